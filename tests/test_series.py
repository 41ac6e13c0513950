"""The regular-series builder: steps, aggregates, duplicates, gaps, and no future leakage (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin_store.federation.series import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    aggregate_step,
    build_series,
    cadence_text,
    fill_forward,
    parse_cadence,
)

T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS  # a day boundary


def test_cadences() -> None:
    assert parse_cadence("10m") == 10 * MINUTE_MS
    assert parse_cadence("30min") == 30 * MINUTE_MS
    assert parse_cadence("1h") == HOUR_MS
    assert parse_cadence("1d") == DAY_MS
    assert cadence_text(parse_cadence("2h")) == "2h"
    for bad in ("7m", "0m", "2d", "30s", "ten minutes", "", "5h"):
        with pytest.raises(ValueError):
            parse_cadence(bad)


def test_aggregates_gaps_and_late_clocks() -> None:
    step = 10 * MINUTE_MS
    ents = ["a", "a", "a", "b"]
    times = [T0 + 1_000, T0 + 5 * MINUTE_MS, T0 + 25 * MINUTE_MS, T0 + 21 * MINUTE_MS]
    vals = [1.0, 3.0, 7.0, 2.0]
    expect = {
        "sum": [[4.0, np.nan, 7.0], [np.nan, np.nan, 2.0]],
        "mean": [[2.0, np.nan, 7.0], [np.nan, np.nan, 2.0]],
        "last": [[3.0, np.nan, 7.0], [np.nan, np.nan, 2.0]],
        "max": [[3.0, np.nan, 7.0], [np.nan, np.nan, 2.0]],
    }
    for how, want in expect.items():
        s = build_series(ents, times, vals, step, how)
        assert s.entities == ("a", "b") and s.start_ms == T0 and s.steps == 3
        np.testing.assert_array_equal(s.values, np.array(want), err_msg=how)
    s = build_series(ents, times, vals, step, "mean")
    assert s.first_steps().tolist() == [0, 2]  # b's clock starts two steps later: NaN before, never filled
    assert s.counts.tolist() == [[2, 0, 1], [0, 0, 1]]


def test_duplicates_last_arrival_wins_and_last_is_by_time() -> None:
    step = HOUR_MS
    # the same (entity, time) twice: one measurement, the later arrival; "last" = the latest time, not arrival
    s = build_series(["a", "a", "a"], [T0 + 10, T0 + 10, T0 + 5], [1.0, 9.0, 4.0], step, "sum")
    assert s.values.tolist() == [[13.0]] and s.counts.tolist() == [[2]]
    s = build_series(["a", "a", "a"], [T0 + 10, T0 + 10, T0 + 5], [1.0, 9.0, 4.0], step, "last")
    assert s.values.tolist() == [[9.0]]


def test_until_and_start_and_order() -> None:
    step = HOUR_MS
    s = build_series(["a", "a"], [T0, T0 + 2 * HOUR_MS + 1], [1.0, 2.0], step, until_ms=T0 + 2 * HOUR_MS + 30)
    assert s.steps == 2 and np.isnan(s.values[0, 1])  # step 2 has not closed: not built, its record ignored
    assert s.counts.sum() == 1
    s = build_series(["a"], [T0], [1.0], step, start_ms=T0 - HOUR_MS, entity_order=["z", "a"])
    assert s.entities == ("z", "a") and s.values.shape == (2, 2)
    assert np.isnan(s.values[0]).all() and s.values[1].tolist()[1] == 1.0


def test_fill_forward_never_looks_ahead() -> None:
    a = np.array([[np.nan, 1.0, np.nan, np.nan, np.nan, 5.0]])
    assert np.array_equal(
        fill_forward(a, 2), np.array([[np.nan, 1.0, 1.0, 1.0, np.nan, 5.0]]), equal_nan=True
    )


records = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(min_value=0, max_value=40 * 10),  # minutes after T0
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(records, st.integers(min_value=0, max_value=400), st.sampled_from(["sum", "mean", "last", "max"]))
def test_no_future_leakage(recs: list[tuple[str, int, float]], cut_min: int, how: str) -> None:
    """A series built from the records before a cut equals the full build on every step closed by the cut."""
    step = 10 * MINUTE_MS
    ents = [e for e, _, _ in recs]
    times = [T0 + m * MINUTE_MS for _, m, _ in recs]
    vals = [v for _, _, v in recs]
    start = T0
    cut = T0 + cut_min * MINUTE_MS
    full = build_series(ents, times, vals, step, how, start_ms=start, entity_order=["a", "b", "c"])
    before = [i for i, t in enumerate(times) if t < cut]
    part = build_series(
        [ents[i] for i in before],
        [times[i] for i in before],
        [vals[i] for i in before],
        step,
        how,
        start_ms=start,
        until_ms=cut,
        entity_order=["a", "b", "c"],
    )
    closed = part.steps
    assert closed == (cut - start) // step
    shared = min(closed, full.steps)  # the full build ends at its latest record's step
    np.testing.assert_array_equal(part.values[:, :shared], full.values[:, :shared])
    assert np.isnan(part.values[:, shared:]).all()
    # and records after the cut never change it, even built together with them
    together = build_series(
        ents, times, vals, step, how, start_ms=start, until_ms=cut, entity_order=["a", "b", "c"]
    )
    np.testing.assert_array_equal(together.values, part.values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(-10, 10)), min_size=1, max_size=40), st.integers(0, 5))
def test_fill_forward_is_causal(raw: list[float | None], limit: int) -> None:
    a = np.array([[np.nan if x is None else x for x in raw]])
    full = fill_forward(a, limit)
    for k in range(1, a.shape[1] + 1):
        np.testing.assert_array_equal(fill_forward(a[:, :k], limit), full[:, :k])
    present = np.isfinite(a)
    np.testing.assert_array_equal(full[present], a[present])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.floats(-1e3, 1e3)), min_size=1, max_size=12),
    st.sampled_from(["sum", "mean", "last", "max"]),
)
def test_one_step_at_a_time_equals_the_batch_build(points: list[tuple[int, float]], how: str) -> None:
    """A live window closing one step (aggregate_step) gives the batch builder's value for that step."""
    times = [T0 + t for t, _ in points]
    vals = [v for _, v in points]
    batch = build_series(["a"] * len(points), times, vals, HOUR_MS, how).values[0, 0]
    assert aggregate_step(times, vals, how) == pytest.approx(batch, rel=1e-12, abs=1e-9)
