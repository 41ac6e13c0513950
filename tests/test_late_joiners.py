"""A BS that joins after V-twinning is admitted to the cluster its agent chose (its signed meta names it);
an update without the flag, or naming no known cluster, from a BS V-twinning did not cluster is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ingest.schema import MalformedMessage
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import TwinMessage
from twin_store.federation.sites import Sites, cluster_entities, load_sites
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


# re-clustering a [twins] deployment: four named cells whose bootstrap clustering mixed two distant pairs
NAMES = {10: "north-a", 11: "south-a", 12: "north-b", 13: "south-b"}
MORNING = [1.0] * 12 + [0.0] * 12
EVENING = [0.0] * 12 + [1.0] * 12


def named_snapshot(recluster_every: int) -> dict[bytes, TwinMessage]:
    plan = StreamPlan(1, 100, 0, fit=FitConfig(2, 1e-2, 4), recluster_every=recluster_every)
    meta = {"plan": plan.to_meta(), "clusters": 2, "as_of": -1, "scaler": {}, "metric": "down",
            "entities": {str(k): n for k, n in NAMES.items()}}  # fmt: skip
    msgs = [TwinMessage("global", "0", 1, 8, np.zeros(P, np.float32), meta)]
    for c, members in ((0, [10, 11]), (1, [12, 13])):
        msgs.append(TwinMessage("cluster", str(c), 1, 8, np.full(P, c, np.float32), {"members": members}))
    return {m.key: m for m in msgs}


def named_update(square: int, hour: int, profile: list[float]) -> TwinMessage:
    meta = {"seq": hour, "hour": hour, "n_samples": 10, "loss": 0.1, "profile": profile, "cluster": 0,
            "base_version": 1}  # fmt: skip
    return TwinMessage("bs", str(square), 1, 8, np.full(P, 0.5, np.float32), meta)


def sites_file(tmp_path: Path) -> Sites:
    rows = ["entity,lat,lon", "north-a,45.50,9.20", "north-b,45.501,9.201", "south-a,44.40,8.90",
            "south-b,44.401,8.901", "north-c,45.502,9.199"]  # fmt: skip
    (tmp_path / "sites.csv").write_text("\n".join(rows) + "\n")
    return load_sites(tmp_path / "sites.csv")


def regroup(state: TwinState, profiles: dict[int, list[float]], hour: int = 130) -> list[str]:
    """Every BS reports at ``hour``, then one more update an hour later triggers the re-clustering."""
    for square, profile in profiles.items():
        assert state.apply(named_update(square, hour, profile)) is not None
    first = next(iter(profiles))
    result = state.apply(named_update(first, hour + 1, profiles[first]))
    assert result is not None and state.counters["reclusterings"] == 1
    return [line for line in result.lines if line.startswith("membership")]


def partition(squares: list[int], labels: list[int]) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for s, c in zip(squares, labels, strict=True):
        groups.setdefault(int(c), set()).add(s)
    return {frozenset(g) for g in groups.values()}


def test_a_twins_deployment_reclusters_on_the_positions_of_its_sites_file(tmp_path: Path) -> None:
    """The new clusters are DCS on the sites file's positions and the reported profiles (the bootstrap's
    rule), and the membership rows name the entities."""
    sites = sites_file(tmp_path)
    profiles = {10: MORNING, 11: EVENING, 12: EVENING, 13: MORNING}
    state = TwinState.from_messages(named_snapshot(4), psi=0.0, sites=sites)
    lines = regroup(state, profiles)
    squares = sorted(NAMES)
    expected = cluster_entities(
        sites.subset([NAMES[s] for s in squares]), np.array([profiles[s] for s in squares]), 2, seed=1
    )
    now = [state.clusters.labels[s] for s in squares]
    assert partition(squares, now) == partition(squares, list(expected))
    without = cluster_entities(None, np.array([profiles[s] for s in squares]), 2, seed=1)
    assert partition(squares, list(expected)) != partition(squares, list(without))  # the positions count
    assert sorted(line.split(" ")[0] for line in lines) == sorted(
        f"membership,entity={n}" for n in NAMES.values()
    )


def test_without_sites_a_twins_deployment_reclusters_by_profile_and_keeps_late_joiners(
    tmp_path: Path,
) -> None:
    state = TwinState.from_messages(named_snapshot(5), psi=0.0)
    assert state.apply(joiner(1)) is not None  # cell-42 joins cluster 1 (and counts as an accepted update)
    assert state.reclusterer is not None and state.reclusterer.membership.labels[42] == 1
    lines = regroup(state, {10: MORNING, 11: EVENING, 12: MORNING, 13: EVENING})
    labels = state.clusters.labels
    assert labels[10] == labels[12] != labels[11] == labels[13]
    assert labels[42] in (labels[10], labels[11]) and "membership,entity=cell-42" in " ".join(lines)
    # a restarted store names the late joiner again, from its bs twin on twin.models
    bs = state._bs_message(42, np.zeros(P, np.float32), 120, 10, 0.1, {})
    again = TwinState.from_messages(named_snapshot(5) | {bs.key: bs}, psi=0.0)
    assert again.names[42] == "cell-42"


def test_a_twins_deployment_never_reclusters_with_recluster_every_zero(tmp_path: Path) -> None:
    state = TwinState.from_messages(named_snapshot(0), psi=0.0, sites=sites_file(tmp_path))
    assert state.reclusterer is None
