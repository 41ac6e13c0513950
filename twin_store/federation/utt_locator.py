"""The generalising merged (FTM + IMU) positioning twin, packed to run anywhere: ``nettwin twin position``
stores it, the live windows (``stream_processors/multimodal_live.py``) load it.

A :class:`Locator` holds what positioning a window needs besides the window: the merged twin, or the
ensemble of merged twins (one per fuser, sharing the frozen Position and tracking encoders) whose mean
correction is used when the validation walks preferred it, times ``arch["members"]`` seed-ensemble members
(each with its own encoders; the mean correction over all of them), the scalers fitted on the training walks, the feature groups, the
range Kalman filter's constants (the live windower runs the filter with them) and the shrink ``alpha`` chosen
on the validation walks. A window's position is ``anchor + alpha * correction``: the anchor is the filter's
position at the window's last step, so ``alpha = 0`` is the filter itself.

Stored as two files side by side: ``<stem>.pt`` (weights) and ``<stem>.json`` (everything else).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twin_store.federation.utt_positioning import anchored
from twin_store.models.ftm_filter import FilterParams
from twin_store.models.utt import Lineage, Scaler, TaskTwin, merge, new_twin

STEM = "positioning"  # <state_dir>/utt/positioning.{pt,json}


def build_merged(
    fusers: list[str], in_channels: dict[str, int], lengths: dict[str, int], d: int, seed: int
) -> list[TaskTwin]:
    """One merge per fuser of the same Position twin (FTM features) and tracking twin (IMU), untrained."""
    pos = new_twin("position/ftm", "position", ["ftm"], in_channels, lengths, d, seed=seed)
    trk = new_twin("tracking/imu", "tracking", ["imu"], in_channels, lengths, d, seed=seed)
    return [
        merge([pos, trk], f"position<-position+tracking/{fz}", "position", fz, lengths, seed) for fz in fusers
    ]


@dataclass
class Locator:
    twins: list[TaskTwin]  # one merged twin, or an ensemble (their corrections are averaged)
    scalers: dict[str, Scaler]  # "ftm", "imu" (inputs) and "position" (output), fitted on training walks
    filter: FilterParams
    groups: tuple[str, ...]
    alpha: float
    arch: dict[
        str, Any
    ]  # fusers, in_channels, lengths, d, seed: what rebuilds the twins to load their weights
    metrics: dict[str, Any] = field(default_factory=dict)

    def locate(
        self, feats: np.ndarray, ok: np.ndarray, imu: np.ndarray, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Windows' held row features ``(N, T, 12)`` with ``ok (N, T)``, IMU ``(N, T, 13)`` and modality mask
        ``(N, 3)`` -> (position ``(N, 2)``, the filter's position ``(N, 2)``) at each window's last step."""
        ftm, anchor = anchored(feats, ok, self.groups)
        if not len(ftm):
            return np.empty((0, 2)), np.empty((0, 2))
        inputs = {
            "ftm": torch.tensor(self.scalers["ftm"].apply(ftm), dtype=torch.float32),
            "imu": torch.tensor(self.scalers["imu"].apply(imu), dtype=torch.float32),
            "vision": torch.zeros(len(ftm), ftm.shape[1], 1),
            "mask": torch.tensor(np.asarray(mask, dtype=bool)),
        }
        rels = [self.scalers["position"].invert(t.predict(inputs).numpy())[:, -1] for t in self.twins]
        return anchor + self.alpha * np.mean(rels, axis=0), anchor

    @property
    def twin_id(self) -> str:
        return "+".join(t.lineage.twin_id for t in self.twins)

    @property
    def version(self) -> int:
        """The stored twin's version (``nettwin twin position`` writes it in its ``twin`` row)."""
        return max((t.lineage.version for t in self.twins), default=0)

    def save(self, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        torch.save([t.state_dict() for t in self.twins], root / f"{STEM}.pt")
        meta = {
            "lineage": [asdict(t.lineage) for t in self.twins],
            "scalers": {k: v.as_dict() for k, v in self.scalers.items()},
            "filter": asdict(self.filter),
            "groups": list(self.groups),
            "alpha": self.alpha,
            "arch": self.arch,
            "metrics": self.metrics,
        }
        path = root / f"{STEM}.json"
        path.write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, root: Path) -> Locator:
        """The locator stored under ``root``; OSError/ValueError/KeyError/RuntimeError if absent or unusable."""
        meta = json.loads((root / f"{STEM}.json").read_text())
        arch = meta["arch"]
        twins = [  # a seed ensemble: each member its own Position and tracking encoders (member-major order)
            twin
            for k in range(int(arch.get("members", 1)))
            for twin in build_merged(
                arch["fusers"], arch["in_channels"], arch["lengths"], arch["d"], arch["seed"] + k
            )
        ]
        states = torch.load(root / f"{STEM}.pt", weights_only=True)
        for twin, state, lineage in zip(twins, states, meta["lineage"], strict=True):
            twin.load_state_dict(state)
            twin.lineage = Lineage(**lineage)
        scalers = {k: Scaler(np.asarray(v["mean"]), np.asarray(v["std"])) for k, v in meta["scalers"].items()}
        return cls(
            twins,
            scalers,
            FilterParams(**meta["filter"]),
            tuple(meta["groups"]),
            float(meta["alpha"]),
            arch,
            meta.get("metrics", {}),
        )
