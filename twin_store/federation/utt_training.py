"""Federated training of UTT twins across local-area twins (one client per walk area).

Each round every client trains from the global flat parameter vector; every upload is screened and the
accepted ones aggregated by a ``twin_store.federation.screening`` defense (default ``mean``:
sample-weighted FedAvg), which makes a new version. The version with the best validation loss wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from twin_store.federation.screening import Candidate, make_defense
from twin_store.models.utt import Client, Lineage, flat, load_flat


@dataclass(frozen=True)
class FedConfig:
    rounds: int = 20
    local_epochs: int = 1
    lr: float = 3e-3
    batch: int = 64
    seed: int = 0
    weight_decay: float = 0.0  # L2 on the trained parameters (Adam's weight_decay); 0 = none
    patience: int = 0  # stop after this many rounds without a better validation loss (0: run every round)
    defense: str = (
        "mean"  # a twin_store.federation.screening defense: screens each client update, then aggregates
    )


@dataclass
class FedResult:
    version: int  # aggregations (versions) up to and including the one kept
    best_round: int
    val_curve: list[float]
    train_s: float
    comm_s: float
    comm_bytes: int
    n_params: int
    defense: str = "mean"
    accepted: int = 0  # client updates the defense let in, over all rounds
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)  # every client upload with the defense's decision


@dataclass(frozen=True)
class Upload:
    """One client upload and the defense's verdict on it (what an ``update`` row records)."""

    client: str
    round: int
    base_version: int  # the global version the client trained from
    accepted: bool
    norm: float  # |upload - global|
    score: float
    reason: str
    time_ns: int  # when it was screened


class Federated(Protocol):
    """What :func:`fed_train` trains: a trainable parameter list and a loss on a client's rows."""

    lineage: Lineage

    def trainable(self) -> list[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def local_state(self, client: Client) -> Any:
        """What the loss starts from for this client (e.g. frozen parts' outputs, computed once)."""
        ...

    def local_loss(self, state: Any, idx: torch.Tensor | None) -> torch.Tensor:
        """Loss on rows ``idx`` of a client's state (all rows when None)."""
        ...


def _exchange(vec: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Serialise a parameter vector to bytes and back: what a client download or upload costs."""
    payload = vec.numpy().astype(np.float32).tobytes()
    return torch.from_numpy(np.frombuffer(payload, dtype=np.float32).copy()), len(payload)


def fed_train(model: Federated, clients: list[Client], val: Client | None, cfg: FedConfig) -> FedResult:
    """Federated rounds across ``clients`` (local-area twins) with the twin store's aggregation machinery.

    Each round every client trains from the global parameter vector; each upload is a
    :class:`~twin_store.federation.screening.Candidate` screened by ``cfg.defense`` (``make_defense``), and the
    accepted ones are combined by the defense's ``aggregate`` (``mean``: sample-weighted FedAvg) into the
    next version. The version with the lowest validation loss is kept.
    """
    defense = make_defense(cfg.defense)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = model.trainable()
    glob = flat(params)
    states = [model.local_state(c) for c in clients]
    val_state = model.local_state(val) if val is not None else None
    sizes = [len(c) for c in clients]
    members = tuple(range(len(clients)))
    best = (math.inf, glob.clone(), 0, 0)
    curve: list[float] = []
    version, accepted, quarantined = 0, 0, 0
    reasons: dict[str, int] = {}
    log: list[Upload] = []
    comm_s, comm_bytes, t0 = 0.0, 0, time.perf_counter()
    for rnd in range(1, cfg.rounds + 1):
        uploads: list[torch.Tensor] = []
        weights: list[float] = []
        for k, (state, n) in enumerate(zip(states, sizes, strict=True)):
            tc = time.perf_counter()
            down, nb = _exchange(glob)
            comm_s += time.perf_counter() - tc
            comm_bytes += nb
            load_flat(params, down)
            opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            model.train()
            last = math.nan
            for _ in range(cfg.local_epochs):
                perm = torch.randperm(n, generator=gen)
                for i in range(0, n, cfg.batch):
                    loss = model.local_loss(state, perm[i : i + cfg.batch])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    last = float(loss.detach())
            tc = time.perf_counter()
            up, nb = _exchange(flat(params))
            comm_s += time.perf_counter() - tc
            comm_bytes += nb
            verdict = defense.screen(Candidate(k, 0, up, glob, members, n, last, rnd))
            log.append(Upload(clients[k].name, rnd, version, verdict.accepted, verdict.norm,
                              verdict.score, verdict.reason, time.time_ns()))  # fmt: skip
            if verdict.accepted:
                uploads.append(up)
                weights.append(float(n))
                accepted += 1
            else:
                quarantined += 1
                reasons[verdict.reason] = reasons.get(verdict.reason, 0) + 1
        if uploads:  # a round whose every update was quarantined leaves the twin (and its version) as is
            glob = defense.aggregate(torch.stack(uploads), torch.tensor(weights), glob)
            version += 1
        if val_state is not None:
            load_flat(params, glob)
            model.eval()
            with torch.no_grad():
                vloss = float(model.local_loss(val_state, None))
            curve.append(vloss)
            if vloss < best[0]:
                best = (vloss, glob.clone(), rnd, version)
            elif cfg.patience and rnd - best[2] >= cfg.patience:
                break  # early stopping: the validation loss has not improved for `patience` rounds
        else:
            best = (math.nan, glob.clone(), rnd, version)
    load_flat(params, best[1])
    model.lineage.version = best[3]
    train_s = time.perf_counter() - t0 - comm_s
    return FedResult(
        best[3], best[2], curve, train_s, comm_s, comm_bytes, int(glob.numel()),
        cfg.defense, accepted, quarantined, reasons, log,
    )  # fmt: skip
