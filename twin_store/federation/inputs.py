"""Model inputs for any cadence and history, and per-entity scaling: the generalisation of ``samples.py``.

Pure numpy. A twin forecasts step ``t`` of an entity's z-scored regular series (``series.py``) from earlier
steps at fixed lags (in steps back from ``t``, oldest first):

- **close lags** ``horizon + close - 1 .. horizon``: the latest steps known when the forecast is issued, which is
  at the close of step ``t - horizon``;
- **period lags** ``k * season .. 1 * season``: the same step on the ``k`` previous seasons. The season is a day,
  or a week when a day is not longer than the close window plus the horizon (e.g. a 1d or 12h cadence). ``k``
  (at most ``periods``) is the largest that leaves at least ``max(one season, a third of the history)`` steps of
  targets, so lags appear only once the history covers them. One day of 30-minute steps: close lags only.

Milan hourly (62 days, or the 1,008 training hours of ``bench vhtwin``) gives exactly ``samples.LAGS``: 120, 96,
72, 48, 24 then 5 .. 1, first target 120 (``tests/test_inputs.py``).

**Missing steps** (NaN in the series): inputs are carried forward from the entity's latest earlier value, at most
``fill_limit`` steps (``series.fill_forward``: never from a later step); a sample whose inputs are still missing
or whose target is missing is masked: not trained on, not scored, no forecast issued.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from twin_store.federation.series import DAY_MS, fill_forward

WEEK_MS = 7 * DAY_MS
CLOSE = 5
PERIODS = 5


@dataclass(frozen=True)
class InputPlan:
    """Which lags a twin's inputs are. ``lags`` are in steps, oldest first: period lags then close lags."""

    step_ms: int
    horizon: int
    season: int  # steps per season (a day or a week); 0: none
    period_lags: tuple[int, ...]  # oldest first
    close_lags: tuple[int, ...]  # oldest first
    fill_limit: int  # inputs carried forward at most this many steps

    @property
    def lags(self) -> np.ndarray:
        return np.array(self.period_lags + self.close_lags, dtype=np.int64)

    @property
    def n_inputs(self) -> int:
        return len(self.period_lags) + len(self.close_lags)

    @property
    def first_target(self) -> int:
        """The earliest target step whose every input lies inside the series (step >= 0)."""
        return int(self.lags.max())

    @property
    def seasonal_lag(self) -> int | None:
        """The seasonal-naive baseline's lag: the latest whole season at or beyond the horizon, if covered."""
        if not self.season or not self.period_lags:
            return None
        return self.season * -(-self.horizon // self.season)

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> InputPlan:
        values = dict(meta)
        values["period_lags"] = tuple(values["period_lags"])
        values["close_lags"] = tuple(values["close_lags"])
        return cls(**values)

    def prepare(self, z: np.ndarray) -> np.ndarray:
        """The input view of a z-scored series ``[E, T]``: gaps carried forward (past values only)."""
        return fill_forward(z, self.fill_limit)

    def inputs_at(self, z_in: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``[E, len(targets), n_inputs]`` from the prepared series ``z_in [E, T]`` (see :meth:`prepare`). Uses
        only steps ``<= target - horizon``. Targets before ``first_target`` get NaN for the missing lags."""
        t = np.asarray(targets, dtype=np.int64)
        idx = t[:, None] - self.lags[None, :]
        out = z_in[:, np.clip(idx, 0, None)]
        if idx.size and idx.min() < 0:
            out = np.where(idx[None] >= 0, out, np.nan)
        return out

    def samples(
        self, z: np.ndarray, start: int, stop: int, z_in: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every sample with its target in ``[start, stop)``: inputs ``[E, N, L]``, targets ``[E, N]`` (raw, NaN
        where missing) and ``ok [E, N]`` (inputs and target all present). ``z`` is the z-scored series,
        ``z_in`` its prepared view (computed when not given)."""
        z_in = self.prepare(z) if z_in is None else z_in
        targets = np.arange(max(start, self.first_target), max(stop, self.first_target))
        x = self.inputs_at(z_in, targets)
        y = z[:, targets]
        ok = np.isfinite(x).all(axis=2) & np.isfinite(y)
        return x, y, ok


def season_steps(step_ms: int, close: int = CLOSE, horizon: int = 1) -> int:
    """Steps per season: a day, or a week when a day is not longer than the close window plus the horizon."""
    day = DAY_MS // step_ms
    return int(day if day > close + horizon else WEEK_MS // step_ms)


def plan_inputs(
    step_ms: int,
    history_steps: int,
    horizon: int = 1,
    close: int = CLOSE,
    periods: int = PERIODS,
    fill_limit: int | None = None,
) -> InputPlan:
    """The lags for a cadence and the history that exists (``history_steps`` steps to train on).

    See the module docstring for the rule. ``fill_limit`` defaults to one season (a day at most).
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 step, got {horizon}")
    if close < 1:
        raise ValueError(f"close must be >= 1, got {close}")
    season = season_steps(step_ms, close, horizon)
    need = max(season, history_steps // 3)
    k = 0
    while k < periods and history_steps - (k + 1) * season >= need:
        k += 1
    period = tuple(season * d for d in range(k, 0, -1) if season * d >= horizon)
    close_lags = tuple(range(horizon + close - 1, horizon - 1, -1))
    limit = fill_limit if fill_limit is not None else min(season, DAY_MS // step_ms)
    return InputPlan(step_ms, horizon, season if period else 0, period, close_lags, limit)


@dataclass(frozen=True)
class EntityScaler:
    """Per-entity mean and std (a std of 0 becomes 1), kept with the twin so the stream scales the same way."""

    mean: np.ndarray  # [E]
    std: np.ndarray  # [E]

    @classmethod
    def fit(cls, values: np.ndarray, stop: int) -> EntityScaler:
        """From steps ``[0, stop)`` of ``values [E, T]``, NaN ignored; an entity without a value gets (0, 1)."""
        part = np.asarray(values, dtype=np.float64)[:, :stop]
        n = np.isfinite(part).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, np.nansum(part, axis=1) / np.maximum(n, 1), 0.0)
            var = np.where(n > 0, np.nansum((part - mean[:, None]) ** 2, axis=1) / np.maximum(n, 1), 1.0)
        std = np.sqrt(var)
        return cls(mean, np.where(std > 0, std, 1.0))

    @classmethod
    def fit_first(cls, values: np.ndarray, n_values: int) -> EntityScaler:
        """For late joiners: each entity's statistics from its first ``n_values`` present values (fewer if it has
        fewer), wherever its clock started."""
        a = np.asarray(values, dtype=np.float64)
        rank = np.cumsum(np.isfinite(a), axis=1)
        first = np.where(np.isfinite(a) & (rank <= n_values), a, np.nan)
        return cls.fit(first, a.shape[1])

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean[:, None]) / self.std[:, None]

    def inverse(self, z: np.ndarray) -> np.ndarray:
        shape = (-1,) + (1,) * (z.ndim - 1)
        return z * self.std.reshape(shape) + self.mean.reshape(shape)

    def merged(self, other: EntityScaler, rows: np.ndarray) -> EntityScaler:
        """These statistics with ``rows`` taken from ``other`` (e.g. late joiners' first-stretch scalers)."""
        mean, std = self.mean.copy(), self.std.copy()
        mean[rows], std[rows] = other.mean[rows], other.std[rows]
        return EntityScaler(mean, std)


def daily_profiles(z: np.ndarray, stop: int, step_ms: int, start_ms: int = 0) -> np.ndarray:
    """Mean z-score per step of the day over steps ``[0, stop)`` (NaN skipped; 0 where never seen): the traffic
    profile DCS clusters on, ``[E, steps per day]``. With a 1d cadence, per day of the week instead."""
    per_day = DAY_MS // step_ms
    slots = per_day if per_day > 1 else 7
    phase = (start_ms // step_ms) % slots
    part = np.asarray(z, dtype=np.float64)[:, :stop]
    slot = (np.arange(part.shape[1]) + phase) % slots
    ok = np.isfinite(part)
    out = np.zeros((part.shape[0], slots))
    for e in range(part.shape[0]):
        sums = np.bincount(slot[ok[e]], weights=part[e, ok[e]], minlength=slots)
        counts = np.bincount(slot[ok[e]], minlength=slots)
        out[e] = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return out
