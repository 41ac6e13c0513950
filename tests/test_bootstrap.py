"""Bootstrap V-twinning's pure parts (twin_store/federation/bootstrap.py): the grid the stream's history makes,
the readiness rule, and the packed training samples."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from twin_store.federation.bootstrap import (
    VALIDATION_MIN,
    build_grid,
    default_need,
    grid_of,
    prepare,
    ready,
)
from twin_store.federation.series import DAY_MS


def test_grid_aligns_entities_to_midnight_and_keeps_gaps() -> None:
    step = 1_800_000
    t0 = 3 * DAY_MS + 5 * step
    rows = [
        (2, "b", t0, 1.0),
        (1, "a", t0 + step, 2.0),
        (1, "a", t0 + 3 * step, 4.0),
        (1, "a", t0 + 3 * step, 5.0),
    ]
    g = build_grid(rows, step)
    assert g.start_ms == 3 * DAY_MS and g.names == ["a", "b"] and g.steps == 9
    assert g.values[0, 6] == 2.0 and np.isnan(g.values[0, 7]) and g.values[0, 8] == 5.0  # last row wins
    assert ready(g, 2, 1) and not ready(g, 2, 2) and not ready(g, 3, 1)
    assert not ready(build_grid([], step), 1, 1)


def test_prepare_twins_the_ready_entities_and_packs_valid_samples_first() -> None:
    rng = np.random.default_rng(0)
    steps = 200
    values = 10 + rng.standard_normal((3, steps))
    values[1, 50:60] = np.nan  # a gap of ten steps
    values[2, :150] = np.nan  # a late clock: only 50 steps
    rows = [
        (k + 1, f"e{k}", s * 600_000, float(values[k, s]))
        for k in range(3)
        for s in range(steps)
        if np.isfinite(values[k, s])
    ]
    grid = build_grid(rows, 600_000)
    need = default_need(1)
    prep = prepare(grid, 100, 1)
    assert prep.grid.names == ["e0", "e1"] and prep.train == steps - max(VALIDATION_MIN, steps // 5)
    assert need == 5 + 30 + VALIDATION_MIN
    # every valid sample is packed first; e1's gap costs samples, never leaks NaN into training
    assert prep.counts[0] > prep.counts[1] > 0 and np.isfinite(prep.x).all() and np.isfinite(prep.y).all()
    k = int(prep.counts[1])
    lags = prep.plan.lags
    targets = np.arange(int(lags.max()), prep.train)
    z1 = prep.z[1]
    valid = [
        t
        for t in targets
        if np.isfinite(z1[t]) and all(np.isfinite(z1[t - lag]) or t - lag in range(50, 60) for lag in lags)
    ]
    assert k <= len(valid) and set(np.round(prep.y[1, :k], 9)) <= set(np.round(z1[valid], 9))
    # the scaler comes from the training steps only
    assert np.allclose(prep.scaler.mean[0], np.mean(values[0, : prep.train]))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(1, 6), st.integers(0, 3 * 48), st.floats(-1e6, 1e6, allow_nan=False)),
        max_size=80,
    )
)
def test_grid_from_columns_is_the_row_by_row_grid(rows: list[tuple[int, int, float]]) -> None:
    """The columns the bootstrap reads (``grid_of``, vectorised) give the grid a row-by-row fill gives,
    duplicates included: the last row of a step wins, the last name of a key."""
    step = 1_800_000
    t0 = 2 * DAY_MS + 7 * step
    full = [(k, f"n{k}-{i % 2}", t0 + s * step, v) for i, (k, s, v) in enumerate(rows)]
    names = {k: n for k, n, _, _ in full}
    g = grid_of(
        np.array([r[0] for r in full], dtype=np.int64),
        np.array([r[2] for r in full], dtype=np.int64),
        np.array([r[3] for r in full]),
        names,
        step,
    )
    if not full:
        assert g.values.size == 0 and g.names == []
        return
    keys = sorted(names)
    first = min(r[2] for r in full)
    start = first - first % DAY_MS
    expected = np.full((len(keys), (max(r[2] for r in full) - start) // step + 1), np.nan)
    for k, _, t, v in full:
        expected[keys.index(k), (t - start) // step] = v
    assert g.keys.tolist() == keys and g.names == [names[k] for k in keys] and g.start_ms == start
    np.testing.assert_array_equal(g.values, expected)
    assert build_grid(full, step).names == g.names
    np.testing.assert_array_equal(build_grid(full, step).values, expected)
