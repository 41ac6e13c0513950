"""The store's twin state without services: re-clustering in the stream, membership rows, restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import TwinMessage
from twin_store.models.forecaster import FitConfig
from twin_store.services.htwin import TwinState

MILAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan"
pytestmark = pytest.mark.skipif(not (MILAN / "milano-grid.geojson").exists(), reason="Milan grid not found")
SQUARES = [1000, 1001, 1002, 5000, 5001, 5002]
P = 6
MORNING = [1.0] * 12 + [0.0] * 12
EVENING = [0.0] * 12 + [1.0] * 12


def snapshot(recluster_every: int) -> dict[bytes, TwinMessage]:
    plan = StreamPlan(1, 100, 0, fit=FitConfig(2, 1e-2, 4), recluster_every=recluster_every)
    meta = {"plan": plan.to_meta(), "clusters": 2, "milan_dir": str(MILAN), "as_of": -1, "scaler": {}}
    msgs = [TwinMessage("global", "0", 1, 8, np.zeros(P, np.float32), meta)]
    # a clustering that mixes the two far-apart groups
    for c in (0, 1):
        members = SQUARES[c::2]
        msgs.append(TwinMessage("cluster", str(c), 1, 8, np.full(P, c, np.float32), {"members": members}))
    return {m.key: m for m in msgs}


def update(square: int, hour: int) -> TwinMessage:
    value = 1.0 if square >= 5000 else -1.0
    profile = EVENING if square >= 5000 else MORNING
    meta = {"seq": hour, "hour": hour, "n_samples": 10, "loss": 0.1, "profile": profile}
    return TwinMessage("bs", str(square), 1, 8, np.full(P, value, np.float32), meta)


def test_the_store_reclusters_before_the_first_update_of_a_later_hour_and_can_restart() -> None:
    state = TwinState.from_messages(snapshot(recluster_every=5), psi=0.0)
    published: list[TwinMessage] = []
    for s in SQUARES[:5]:
        result = state.apply(update(s, 100))
        assert result is not None
        published += result.twins
        assert not any(line.startswith("membership") for line in result.lines)
    assert state.counters["reclusterings"] == 0
    result = state.apply(update(5002, 101))
    assert result is not None
    twins, lines = result.twins, result.lines
    assert state.counters["reclusterings"] == 1
    membership = [line for line in lines if line.startswith("membership")]
    assert len(membership) == len(SQUARES) and all("epoch=1i" in line for line in membership)
    assert state.reclusterer is not None and state.reclusterer.membership.epoch == 1
    epochs = {t.meta["epoch"] for t in twins if t.level == "cluster"}
    assert epochs == {1} and all(t.meta["as_of"] in (100, 101) for t in twins if t.level == "cluster")
    # the members' clusters are the ones their cluster messages list, and each twin is their FedAvg
    for cid in set(state.clusters.labels.values()):
        members = state.clusters.members(cid)
        with_updates = [s for s in members if s in state.clusters.latest]
        expected = np.mean([state.clusters.latest[s][0].numpy() for s in with_updates], axis=0)
        np.testing.assert_allclose(state.clusters.twins[cid].numpy(), expected, rtol=1e-6)

    # a restarted store rebuilds the same membership, epoch and re-clustering counter from its snapshot
    latest = snapshot(recluster_every=5)
    for t in published + twins:
        latest[t.key] = t
    again = TwinState.from_messages(latest, psi=0.0)
    assert again.clusters.labels == state.clusters.labels
    assert again.reclusterer is not None and again.reclusterer.membership.epoch == 1
    assert again.reclusterer.since == state.reclusterer.since == 1 and again.accepted == 6
    assert again.apply(update(5002, 101)) is None  # a replay of what it already applied


def test_without_a_plan_or_with_k_zero_the_store_never_reclusters() -> None:
    state = TwinState.from_messages(snapshot(recluster_every=0), psi=0.0)
    for hour in (100, 101, 102):
        for s in SQUARES:
            state.apply(update(s, hour))
    assert state.reclusterer is None and state.counters["reclusterings"] == 0


def test_a_configured_gamma_replaces_the_cluster_share() -> None:
    default = TwinState.from_messages(snapshot(recluster_every=0), psi=0.0)
    fixed = TwinState.from_messages(snapshot(recluster_every=0), psi=0.0, gamma=0.5)
    assert default.gamma(0) == 0.5 and fixed.gamma(0) == 0.5  # 3 of 6 BSs
    fixed.apply(update(1000, 100))
    # the global (zeros) moved half way to cluster 0's twin, which is 1000's update, its only one yet
    np.testing.assert_allclose(fixed.global_twin.params.numpy(), 0.5 * fixed.clusters.twins[0].numpy())
    other = TwinState.from_messages(snapshot(recluster_every=0), psi=0.0, gamma=0.25)
    other.apply(update(1000, 100))
    np.testing.assert_allclose(other.global_twin.params.numpy(), 0.25 * other.clusters.twins[0].numpy())
