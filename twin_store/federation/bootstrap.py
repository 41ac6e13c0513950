"""Twins for any deployment from the history its stream has built: the ``[twins]`` steps read back from
InfluxDB -> a regular grid -> inputs adapted to the cadence and the history -> V-twinning. Pure: no I/O.

Rules (docs/twins.md):

- **Grid.** Step ``k`` of the series is ``[start_ms + k * step_ms, ...)``; ``start_ms`` is the UTC midnight
  before the first step of any entity, so step ``k`` of every entity is the same wall-clock step and the
  hour-of-day profiles line up. A step an entity did not report is missing (NaN).
- **Inputs.** Ten inputs per target, as the model takes: the ``horizon``..``horizon + 4`` steps before it
  ("close") and the same step on up to five earlier days ("period") when the history covers them with
  room left for a validation slice; days the history does not cover are replaced by further close steps.
  Milan hourly with its 62 days gets exactly the benchmark's 5 + 5 inputs.
- **Gaps in training.** z-scores are carried forward over missing steps (only past values, so nothing
  from the future reaches an input), and an entity's steps before its first report are its mean (z = 0).
- **Scaling.** Each entity's mean and standard deviation over its own training steps (std 0 -> 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twin_store.federation import dcs

N_INPUTS = 10  # TwinModel's inputs per sample
CLOSE = 5
MAX_PERIOD_DAYS = 5
DAY_MS = 86_400_000
VALIDATION_MIN = 10  # steps kept out of V-twinning's training for the scaler and the check
TRAIN_MIN = 30  # targets V-twinning needs at least


def default_need(horizon: int) -> int:
    """Steps of history the default bootstrap waits for: the close-only inputs, then enough targets to
    train on and a validation slice."""
    return horizon + N_INPUTS - 1 + TRAIN_MIN + VALIDATION_MIN


def input_lags(steps_per_day: int, history: int, horizon: int = 1) -> tuple[int, ...]:
    """The ten input lags (steps before the target, oldest first) for a series of ``history`` steps."""
    close = list(range(horizon + CLOSE - 1, horizon - 1, -1))
    days = 0
    for d in range(MAX_PERIOD_DAYS, 0, -1):
        longest = d * steps_per_day
        # the period inputs must lie beyond the close ones and leave training targets and a validation slice
        if longest > close[0] and longest + TRAIN_MIN + VALIDATION_MIN <= history:
            days = d
            break
    period = [d * steps_per_day for d in range(days, 0, -1)]
    extra = list(range(horizon + CLOSE + (N_INPUTS - CLOSE - days) - 1, horizon + CLOSE - 1, -1))
    return tuple(period + extra + close)


@dataclass(frozen=True)
class Grid:
    keys: np.ndarray  # int64 [S], the entities' registry keys (Milan: square numbers), sorted
    names: list[str]  # [S]
    start_ms: int  # time of step 0 (a UTC midnight)
    step_ms: int
    values: np.ndarray  # float64 [S, T], NaN = missing

    @property
    def steps(self) -> int:
        return int(self.values.shape[1])


def build_grid(rows: list[tuple[int, str, int, float]], step_ms: int, until_ms: int | None = None) -> Grid:
    """(key, name, step start ms, value) rows -> a grid up to the newest step (or ``until_ms``, excluded).
    A step given twice keeps the last row."""
    if not rows:
        return Grid(np.zeros(0, np.int64), [], 0, step_ms, np.zeros((0, 0)))
    keys = sorted({r[0] for r in rows})
    names = {r[0]: r[1] for r in rows}
    first = min(r[2] for r in rows)
    start = first - first % DAY_MS
    last = max(r[2] for r in rows) if until_ms is None else until_ms - step_ms
    steps = int((last - start) // step_ms) + 1
    values = np.full((len(keys), max(steps, 0)), np.nan)
    row_of = {k: i for i, k in enumerate(keys)}
    for key, _, t, v in rows:
        k = (t - start) // step_ms
        if 0 <= k < steps:
            values[row_of[key], k] = v
    return Grid(np.asarray(keys, np.int64), [names[k] for k in keys], int(start), step_ms, values)


def ready(grid: Grid, need_steps: int, need_entities: int) -> bool:
    """Enough history: at least ``need_entities`` entities with ``need_steps`` reported steps each."""
    if grid.values.size == 0:
        return False
    reported = np.isfinite(grid.values).sum(axis=1)
    return int((reported >= need_steps).sum()) >= need_entities


@dataclass(frozen=True)
class EntityScaler:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> EntityScaler:
        """Per-row mean and std of the finite values (a row without any: 0 and 1)."""
        ok = np.isfinite(values)
        n = ok.sum(axis=1)
        filled = np.where(ok, values, 0.0)
        mean = np.where(n > 0, filled.sum(axis=1) / np.maximum(n, 1), 0.0)
        var = np.where(ok, (values - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(n, 1)
        std = np.sqrt(var)
        return cls(mean, np.where(std > 0, std, 1.0))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean[:, None]) / self.std[:, None]


def carry_forward(z: np.ndarray) -> np.ndarray:
    """Missing steps take the last reported value before them; steps before the first report take 0."""
    out = z.copy()
    for row in out:
        ok = np.isfinite(row)
        if not ok.any():
            row[:] = 0.0
            continue
        idx = np.where(ok, np.arange(row.size), -1)
        np.maximum.accumulate(idx, out=idx)
        row[:] = np.where(idx >= 0, row[np.maximum(idx, 0)], 0.0)
    return out


def training_samples(z: np.ndarray, lags: tuple[int, ...], stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``[S, N, 10]`` and targets ``[S, N]`` of every target step in [max lag, stop)."""
    lag = np.asarray(lags, np.int64)
    targets = np.arange(int(lag.max()), stop)
    return z[:, targets[:, None] - lag[None, :]], z[:, targets]


def profiles(z: np.ndarray, steps_per_day: int, upto: int) -> np.ndarray:
    """Mean z per hour of day over steps [0, upto), missing steps skipped (a bin without data: 0)."""
    values = z[:, :upto]
    hod = (np.arange(values.shape[1]) % steps_per_day) * 24 // steps_per_day
    ok = np.isfinite(values)
    out = np.zeros((z.shape[0], 24))
    for b in range(24):
        cols = hod == b
        n = ok[:, cols].sum(axis=1)
        s = np.where(ok[:, cols], values[:, cols], 0.0).sum(axis=1)
        out[:, b] = np.where(n > 0, s / np.maximum(n, 1), 0.0)
    return out


def cluster_labels(
    profile: np.ndarray, n_clusters: int, seed: int, positions: np.ndarray | None = None
) -> np.ndarray:
    """DCS labels from traffic profiles, plus great-circle proximity when positions ``[S, 2]`` (lat, lon) are
    known. As many clusters as entities at most (one to three entities: one cluster each)."""
    n = profile.shape[0]
    if n <= n_clusters:
        return np.arange(n, dtype=np.int64)
    affinity = dcs.traffic_similarity(profile)
    if positions is not None:
        lat, lon = positions[:, 0], positions[:, 1]
        dist = dcs._haversine_m(lon[:, None], lat[:, None], lon[None, :], lat[None, :])
        # DCS's proximity (1/e at 2 km), weighted equally with the traffic similarity
        affinity = 0.5 * affinity + 0.5 * np.exp(-dist / dcs.DcsWeights().distance_scale_m)
    affinity = np.clip((affinity + affinity.T) / 2, 0.0, 1.0)
    affinity[affinity < 1e-6] = 0.0  # far apart and unalike: no edge (1/affinity distances would overflow)
    np.fill_diagonal(affinity, 0.0)
    return dcs.cluster(affinity, min(n_clusters, n), seed=seed, knn=min(8, n - 1))


def nearest_cluster(
    profile: np.ndarray,
    centroids: dict[int, np.ndarray],
    position: np.ndarray | None = None,
    positions: dict[int, np.ndarray] | None = None,
) -> int:
    """A late joiner's cluster: the one whose members' mean position is nearest when both are known,
    else the one whose mean profile is closest (Euclidean on z-scored hour-of-day means)."""
    if position is not None and positions:
        lat, lon = position
        best = min(
            positions,
            key=lambda c: float(dcs._haversine_m(lon, lat, positions[c][1], positions[c][0])),
        )
        return int(best)
    return int(min(centroids, key=lambda c: float(np.sum((centroids[c] - profile) ** 2))))
