"""Online anomaly screening of scalar telemetry, one detector state per source. Plain Python, no Kafka.

Every point is scored against what came *before* it (no look-ahead), then learned. Flagged points are
marked, never dropped: callers keep the value and add ``score`` and ``flagged``.

Methods (``SourceScreen(method=...)``, ``screen_series(values, method=...)``):

- ``robust``: robust z-score ``|x - median| / (1.4826 * MAD)`` over the last ``window`` points (at least
  ``min_samples``), flagged when above ``threshold`` (3.5, Iglewicz & Hoaglin's cut-off for the modified
  z-score). A river ``drift.ADWIN`` watches the raw values; when it signals a change, the baseline keeps only
  the points ADWIN retained (never fewer than ``min_samples``), so after a level shift the detector
  re-baselines instead of flagging the new level for a whole window. If the MAD is 0 (quantised or flat
  signals), the scale falls back to 1.2533 x the mean absolute deviation, then to a tiny relative floor.
- ``hst``: river ``anomaly.HalfSpaceTrees`` on values min-max scaled over the last ``scale_window`` points
  (clipped to [0, 1]), plus ``lags`` previous scaled values as features. Flagged when the score is above the
  running ``q``-quantile (river ``stats.Quantile``) of the scores seen since its first reference window.
- ``zscore``: the baseline: rolling mean/std z-score over the last ``window`` points, ``|z| > 3``, no drift
  handling.

Scores differ in scale between methods (``robust``/``zscore``: |z|; ``hst``: 0..1); ``flagged`` is the
decision. ``screen_series`` computes ``robust`` and ``zscore`` vectorised (identical to the point-by-point
``SourceScreen``, only faster: the ADWIN pass is the only per-point loop); ``hst`` is inherently sequential.
Everything is deterministic (HST is seeded).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from river import anomaly, drift, stats

METHODS = ("hst", "robust", "zscore")
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x 1.4826 = its standard deviation
MEAN_AD_TO_SIGMA = 1.2533  # mean absolute deviation of a normal distribution x sqrt(pi/2) = sigma
REL_FLOOR = 1e-9
# rows of windows sorted at once by screen_series (memory: rows x window x 8 bytes, twice)
_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class RobustParams:
    window: int = 256
    min_samples: int = 30
    threshold: float = 3.5
    delta: float = 0.002  # ADWIN confidence
    rebaseline: bool = True  # False: no ADWIN (for ablations)
    # rarity gate: also above this quantile of the last gate_window scores (0 or 1 switch it off)
    q: float = 0.995
    gate_window: int = 1000
    min_scored: int = 100  # scores seen before the gate lets anything through


@dataclass(frozen=True)
class ZScoreParams:
    window: int = 256
    min_samples: int = 30
    threshold: float = 3.0


@dataclass(frozen=True)
class HstParams:
    n_trees: int = 10
    height: int = 6
    window_size: int = 250  # HST reference window; no flags before the first one is complete
    seed: int = 42
    q: float = 0.995  # flag scores above this quantile of the last scale_window scores
    min_scored: int = 100  # scores seen (after the first reference window) before anything is flagged
    lags: int = 0
    diff: bool = True  # add the first difference (min-max scaled) as a feature
    scale_window: int = 1000


_PARAMS: dict[str, type[RobustParams] | type[ZScoreParams] | type[HstParams]] = {
    "robust": RobustParams,
    "zscore": ZScoreParams,
    "hst": HstParams,
}


def make_params(method: str, **overrides: Any) -> RobustParams | ZScoreParams | HstParams:
    """The method's parameters with ``overrides``; unknown methods or names raise ValueError."""
    if method not in _PARAMS:
        raise ValueError(f"unknown screening method {method!r} (choose {', '.join(METHODS)})")
    cls = _PARAMS[method]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) {unknown} (known: {sorted(known)})")
    params = replace(cls(), **overrides)
    for name in ("window", "min_samples", "window_size", "scale_window", "n_trees", "height"):
        if getattr(params, name, 1) < 1:
            raise ValueError(f"{method}: {name} must be >= 1")
    if isinstance(params, RobustParams | ZScoreParams) and params.min_samples > params.window:
        raise ValueError(f"{method}: min_samples must not exceed window")
    return params


def _centre_scale(rows: np.ndarray, counts: np.ndarray, robust: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per row, over its first ``counts[i]`` entries (the rest NaN): (median, robust sigma) or (mean, std).

    Used for single windows and for thousands at once, so the streaming and the batch path compute exactly
    the same floats.
    """
    k = np.maximum(counts, 1)
    if robust:
        # order statistics by partition (O(w) per row instead of a sort), one pass per distinct count:
        # after the warm-up nearly every window is full, so this is one or two numpy calls per batch
        centre = np.empty(rows.shape[0])
        mad2 = np.empty(rows.shape[0])  # twice the MAD (the two middle deviations, summed)
        for kk in np.unique(k).tolist():
            sel = np.flatnonzero(k == kk)
            block = rows[sel, :kk]
            lo, hi = (kk - 1) // 2, kk // 2
            s = np.partition(block, (lo, hi), axis=1)
            c = 0.5 * (s[:, lo] + s[:, hi])
            d = np.partition(np.abs(block - c[:, None]), (lo, hi), axis=1)
            centre[sel] = c
            mad2[sel] = d[:, lo] + d[:, hi]
        scale = MAD_TO_SIGMA * 0.5 * mad2
        flat = ~(scale > 0)
        if flat.any():  # quantised or flat windows: the mean absolute deviation instead
            mean_ad = np.nansum(np.abs(rows[flat] - centre[flat, None]), axis=1) / k[flat]
            scale[flat] = MEAN_AD_TO_SIGMA * mean_ad
    else:
        centre = np.nansum(rows, axis=1) / k
        scale = np.sqrt(np.nansum((rows - centre[:, None]) ** 2, axis=1) / k)
    floor = REL_FLOOR * np.maximum(1.0, np.abs(centre))
    return centre, np.maximum(scale, floor)


class RollingQuantile:
    """The ``q``-quantile (linear interpolation, numpy's default and river's ``stats.RollingQuantile``) of the
    last ``window`` values.

    Written here instead of river's because of memory: river's reserves its whole window up front (two
    ``window``-slot buffers, 16 KB per source at the gate's 1,000), and the BS agents keep one gate per entity:
    160 MB at 10,000 entities before any score exists. This one grows with the values it has seen (one
    float64 ring, at most 8 KB) and sorts only when asked, which the gate does only for an over-threshold
    point. Same values as river's to the last bit or one ulp (``tests/test_screen_bank.py``).
    """

    __slots__ = ("oldest", "q", "ring", "size", "window")

    def __init__(self, q: float, window: int) -> None:
        if not 0.0 <= q <= 1.0 or window < 1:
            raise ValueError(f"RollingQuantile: q must be in [0, 1] and window >= 1 (got {q}, {window})")
        self.q, self.window = q, window
        self.ring = np.empty(0)
        self.size = 0  # values in the ring (at most window)
        self.oldest = 0  # once full: where the next value overwrites the oldest

    def update(self, x: float) -> None:
        if self.size < self.window:
            if self.size == self.ring.shape[0]:  # doubling: amortised O(1), never beyond the window
                grown = np.empty(min(self.window, max(16, 2 * self.size)))
                grown[: self.size] = self.ring
                self.ring = grown
            self.ring[self.size] = x
            self.size += 1
        else:
            self.ring[self.oldest] = x
            self.oldest = (self.oldest + 1) % self.window

    def get(self) -> float | None:
        """None before the first value."""
        return float(np.quantile(self.ring[: self.size], self.q)) if self.size else None


class _RarityGate:
    """Lets a flag through only if its score is also above the ``q``-quantile of the recent scores.

    A run of consecutive over-threshold points enters the quantile once (its first score): one level shift
    is one event, so it does not blind the gate for ``gate_window`` points, while a signal that keeps
    crossing the threshold (heavy tails, quantised levels) raises the quantile and is flagged only rarely.
    """

    __slots__ = ("in_run", "params", "quantile", "seen")

    def __init__(self, params: RobustParams) -> None:
        self.params = params
        self.quantile = RollingQuantile(params.q, params.gate_window) if 0.0 < params.q < 1.0 else None
        self.seen = 0
        self.in_run = False

    def __call__(self, score: float, over: bool) -> bool:
        if self.quantile is None:
            return over
        rare = False
        if (
            over and self.seen >= self.params.min_scored
        ):  # the bound matters only for a point over the threshold
            bound = self.quantile.get()
            rare = bound is not None and score > bound
        if not (over and self.in_run):
            self.quantile.update(score)
            self.seen += 1
        self.in_run = over
        return rare


class _GateBank:
    """The rarity gates of many sources as arrays: ``_RarityGate``'s rule (and its quantile's ring, growing to
    ``gate_window``) for a whole batch of distinct sources in a few numpy calls. ``ScreenBank`` screens every
    entity every step, and one ``_RarityGate`` call per scored point was a third of its time."""

    def __init__(self, params: RobustParams) -> None:
        self.params = params
        self.on = 0.0 < params.q < 1.0
        self.seen = np.zeros(0, np.int64)
        self.in_run = np.zeros(0, bool)
        self.size = np.zeros(0, np.int64)  # scores in each source's ring
        self.oldest = np.zeros(0, np.int64)  # once full: where its next score overwrites the oldest
        self.ring = np.empty((0, 0))  # one row per source; as many slots as the fullest source needs

    def grow(self, sources: int) -> None:
        more = sources - self.seen.shape[0]
        if more > 0:
            self.seen = np.concatenate([self.seen, np.zeros(more, np.int64)])
            self.in_run = np.concatenate([self.in_run, np.zeros(more, bool)])
            self.size = np.concatenate([self.size, np.zeros(more, np.int64)])
            self.oldest = np.concatenate([self.oldest, np.zeros(more, np.int64)])
            self.ring = np.concatenate([self.ring, np.empty((more, self.ring.shape[1]))])

    def __call__(self, rows: np.ndarray, scores: np.ndarray, over: np.ndarray) -> np.ndarray:
        """The gated flags of distinct sources ``rows`` given their scores and over-threshold verdicts."""
        if not self.on:
            return over
        p = self.params
        flags = np.zeros(rows.shape[0], bool)
        # the bound matters only for a point over the threshold, once the source has min_scored scores
        ask = np.flatnonzero(over & (self.seen[rows] >= p.min_scored) & (self.size[rows] > 0))
        for i in ask.tolist():
            r = rows[i]
            flags[i] = scores[i] > float(np.quantile(self.ring[r, : self.size[r]], p.q))
        enter = ~(over & self.in_run[rows])  # a run of over-threshold points enters once
        r, sc = rows[enter], scores[enter]
        k = self.size[r]
        cap = self.ring.shape[1]
        need = int(k.max()) + 1 if k.shape[0] else 0
        if need > cap and cap < p.gate_window:  # doubling: amortised O(1), never beyond the window
            ring = np.empty((self.ring.shape[0], min(p.gate_window, max(16, 2 * cap, need))))
            ring[:, :cap] = self.ring
            self.ring = ring
        filling = k < p.gate_window
        self.ring[r[filling], k[filling]] = sc[filling]
        full = r[~filling]
        self.ring[full, self.oldest[full]] = sc[~filling]
        self.oldest[full] = (self.oldest[full] + 1) % p.gate_window
        self.size[r] = np.minimum(k + 1, p.gate_window)
        self.seen[r] += 1
        self.in_run[rows] = over
        return flags


class _WindowZ:
    """Robust (median/MAD + ADWIN re-baselining) or plain (mean/std) z-score over a rolling window."""

    def __init__(self, params: RobustParams | ZScoreParams) -> None:
        self.params = params
        self.robust = isinstance(params, RobustParams)
        self.buf: deque[float] = deque(maxlen=params.window)
        self.adwin = (
            drift.ADWIN(delta=params.delta)
            if isinstance(params, RobustParams) and params.rebaseline
            else None
        )
        self.gate = _RarityGate(params) if isinstance(params, RobustParams) else None
        self.rebaselines = 0

    def update(self, x: float) -> tuple[float, bool]:
        p = self.params
        score, flagged = 0.0, False
        k = len(self.buf)
        if k >= p.min_samples:
            row = np.full((1, p.window), np.nan)
            row[0, :k] = self.buf  # the same padded layout as screen_series: identical floats
            centre, scale = _centre_scale(row, np.array([k]), self.robust)
            score = float(abs(x - centre[0]) / scale[0])
            flagged = score > p.threshold
            if self.gate is not None:
                flagged = self.gate(score, flagged)
        self.buf.append(x)
        if self.adwin is not None:
            self.adwin.update(x)
            if self.adwin.drift_detected:
                keep = max(int(self.adwin.width), p.min_samples)
                while len(self.buf) > keep:
                    self.buf.popleft()
                self.rebaselines += 1
        return score, flagged


def _adwin_starts(values: np.ndarray, params: RobustParams) -> np.ndarray:
    """For every index t, the left edge the baseline may not cross because of ADWIN re-baselining."""
    adwin = drift.ADWIN(delta=params.delta)
    floor = np.zeros(values.shape[0], np.int64)
    edge = 0
    for t, x in enumerate(values.tolist()):
        floor[t] = edge
        adwin.update(x)
        if adwin.drift_detected:
            edge = max(edge, t + 1 - max(int(adwin.width), params.min_samples))
    return floor


def _window_scores(values: np.ndarray, params: RobustParams | ZScoreParams) -> tuple[np.ndarray, np.ndarray]:
    n, w = values.shape[0], params.window
    robust = isinstance(params, RobustParams)
    t = np.arange(n)
    start = np.maximum(t - w, 0)
    if isinstance(params, RobustParams) and params.rebaseline:
        start = np.maximum(start, _adwin_starts(values, params))
    counts = t - start
    scores = np.zeros(n)
    padded = np.concatenate([np.full(w, np.nan), values])
    # row t = values[t - w : t] (the w points before t), NaN before the series
    windows = np.lib.stride_tricks.sliding_window_view(padded, w)[:n]
    cols = np.arange(w)
    for a in range(0, n, _CHUNK_ROWS):
        b = min(n, a + _CHUNK_ROWS)
        sel = np.flatnonzero(counts[a:b] >= params.min_samples) + a
        if sel.shape[0] == 0:
            continue
        rows = windows[sel].copy()
        # keep the last counts[t] entries of each row; move them to the front (NaN after) like the deque
        k = counts[sel]
        src = (w - k)[:, None] + cols[None, :]
        valid = cols[None, :] < k[:, None]
        rows = np.where(valid, np.take_along_axis(rows, np.minimum(src, w - 1), axis=1), np.nan)
        centre, scale = _centre_scale(rows, k, robust)
        scores[sel] = np.abs(values[sel] - centre) / scale
    flags = scores > params.threshold
    if isinstance(params, RobustParams):
        gate = _RarityGate(params)
        for i in np.flatnonzero(counts >= params.min_samples).tolist():
            flags[i] = gate(float(scores[i]), bool(flags[i]))
    return scores, flags


class _RollingRange:
    """Min and max of the last ``window`` values (monotonic deques: O(1) amortised per value)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.mins: deque[tuple[int, float]] = deque()
        self.maxs: deque[tuple[int, float]] = deque()
        self.n = 0

    def scale(self, x: float) -> float:
        """``x`` min-max scaled to the values seen so far, clipped to [0, 1] (0.5 before any value)."""
        if not self.mins:
            return 0.5
        lo, hi = self.mins[0][1], self.maxs[0][1]
        if hi <= lo:
            return 0.5 if x == lo else (1.0 if x > lo else 0.0)
        return min(1.0, max(0.0, (x - lo) / (hi - lo)))

    def add(self, x: float) -> None:
        i = self.n
        while self.mins and self.mins[-1][1] >= x:
            self.mins.pop()
        self.mins.append((i, x))
        while self.maxs and self.maxs[-1][1] <= x:
            self.maxs.pop()
        self.maxs.append((i, x))
        for q in (self.mins, self.maxs):
            while q[0][0] <= i - self.window:
                q.popleft()
        self.n += 1


class _HalfSpace:
    """HalfSpaceTrees on rolling min-max scaled features, thresholded at a rolling score quantile.

    Features: the value, its first difference (``diff``) and ``lags`` previous scaled values.
    """

    def __init__(self, params: HstParams) -> None:
        self.params = params
        self.model = anomaly.HalfSpaceTrees(
            n_trees=params.n_trees, height=params.height, window_size=params.window_size, seed=params.seed
        )
        self.quantile = stats.RollingQuantile(params.q, window_size=params.scale_window)
        self.values = _RollingRange(params.scale_window)
        self.diffs = _RollingRange(params.scale_window)
        self.lagged: deque[float] = deque([0.5] * params.lags, maxlen=max(params.lags, 1))
        self.prev: float | None = None
        self.n = 0
        self.scored = 0

    def update(self, x: float) -> tuple[float, bool]:
        p = self.params
        s = self.values.scale(x)
        features = {"x": s}
        d = 0.0 if self.prev is None else x - self.prev
        if p.diff:
            features["diff"] = self.diffs.scale(d)
        if p.lags:
            features |= {f"lag{j + 1}": v for j, v in enumerate(reversed(self.lagged))}
        score = float(self.model.score_one(features))
        flagged = False
        if self.n >= p.window_size:  # the first reference window is complete: scores mean something
            bound = self.quantile.get()
            if self.scored >= p.min_scored and bound is not None:
                flagged = score > bound
            self.quantile.update(score)
            self.scored += 1
        self.model.learn_one(features)
        self.values.add(x)
        if self.prev is not None:
            self.diffs.add(d)
        self.prev = x
        self.n += 1
        if p.lags:
            self.lagged.append(s)
        return score, flagged


class SourceScreen:
    """The screening state of one source: ``update(value, t_ms) -> (score, flagged)``, point by point.

    Counts ``points`` and ``flagged`` (cumulative) and remembers the last event time it saw.
    """

    def __init__(self, method: str = "robust", **params: Any) -> None:
        self.method = method
        self.params = make_params(method, **params)
        self._detector: _WindowZ | _HalfSpace = (
            _HalfSpace(self.params) if isinstance(self.params, HstParams) else _WindowZ(self.params)
        )
        self.points = 0
        self.flagged = 0
        self.last_ms: int | None = None

    def update(self, value: float, t_ms: int) -> tuple[float, bool]:
        score, flagged = self._detector.update(float(value))
        self.points += 1
        self.flagged += int(flagged)
        self.last_ms = int(t_ms)
        return score, flagged

    def update_many(self, values: np.ndarray, times_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``update`` over a batch of one source's points in time order; returns (scores, flags)."""
        scores = np.zeros(values.shape[0])
        flags = np.zeros(values.shape[0], bool)
        update = self._detector.update
        for i, x in enumerate(values.tolist()):
            scores[i], flags[i] = update(x)
        self.points += values.shape[0]
        self.flagged += int(flags.sum())
        if values.shape[0]:
            self.last_ms = int(times_ms[-1])
        return scores, flags


class ScreenBank:
    """The window screens (``robust`` or ``zscore``) of many sources, updated together, one point per source
    per call: ``update(keys, values) -> (scores, flags)``.

    Scores and flags equal those of one ``SourceScreen`` per source fed the same points in the same order
    (a property test holds them equal). The BS agents screen every square each hour: here the windows of all
    of them are scored in one vectorised pass instead of several numpy calls per point, and their rarity
    gates too (``_GateBank``). Only ADWIN remains a per-source step.
    """

    def __init__(self, method: str = "robust", **params: Any) -> None:
        p = make_params(method, **params)
        if not isinstance(p, RobustParams | ZScoreParams):
            raise ValueError(f"ScreenBank screens with a window method (robust, zscore), not {method!r}")
        self.params: RobustParams | ZScoreParams = p
        self.robust = isinstance(p, RobustParams)
        self.index: dict[Hashable, int] = {}
        self.buf = np.full((0, p.window), np.nan)  # row = a source's window, oldest first, NaN after
        self.count = np.zeros(0, np.int64)
        self.adwins: list[drift.ADWIN] = []
        self.gates = _GateBank(p) if isinstance(p, RobustParams) else None
        self.points = 0
        self.flagged = 0

    def __len__(self) -> int:
        return len(self.index)

    def _rows(self, keys: Sequence[Hashable]) -> np.ndarray:
        for key in keys:
            if key not in self.index:
                self.index[key] = len(self.index)
                if isinstance(self.params, RobustParams) and self.params.rebaseline:
                    self.adwins.append(drift.ADWIN(delta=self.params.delta))
        grow = len(self.index) - self.buf.shape[0]
        if grow > 0:
            size = max(grow, self.buf.shape[0])  # doubling: amortised O(1) per new source
            self.buf = np.concatenate([self.buf, np.full((size, self.params.window), np.nan)])
            self.count = np.concatenate([self.count, np.zeros(size, np.int64)])
            if self.gates is not None:
                self.gates.grow(self.buf.shape[0])
        return np.fromiter((self.index[key] for key in keys), np.int64, len(keys))

    def update(self, keys: Sequence[Hashable], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score each value against its source's window (points before it only), then learn it. A key given
        more than once is updated in order of appearance."""
        x = np.asarray(values, np.float64).ravel()
        if x.shape[0] != len(keys):
            raise ValueError(f"ScreenBank.update: {len(keys)} keys but {x.shape[0]} values")
        rows = self._rows(keys)
        scores = np.zeros(x.shape[0])
        flags = np.zeros(x.shape[0], bool)
        # one pass per occurrence: a source's second point must see its first
        occurrence = np.zeros(len(rows), np.int64)
        if np.unique(rows).shape[0] < rows.shape[0]:  # (usually every source once: one pass)
            seen: dict[int, int] = {}
            for i, r in enumerate(rows.tolist()):
                occurrence[i] = seen[r] = seen.get(r, -1) + 1
        for n in range(int(occurrence.max()) + 1 if len(rows) else 0):
            at = np.flatnonzero(occurrence == n)
            scores[at], flags[at] = self._update_distinct(rows[at], x[at])
        self.points += x.shape[0]
        self.flagged += int(flags.sum())
        return scores, flags

    def _update_distinct(self, rows: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        k = self.count[rows]
        scores = np.zeros(x.shape[0])
        flags = np.zeros(x.shape[0], bool)
        scored = np.flatnonzero(k >= p.min_samples)
        if scored.shape[0]:
            centre, scale = _centre_scale(self.buf[rows[scored]], k[scored], self.robust)
            scores[scored] = np.abs(x[scored] - centre) / scale
            flags[scored] = scores[scored] > p.threshold
            if self.gates is not None:
                flags[scored] = self.gates(rows[scored], scores[scored], flags[scored])
        full = k >= p.window
        if full.any():  # the oldest point leaves the window
            r = rows[full]
            self.buf[r, :-1] = self.buf[r, 1:]
            self.buf[r, -1] = x[full]
        self.buf[rows[~full], k[~full]] = x[~full]
        self.count[rows] = np.minimum(k + 1, p.window)
        if self.adwins and isinstance(p, RobustParams):
            for r, value in zip(rows.tolist(), x.tolist(), strict=True):
                adwin = self.adwins[r]
                adwin.update(value)
                if adwin.drift_detected:  # re-baseline on what ADWIN kept, as _WindowZ does
                    keep = max(int(adwin.width), p.min_samples)
                    c = int(self.count[r])
                    if c > keep:
                        self.buf[r, :keep] = self.buf[r, c - keep : c].copy()
                        self.buf[r, keep:] = np.nan
                        self.count[r] = keep
        return scores, flags


def screen_series(values: np.ndarray, method: str = "robust", **params: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scores and flags of a whole series, online (each point judged on the points before it only).

    Equal to feeding the values one by one to a fresh ``SourceScreen(method, **params)``. Non-finite values
    are not allowed (raise ValueError): drop or impute them first.
    """
    x = np.asarray(values, np.float64).ravel()
    if not np.isfinite(x).all():
        raise ValueError("screen_series: values must be finite")
    p = make_params(method, **params)
    if isinstance(p, RobustParams | ZScoreParams):
        return _window_scores(x, p)
    return SourceScreen(method, **params).update_many(x, np.zeros(x.shape[0], np.int64))
