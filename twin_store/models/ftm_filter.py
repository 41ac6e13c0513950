"""A range Kalman filter over FTM (RTT) ranges and the IMU: the positioning baseline an engineer would deploy.

State ``[x, y, vx, vy]`` with a constant-velocity model driven by white acceleration; the ranged APs of a row
are one extended-Kalman update with ``r = |p - a| + bias`` per AP. Two things make it robust on real FTM:

* **IMU motion gate**: when the acceleration magnitude has been still over the last second (its standard
  deviation below ``still_acc``), the phone is standing, so the velocity is damped and the process noise is
  small; while walking the process noise is ``accel_sigma``;
* **robust updates**: an innovation beyond ``gate`` standard deviations has its measurement noise inflated by
  the square of the excess (a Huber-like weight), so a multipath range bends the track instead of yanking it.

A row's ranges are one joint update linearised at the prediction, so the result does not depend on the order
(or number of never-ranged) AP columns of a walk.

The filter starts at the first row ranged by >= 3 known APs (from the least-squares fix of that row); before
that it reports the APs' centroid, as :func:`ingest.readers.ftm.trilaterate` does. Its few constants are tuned
on training walks only (:func:`tune_filter`). Pure numpy: no model, no training.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import asdict, dataclass, replace

import numpy as np

from ingest.readers.ftm import FixTracker, SiteGeometry, Walk


@dataclass(frozen=True)
class FilterParams:
    range_sigma_m: float = 1.5  # range noise beyond the reported RTT std
    accel_sigma: float = 1.0  # m/s^2, process noise while walking
    still_accel_sigma: float = 0.05  # m/s^2, process noise while standing
    bias_m: float = 0.0  # subtracted from every RTT range (FTM ranges run long: multipath)
    gate: float = 2.5  # innovations beyond this many sigmas are down-weighted
    still_acc: float = 0.25  # m/s^2: std of |acc| over the last second below this = standing
    still_damping: float = 0.5  # velocity kept per second while standing

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def motion_flags(t_ms: np.ndarray, imu: np.ndarray, still_acc: float, span_ms: float = 1000.0) -> np.ndarray:
    """True per row when the phone moved: the std of |acc| over the rows of the last ``span_ms`` (causal)."""
    mag = np.linalg.norm(imu[:, :3], axis=1)
    start = np.searchsorted(t_ms, t_ms - span_ms, side="left")
    c1 = np.concatenate([[0.0], np.cumsum(mag)])
    c2 = np.concatenate([[0.0], np.cumsum(mag**2)])
    idx = np.arange(len(t_ms))
    n = idx + 1 - start
    mean = (c1[idx + 1] - c1[start]) / n
    var = np.maximum((c2[idx + 1] - c2[start]) / n - mean**2, 0.0)
    return (np.sqrt(var) >= still_acc) | (n < 3)


class MotionGate:
    """:func:`motion_flags` one row at a time (the live windows feed it row by row): moving when the std of
    |acc| over the rows of the last ``span_ms`` (this one included) is at least ``still_acc``, or fewer than
    three rows are in that span."""

    def __init__(self, still_acc: float, span_ms: float = 1000.0) -> None:
        self.still_acc, self.span_ms = still_acc, span_ms
        self.t: deque[float] = deque()
        self.mag: deque[float] = deque()

    def update(self, t_ms: float, acc_mag: float) -> bool:
        self.t.append(t_ms)
        self.mag.append(acc_mag)
        while self.t[0] < t_ms - self.span_ms:
            self.t.popleft()
            self.mag.popleft()
        if len(self.mag) < 3:
            return True
        return float(np.std(np.fromiter(self.mag, dtype=float))) >= self.still_acc


class RangeFilter:
    """The range Kalman filter of the module docstring, one row at a time: causal by construction (a row is
    filtered with the rows before it only). :func:`kalman_track` runs a walk through it; the live windows run
    each key's rows through one as they become final.

    ``ap_ids`` (default: the site's APs) is the order of the ranging rows given to :meth:`step`."""

    def __init__(
        self, geo: SiteGeometry, ap_ids: list[str] | None = None, params: FilterParams | None = None
    ):
        self.p = params or FilterParams()
        self.tracker = FixTracker(geo, ap_ids)
        self.index = self.tracker.index
        self.aps = self.tracker.aps  # (A, 2), NaN for APs the site does not know
        self.known = np.isfinite(self.aps[:, 0])
        self.gate = MotionGate(self.p.still_acc)
        self.x = np.zeros(4)
        self.cov = np.eye(4)
        self.started = False
        self.t_prev = 0.0
        self.est = self.tracker.est.copy()  # the position after the last row

    def resume_from(self, other: RangeFilter) -> None:
        """Carry on from ``other``'s state (position, velocity, covariance, last row time, motion gate's rows)
        with this filter's constants: a restart that needs no row ranged by >= 3 APs."""
        self.x, self.cov, self.est = other.x.copy(), other.cov.copy(), other.est.copy()
        self.started, self.t_prev = other.started, other.t_prev
        self.gate.t, self.gate.mag = deque(other.gate.t), deque(other.gate.mag)

    def step_ranged(self, t_ms: float, ranged: dict[str, tuple[float, float]], acc_mag: float) -> np.ndarray:
        """One row as ``{ap: (rtt_m, rtt_std_m)}`` (APs the site does not know are ignored)."""
        rtt, std = np.zeros(len(self.index)), np.zeros(len(self.index))
        for a, (d, sd) in ranged.items():
            k = self.index.get(a)
            if k is not None:
                rtt[k], std[k] = d, sd
        return self.step(t_ms, rtt, std, acc_mag)

    def step(self, t_ms: float, rtt: np.ndarray, std: np.ndarray, acc_mag: float) -> np.ndarray:
        """One row: RTT ranges and their std in ``ap_ids`` order (0: not ranged) and the |acc| of the row's
        IMU reading; returns the filtered position after it."""
        p = self.p
        moving = self.gate.update(t_ms, acc_mag)
        if not self.started:
            fix = self.tracker.update_row(rtt)
            if self.tracker.fixed:
                self.x = np.array([fix[0], fix[1], 0.0, 0.0])
                self.cov = np.diag([4.0, 4.0, 1.0, 1.0])
                self.started = True
                self.t_prev = t_ms
            self.est = fix.copy()
            return self.est
        x, cov = self.x, self.cov
        dt = min(max((t_ms - self.t_prev) / 1000.0, 0.0), 2.0)
        self.t_prev = t_ms
        sig = p.accel_sigma if moving else p.still_accel_sigma
        f = np.eye(4)
        f[0, 2] = f[1, 3] = dt
        x = f @ x
        if not moving:
            x[2:] *= p.still_damping**dt
        q1 = sig**2 * np.array([[dt**4 / 4, dt**3 / 2], [dt**3 / 2, dt**2]])
        q = np.zeros((4, 4))
        q[np.ix_([0, 2], [0, 2])] = q1
        q[np.ix_([1, 3], [1, 3])] = q1
        cov = f @ cov @ f.T + q
        ks = np.flatnonzero((rtt > 0) & self.known)
        if len(ks):  # one joint update of the row's ranges, linearised at the prediction: AP order is moot
            diff = x[:2] - self.aps[ks]
            rng = np.maximum(np.hypot(diff[:, 0], diff[:, 1]), 1e-3)
            h = np.zeros((len(ks), 4))
            h[:, :2] = diff / rng[:, None]
            r_var = p.range_sigma_m**2 + std[ks] ** 2
            innov = rtt[ks] - p.bias_m - rng
            hp = h @ cov
            z = np.abs(innov) / np.sqrt(np.einsum("ij,ij->i", hp, h) + r_var)
            r_var = np.where(z > p.gate, r_var * (z / p.gate) ** 2, r_var)
            s = hp @ h.T + np.diag(r_var)
            gain = np.linalg.solve(s, hp).T  # cov h^T s^-1 (s and cov symmetric)
            x = x + gain @ innov
            ikh = np.eye(4) - gain @ h  # Joseph form: the covariance stays symmetric positive definite
            cov = ikh @ cov @ ikh.T + (gain * r_var) @ gain.T
        self.x, self.cov = x, cov
        self.est = x[:2].copy()
        return self.est


def kalman_track(walk: Walk, geo: SiteGeometry, params: FilterParams | None = None) -> np.ndarray:
    """Filtered position per row of ``walk`` (``(n, 2)``), causal: each row sees only rows up to itself."""
    filt = RangeFilter(geo, walk.ap_ids, params)
    mag = np.linalg.norm(walk.imu[:, :3], axis=1)
    out = np.zeros((len(walk), 2))
    for i in range(len(walk)):
        out[i] = filt.step(float(walk.t_ms[i]), walk.rtt[i], walk.std[i], float(mag[i]))
    return out


def range_bias(walks: list[Walk]) -> float:
    """Median of RTT range minus true distance over every ranged reading of walks that have true distances."""
    diffs = [(w.rtt - w.true_dist)[(w.rtt > 0) & (w.true_dist > 0)] for w in walks if w.true_dist is not None]
    cat = np.concatenate(diffs) if diffs else np.empty(0)
    return float(np.median(cat)) if len(cat) else 0.0


GRID: dict[str, tuple[float, ...]] = {"range_sigma_m": (0.5, 0.75, 1.5, 3.0), "accel_sigma": (0.3, 1.0, 3.0)}


def tune_filter(
    walks: list[Walk], sites: dict[str, SiteGeometry], grid: dict[str, tuple[float, ...]] | None = None
) -> tuple[FilterParams, dict[str, float]]:
    """The grid point with the lowest median error over ``walks`` (training walks with ground truth only), with
    the range bias taken as the median RTT excess of those walks (0 without true distances). Returns the
    parameters and the median error (m) of each grid point tried."""
    grid_ = grid or GRID
    base = FilterParams(bias_m=round(range_bias(walks), 3))
    labelled = [w for w in walks if w.gt is not None]
    if not labelled:
        return base, {}
    keys = sorted(grid_)
    tried: dict[str, float] = {}
    best = (math.inf, base)
    for combo in itertools.product(*(grid_[k] for k in keys)):
        params = replace(base, **dict(zip(keys, combo, strict=True)))
        errs = np.concatenate(
            [np.linalg.norm(kalman_track(w, sites[w.scene], params) - w.gt, axis=1) for w in labelled]
        )
        med = float(np.median(errs))
        tried[",".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True))] = round(med, 4)
        if med < best[0]:
            best = (med, params)
    return best[1], tried
