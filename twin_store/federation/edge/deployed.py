"""A learned association trained for one deployment, saved to a file and used by the running ledger.

``nettwin bench diten --milan DIR --save-agent FILE`` trains PPO on the deployment (its sites, BSs and data
sizes) and saves the actor with what its features need (the sites' caps and energies, the feature scale,
the energy constants). ``edge.policy = "learned"`` with ``edge.learned_model = FILE`` makes the ledger
service place BSs with it. The file holds tensors and plain numbers only (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twin_store.federation.edge.costs import Array, DitenParams
from twin_store.federation.edge.features import FEATURES, pair_features
from twin_store.federation.edge.simulator import FeatureScale, IntArray, Servers, SlotContext
from twin_store.models.diten_agents import ActorCritic, MeanFieldActor

FORMAT = "nettwin-diten-agent-1"


def save_agent(
    path: Path,
    agent: ActorCritic,
    servers: Servers,
    scale: FeatureScale,
    params: DitenParams,
    twin_size: float,
) -> None:
    torch.save(
        {
            "format": FORMAT,
            "actor": agent.actor.state_dict(),
            "distance_prior": agent.cfg.distance_prior,
            "hidden": agent.cfg.hidden,
            "servers": {k: np.asarray(v).tolist() for k, v in asdict(servers).items()},
            "scale": asdict(scale),
            "params": asdict(params),
            "twin_size": twin_size,
        },
        path,
    )


class LearnedAssociation:
    """The saved actor as the ledger's chooser: (distance, samples, previous site) -> site per BS."""

    def __init__(self, path: Path) -> None:
        try:
            saved: dict[str, Any] = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            raise ValueError(f"{path}: not a saved association model ({exc})") from exc
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"{path}: not a saved association model (format {FORMAT})")
        self.actor = MeanFieldActor(FEATURES, int(saved["hidden"]), float(saved["distance_prior"]))
        self.actor.load_state_dict(saved["actor"])
        self.servers = Servers(**{k: np.asarray(v, dtype=float) for k, v in saved["servers"].items()})
        self.scale = FeatureScale(**saved["scale"])
        self.params = DitenParams(**saved["params"])
        self.twin_size = float(saved["twin_size"])

    @property
    def sites(self) -> int:
        return self.servers.count

    def __call__(self, distance: Array, samples: Array, previous: IntArray) -> IntArray:
        if distance.shape[1] != self.servers.count:
            raise ValueError(
                f"the model was trained for {self.servers.count} sites, the deployment has {distance.shape[1]}"
            )
        ctx = SlotContext(
            t=0,
            position=np.zeros((len(samples), 2)),
            distance=distance,
            samples=samples,
            prev_samples=samples,
            prev_host=previous,
            twin_size=np.full(len(samples), self.twin_size),
            phi=0.0,
        )
        x = pair_features(self.servers, ctx, self.params, None, self.scale)
        with torch.no_grad():
            logits = self.actor(torch.from_numpy(x))
        return logits.argmax(-1).numpy().astype(np.int64)
