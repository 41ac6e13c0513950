"""The stream protocol shared by the benchmark and the live BS agents (pure: no services)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from twin_store.federation import dcs
from twin_store.federation.local_updates import (
    StreamPlan,
    local_updates,
    minibatch_generators,
    profile_upto,
    window_samples,
)
from twin_store.federation.reclustering import MilanGrouping, Reclusterer
from twin_store.federation.samples import FIRST_TARGET, samples
from twin_store.federation.twinning import ClusterTwins
from twin_store.models.forecaster import FitConfig, TwinModel

MILAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan"


def plan(**kw: object) -> StreamPlan:
    return StreamPlan(seed=3, start_hour=200, start_ms=0, fit=FitConfig(4, 1e-2, 8), **kw)  # type: ignore[arg-type]


def test_each_bs_is_due_once_per_period_from_the_start_hour_on() -> None:
    p = plan()
    for square in (1, 17, 4242):
        due = [h for h in range(0, 200 + 3 * 24) if p.due(square, h)]
        assert len(due) == 3 and due[0] >= 200 and np.all(np.diff(due) == 24)
    offsets = {p.offset(s) for s in range(1, 200)}
    assert len(offsets) > 12  # staggered, not all at once
    assert plan().offset(17) == p.offset(17) and StreamPlan.from_meta(p.to_meta()) == p


def test_window_samples_match_the_offline_samples_and_drop_gaps() -> None:
    z = np.random.default_rng(0).normal(size=400)
    x, y = window_samples(z, FIRST_TARGET, 300)
    x_ref, y_ref = samples(z[None, :], FIRST_TARGET, 301)
    np.testing.assert_array_equal(x, x_ref[0])
    np.testing.assert_array_equal(y, y_ref[0])
    z[250] = np.nan  # a missing hour removes the samples that read it: targets 250..255, 274, 298
    x_gap, y_gap = window_samples(z, FIRST_TARGET, 300)
    assert len(y_gap) == len(y) - 8 and np.isfinite(x_gap).all()


def test_a_bs_update_does_not_depend_on_what_else_is_in_the_stack() -> None:
    model = TwinModel(8)
    rng = np.random.default_rng(1)
    series = [rng.normal(size=300) for _ in range(3)]
    starts = model.init(3, 0)
    p = plan()
    together, loss, counts = local_updates(model, starts, series, [5, 6, 7], 260, p)
    alone, _, _ = local_updates(model, starts[1:2], series[1:2], [6], 260, p)
    # every BS trains on its samples with targets FIRST_TARGET..260, fewer than the plan's window (the old
    # `== [window] * 3 or ...` could never take its first branch)
    assert counts == [260 - FIRST_TARGET + 1] * 3 and counts[0] < p.window
    torch.testing.assert_close(together[1], alone[0], atol=1e-6, rtol=0)
    assert not torch.allclose(together[1], starts[1]) and (loss > 0).all()
    # a BS without a single complete sample keeps its start and reports no samples
    empty, _, n = local_updates(model, starts[:1], [np.full(300, np.nan)], [5], 260, p)
    assert n == [0] and torch.equal(empty[0], starts[0])


def test_minibatch_generators_are_per_square_and_hour() -> None:
    a = [torch.rand(3, generator=g) for g in minibatch_generators(1, [10, 11], 5)]
    b = [torch.rand(3, generator=g) for g in minibatch_generators(1, [11], 5)]
    c = [torch.rand(3, generator=g) for g in minibatch_generators(1, [11], 6)]
    assert torch.equal(a[1], b[0]) and not torch.equal(b[0], c[0]) and not torch.equal(a[0], a[1])


def test_profile_is_the_mean_per_hour_of_day_skipping_gaps() -> None:
    z = np.arange(24 * 3, dtype=float)
    assert profile_upto(z, 71) == pytest.approx((np.arange(24) + 24).tolist())
    assert profile_upto(z, 25)[:2] == [12.0, 13.0] and profile_upto(z, 25)[2] == 2.0
    z[24] = np.nan
    assert profile_upto(z, 71)[0] == 24.0  # mean of 0 and 48


@pytest.mark.skipif(not (MILAN / "milano-grid.geojson").exists(), reason="Milan grid not found")
def test_reclusterer_runs_after_k_updates_at_a_later_hour_and_moves_twins() -> None:
    squares = [1000, 1001, 1002, 5000, 5001, 5002]
    attrs = dcs.SquareAttributes.load(MILAN, squares)
    # start with a clustering that mixes the two far-apart groups
    start = {s: i % 2 for i, s in enumerate(squares)}
    twins = ClusterTwins(labels=dict(start), twins={0: torch.zeros(4), 1: torch.ones(4)})
    for s in squares:
        twins.latest[s] = (torch.full((4,), float(s >= 5000)), 10)
    r = Reclusterer(MilanGrouping(attrs), 2, 0, every=3, membership=dcs.Membership(dict(start), 0))
    morning = [1.0] * 12 + [0.0] * 12
    evening = [0.0] * 12 + [1.0] * 12
    for s in squares[:5]:  # 5002 never reports: it stays where it is
        r.accepted(s, 10, morning if s < 5000 else evening)
        assert not r.due(10)
    assert r.due(11)
    moves = r.run(twins, fallback=torch.zeros(4))
    assert not r.due(11) and r.membership.epoch == 1 and r.membership.labels[5002] == start[5002]
    # the partition is DCS's on the reporting squares and their profiles
    profiles = np.array([morning] * 3 + [evening] * 2)
    expected = dcs.cluster(dcs.relationship_matrix(attrs.subset(squares[:5]), profiles, dcs.DcsWeights()), 2)
    got = [twins.labels[s] for s in squares[:5]]
    assert all((expected[i] == expected[j]) == (got[i] == got[j]) for i in range(5) for j in range(5))
    assert moves and all(twins.labels[s] == new for s, _, new in moves)
    # the moved members' updates moved with them: each cluster twin is the FedAvg of its members
    for cid in set(twins.labels.values()):
        members = twins.members(cid)
        expected = torch.stack([twins.latest[s][0] for s in members]).mean(dim=0)
        torch.testing.assert_close(twins.twins[cid], expected)
