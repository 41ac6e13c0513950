"""BS agents on the hourly stream, without services: forecasts, outcomes, local updates, twin versions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest.schema import RecordBatch, decode
from stream_processors.bs_agents import JOIN_STEPS, BsAgents, TwinVersions
from twin_store.adapters.traffic import forecast_lines
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import TwinMessage, roster_message
from twin_store.federation.samples import LAGS
from twin_store.models.forecaster import FitConfig, TwinModel

SQUARES = [3, 7]
START_MS = 1_383_260_400_000
PLAN = StreamPlan(
    seed=1, start_hour=130, start_ms=START_MS, update_every=4, window=24, fit=FitConfig(3, 1e-2, 8)
)
MODEL = TwinModel(8)
SCALER = {"3": [100.0, 10.0], "7": [50.0, 5.0]}


def twins(global_params: torch.Tensor, as_of: int = -1, version: int = 1) -> list[TwinMessage]:
    meta = {"plan": PLAN.to_meta(), "as_of": as_of, "roster": 1}
    return [
        roster_message(1, {"members": SQUARES, "scaler": SCALER}),
        TwinMessage("global", "0", version, 8, global_params.numpy(), meta),
        TwinMessage(
            "cluster",
            "0",
            version,
            8,
            global_params.numpy(),
            {"members": SQUARES, "epoch": 0, "as_of": as_of},
        ),
    ]


def hour_batch(hour: int, values: dict[int, float], column: str = "activity") -> RecordBatch:
    sq = sorted(values)
    return RecordBatch(
        "features",
        (column, "n_intervals"),
        3600,
        np.array(sq, np.uint32),
        np.full(len(sq), START_MS + hour * 3_600_000, np.int64),
        np.array([[values[s], 1.0] for s in sq]),
    )


def series(square: int, hours: int) -> np.ndarray:
    mean, std = SCALER[str(square)]
    return mean + std * np.sin(np.arange(hours) * 2 * np.pi / 24 + square)


def feed(agents: BsAgents, upto: int) -> dict[int, list]:  # type: ignore[type-arg]
    outputs: dict[int, list] = {}  # type: ignore[type-arg]
    data = {s: series(s, upto + 1) for s in SQUARES}
    for h in range(upto + 1):
        outputs[h] = [agents.on_hour(hour_batch(h, {s: data[s][h] for s in SQUARES}))]
    return outputs


def test_forecasts_come_before_their_hour_and_outcomes_after() -> None:
    agents = BsAgents()
    params = MODEL.init(1, 0)[0]
    for t in twins(params):
        agents.on_twin(t)
    out = feed(agents, 131)
    assert all(not o[0].forecasts for h, o in out.items() if h < 129)
    [fc] = out[129][0].forecasts  # hour 129 closed: the forecast of the first stream hour, 130
    assert set(fc.squares.tolist()) == set(SQUARES)
    assert (fc.starts_ms == START_MS + 130 * 3_600_000).all()
    # the forecast is the global twin applied to the z-scored lags, in original units
    z = (series(3, 131) - 100.0) / 10.0
    expected = MODEL.predict(
        params.unsqueeze(0), torch.tensor(z[130 - LAGS], dtype=torch.float32).view(1, 1, -1)
    )
    got = fc.values[fc.squares.tolist().index(3), 0]
    assert abs(got - (float(expected) * 10.0 + 100.0)) < 1e-4
    [oc] = out[130][0].outcomes  # hour 130 arrived: predicted vs actual
    assert oc.columns == ("predicted", "actual", "abs_error", "flagged", "cluster")
    row = oc.values[oc.squares.tolist().index(3)]
    assert row[0] == got and row[1] == series(3, 131)[130] and row[2] == abs(row[1] - row[0]) and row[3] == 0
    # the store turns them into `forecast` rows, round-tripping the wire format
    lines = forecast_lines(decode(oc.encode()))
    assert (
        lines[0].startswith("forecast,cluster=0,entity=3,metric=activity predicted=")
        and "abs_error=" in lines[0]
    )


def test_due_bss_publish_updates_from_their_cluster_twin() -> None:
    agents = BsAgents()
    params = MODEL.init(1, 0)[0]
    for t in twins(params):
        agents.on_twin(t)
    out = feed(agents, 130 + 8)
    updates = [u for o in out.values() for u in o[0].updates]
    assert sorted((int(u.twin_id), u.meta["seq"]) for u in updates) == sorted(
        (s, h) for s in SQUARES for h in range(130, 139) if PLAN.due(s, h)
    )
    u = updates[0]
    assert u.level == "bs" and u.meta["hour"] == u.meta["seq"] and u.meta["cluster"] == 0
    assert (
        u.meta["n_samples"] == u.meta["hour"] + 1 - PLAN.first_target(u.meta["hour"])
        and len(u.meta["profile"]) == 24
        and u.meta["base_version"] == 1
    )
    assert not np.allclose(u.params, params.numpy())
    # until the store publishes them, the next hour's batch reports them as unacknowledged
    assert agents.unacknowledged_before(hour_batch(139, {3: 1.0})) == len({int(x.twin_id) for x in updates})
    for x in updates:
        agents.on_twin(TwinMessage("bs", x.twin_id, 2, 8, x.params, {"seq": x.meta["seq"]}))
    assert agents.unacknowledged_before(hour_batch(139, {3: 1.0})) == 0


def test_a_restarted_agent_skips_updates_the_store_already_accepted() -> None:
    agents = BsAgents()
    for t in twins(MODEL.init(1, 0)[0]):
        agents.on_twin(t)
    for s in SQUARES:
        agents.on_twin(TwinMessage("bs", str(s), 5, 8, np.zeros(MODEL.n_params, np.float32), {"seq": 10_000}))
    out = feed(agents, 138)
    assert not [u for o in out.values() for u in o[0].updates]
    assert agents.counters["skipped_updates"] > 0


def test_hours_before_the_first_twin_wait_and_unknown_squares_join_after_their_first_stretch() -> None:
    agents = BsAgents()
    data = {s: series(s, 131) for s in SQUARES}
    for h in range(130):
        assert agents.on_hour(hour_batch(h, {s: data[s][h] for s in SQUARES} | {99: 1.0})).forecasts == []
    for t in twins(MODEL.init(1, 0)[0]):
        agents.on_twin(t)
    out = agents.on_hour(hour_batch(130, {s: data[s][130] for s in SQUARES}))
    # square 99 has no scaling statistics in the twin: it waits (counted) until it reported JOIN_STEPS hours,
    # then joins with a scaler from them and a cluster, and is forecast like the others
    assert out.skipped == JOIN_STEPS - 1 and agents.counters["waiting"] == JOIN_STEPS - 1
    assert agents.counters["joined"] == 1 and agents.joined[99][:2] == (1.0, 1.0)  # constant: std 0 -> 1
    assert [99 in f.squares.tolist() for f in out.forecasts] == [True, False]  # silent at 130: no target 131
    # one forecast batch per hour that gave one: targets 130 (from the backlog's hour 129) and 131
    assert [int(f.starts_ms[0]) for f in out.forecasts] == [START_MS + h * 3_600_000 for h in (130, 131)]
    assert all(set(f.squares.tolist()) - {99} == set(SQUARES) for f in out.forecasts)
    assert (
        agents.on_hour(hour_batch(131, {3: 1.0}, column="internet")).forecasts == []
    )  # not the plan's column


def test_twin_versions_pick_the_newest_as_of_the_hour() -> None:
    versions = TwinVersions()
    p = np.zeros(3, np.float32)
    for version, as_of in ((1, -1), (2, 10), (3, 12), (4, 12)):
        versions.add(TwinMessage("global", "0", version, 8, p, {"as_of": as_of}))
    assert [versions.at(b"global:0", h).version for h in (-1, 9, 10, 11, 12, 99)] == [1, 1, 2, 2, 4, 4]  # type: ignore[union-attr]
    versions.add(TwinMessage("cluster", "0", 1, 8, p, {"members": [1, 2], "epoch": 0, "as_of": -1}))
    versions.add(TwinMessage("cluster", "1", 2, 8, p, {"members": [2], "epoch": 1, "as_of": 20}))
    assert (
        versions.cluster_of(19) == {1: 0, 2: 0}
        and versions.at(b"cluster:1", 19) is None
        and versions.cluster_of(20) == {1: 0, 2: 1}
    )


def test_a_twin_republished_often_in_one_hour_keeps_the_previous_hours_version() -> None:
    """htwin may publish the global twin once per accepted update: 40 versions as of hour 11 must not
    evict the version as of hour 10 that an agent lagging one hour behind still needs."""
    versions = TwinVersions()
    p = np.zeros(3, np.float32)
    versions.add(TwinMessage("global", "0", 1, 8, p, {"as_of": 10}))
    for version in range(2, 42):
        versions.add(TwinMessage("global", "0", version, 8, p, {"as_of": 11}))
    assert versions.at(b"global:0", 10).version == 1  # type: ignore[union-attr]
    assert versions.at(b"global:0", 11).version == 41  # type: ignore[union-attr]


def test_versions_of_an_unchanged_membership_share_one_member_list() -> None:
    versions = TwinVersions()
    p = np.zeros(3, np.float32)
    for version, members in ((1, [1, 2, 3]), (2, [1, 2, 3]), (3, [1, 2]), (4, [1, 2])):
        versions.add(TwinMessage("cluster", "0", version, 8, p, {"members": list(members), "as_of": version}))
    kept = [m.meta["members"] for m in versions.versions[b"cluster:0"]]
    assert kept == [[1, 2, 3], [1, 2, 3], [1, 2], [1, 2]]
    assert kept[0] is kept[1] and kept[2] is kept[3] and kept[1] is not kept[2]
    assert [versions.cluster_of(h) for h in (2, 4)] == [{1: 0, 2: 0, 3: 0}, {1: 0, 2: 0}]


def test_cluster_membership_is_rebuilt_when_a_version_changes_and_callers_get_their_own_dict() -> None:
    versions = TwinVersions()
    p = np.zeros(3, np.float32)
    versions.add(TwinMessage("cluster", "0", 1, 8, p, {"members": [1, 2], "epoch": 0, "as_of": -1}))
    first = versions.cluster_of(5)
    first[99] = 7  # an agent adds its joined entities to the answer: not to the next one
    assert versions.cluster_of(5) == {1: 0, 2: 0}
    versions.add(TwinMessage("cluster", "1", 2, 8, p, {"members": [2], "epoch": 1, "as_of": 5}))
    assert versions.cluster_of(5) == {1: 0, 2: 1} and versions.cluster_of(4) == {1: 0, 2: 0}


@settings(max_examples=60, deadline=None)
@given(
    fill=st.integers(0, 3),
    target=st.integers(0, 40),
    gaps=st.lists(st.integers(0, 35), max_size=12),
    length=st.integers(1, 36),
)
@example(fill=0, target=0, gaps=[0], length=1)  # a square whose only step is a gap
def test_forecast_inputs_gathered_at_once_are_each_squares_own(
    fill: int, target: int, gaps: list[int], length: int
) -> None:
    """``_inputs`` (all entities in one gather) gives exactly ``_z`` per entity: with gaps that ``fill``
    bridges or not, steps before the history's start and after its end."""
    agents = BsAgents()
    for s in SQUARES:
        history = agents._history(s)  # (a history may be all gaps)
        for h in range(length if s == 3 else 30):
            if h not in gaps:
                history.put(h, float(h * s) + 0.5)
    agents.history[3].raw = agents.history[3].raw[:length]  # a history shorter than the inputs reach
    hours = target - np.array([5, 4, 3, 2, 1])
    got = agents._inputs(SQUARES, SCALER, hours, fill)
    for row, s in zip(got, SQUARES, strict=True):
        np.testing.assert_array_equal(row, agents._z(s, SCALER, hours, fill=fill))


def test_screened_traffic_is_kept_and_flagged_but_left_out_of_local_training() -> None:
    agents = BsAgents(screen_traffic=True)
    for t in twins(MODEL.init(1, 0)[0]):
        agents.on_twin(t)
    data = {s: series(s, 141) for s in SQUARES}
    data[3][133] += 30 * 10.0  # a 30-sigma spike in square 3's traffic, hour 133
    flags = {}
    for h in range(141):
        out = agents.on_hour(hour_batch(h, {s: data[s][h] for s in SQUARES}))
        for oc in out.outcomes:
            for sq, row in zip(oc.squares.tolist(), oc.values.tolist(), strict=True):
                flags[(sq, h)] = row[oc.columns.index("flagged")]
    assert flags[(3, 133)] == 1.0 and flags[(7, 133)] == 0.0  # marked on the outcome row, value kept
    assert agents.history[3].raw[133] == data[3][133]
    training = agents._z(3, SCALER, np.arange(141), training=True)
    assert np.isnan(training[133]) and np.isfinite(training[120:133]).all()
    assert agents.counters["flagged_hours"] < 0.02 * 2 * 141 + 1  # the smooth series is rarely flagged


def test_giving_up_on_the_store_counts_the_updates_it_did_not_answer() -> None:
    agents = BsAgents()
    for t in twins(MODEL.init(1, 0)[0]):
        agents.on_twin(t)
    out = feed(agents, 138)
    sent = {int(u.twin_id) for o in out.values() for u in o[0].updates}
    assert sent and agents.unacknowledged_before(hour_batch(139, {3: 1.0})) == len(sent)
    agents.give_up_waiting()  # the store did not answer within ACK_WAIT_S
    assert agents.counters["ack_timeouts"] == len(sent)
    assert agents.unacknowledged_before(hour_batch(139, {3: 1.0})) == 0


def test_hours_re_read_with_twins_from_their_future_are_counted_not_forecast() -> None:
    """A restarted agent re-reads old hours while the twins it knows reflect later ones."""
    agents = BsAgents()
    for t in twins(MODEL.init(1, 0)[0], as_of=500):
        agents.on_twin(t)
    out = feed(agents, 140)
    assert not [f for o in out.values() for f in o[0].forecasts]
    # the steps whose forecast was issued back then: from the plan's first forecast step on
    assert agents.counters["past_hours"] == 141 - (PLAN.start_hour - PLAN.horizon)


def test_agents_of_two_partitions_share_the_twins_and_the_store_decisions() -> None:
    shared = TwinVersions()
    left, right = BsAgents(twins=shared), BsAgents(twins=shared)
    for t in twins(MODEL.init(1, 0)[0]):
        left.on_twin(t)
    assert right.ready
    right.on_twin(TwinMessage("bs", "7", 5, 8, np.zeros(MODEL.n_params, np.float32), {"seq": 10_000}))
    assert left.accepted_seq[7] == 10_000


def test_an_hour_waits_for_the_updates_other_partitions_agents_sent() -> None:
    """As one agent over every partition would: the twins of the previous hour include all of them."""
    shared, awaiting = TwinVersions(), {}
    left = BsAgents(twins=shared, awaiting=awaiting)
    right = BsAgents(twins=shared, awaiting=awaiting)
    for t in twins(MODEL.init(1, 0)[0]):
        left.on_twin(t)
    sent = {int(u.twin_id) for o in feed(left, 138).values() for u in o[0].updates}
    assert sent and right.unacknowledged_before(hour_batch(139, {9: 1.0})) == len(sent)
    for s in sent:
        right.on_twin(TwinMessage("bs", str(s), 2, 8, np.zeros(MODEL.n_params, np.float32), {"seq": 200}))
    assert right.unacknowledged_before(hour_batch(139, {9: 1.0})) == 0


FIRST_STEP_AFTER_WARM_UP = """
import sys

import numpy as np

from ingest.schema import RecordBatch
from stream_processors.agents.bs_twins import warm_up
from stream_processors.bs_agents import BsAgents
from twin_store.federation.models_topic import TwinMessage

warm_up()
before = set(sys.modules)
plan = {"seed": 1, "start_hour": 130, "start_ms": 0, "update_every": 1, "window": 24,
        "fit": {"steps": 2, "lr": 0.01, "batch": 8}}
params = np.random.default_rng(0).normal(0, 0.1, 339).astype(np.float32)  # hidden 8, 10 inputs
agents = BsAgents()
agents.on_twin(TwinMessage("global", "0", 1, 8, params, {"plan": plan, "scaler": {"3": [1.0, 1.0]}}))
agents.on_twin(TwinMessage("cluster", "0", 1, 8, params, {"members": [3], "epoch": 0}))
for h in range(132):
    batch = RecordBatch("features", ("activity", "n_intervals"), 3600, np.array([3], np.uint32),
                        np.array([h * 3_600_000], np.int64), np.array([[np.sin(h / 4), 1.0]]))
    out = agents.on_hour(batch)
assert agents.counters["forecasts"] == 3 and agents.counters["updates"] == 2, agents.counters
print(sorted(set(sys.modules) - before))
"""


def test_after_the_warm_up_the_first_steps_import_nothing() -> None:
    """The worker's warm-up (a thread at start) leaves nothing for the first live step to import: the first
    ``Adam`` imported ``torch._dynamo`` there (3.3 s of the first step's profile at 1,000 entities, load ~11)."""
    import subprocess
    import sys
    from pathlib import Path

    res = subprocess.run(
        [sys.executable, "-c", FIRST_STEP_AFTER_WARM_UP],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_steps_kept_before_the_first_global_twin_are_acted_on_when_it_arrives() -> None:
    """The worker calls ``catch_up`` as soon as the first global twin arrives: the kept steps' forecasts go out
    then, not with the next step's batch a whole step later."""
    agents = BsAgents()
    data = {s: series(s, 131) for s in SQUARES}
    for h in range(130):
        assert not agents.on_hour(hour_batch(h, {s: data[s][h] for s in SQUARES})).forecasts
    assert agents.catch_up() is None  # no twin yet: kept
    for t in twins(MODEL.init(1, 0)[0]):
        agents.on_twin(t)
    out = agents.catch_up()
    assert out is not None and not agents.backlog
    [fc] = out.forecasts  # hour 129, the newest kept, closed: the forecast of hour 130
    assert (fc.starts_ms == START_MS + 130 * 3_600_000).all() and set(fc.squares.tolist()) == set(SQUARES)
    assert agents.catch_up() is None
    # the next step goes on from there: its outcome scores that forecast
    [oc] = agents.on_hour(hour_batch(130, {s: data[s][130] for s in SQUARES})).outcomes
    assert set(oc.squares.tolist()) == set(SQUARES)


# the roster a bootstrap sends before it trains the twins: with the plan, so the agents record the kept steps
PREVIEW = roster_message(1, {"members": SQUARES, "scaler": SCALER, "plan": PLAN.to_meta()})


def kept_then_live(
    agents: BsAgents,
    kept: list[RecordBatch],
    record_at: set[int],
    before: list[TwinMessage],
    then: list[TwinMessage],
    live: list[RecordBatch],
) -> list[object]:
    """``kept`` arrive before the twins (``record_kept`` after the batches of ``record_at``), then the twins,
    the catch-up and ``live``: everything the agents put out, in order, as plain values."""
    for t in before:
        agents.on_twin(t)
    for i, batch in enumerate(kept):
        assert agents.observe(batch).forecasts == []
        if i in record_at:
            agents.record_kept()
    for t in then:
        agents.on_twin(t)
    outs = [agents.catch_up()]
    outs += [agents.observe(batch) for batch in live]
    seen: list[object] = []
    for out in outs:
        if out is None:
            continue
        agents.train(out)
        for b in [*out.forecasts, *out.outcomes]:
            seen.append((b.kind, b.squares.tolist(), b.starts_ms.tolist(), b.values.tolist()))
        seen += [(u.key, u.meta["seq"], u.params.tolist()) for u in out.updates]
    # (NaN, a step not reported, as a string: list equality would call two NaNs different)
    histories = {s: (h.raw.astype(str).tolist(), h.flagged.tolist()) for s, h in agents.history.items()}
    return [seen, dict(agents.counters), histories, agents.newest_hour]


def steps(hours: list[int], spike: int | None = None, unknown: int | None = None) -> list[RecordBatch]:
    data = {s: series(s, 140) for s in SQUARES}
    if spike is not None:
        data[3][spike] += 30 * 10.0  # flagged by the telemetry screen
    return [
        hour_batch(h, {s: data[s][h] for s in SQUARES} | ({99: 1.0} if h == unknown else {})) for h in hours
    ]


@settings(max_examples=15, deadline=None)
@given(
    n_kept=st.integers(0, 131),
    record_at=st.sets(st.integers(0, 131), max_size=4),
    spike=st.none() | st.integers(100, 135),
    unknown=st.none() | st.integers(0, 131),
    swap=st.none() | st.integers(0, 130),
)
@example(n_kept=131, record_at={130}, spike=120, unknown=None, swap=None)
def test_kept_steps_recorded_while_the_twins_train_give_what_acting_on_them_later_gives(
    n_kept: int, record_at: set[int], spike: int | None, unknown: int | None, swap: int | None
) -> None:
    """Recording the kept steps with the roster and plan sent ahead of the twins changes nothing the agents
    put out or keep, only when the work is done: whatever steps came (an entity the roster lacks, steps out
    of order, a step the screen flags) and whenever ``record_kept`` ran."""
    hours = list(range(n_kept))
    if swap is not None and swap + 1 < n_kept:
        hours[swap], hours[swap + 1] = hours[swap + 1], hours[swap]
    kept, live = steps(hours, spike, unknown), steps(list(range(n_kept, 136)), spike, unknown)
    glob = twins(MODEL.init(1, 0)[0])[1:]
    recorded = BsAgents(screen_traffic=True)
    with_preview = kept_then_live(recorded, kept, record_at, [PREVIEW], glob, live)
    without = kept_then_live(BsAgents(screen_traffic=True), kept, set(), [], [PREVIEW, *glob], live)
    assert with_preview == without
    assert not recorded._recorded and recorded._recorded_with is None  # nothing held once the twins came


def test_kept_steps_are_recorded_up_to_the_first_step_the_plan_forecasts_from() -> None:
    agents = BsAgents(screen_traffic=True)
    agents.on_twin(
        roster_message(1, {"members": SQUARES, "scaler": SCALER})
    )  # no plan: nothing to record with
    for batch in steps(list(range(130))):
        agents.observe(batch)
    assert not agents.can_record and agents.record_kept() == 0 and len(agents.backlog) == 130
    agents.on_twin(PREVIEW)
    assert agents.can_record and agents.record_kept() == 129  # steps 0-128: step 129 forecasts step 130
    assert (
        len(agents.backlog) == 1
        and not agents.can_record
        and agents.history[3].raw[128] == series(3, 129)[128]
    )
    assert agents.counters["hours"] == 129 and agents.counters["forecasts"] == 0


def test_steps_recorded_with_another_roster_than_the_twins_came_with_are_redone() -> None:
    """A bootstrap stopped after it sent its roster runs again on more history: another scaling and plan."""
    # its plan began an hour earlier: every step's index differs by one
    plan = replace(PLAN, start_ms=START_MS - 3_600_000, start_hour=PLAN.start_hour + 1)
    first = roster_message(
        1, {"members": SQUARES, "scaler": {"3": [90.0, 20.0], "7": [40.0, 2.0]}, "plan": plan.to_meta()}
    )
    kept, live = steps(list(range(131)), spike=125), steps(list(range(131, 136)))
    glob = twins(MODEL.init(1, 0)[0])[1:]
    redone = kept_then_live(BsAgents(screen_traffic=True), kept, {60, 130}, [first], [PREVIEW, *glob], live)
    late = BsAgents(
        screen_traffic=True
    )  # the same roster swap, the twins arriving while the first is recorded
    also = kept_then_live(late, kept, {60}, [first], [PREVIEW, *glob], live)
    assert (
        redone
        == also
        == kept_then_live(BsAgents(screen_traffic=True), kept, set(), [], [PREVIEW, *glob], live)
    )
