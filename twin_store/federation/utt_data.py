"""UTT data on real FTM/IMU walks (+ the SIMULATED vision modality): the walk-level split, windows per
walk, and the clients of federated training. Shared by ``nettwin twin`` and ``bench/utt.py``.

Split: walks with ground truth are grouped by (scene, device); the last walk (by name) of every group with
at least two walks is a test walk, never seen in training; the rest are training walks. Validation (early
stopping, fuser choice, tuning) is on **held-out walks**: in every scene with at least two training walks,
the last training walk (by name) is a validation walk, and the twins fit on the others (one federated client
each: a local-area twin). Only when no scene has two training walks does validation fall back to blocks 2 and
5 of 8 (in time) of the training walks, and the report says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ingest.errors import InputError
from ingest.readers.ftm import SiteGeometry, Walk, discover, read_walk, recover_ap_positions, trilaterate
from ingest.readers.simulated_vision import (
    SimulatedDetections,
    camera_for_scene,
    seed_for,
    simulate_detections,
)
from twin_store.models.multimodal import STEP_MS, Windows, build_windows, grid_ends
from twin_store.models.utt import FUSERS, TASKS, Client, Scaler, TaskTwin

WINDOW, HORIZON, STRIDE = 20, 10, 5
INPUTS = ("ftm", "imu", "vision")


@dataclass(frozen=True)
class UttConfig:
    seed: int = 1
    rounds: int = 20
    local_epochs: int = 2
    d: int = 32
    fusers: tuple[str, ...] = FUSERS
    test_walks: tuple[str, ...] = ()  # default: the last walk of each (scene, device) group
    threads: int = 1
    defense: str = "mean"  # twin_store.federation.screening defense of every federated aggregation
    unified_fusers: tuple[str, ...] = ("gating", "concatenation")  # one unified model per fuser
    seed_repeats: int = 3  # merges of seed_fusers trained this many times (other init/minibatch seeds)
    seed_fusers: tuple[str, ...] = ("gating", "concatenation")
    ablation: bool = False  # bench utt: also refit the merged positioning twin with inputs left out
    validation: str = "walk"  # "walk": held-out walks per scene; "blocks": blocks 2 and 5 of 8 of each walk
    patience: int = 0  # early stopping: rounds without a better validation loss before a twin stops (0: off)


@dataclass
class Prepared:
    walks: dict[str, Walk]
    geometry: dict[str, SiteGeometry]
    vision: dict[str, SimulatedDetections]
    train: list[str]
    test: list[str]
    unlabelled: list[str]
    skipped: dict[str, str]
    ap_ids: list[str]
    fixes: dict[str, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)
    val: list[str] = field(default_factory=list)  # held-out validation walks (a subset of ``train``)

    @property
    def fit(self) -> list[str]:
        """The training walks the twins fit on (training walks minus the validation walks)."""
        return [n for n in self.train if n not in self.val]

    def validation_rule(self) -> str:
        if self.val:
            return "held-out walks (the last training walk of every scene with two or more): " + ", ".join(
                self.val
            )
        return "blocks 2 and 5 of 8 (in time) of each training walk (no scene has two training walks)"


def split_walks(walks: list[Walk], test_names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    labelled = [w for w in walks if w.gt is not None]
    names = {w.name for w in labelled}
    if test_names:
        unknown = [t for t in test_names if t not in names]
        if unknown:
            raise InputError(f"--test-walks: {', '.join(unknown)} is not a walk with ground truth")
        test = sorted(test_names)
    else:
        groups: dict[tuple[str, str], list[str]] = {}
        for w in labelled:
            groups.setdefault((w.scene, w.device), []).append(w.name)
        test = sorted(sorted(g)[-1] for g in groups.values() if len(g) >= 2)
    train = sorted(names - set(test))
    if not test or not train:
        raise InputError(
            f"{len(labelled)} walks have ground truth: need at least one training and one test walk "
            "(two walks of one scene and device, or --test-walks)"
        )
    return train, test


def validation_walks(walks: dict[str, Walk], train: list[str]) -> list[str]:
    """The last training walk (by name) of every scene with at least two training walks."""
    per_scene: dict[str, list[str]] = {}
    for n in train:
        per_scene.setdefault(walks[n].scene, []).append(n)
    return sorted(sorted(g)[-1] for g in per_scene.values() if len(g) >= 2)


def prepare(data: list[Path], cfg: UttConfig) -> Prepared:
    t0 = time.perf_counter()
    found = discover(data)
    walks = {w.name: w for w in (read_walk(p) for p in found.walks)}
    t_read = time.perf_counter() - t0
    train, test = split_walks(list(walks.values()), cfg.test_walks)
    labelled = train + test
    unlabelled = sorted(set(walks) - set(labelled))
    geometry: dict[str, SiteGeometry] = {}
    for scene in sorted({walks[n].scene for n in labelled}):
        geometry[scene] = recover_ap_positions(
            [walks[n] for n in labelled if walks[n].scene == scene], found.site_files.get(scene, [])
        )
    t_geo = time.perf_counter() - t0 - t_read
    vision: dict[str, SimulatedDetections] = {}
    for scene in geometry:
        names = [n for n in labelled if walks[n].scene == scene]
        pts = np.concatenate([walks[n].gt for n in names if walks[n].gt is not None])
        cam = camera_for_scene(pts)
        for n in names:
            w = walks[n]
            assert w.gt is not None
            vision[n] = simulate_detections(w.t_ms, w.gt, cam, seed_for(cfg.seed, n), scene_points=pts)
    ap_ids = sorted({a for n in labelled for a in walks[n].ap_ids}, key=lambda a: (len(a), a))
    skipped = {str(p.name): r for p, r in found.skipped.items()}
    fixes = {n: trilaterate(walks[n], geometry[walks[n].scene]) for n in labelled}
    prep = Prepared(walks, geometry, vision, train, test, unlabelled, skipped, ap_ids, fixes)
    if cfg.validation == "walk":
        prep.val = validation_walks(walks, train)
    elif cfg.validation != "blocks":
        raise InputError(f"validation {cfg.validation!r}: one of walk, blocks")
    prep.timings = {
        "read_s": round(t_read, 2),
        "ap_recovery_s": round(t_geo, 3),
        "vision_sim_s": round(time.perf_counter() - t0 - t_read - t_geo, 3),
    }
    return prep


def _val_mask(w: Windows, walk: Walk) -> np.ndarray:
    """Validation = windows wholly inside blocks 2 and 5 of 8 (in time) of their walk; the caller drops
    windows that straddle a block edge."""
    t0, t1 = walk.t_ms[0], walk.t_ms[-1]
    block = np.floor((w.end_ms - t0) / (t1 - t0 + 1e-9) * 8).astype(int)
    return np.isin(block, (2, 5))


def _straddles(w: Windows, walk: Walk) -> np.ndarray:
    t0, t1 = walk.t_ms[0], walk.t_ms[-1]
    start = w.end_ms - (WINDOW - 1 + HORIZON) * STEP_MS
    b_end = np.floor((w.end_ms + HORIZON * STEP_MS - t0) / (t1 - t0 + 1e-9) * 8)
    b_start = np.floor((start - t0) / (t1 - t0 + 1e-9) * 8)
    return b_end != b_start


class Data:
    """Windows as tensors, normalised with statistics of the fitting walks only (never validation or test)."""

    def __init__(self, prep: Prepared) -> None:
        self.prep = prep
        parts_train: dict[str, Windows] = {}
        parts_val: list[Windows] = []

        def windows(n: str, ends: np.ndarray | None = None) -> Windows:
            """Walk ``n``'s windows ending at ``ends`` (default: the regular grid)."""
            w = prep.walks[n]
            at = grid_ends(w, WINDOW, STRIDE, HORIZON) if ends is None else ends
            return build_windows(w, prep.ap_ids, at, prep.vision[n], prep.fixes[n], WINDOW, HORIZON)

        if prep.val:  # held-out walks: fit on the others, validate on these whole walks
            parts_train = {n: windows(n) for n in prep.fit}
            parts_val = [windows(n) for n in prep.val]
        for n in [] if prep.val else prep.train:
            w = prep.walks[n]
            win = windows(n)
            keep = ~_straddles(win, w)
            val = _val_mask(win, w) & keep
            parts_train[n] = win.take(np.flatnonzero(keep & ~val))
            parts_val.append(win.take(np.flatnonzero(val)))
        self.train = parts_train
        self.val = Windows.concat(parts_val)
        self.test_grid: dict[str, Windows] = {}
        self.test_rows: dict[str, Windows] = {}
        for n in prep.test:
            w = prep.walks[n]
            self.test_grid[n] = windows(n)
            self.test_rows[n] = windows(n, w.t_ms[w.t_ms >= w.t_ms[0] + (WINDOW - 1) * STEP_MS])
        all_train = Windows.concat(list(parts_train.values()))
        self.in_scalers = {m: Scaler.fit(getattr(all_train, m)) for m in INPUTS}
        self.out_scalers = {t: Scaler.fit(getattr(all_train, TASKS[t][0])) for t in TASKS}
        self.in_channels = {m: getattr(all_train, m).shape[-1] for m in INPUTS}
        self.lengths = {"position": WINDOW, "trajectory": HORIZON, "tracking": WINDOW}

    def inputs(self, w: Windows) -> dict[str, torch.Tensor]:
        out = {m: torch.tensor(self.in_scalers[m].apply(getattr(w, m)), dtype=torch.float32) for m in INPUTS}
        out["mask"] = torch.tensor(w.mask)
        return out

    def target(self, w: Windows, task: str) -> torch.Tensor:
        return torch.tensor(self.out_scalers[task].apply(getattr(w, TASKS[task][0])), dtype=torch.float32)

    def _client(self, name: str, w: Windows, tasks: tuple[str, ...]) -> Client:
        return Client(name, self.inputs(w), {t: self.target(w, t) for t in tasks})

    def clients(self, tasks: tuple[str, ...]) -> list[Client]:
        """One client per training walk (a local-area twin) with the targets of ``tasks``."""
        return [self._client(n, w, tasks) for n, w in self.train.items()]

    def val_client(self, tasks: tuple[str, ...]) -> Client:
        return self._client("validation", self.val, tasks)

    def predict(self, twin: TaskTwin, w: Windows) -> np.ndarray:
        pred = twin.predict(self.inputs(w)).numpy()
        return self.out_scalers[twin.lineage.task].invert(pred)
