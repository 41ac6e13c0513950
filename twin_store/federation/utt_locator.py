"""The generalising merged (FTM + IMU) positioning twin, packed to run anywhere: ``nettwin twin position``
stores it, the live windows (``stream_processors/multimodal_live.py``) load it.

A :class:`Locator` holds what positioning a window needs besides the window: the merged twin (its frozen
Position and tracking encoders included), the scalers fitted on the training walks, the feature groups, the
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
    fuser: str, in_channels: dict[str, int], lengths: dict[str, int], d: int, seed: int
) -> tuple[TaskTwin, TaskTwin, TaskTwin]:
    """The Position twin (FTM features), the tracking twin (IMU) and their merge, untrained."""
    pos = new_twin("position/ftm", "position", ["ftm"], in_channels, lengths, d, seed=seed)
    trk = new_twin("tracking/imu", "tracking", ["imu"], in_channels, lengths, d, seed=seed)
    merged = merge([pos, trk], f"position<-position+tracking/{fuser}", "position", fuser, lengths, seed)
    return pos, trk, merged


@dataclass
class Locator:
    twin: TaskTwin
    scalers: dict[str, Scaler]  # "ftm", "imu" (inputs) and "position" (output), fitted on training walks
    filter: FilterParams
    groups: tuple[str, ...]
    alpha: float
    arch: dict[str, Any]  # fuser, in_channels, lengths, d, seed: what rebuilds the twin to load its weights
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
        rel = self.scalers["position"].invert(self.twin.predict(inputs).numpy())[:, -1]
        return anchor + self.alpha * rel, anchor

    def save(self, root: Path) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        torch.save(self.twin.state_dict(), root / f"{STEM}.pt")
        meta = {
            "lineage": asdict(self.twin.lineage),
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
        _, _, twin = build_merged(
            arch["fuser"], arch["in_channels"], arch["lengths"], arch["d"], arch["seed"]
        )
        twin.load_state_dict(torch.load(root / f"{STEM}.pt", weights_only=True))
        twin.lineage = Lineage(**meta["lineage"])
        scalers = {k: Scaler(np.asarray(v["mean"]), np.asarray(v["std"])) for k, v in meta["scalers"].items()}
        return cls(
            twin,
            scalers,
            FilterParams(**meta["filter"]),
            tuple(meta["groups"]),
            float(meta["alpha"]),
            arch,
            meta.get("metrics", {}),
        )
