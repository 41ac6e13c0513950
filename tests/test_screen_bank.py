"""``ScreenBank`` (the BS agents' vectorised traffic screen) against one ``SourceScreen`` per source."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin_store.models.telemetry_screen import RollingQuantile, ScreenBank, SourceScreen


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(["robust", "zscore"]),
    rebaseline=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    sources=st.integers(1, 5),
    points=st.integers(0, 160),
    shift=st.floats(0, 50),
)
def test_screen_bank_equals_one_source_screen_per_source(
    method: str, rebaseline: bool, seed: int, sources: int, points: int, shift: float
) -> None:
    """Interleaved points of several sources (some repeated within one call, some quantised, a level shift
    that makes ADWIN re-baseline): the bank's scores and flags are exactly the per-source screens'."""
    rng = np.random.default_rng(seed)
    params: dict[str, object] = {"window": 48, "min_samples": 10}
    if method == "robust":
        params |= {"rebaseline": rebaseline, "min_scored": 20, "gate_window": 60}
    keys = rng.integers(0, sources, points).tolist()
    values = rng.standard_t(3, points) + np.where(np.arange(points) > points // 2, shift, 0.0)
    values[rng.random(points) < 0.2] = 1.0  # repeated values: windows whose MAD is 0
    bank = ScreenBank(method, **params)
    singles = {k: SourceScreen(method, **params) for k in set(keys)}
    expected = [singles[k].update(v, 0) for k, v in zip(keys, values.tolist(), strict=True)]
    got_scores: list[float] = []
    got_flags: list[bool] = []
    cuts = sorted(set(rng.integers(0, points + 1, 6).tolist()) | {0, points})
    for a, b in itertools.pairwise(cuts):
        scores, flags = bank.update(keys[a:b], values[a:b])
        got_scores += scores.tolist()
        got_flags += flags.tolist()
    assert got_scores == [s for s, _ in expected]
    assert got_flags == [f for _, f in expected]
    assert bank.points == points
    assert bank.flagged == sum(f for _, f in expected)


def test_screen_bank_flags_a_spike_and_rebaselines_after_a_level_shift() -> None:
    rng = np.random.default_rng(0)
    bank = ScreenBank("robust", min_scored=10)
    keys = ["a", "b"]
    for _ in range(300):
        bank.update(keys, rng.normal(size=2))
    assert bank.update(keys, np.array([40.0, 0.1]))[1].tolist() == [True, False]
    for _ in range(400):  # "a" moves to a new level: flagged at first, then the new normal
        flags = bank.update(keys, np.array([20.0, 0.0]) + rng.normal(size=2))[1]
    assert not flags.any()


def test_screen_bank_refuses_hst_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="window method"):
        ScreenBank("hst")
    with pytest.raises(ValueError, match="2 keys but 1 values"):
        ScreenBank().update(["a", "b"], np.array([1.0]))


@settings(max_examples=60, deadline=None)
@given(
    q=st.floats(0.0, 1.0),
    window=st.integers(1, 40),
    values=st.lists(st.floats(-1e6, 1e6), max_size=120),
)
def test_rolling_quantile_equals_rivers(q: float, window: int, values: list[float]) -> None:
    """The gate's quantile (ours: it grows with the scores instead of reserving the window) gives river's
    ``RollingQuantile`` values after every update, to within rounding."""
    from river import stats

    ours, theirs = RollingQuantile(q, window), stats.RollingQuantile(q, window_size=window)
    assert ours.get() is None
    for x in values:
        ours.update(x)
        theirs.update(x)
        got, want = ours.get(), theirs.get()
        assert got is not None and want is not None
        assert got == pytest.approx(want, rel=1e-12, abs=1e-9)
    assert ours.ring.shape[0] <= max(16, 2 * min(len(values), window))


def test_rolling_quantile_holds_what_it_has_seen_not_the_whole_window() -> None:
    gate = RollingQuantile(0.995, 1000)
    for x in range(40):
        gate.update(float(x))
    assert gate.ring.nbytes == 64 * 8  # 40 scores: a 64-slot ring, not 1,000 slots
    for x in range(5000):
        gate.update(float(x))
    assert gate.ring.nbytes == 1000 * 8
    assert gate.get() == pytest.approx(np.quantile(np.arange(4000, 5000, dtype=float), 0.995))
