"""Position and merged (FTM + IMU) twins that hold up on walks and scenes they never saw.

The UTT matrix (``utt_data.Data``) feeds the per-AP channels and absolute coordinates, which tie a twin to its
training walks' AP list and floor. Here instead:

* the FTM input is :mod:`twin_store.models.ftm_features` (fix, range Kalman filter, residuals and geometry
  quality; no per-AP column), held on the 10 Hz grid like every window channel;
* positions (inputs and target) are relative to an anchor, the filter's (or, without the ``kf`` group, the
  fix's) position at the window's last step, so the twin learns a correction, not a floor plan;
* every scaler is fitted on the fitting walks only (never on a validation or test walk);
* each fitting walk is augmented with AP-dropout copies (:func:`~twin_store.models.ftm_features.drop_aps`):
  the same walk with APs silenced and readings dropped, its fix and filter recomputed.

One client per fitting walk (its copies included), as in the UTT federation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ingest.readers.ftm import SiteGeometry, Walk, trilaterate
from twin_store.federation.utt_data import HORIZON, STRIDE, WINDOW
from twin_store.models.ftm_features import ALL_GROUPS, FEATURE_GROUPS, drop_aps, row_features
from twin_store.models.ftm_filter import FilterParams, kalman_track
from twin_store.models.multimodal import STEP_MS, build_windows, grid_ends, hold
from twin_store.models.utt import Client, Scaler, TaskTwin, nmse

TASK_FIELDS = {"position": "pos", "tracking": "track"}
SHRINK_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # alpha: 0 = the filter alone, 1 = the twin's full correction


@dataclass(frozen=True)
class PositioningConfig:
    groups: tuple[str, ...] = ALL_GROUPS  # FTM feature groups fed to the twin (ablation: fewer)
    augment: int = 2  # AP-dropout copies per fitting walk (0: none)
    p_ap: float = 0.25  # chance an AP is silenced for a whole copy
    p_reading: float = 0.3  # chance a single reading is dropped
    rounds: int = 10  # federated rounds in selection (the refit trains the rounds each twin kept)
    local_epochs: int = 2
    patience: int = (
        0  # selection stops a twin after this many rounds without a better validation loss (0: off)
    )
    batch: int = 128
    weight_decay: float = 1e-4  # Adam weight decay (regularisation)
    fusers: tuple[str, ...] = ("gating", "concatenation", "average")  # merged twin fusers to choose from
    selection: str = "walk"  # "walk": the held-out walk per scene; "lowo": leave-one-walk-out over the folds
    members: int = 1  # seed ensemble: every twin trained with this many seeds, their corrections averaged
    shrink_grid: tuple[float, ...] = SHRINK_GRID  # the alphas chosen from on validation
    val_copies: int = 2  # AP-dropout copies of each validation walk the shrink alpha is also chosen on


@dataclass
class Tracks:
    """A walk's per-row fix, filter track and row features (computed once per walk or copy)."""

    walk: Walk
    fix: np.ndarray
    kf: np.ndarray
    feats: np.ndarray


def tracks_of(walk: Walk, geo: SiteGeometry, filt: FilterParams, fix: np.ndarray | None = None) -> Tracks:
    fix = trilaterate(walk, geo) if fix is None else fix
    kf = kalman_track(walk, geo, filt)
    return Tracks(walk, fix, kf, row_features(walk, geo, fix, kf))


@dataclass
class PosWindows:
    """Windows of one walk for the positioning twins: inputs before scaling, anchors and targets."""

    ftm: np.ndarray  # (N, T, C) features, positions relative to the anchor, plus a held flag
    imu: np.ndarray  # (N, T, 13)
    mask: np.ndarray  # (N, 3)
    anchor: np.ndarray  # (N, 2)
    pos: np.ndarray  # (N, T, 2) relative to the anchor
    track: np.ndarray  # (N, T, 4)

    @staticmethod
    def concat(parts: list[PosWindows]) -> PosWindows:
        return PosWindows(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    def __len__(self) -> int:
        return len(self.anchor)


_FIELDS = ("ftm", "imu", "mask", "anchor", "pos", "track")


def _columns(groups: tuple[str, ...]) -> list[int]:
    cols: list[int] = []
    k = 0
    for g in ALL_GROUPS:
        n = len(FEATURE_GROUPS[g])
        if g in groups:
            cols.extend(range(k, k + n))
        k += n
    return cols


def anchored(feats: np.ndarray, ok: np.ndarray, groups: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Held row features ``(N, T, 12)`` (absolute positions; ``ok (N, T)`` where a row was held) -> the
    twin's FTM input ``(N, T, C)`` (``groups``' columns, positions relative to the anchor, a held flag) and
    the anchor ``(N, 2)``: the filter's (without ``kf``: the fix's) position at the window's last step.
    The offline windows and the live ones (``multimodal_live``) both go through here."""
    feats = feats.copy()
    anchor_cols = slice(2, 4) if "kf" in groups else slice(0, 2)
    anchor = feats[:, -1, anchor_cols].copy()
    feats[:, :, 0:2] -= anchor[:, None, :]
    feats[:, :, 2:4] -= anchor[:, None, :]
    feats = np.where(ok[:, :, None], feats, 0.0)
    return np.concatenate([feats[:, :, _columns(groups)], ok[:, :, None].astype(float)], axis=-1), anchor


def pos_windows(tr: Tracks, end_ms: np.ndarray, groups: tuple[str, ...]) -> PosWindows:
    w = tr.walk
    win = build_windows(w, w.ap_ids, end_ms, None, None, WINDOW, HORIZON)
    tq = end_ms[:, None] + (np.arange(WINDOW) - (WINDOW - 1)) * STEP_MS
    feats, ok = hold(w.t_ms, tr.feats, tq, 1000.0)
    ftm, anchor = anchored(feats, ok, groups)
    return PosWindows(ftm, win.imu, win.mask, anchor, win.pos - anchor[:, None, :], win.track)


def eval_ends(walk: Walk) -> np.ndarray:
    """Every row time from the walk's first full window: the rows positioning is scored on."""
    return walk.t_ms[walk.t_ms >= walk.t_ms[0] + (WINDOW - 1) * STEP_MS]


class PositionData:
    """Clients (one per fitting walk, with its AP-dropout copies), a validation client (held-out walks) and
    scaled inputs, all normalised with statistics of the fitting walks only."""

    def __init__(
        self,
        tracks: dict[str, Tracks],
        sites: dict[str, SiteGeometry],
        filt: FilterParams,
        fit: list[str],
        val: list[str],
        cfg: PositioningConfig,
        seed: int,
    ) -> None:
        self.cfg, self.tracks = cfg, tracks
        self.fit_windows: dict[str, PosWindows] = {}
        for n in fit:
            base = tracks[n]
            parts = [pos_windows(base, grid_ends(base.walk, WINDOW, STRIDE, HORIZON), cfg.groups)]
            rng = np.random.default_rng([seed, sum(map(ord, n))])
            for _ in range(cfg.augment):
                copy = drop_aps(base.walk, rng, cfg.p_ap, cfg.p_reading)
                tc = tracks_of(copy, sites[copy.scene], filt)
                parts.append(pos_windows(tc, grid_ends(copy, WINDOW, STRIDE, HORIZON), cfg.groups))
            self.fit_windows[n] = PosWindows.concat(parts)
        self.val_windows = PosWindows.concat([self.windows_of(n) for n in val]) if val else None
        everything = PosWindows.concat(list(self.fit_windows.values()))
        self.in_scalers = {"ftm": Scaler.fit(everything.ftm), "imu": Scaler.fit(everything.imu)}
        self.out_scalers = {t: Scaler.fit(getattr(everything, f)) for t, f in TASK_FIELDS.items()}
        self.in_channels = {"ftm": everything.ftm.shape[-1], "imu": everything.imu.shape[-1], "vision": 1}
        self.lengths = {"position": WINDOW, "trajectory": HORIZON, "tracking": WINDOW}

    def windows_of(self, name: str, ends: np.ndarray | None = None) -> PosWindows:
        tr = self.tracks[name]
        at = grid_ends(tr.walk, WINDOW, STRIDE, HORIZON) if ends is None else ends
        return pos_windows(tr, at, self.cfg.groups)

    def inputs(self, w: PosWindows) -> dict[str, torch.Tensor]:
        return {
            "ftm": torch.tensor(self.in_scalers["ftm"].apply(w.ftm), dtype=torch.float32),
            "imu": torch.tensor(self.in_scalers["imu"].apply(w.imu), dtype=torch.float32),
            "vision": torch.zeros(len(w), WINDOW, 1),
            "mask": torch.tensor(w.mask),
        }

    def _client(self, name: str, w: PosWindows, tasks: tuple[str, ...]) -> Client:
        targets = {
            t: torch.tensor(self.out_scalers[t].apply(getattr(w, TASK_FIELDS[t])), dtype=torch.float32)
            for t in tasks
        }
        return Client(name, self.inputs(w), targets)

    def clients(self, tasks: tuple[str, ...]) -> list[Client]:
        return [self._client(n, w, tasks) for n, w in self.fit_windows.items()]

    def val_client(self, tasks: tuple[str, ...]) -> Client | None:
        return self._client("validation", self.val_windows, tasks) if self.val_windows is not None else None

    def predict_rel(self, twin: TaskTwin, w: PosWindows) -> np.ndarray:
        task = twin.lineage.task
        return self.out_scalers[task].invert(twin.predict(self.inputs(w)).numpy())

    def corrections(self, twin: TaskTwin, name: str) -> tuple[np.ndarray, np.ndarray]:
        """At every scored row of walk ``name``: the anchor (the filter's position) and the twin's correction
        of it (its position at the window's last step, relative to the anchor)."""
        w = self.windows_of(name, eval_ends(self.tracks[name].walk))
        return w.anchor, self.predict_rel(twin, w)[:, -1]

    def positions(self, twin: TaskTwin, name: str, alpha: float = 1.0) -> np.ndarray:
        """The twin's absolute position at every scored row of walk ``name``: anchor + alpha * correction."""
        anchor, rel = self.corrections(twin, name)
        return anchor + alpha * rel

    def nmse(self, twin: TaskTwin, w: PosWindows | None) -> float:
        """NMSE of the twin's task on windows ``w`` (positions absolute: prediction and truth + anchor)."""
        if w is None or len(w) == 0:
            return math.nan
        field = TASK_FIELDS[twin.lineage.task]
        pred, true = self.predict_rel(twin, w), getattr(w, field)
        if field == "pos":
            pred, true = pred + w.anchor[:, None, :], true + w.anchor[:, None, :]
        return nmse(pred, true)
