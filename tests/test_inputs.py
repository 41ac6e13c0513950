"""Input plans for any cadence and history, per-entity scalers, and late joiners' clusters."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from twin_store.federation import samples
from twin_store.federation.inputs import EntityScaler, daily_profiles, plan_inputs
from twin_store.federation.series import DAY_MS, HOUR_MS, MINUTE_MS, parse_cadence


def test_milan_hourly_keeps_todays_lags() -> None:
    for history in (1488, 1008, 1488 - 480):  # the whole file, and the training hours of bench vhtwin
        plan = plan_inputs(HOUR_MS, history)
        assert plan.lags.tolist() == samples.LAGS.tolist()
        assert plan.first_target == samples.FIRST_TARGET
        assert plan.seasonal_lag == 24


def test_inputs_adapt_to_cadence_and_history() -> None:
    week_2m = plan_inputs(2 * MINUTE_MS, 7 * DAY_MS // (2 * MINUTE_MS) - 480)  # a week of 2-minute data
    assert week_2m.season == 720 and week_2m.period_lags == (2880, 2160, 1440, 720)
    assert week_2m.close_lags == (5, 4, 3, 2, 1)
    one_day_30m = plan_inputs(parse_cadence("30m"), 32)  # the Milan day as 30-minute PM files
    assert (
        one_day_30m.period_lags == () and one_day_30m.seasonal_lag is None and one_day_30m.first_target == 5
    )
    intel = plan_inputs(parse_cadence("30m"), 160)
    assert intel.period_lags == (96, 48)
    daily = plan_inputs(DAY_MS, 400)  # a day is a step: the season is a week
    assert daily.season == 7 and daily.period_lags[-1] == 7
    h3 = plan_inputs(HOUR_MS, 1008, horizon=3)
    assert h3.close_lags == (7, 6, 5, 4, 3) and h3.seasonal_lag == 24


def test_samples_mask_gaps_and_use_only_the_past() -> None:
    plan = plan_inputs(HOUR_MS, 30, close=3)  # no period lags at 30 hours
    z = np.arange(30, dtype=float)[None, :].repeat(2, axis=0)
    z[1, 10] = np.nan  # a gap: carried forward as an input, never a target
    z[1, :4] = np.nan  # a late clock
    x, y, ok = plan.samples(z, 0, 30)
    assert x.shape == (2, 27, 3)
    assert (x[0, :, -1] == y[0] - 1).all()  # the latest input is the step before the target
    row = list(range(3, 30))
    assert not ok[1, row.index(10)]  # missing target: masked
    assert ok[1, row.index(11)] and x[1, row.index(11)].tolist() == [8.0, 9.0, 9.0]  # carried from step 9
    assert not ok[1, row.index(5)]  # inputs before the clock started: masked


@settings(max_examples=60, deadline=None)
@given(st.integers(40, 200), st.integers(1, 4), st.integers(0, 199))
def test_inputs_never_read_the_target_or_later(steps: int, horizon: int, poison_at: int) -> None:
    """Changing any step >= t - horizon + 1 never changes the inputs of target t."""
    plan = plan_inputs(HOUR_MS, steps, horizon=horizon)
    rng = np.random.default_rng(steps)
    z = rng.normal(size=(1, steps))
    z[0, rng.random(steps) < 0.1] = np.nan
    poison_at %= steps
    bad = z.copy()
    bad[0, poison_at:] = 1e9
    targets = np.arange(plan.first_target, steps)
    a = plan.inputs_at(plan.prepare(z), targets)
    b = plan.inputs_at(plan.prepare(bad), targets)
    safe = targets - horizon < poison_at
    np.testing.assert_array_equal(a[:, safe], b[:, safe])


def test_scalers_for_late_joiners() -> None:
    v = np.full((2, 10), np.nan)
    v[0] = np.arange(10.0)
    v[1, 6:] = [10.0, 20.0, 30.0, 1e6]  # joins at step 6
    sc = EntityScaler.fit(v, 5)
    assert sc.mean[0] == 2.0 and sc.mean[1] == 0.0 and sc.std[1] == 1.0  # nothing yet: identity
    late = EntityScaler.fit_first(v, 3)
    assert late.mean[1] == 20.0  # its first three values, not the outlier after them
    merged = sc.merged(late, np.array([1]))
    assert merged.mean.tolist() == [2.0, 20.0]


def test_daily_profiles_follow_the_clock() -> None:
    z = np.tile(np.arange(24.0), 3)[None, :]
    prof = daily_profiles(z, 72, HOUR_MS, start_ms=5 * HOUR_MS)  # step 0 is 05:00
    assert prof[0, 5] == 0.0 and prof[0, 4] == 23.0
