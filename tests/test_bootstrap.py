"""Bootstrap V-twinning's pure parts (twin_store/federation/bootstrap.py): inputs adapted to the cadence and
history, the grid, gap rules, clusters for tiny deployments."""

from __future__ import annotations

import numpy as np
import pytest

from twin_store.federation.bootstrap import (
    DAY_MS,
    EntityScaler,
    build_grid,
    carry_forward,
    cluster_labels,
    default_need,
    input_lags,
    nearest_cluster,
    ready,
    training_samples,
)
from twin_store.federation.samples import LAGS


def test_milan_hourly_keeps_the_benchmark_inputs() -> None:
    assert input_lags(24, 62 * 24) == tuple(LAGS.tolist())


def test_inputs_adapt_to_short_history_cadence_and_horizon() -> None:
    assert input_lags(48, default_need(1)) == tuple(range(10, 0, -1))  # close steps only
    assert input_lags(48, 3 * 48) == (96, 48, 8, 7, 6, 5, 4, 3, 2, 1)  # two days covered
    week_of_2min = input_lags(720, 7 * 720, horizon=2)
    assert week_of_2min[:5] == (3600, 2880, 2160, 1440, 720) and min(week_of_2min) == 2
    for spd, hist, h in [(24, 100, 1), (1440, 5000, 3), (1, 400, 1), (96, 30, 5)]:
        lags = input_lags(spd, hist, h)
        assert (
            len(lags) == 10 and len(set(lags)) == 10 and min(lags) >= h
        )  # never data the forecast can't have


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


def test_gaps_are_carried_forward_never_back() -> None:
    z = np.array([[np.nan, 1.0, np.nan, np.nan, 3.0, np.nan]])
    assert carry_forward(z).tolist() == [[0.0, 1.0, 1.0, 1.0, 3.0, 3.0]]
    # changing a later value never changes an earlier filled one
    later = z.copy()
    later[0, 4] = 99.0
    assert carry_forward(later)[0, :4].tolist() == carry_forward(z)[0, :4].tolist()


def test_training_samples_use_only_earlier_steps() -> None:
    z = np.arange(40, dtype=float)[None, :]
    x, y = training_samples(z, tuple(range(10, 0, -1)), 30)
    assert x.shape == (1, 20, 10) and (x.max(axis=2) < y).all()


def test_scaler_ignores_missing_steps() -> None:
    s = EntityScaler.fit(np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, np.nan], [2.0, 2.0, 2.0]]))
    assert s.mean.tolist() == [2.0, 0.0, 2.0] and s.std.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_to_three_entities_get_a_cluster_each(n: int) -> None:
    assert cluster_labels(np.random.default_rng(0).random((n, 24)), 4, 1).tolist() == list(range(n))


def test_clusters_from_profiles_and_positions() -> None:
    rng = np.random.default_rng(1)
    day = np.sin(np.linspace(0, 2 * np.pi, 24))
    prof = np.vstack(
        [day + 0.05 * rng.standard_normal(24) for _ in range(5)]
        + [-day + 0.05 * rng.standard_normal(24) for _ in range(5)]
    )
    labels = cluster_labels(prof, 2, 1)
    assert (
        len(set(labels[:5].tolist())) == 1 and len(set(labels[5:].tolist())) == 1 and labels[0] != labels[5]
    )
    pos = np.array([[45.0 + i * 0.001, 9.0] for i in range(5)] + [[48.0 + i * 0.001, 2.0] for i in range(5)])
    assert cluster_labels(prof, 2, 1, pos).tolist() == labels.tolist()
    centroids = {0: day, 1: -day}
    assert nearest_cluster(-day, centroids) == 1
    assert (
        nearest_cluster(
            day, centroids, np.array([48.0, 2.0]), {0: np.array([45.0, 9.0]), 1: np.array([48.0, 2.0])}
        )
        == 1
    )
