"""``twin_current``: one point per twin, equal to the twin's latest ``twin`` row (issue 12, the current-state
query). Unit tests of the keys and lines, then the writers' own rows on the real InfluxDB."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from ingest.settings import NettwinSettings
from tests.conftest import run_cli
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.traffic import TwinRegistry
from twin_store.adapters.twin_rows import (
    INT_KEYS,
    TWIN_CURRENT,
    current_twins,
    latest_history_rows,
    twin_key,
    twin_state_lines,
)
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import TwinMessage
from twin_store.models.forecaster import FitConfig
from twin_store.services.htwin import TwinState
from twin_store.services.twin import twin_lines as utt_twin_lines
from twin_store.services.vtwin import first_twin_rows

P = 6
SQUARES = [3, 4, 7]


def test_integer_ids_are_their_own_keys_and_names_hash_above_them() -> None:
    assert [twin_key(str(i)) for i in (0, 1, 9999, INT_KEYS - 1)] == [0, 1, 9999, INT_KEYS - 1]
    named = {twin_key(n) for n in ("position.merge.ftm+imu.gating", "tracking", str(INT_KEYS), "-1")}
    assert len(named) == 4 and all(k >= INT_KEYS for k in named)
    assert twin_key("tracking") == twin_key("tracking")  # stable across processes: no salted hash()


def test_the_current_point_is_stamped_with_the_key_in_the_writes_precision() -> None:
    fields = {"version": 2, "epsilon": None, "loss": 0.25}
    for precision, unit in (("s", 1), ("ms", 1_000), ("ns", 1_000_000_000)):
        history, current = twin_state_lines("bs", "42", fields, 1_700_000_000 * unit, precision, "cell-42")
        assert history == f"twin,level=bs,twin_id=42 version=2i,loss=0.25 {1_700_000_000 * unit}"
        head, _, stamp = current.rpartition(" ")
        assert head.startswith("twin_current,level=bs state=") and stamp == str(42 * unit)
        state = json.loads(json.loads(head.partition("state=")[2]))  # the field's string, then its JSON
        # the whole state in one field: a later write replaces it whole (no epsilon here)
        assert state == {
            "level": "bs",
            "twin_id": "42",
            "entity": "cell-42",
            "version": 2,
            "loss": 0.25,
            "time": "2023-11-14T22:13:20Z",
        }


@pytest.fixture
def influx(services: NettwinSettings) -> Iterator[InfluxClient]:
    settings = services.model_copy(
        update={
            "influx": services.influx.model_copy(update={"database": f"nettwin_c{uuid.uuid4().hex[:10]}"})
        }
    )
    with InfluxClient(settings.influx) as client:
        client.create_database()
        try:
            yield client
        finally:
            client.drop_database(settings.influx.database)


def _snapshot() -> dict[bytes, TwinMessage]:
    plan = StreamPlan(1, 100, 0, fit=FitConfig(2, 1e-2, 4), recluster_every=0)
    meta = {"plan": plan.to_meta(), "as_of": -1, "scaler": {}}
    msgs = [TwinMessage("global", "0", 1, 8, np.zeros(P, np.float32), meta)]
    for c, members in ((0, SQUARES[:2]), (1, SQUARES[2:])):
        msgs.append(TwinMessage("cluster", str(c), 1, 8, np.full(P, c, np.float32), {"members": members}))
    return {m.key: m for m in msgs}


def _update(square: int, seq: int) -> TwinMessage:
    meta = {"seq": seq, "hour": seq, "n_samples": 10, "loss": 0.1 + 0.01 * seq, "entity": f"cell-{square}"}
    return TwinMessage("bs", str(square), 1, 8, np.full(P, 0.1 * seq, np.float32), meta)


def _count_points(influx: InfluxClient) -> dict[str, int]:
    series = influx.query(f'SELECT count("state") FROM "{TWIN_CURRENT}" GROUP BY "level"')
    return {s.tags["level"]: int(s.values[0][1]) for s in series}


@pytest.mark.integration
def test_current_state_equals_the_latest_twin_rows_after_several_updates(influx: InfluxClient) -> None:
    now_s = int(time.time()) - 5
    # the writers in a deployment's order: the store's first BS rows (s), V-twinning's (s), then H-twinning (ns)
    influx.write("\n".join(TwinRegistry().first_rows(np.array(SQUARES), now_s)).encode(), "s")
    influx.write("\n".join(first_twin_rows(0.5, 3, {0: 2, 1: 1}, {})).encode(), "s")
    state = TwinState.from_messages(_snapshot(), psi=0.0)
    t = (now_s + 10) * 1_000_000_000
    for seq in range(
        1, 6
    ):  # the same BSs updated again and again; every update moves its cluster and the global
        for square in SQUARES[:2] if seq > 2 else SQUARES:
            t += 1_000_000
            outcome = state.apply(_update(square, seq), t)
            assert outcome is not None and outcome.decision == "accepted"
            influx.write("\n".join(outcome.lines).encode(), "ns")
        current = current_twins(influx)
        # one point per twin, however often it was written
        assert _count_points(influx) == {"bs": 3, "cluster": 2, "global": 1}
        assert [{k: v for k, v in r.items() if k != "entity"} for r in current] == latest_history_rows(influx)
    by_id = {(r["level"], r["twin_id"]): r for r in current}
    assert by_id[("bs", "3")]["version"] == 5 and by_id[("bs", "7")]["version"] == 2
    assert by_id[("bs", "3")]["entity"] == "cell-3"
    # the store's first row had epsilon 0 and V-twinning's a loss: later rows without them do not show them
    assert by_id[("bs", "3")]["epsilon"] is None and by_id[("global", "0")]["loss"] is None
    assert by_id[("global", "0")]["version"] == state.global_twin.version
    assert current_twins(influx, "cluster") == [r for r in current if r["level"] == "cluster"]


@pytest.mark.integration
def test_named_utt_twins_and_an_old_database(influx: InfluxClient) -> None:
    # a database written before twin_current existed is still listed, from ``twin``
    influx.write(b"twin,level=bs,twin_id=5 version=3i,loss=0.5,n_updates=3i,n_members=1i 1700000000", "s")
    assert [r["version"] for r in current_twins(influx)] == [3]
    record = {
        "twin_id": "position.merge.ftm+imu.gating",
        "version": 1,
        "metrics": {
            "test_nmse": 0.3,
            "accepted": 4,
            "clients": 4,
            "rounds": 2,
            "quarantined": 0,
            "defense": "x",
        },
        "model": "m",
        "operation": "merge",
        "sources": ["ftm", "imu"],
        "fuser": "gating",
        "task": "position",
    }
    influx.write("\n".join(utt_twin_lines([record], 1_700_000_100)).encode(), "s")
    influx.write("\n".join(utt_twin_lines([record | {"version": 2}], 1_700_000_200)).encode(), "s")
    (utt,) = current_twins(influx, "utt")
    assert utt["twin_id"] == record["twin_id"] and utt["version"] == 2 and utt["fuser"] == "gating"
    assert utt["time"] == "2023-11-14T22:16:40Z"


@pytest.mark.integration
def test_query_twins_lists_the_current_state(isolated: NettwinSettings) -> None:
    with InfluxClient(isolated.influx) as influx:
        influx.write("\n".join(TwinRegistry().first_rows(np.array([1, 2]), 1_700_000_000)).encode(), "s")
        lines = twin_state_lines(
            "bs", "2", {"version": 4, "loss": 0.2, "n_members": 1}, 1_700_000_100, "s", "2"
        )
        influx.write("\n".join(lines).encode(), "s")
    res = run_cli(isolated, "query", "twins", "--level", "bs", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [(r["twin_id"], r["version"], r["entity"], r["time"]) for r in rows] == [
        ("1", 0, "1", "2023-11-14T22:13:20Z"),
        ("2", 4, "2", "2023-11-14T22:15:00Z"),
    ]
    assert rows[1]["epsilon"] is None and rows[0]["epsilon"] == 0
