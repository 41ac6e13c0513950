"""A BS that joins after V-twinning is admitted to the cluster its agent chose (its signed meta names it);
an update without the flag, or naming no known cluster, from a BS V-twinning did not cluster is refused."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.schema import MalformedMessage
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import TwinMessage
from twin_store.models.forecaster import FitConfig
from twin_store.services.htwin import TwinState

P = 6


def snapshot(metric: str | None) -> dict[bytes, TwinMessage]:
    plan = StreamPlan(1, 100, 0, fit=FitConfig(2, 1e-2, 4), recluster_every=0)
    meta = {"plan": plan.to_meta(), "clusters": 2, "as_of": -1, "scaler": {}}
    if metric:
        meta["metric"] = metric
    msgs = [TwinMessage("global", "0", 1, 8, np.zeros(P, np.float32), meta)]
    for c in (0, 1):
        msgs.append(TwinMessage("cluster", str(c), 1, 8, np.full(P, c, np.float32), {"members": [10 + c]}))
    return {m.key: m for m in msgs}


def joiner(cluster: object, joined: object = True) -> TwinMessage:
    meta = {"seq": 120, "hour": 120, "n_samples": 10, "loss": 0.1, "cluster": cluster, "base_version": 1,
            "joined": joined, "entity": "cell-42"}  # fmt: skip
    return TwinMessage("bs", "42", 1, 8, np.full(P, 0.5, np.float32), meta)


def test_a_late_entity_joins_the_cluster_it_names() -> None:
    state = TwinState.from_messages(snapshot("down"), psi=0.0)
    result = state.apply(joiner(1))
    assert result is not None and result.decision == "accepted"
    assert state.clusters.labels[42] == 1 and state.counters["joined"] == 1
    assert any(line.startswith("membership,entity=cell-42 cluster=1i") for line in result.lines)
    cluster = next(t for t in result.twins if t.level == "cluster")
    assert cluster.twin_id == "1" and 42 in cluster.meta["members"]  # agents and a restarted store see it
    # restarted from what was published, it is a member
    latest = snapshot("down") | {t.key: t for t in result.twins}
    assert TwinState.from_messages(latest, psi=0.0).clusters.labels[42] == 1


@pytest.mark.parametrize(
    ("metric", "cluster", "joined"),
    [("down", 7, True), ("down", 1, False), ("down", "1", True), (None, 7, True)],
)
def test_joining_needs_a_known_cluster_and_the_flag(
    metric: str | None, cluster: object, joined: object
) -> None:
    state = TwinState.from_messages(snapshot(metric), psi=0.0)
    with pytest.raises(MalformedMessage):
        state.apply(joiner(cluster, joined))
    assert 42 not in state.clusters.labels
