"""Time-aligned multimodal windows (FTM, IMU, simulated vision) of one walk, pure numpy.

Every modality is resampled onto a 10 Hz grid by holding its latest reading (a reading older than
``max_age_ms`` counts as missing), and cut into windows of ``window`` steps ending at given times. A window
carries a per-modality mask: a modality is present when at least ``min_present`` of its steps have data, so a
model can skip a missing camera or a silent FTM radio instead of reading zeros as data.

Targets, when the walk has ground truth: positions over the window, positions over the next ``horizon`` steps
(trajectory), and motion/orientation over the window (tracking: ground-truth velocity and the IMU azimuth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.readers.ftm import Walk
from ingest.readers.simulated_vision import SimulatedDetections

STEP_MS = 100.0
MODALITIES = ("ftm", "imu", "vision")
TRACK_CHANNELS = ("vx", "vy", "sin_azimuth", "cos_azimuth")


@dataclass
class Windows:
    walk: list[str]
    end_ms: np.ndarray  # (N,)
    ftm: np.ndarray  # (N, T, 4A + 2): per AP rtt (m), std (m), rss (dBm), present (0/1); then the LS fix x, y
    imu: np.ndarray  # (N, T, 13): acc, gyro, mag, sin/cos azimuth, pitch, roll
    vision: np.ndarray  # (N, T, 7): u, v, box_w, box_h, detected, floor x, y (SIMULATED)
    mask: np.ndarray  # (N, 3) bool, MODALITIES order
    pos: np.ndarray  # (N, T, 2) ground truth over the window (NaN without ground truth)
    future: np.ndarray  # (N, H, 2) ground truth over the next H steps (NaN past the walk's end)
    track: np.ndarray  # (N, T, 4) TRACK_CHANNELS

    def __len__(self) -> int:
        return len(self.end_ms)

    def take(self, idx: np.ndarray) -> Windows:
        return Windows(
            [self.walk[i] for i in idx],
            *(
                getattr(self, f)[idx]
                for f in ("end_ms", "ftm", "imu", "vision", "mask", "pos", "future", "track")
            ),
        )

    @staticmethod
    def concat(parts: list[Windows]) -> Windows:
        return Windows(
            [w for p in parts for w in p.walk],
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("end_ms", "ftm", "imu", "vision", "mask", "pos", "future", "track")
            ),
        )


def hold(
    t_src: np.ndarray, values: np.ndarray, t_query: np.ndarray, max_age_ms: float
) -> tuple[np.ndarray, np.ndarray]:
    """Latest ``values`` row at or before each query time; ``ok`` is False when none is younger than max age."""
    idx = np.searchsorted(t_src, t_query, side="right") - 1
    ok = idx >= 0
    idx_c = np.clip(idx, 0, max(len(t_src) - 1, 0))
    if len(t_src):
        ok &= (t_query - t_src[idx_c]) <= max_age_ms
    out = np.zeros((*t_query.shape, *values.shape[1:]))
    if len(t_src):
        out[ok] = values[idx_c[ok]]
    return out, ok


def grid_ends(walk: Walk, window: int, stride: int, horizon: int = 0) -> np.ndarray:
    """Window end times on the 10 Hz grid from the walk's first full window, ``stride`` steps apart."""
    t0, t1 = walk.t_ms[0], walk.t_ms[-1] - horizon * STEP_MS
    first = t0 + (window - 1) * STEP_MS
    if t1 < first:
        return np.empty(0)
    return np.arange(first, t1 + 1e-9, stride * STEP_MS)


@dataclass
class Readings:
    """One device's readings per modality, each sorted by time, in the windows' channel layout.

    ``ftm``: AP id -> (``t_ms (k,)``, ``[rtt_m, std_m, rss_dbm] (k, 3)``), ranged readings only;
    ``imu``: (``t_ms``, ``(k, 13)`` acc, gyro, mag, sin/cos azimuth, pitch, roll);
    ``vision``: (``t_ms``, ``(k, 7)`` u, v, box_w, box_h, detected, floor x, y) or None;
    ``fix``: (``t_ms``, ``(k, 2)``) a position from the FTM ranging alone, or None.
    The offline windows (:func:`build_windows`) and the live ones (``multimodal_live``) both go through
    :func:`align`, so a live window equals the offline window on the same rows.
    """

    ftm: dict[str, tuple[np.ndarray, np.ndarray]]
    imu: tuple[np.ndarray, np.ndarray]
    vision: tuple[np.ndarray, np.ndarray] | None = None
    fix: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of_walk(
        cls, walk: Walk, vision: SimulatedDetections | None = None, fix: np.ndarray | None = None
    ) -> Readings:
        ftm = {}
        for j, ap in enumerate(walk.ap_ids):
            rows = walk.rtt[:, j] > 0
            ftm[ap] = (
                walk.t_ms[rows],
                np.column_stack([walk.rtt[rows, j], walk.std[rows, j], walk.rss[rows, j]]),
            )
        return cls(
            ftm,
            (walk.t_ms, imu_channels(walk.imu)),
            (vision.t_ms, np.column_stack([vision.obs, vision.floor_xy])) if vision is not None else None,
            (walk.t_ms, fix) if fix is not None else None,
        )


def imu_channels(imu: np.ndarray) -> np.ndarray:
    """``(k, 12)`` IMU rows (IMU_CHANNELS order) -> the windows' 13 channels (azimuth as sin, cos)."""
    az = imu[:, 9]
    return np.column_stack([imu[:, :9], np.sin(az), np.cos(az), imu[:, 10:12]])


def align(
    readings: Readings,
    ap_ids: list[str],
    end_ms: np.ndarray,
    window: int = 20,
    max_age_ms: float = 1000.0,
    min_present: float = 0.25,
    vision_max_age_ms: float = 60.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``ftm (N, T, 4A + 2), imu (N, T, 13), vision (N, T, 7), mask (N, 3)`` on the 10 Hz grid."""
    n = len(end_ms)
    tq = end_ms[:, None] + (np.arange(window) - (window - 1)) * STEP_MS  # (N, T)
    ftm = np.zeros((n, window, 4 * len(ap_ids) + 2))
    any_ap = np.zeros((n, window), dtype=bool)
    for k, ap in enumerate(ap_ids):
        if ap not in readings.ftm:
            continue
        t_ap, vals = readings.ftm[ap]
        held, ok = hold(t_ap, vals, tq, max_age_ms)
        ftm[:, :, 4 * k : 4 * k + 3] = held
        ftm[:, :, 4 * k + 3] = ok
        any_ap |= ok
    if readings.fix is not None:
        ftm[:, :, -2:], _ = hold(*readings.fix, tq, max_age_ms)
    imu, imu_ok = hold(*readings.imu, tq, max_age_ms)
    vis = np.zeros((n, window, 7))
    vis_ok = np.zeros((n, window), dtype=bool)
    if readings.vision is not None and len(readings.vision[0]):
        vis, vis_ok = hold(*readings.vision, tq, vision_max_age_ms)
        vis_ok &= vis[:, :, 4] > 0
    mask = np.column_stack([m.mean(axis=1) >= min_present for m in (any_ap, imu_ok, vis_ok)])
    return ftm, imu, vis, mask


def build_windows(
    walk: Walk,
    ap_ids: list[str],
    end_ms: np.ndarray,
    vision: SimulatedDetections | None = None,
    fix: np.ndarray | None = None,
    window: int = 20,
    horizon: int = 10,
    max_age_ms: float = 1000.0,
    min_present: float = 0.25,
) -> Windows:
    """Windows of ``window`` 10 Hz steps ending at ``end_ms``; FTM channels follow ``ap_ids`` (absent: 0).

    ``fix`` (per walk row, ``(n, 2)``) is a position computed from the FTM ranging alone (least-squares
    trilateration with the site's AP positions); it is held like the readings and appended to the FTM channels.
    """
    n = len(end_ms)
    tq = end_ms[:, None] + (np.arange(window) - (window - 1)) * STEP_MS  # (N, T)
    ftm, imu, vis, mask = align(
        Readings.of_walk(walk, vision, fix), ap_ids, end_ms, window, max_age_ms, min_present
    )
    if walk.gt is not None:
        gx, gy = walk.gt[:, 0], walk.gt[:, 1]
        pos = np.stack([np.interp(tq, walk.t_ms, gx), np.interp(tq, walk.t_ms, gy)], axis=-1)
        tf = end_ms[:, None] + np.arange(1, horizon + 1) * STEP_MS
        future = np.stack([np.interp(tf, walk.t_ms, gx), np.interp(tf, walk.t_ms, gy)], axis=-1)
        future[tf > walk.t_ms[-1]] = np.nan
        half = 500.0
        ahead = np.stack([np.interp(tq + half, walk.t_ms, g) for g in (gx, gy)], axis=-1)
        behind = np.stack([np.interp(tq - half, walk.t_ms, g) for g in (gx, gy)], axis=-1)
        vel = (ahead - behind) / (2 * half / 1000.0)
    else:
        pos = np.full((n, window, 2), np.nan)
        future = np.full((n, horizon, 2), np.nan)
        vel = np.full((n, window, 2), np.nan)
    track = np.concatenate([vel, imu[:, :, 9:11]], axis=-1)
    return Windows([walk.name] * n, end_ms.astype(np.float64), ftm, imu, vis, mask, pos, future, track)
