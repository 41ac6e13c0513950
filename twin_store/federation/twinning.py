"""Twin aggregation, pure: FedAvg, cluster twins (C-NDT) with member moves, and the H-twinning global (G-NDT).

Nothing here knows about Kafka or InfluxDB: the live store and the offline benchmark drive the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ingest.errors import Stopped
from twin_store.models.forecaster import FitConfig, TwinModel


def fedavg(params: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sample-weighted mean of ``[k, P]`` parameter vectors."""
    w = weights.to(params.dtype)
    return (w / w.sum()) @ params  # one BLAS pass: clusters of thousands of members re-aggregate per update


def epsilon(a_cluster: torch.Tensor, a_global: torch.Tensor) -> float:
    """H-twinning's divergence: mean squared parameter difference."""
    return float(((a_cluster - a_global) ** 2).mean())


class Labels(dict[int, int]):
    """square -> cluster id, counting its changes so that each cluster's member list is sorted once per
    change of the membership instead of by a scan of every square at every update (10,000 squares: ~20 ms of
    the store's time per update)."""

    changes = 0

    def _changed(self) -> None:
        self.changes += 1

    def __setitem__(self, key: int, value: int) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: int) -> None:
        super().__delitem__(key)
        self._changed()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args: Any) -> Any:
        self._changed()
        return super().pop(*args)

    def popitem(self) -> tuple[int, int]:
        self._changed()
        return super().popitem()

    def setdefault(self, key: int, default: int = 0) -> int:
        self._changed()
        return super().setdefault(key, default)

    def clear(self) -> None:
        super().clear()
        self._changed()

    def __ior__(self, other: Any) -> Labels:  # type: ignore[override,misc]
        self.update(other)
        return self


@dataclass
class ClusterTwins:
    """Cluster twins = sample-weighted FedAvg of the latest accepted local update of each member.

    A member without an accepted update yet does not count. When a BS moves cluster its latest update
    moves with it and both clusters are re-aggregated (the reference code left it behind).
    """

    labels: dict[int, int]  # square -> cluster id
    twins: dict[int, torch.Tensor]  # cluster id -> parameter vector
    latest: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)  # square -> (params, samples)
    versions: dict[int, int] = field(default_factory=dict)
    # (members' updates [k, P], their sample counts [k], the cluster twin now) -> the new cluster twin;
    # None: FedAvg. A robust aggregator of twin_store/federation/screening plugs in here.
    aggregator: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # cid -> (members with an update, their entries of ``latest``, stacked params, weights): an accept in a
    # cluster of k members rewrites one row instead of stacking k vectors again (same rows, same floats)
    _stacks: dict[int, tuple[list[int], list[Any], torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # cid -> sorted members, as of ``labels`` at (its identity, its change count)
    _members: tuple[Labels | None, int, dict[int, list[int]]] = field(
        default=(None, -1, {}), repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.labels, Labels):
            self.labels = Labels(self.labels)

    def members(self, cid: int) -> list[int]:
        labels = self.labels
        if not isinstance(labels, Labels):  # replaced by a plain dict: no change count to trust
            return sorted(s for s, c in labels.items() if c == cid)
        seen, changes, index = self._members
        if seen is not labels or changes != labels.changes:
            index = {}
            for s, c in labels.items():
                index.setdefault(c, []).append(s)
            for group in index.values():
                group.sort()
            self._members = (labels, labels.changes, index)
        return list(index.get(cid, ()))

    def samples(self, cid: int) -> int:
        return sum(self.latest[s][1] for s in self.members(cid) if s in self.latest)

    def accept(self, square: int, params: torch.Tensor, n_samples: int) -> int:
        """Record a local update and re-aggregate its cluster; return the cluster id."""
        self.latest[square] = (params, n_samples)
        cid = self.labels[square]
        self.aggregate(cid)
        return cid

    def evict(self, square: int, fallback: torch.Tensor) -> int | None:
        """Drop a member's latest update from its cluster twin (a BS caught attacking: what it sent before
        it was caught is suspect too); return the re-aggregated cluster, or None if there was nothing.
        A cluster left without updates falls back to ``fallback`` (the global twin)."""
        if self.latest.pop(square, None) is None:
            return None
        cid = self.labels[square]
        if any(s in self.latest for s in self.members(cid)):
            self.aggregate(cid)
        else:
            self.twins[cid] = fallback.clone()
            self.versions[cid] = self.versions.get(cid, 0) + 1
        return cid

    def aggregate(self, cid: int) -> None:
        have = [s for s in self.members(cid) if s in self.latest]
        if not have:
            return
        stack, weights = self._stack(cid, have)
        if self.aggregator is None or cid not in self.twins:
            self.twins[cid] = fedavg(stack, weights)
        else:
            self.twins[cid] = self.aggregator(stack, weights, self.twins[cid])
        self.versions[cid] = self.versions.get(cid, 0) + 1

    def _stack(self, cid: int, have: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' latest params ``[k, P]`` and sample counts ``[k]``, rows in ``have``'s order."""
        entries = [self.latest[s] for s in have]
        cached = self._stacks.get(cid)
        first = entries[0][0]
        if (
            cached is None
            or cached[0] != have
            or cached[2].shape[1:] != first.shape
            or cached[2].dtype != first.dtype
        ):
            stack = torch.stack([params for params, _ in entries])
            weights = torch.tensor([n for _, n in entries], dtype=torch.float32)
        else:
            _, before, stack, weights = cached
            for row, (entry, old) in enumerate(zip(entries, before, strict=True)):
                if entry is not old:  # ``latest`` holds a new (params, samples) for this member
                    stack[row] = entry[0]
                    weights[row] = float(entry[1])
        self._stacks[cid] = (have, entries, stack, weights)
        return stack, weights

    def move(self, square: int, new_cid: int, fallback: torch.Tensor) -> None:
        """Move a member; a brand-new cluster starts from ``fallback`` (e.g. the global twin)."""
        old = self.labels.get(square)
        if old == new_cid:
            return
        self.labels[square] = new_cid
        if new_cid not in self.twins:
            self.twins[new_cid] = fallback.clone()
        for cid in (old, new_cid):
            if cid is not None:
                self.aggregate(cid)


@dataclass
class GlobalTwin:
    """The G-NDT, kept current asynchronously: a cluster change is merged only if it diverged enough.

    After a cluster twin changes: ``eps = mean((a_c - a_G)^2)``; if ``eps > psi`` then
    ``a_G <- a_G + gamma_c (a_c - a_G)`` and the version is bumped (one synchronisation).
    ``psi = 0`` merges every change: synchronous updating.
    """

    params: torch.Tensor
    psi: float
    version: int = 0
    syncs: int = 0
    offers: int = 0
    last_epsilon: float = 0.0  # eps of the latest offer

    def offer(self, cluster_params: torch.Tensor, gamma: float) -> bool:
        self.offers += 1
        eps = self.last_epsilon = epsilon(cluster_params, self.params)
        if eps <= self.psi:
            return False
        self.params = self.params + gamma * (cluster_params - self.params)
        self.version += 1
        self.syncs += 1
        return True


@dataclass
class VTwinResult:
    global_params: torch.Tensor
    clusters: ClusterTwins
    rounds: int
    uploads: int
    downloads: int
    losses: list[float]  # mean local training loss per round


def v_twinning(
    model: TwinModel,
    squares: np.ndarray,
    labels: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    init: torch.Tensor,
    rounds: int,
    participation: float,
    fit: FitConfig,
    gen: torch.Generator,
    rng: np.random.Generator,
    counts: np.ndarray | None = None,
    after_round: Callable[[VTwinResult], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> VTwinResult:
    """Synchronous V-twinning: rounds with a barrier over the participating BSs.

    Each round the participants train from their cluster twin on their own samples (``x [S, N, 10]``,
    ``y [S, N]``), every cluster twin becomes the FedAvg of its members' latest updates, and the global twin
    the FedAvg of the cluster twins weighted by their samples.

    ``counts [S]`` (optional): BS s has only its first ``counts[s]`` samples (series with gaps or late clocks,
    compacted to the front); it draws minibatches from those and weighs its update by them. A BS with 0 samples
    never takes part. None: every BS has all ``N`` samples. ``after_round`` (optional) sees the result after
    every round (e.g. to keep the round with the lowest validation error; copy what it keeps). ``stop``
    (optional) is asked before every round and every minibatch step of it: True raises ``ingest.errors.Stopped``
    and nothing of the unfinished V-twinning is returned.
    """
    cluster_ids = sorted(set(labels.tolist()))
    ctwins = ClusterTwins(
        labels={int(s): int(c) for s, c in zip(squares, labels, strict=True)},
        twins={c: init.clone() for c in cluster_ids},
    )
    result = VTwinResult(init.clone(), ctwins, 0, 0, 0, [])
    n_samples = int(x.shape[1])
    have = np.full(len(squares), n_samples) if counts is None else np.asarray(counts, dtype=np.int64)
    for _ in range(rounds):
        if stop is not None and stop():
            raise Stopped("V-twinning stopped")
        part = np.flatnonzero(rng.random(len(squares)) < participation)
        if counts is not None:
            part = part[have[part] > 0]
        if part.size == 0:
            continue
        start = torch.stack([ctwins.twins[ctwins.labels[int(squares[i])]] for i in part])
        limit = None if counts is None else torch.as_tensor(have[part])
        new, loss = model.fit(start, x[part], y[part], fit, gen, counts=limit, stop=stop)
        for k, i in enumerate(part):
            ctwins.latest[int(squares[i])] = (new[k], int(have[i]))
        for c in cluster_ids:  # the barrier: every cluster aggregates, then the global
            ctwins.aggregate(c)
        weights = torch.tensor([max(ctwins.samples(c), 1) for c in cluster_ids], dtype=torch.float32)
        result.global_params = fedavg(torch.stack([ctwins.twins[c] for c in cluster_ids]), weights)
        result.rounds += 1
        result.uploads += int(part.size)
        result.downloads += int(part.size)
        result.losses.append(float(loss.mean()))
        if after_round is not None:
            after_round(result)
    return result
