"""The roster on twin.models: the per-entity fields published once, a small global message per merge."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ingest.schema import MalformedMessage
from stream_processors.bs_agents import BsAgents
from tests.test_bs_agents import MODEL, PLAN, SCALER, SQUARES, hour_batch, series
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import (
    ROSTER_KEY,
    TwinMessage,
    decode_twin,
    roster_message,
    split_roster,
)
from twin_store.federation.twinning import ClusterTwins
from twin_store.services.htwin import TwinState
from twin_store.services.vtwin import twin_messages

N = 10_000
HIDDEN = 32
N_PARAMS = 4390  # TwinModel(32, 5): what a 1-minute [twins] deployment's twins have
CLUSTERS = 40


def bootstrap_meta(n: int) -> dict[str, object]:
    """A global meta as ``run_vtwin_from_influx`` builds it, with its per-entity fields, for n entities."""
    rng = np.random.default_rng(1)
    keys = list(range(1, n + 1))
    return {
        "members": keys,
        "loss": 0.1,
        "rounds": 10,
        "train_hours": 40,
        "plan": StreamPlan(
            1, 50, 0, recluster_every=0, column="v", step_ms=60_000, lags=(1, 2, 3, 4, 5)
        ).to_meta(),
        "clusters": CLUSTERS,
        "as_of": -1,
        "scaler": {
            str(k): [float(m), float(d)]
            for k, m, d in zip(keys, rng.normal(100, 9, n), rng.uniform(1, 9, n), strict=True)
        },
        "entities": {str(k): f"cell-{k}" for k in keys},
        "metric": "v",
        "cluster_profiles": {str(c): rng.normal(size=24).round(6).tolist() for c in range(CLUSTERS)},
    }


def vtwin_result(n: int) -> SimpleNamespace:
    labels = {k: k % CLUSTERS for k in range(1, n + 1)}
    twins = {c: torch.full((N_PARAMS,), float(c) / 100) for c in range(CLUSTERS)}
    clusters = ClusterTwins(labels, twins)
    clusters.latest = {k: (twins[c].clone(), 10) for k, c in labels.items()}
    return SimpleNamespace(global_params=torch.zeros(N_PARAMS), clusters=clusters)


def test_the_global_message_stays_small_at_10000_entities_and_the_roster_carries_them() -> None:
    messages = twin_messages(vtwin_result(N), HIDDEN, bootstrap_meta(N))
    roster, glob = messages[0], messages[1]
    assert (roster.key, glob.key) == (ROSTER_KEY, b"global:0")  # the roster first: readers have it in time
    size = len(glob.encode()) - 4 * N_PARAMS
    assert size < 2_000, f"the global's header is {size} bytes at {N} entities"
    back = decode_twin(roster.encode())
    assert back.meta["members"] == list(range(1, N + 1)) and len(back.meta["scaler"]) == N
    assert glob.meta["roster"] == back.version and "plan" in glob.meta

    # and so is every global the store publishes per merge
    latest = {m.key: decode_twin(m.encode()) for m in messages}
    state = TwinState.from_messages(latest, psi=0.0)
    state.clusters.twins[3] = state.clusters.twins[3] + 0.5
    merged = state._offer_global(3, 60, 0).twins
    assert [m.level for m in merged] == ["global"] and len(merged[0].encode()) - 4 * N_PARAMS < 2_000


def test_a_global_of_the_former_protocol_is_split_and_its_roster_published_before_the_next_global() -> None:
    messages = twin_messages(vtwin_result(50), HIDDEN, bootstrap_meta(50))
    small, roster = split_roster(messages[1].meta | messages[0].meta)
    legacy = TwinMessage("global", "0", 1, HIDDEN, messages[1].params, small | roster)
    latest = {m.key: m for m in messages[2:]} | {legacy.key: legacy}
    state = TwinState.from_messages(latest, psi=0.0)
    state.clusters.twins[3] = state.clusters.twins[3] + 0.5
    first = state._offer_global(3, 60, 0).twins
    assert [m.level for m in first] == ["roster", "global"]
    assert decode_twin(first[0].encode()).meta == roster and "scaler" not in first[1].meta
    state.clusters.twins[3] = state.clusters.twins[3] + 0.5
    assert [m.level for m in state._offer_global(3, 61, 0).twins] == ["global"]  # once


@pytest.mark.parametrize(
    ("meta", "why"),
    [
        ({"members": [1, 2], "scaler": {"1": [0.0, 1.0]}}, "no scaler"),
        ({"members": [1], "scaler": {"1": [0.0, 0.0]}}, "std > 0"),
        ({"members": [1], "scaler": {"1": [0.0, float("nan")]}}, "finite"),
        ({"members": ["1"], "scaler": {"1": [0.0, 1.0]}}, "members"),
        ({"scaler": {"1": [0.0, 1.0]}}, "members"),
        ({"members": [1], "scaler": [[0.0, 1.0]]}, "scaler must be"),
        ({"members": [1], "scaler": {"1": [0.0, 1.0]}, "entities": {"1": 7}}, "entities"),
        ({"members": [1], "scaler": {"1": [0.0, 1.0]}, "cluster_profiles": {"x": [1.0]}}, "cluster_profiles"),
    ],
)
def test_a_malformed_roster_does_not_decode(meta: dict[str, object], why: str) -> None:
    with pytest.raises(MalformedMessage, match=why):
        decode_twin(roster_message(1, meta).encode())


def test_a_roster_with_parameters_does_not_decode() -> None:
    bad = TwinMessage("roster", "0", 1, 0, np.zeros(3, np.float32), {"members": [], "scaler": {}})
    with pytest.raises(MalformedMessage, match="no parameters"):
        decode_twin(bad.encode())


def small_twins(params: torch.Tensor) -> list[TwinMessage]:
    meta = {"plan": PLAN.to_meta(), "as_of": -1, "roster": 1}
    cluster = {"members": SQUARES, "epoch": 0, "as_of": -1}
    return [
        TwinMessage("global", "0", 1, 8, params.numpy(), meta),
        TwinMessage("cluster", "0", 1, 8, params.numpy(), cluster),
    ]


def forecasts_after(agents: BsAgents, start: int, upto: int) -> int:
    data = {s: series(s, upto + 1) for s in SQUARES}
    n = 0
    for h in range(start, upto + 1):
        n += sum(
            len(b) for b in agents.on_hour(hour_batch(h, {s: float(data[s][h]) for s in SQUARES})).forecasts
        )
    return n


@pytest.mark.parametrize("roster_first", [True, False])
def test_agents_forecast_once_they_have_the_global_and_the_roster_in_either_order(roster_first: bool) -> None:
    roster = roster_message(1, {"members": SQUARES, "scaler": SCALER})
    twins = small_twins(MODEL.init(1, 0)[0])
    agents = BsAgents()
    for t in [roster, *twins] if roster_first else twins:
        agents.on_twin(t)
    assert agents.ready is roster_first
    if not roster_first:
        assert forecasts_after(agents, 0, PLAN.start_hour - 2) == 0  # hours kept until the roster comes
        agents.on_twin(roster)
        assert agents.ready
    assert forecasts_after(agents, 0 if roster_first else PLAN.start_hour - 1, PLAN.start_hour + 2) > 0


def test_agents_keep_the_last_good_roster_when_a_malformed_one_arrives() -> None:
    """The follower drops what does not decode (``TwinFollower``): the agents act on the last good one."""
    from stream_processors.bs_agents import TwinVersions

    good = roster_message(1, {"members": SQUARES, "scaler": SCALER})
    bad = roster_message(2, {"members": SQUARES, "scaler": {"3": [1.0, -1.0]}}).encode()
    versions = TwinVersions()
    versions.add(decode_twin(good.encode()))
    with pytest.raises(MalformedMessage):
        versions.add(decode_twin(bad))
    assert versions.roster is not None and versions.roster.version == 1
