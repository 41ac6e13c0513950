"""``nettwin vtwin`` on the real services, and the twin.models message format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingest.schema import MalformedMessage
from ingest.settings import NettwinSettings
from tests.conftest import run_cli, small_vtwin
from twin_store.adapters.influx import InfluxClient
from twin_store.federation.models_topic import ROSTER_KEY, TwinMessage, decode_twin
from twin_store.models.forecaster import TwinModel
from twin_store.services.htwin import read_latest_twins

MILAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan"
HOURLY = MILAN / "hourly_150squares_62days.csv"


def test_twin_message_round_trip_and_errors() -> None:
    msg = TwinMessage("cluster", "3", 7, 8, np.arange(5, dtype=np.float32), {"members": [1, 2]})
    back = decode_twin(msg.encode())
    assert (back.level, back.twin_id, back.version, back.hidden, back.meta) == (
        "cluster",
        "3",
        7,
        8,
        {"members": [1, 2]},
    )
    np.testing.assert_array_equal(back.params, msg.params)
    assert msg.key == b"cluster:3"
    for bad in (b"junk", msg.encode()[:-4], b"NTM1" + msg.encode()[4:].replace(b'"cluster"', b'"planet!"')):
        with pytest.raises(MalformedMessage):
            decode_twin(bad)


@pytest.mark.integration
@pytest.mark.skipif(not HOURLY.exists(), reason=f"real data not found at {HOURLY}")
def test_vtwin_publishes_twins_and_writes_rows(isolated: NettwinSettings) -> None:
    summary: dict[str, Any] = small_vtwin(isolated)
    assert summary["squares"] == 6 and summary["rounds"] == 2 and sum(summary["clusters"].values()) == 6

    latest = read_latest_twins(isolated)
    glob, roster = latest[b"global:0"], latest[ROSTER_KEY]
    squares = sorted(int(s) for s in roster.meta["scaler"])
    assert set(latest) == {b"global:0", ROSTER_KEY} | {
        f"cluster:{c}".encode() for c in summary["clusters"]
    } | {f"bs:{s}".encode() for s in squares}
    n_params = TwinModel(32).n_params
    twins = [t for t in latest.values() if t.level != "roster"]
    assert all(t.params.shape == (n_params,) and np.isfinite(t.params).all() for t in twins)
    assert len(squares) == 6 and all(std > 0 for _, std in roster.meta["scaler"].values())
    # the global names its roster and carries none of its per-entity fields
    assert roster.meta["members"] == squares and glob.meta["roster"] == roster.version
    assert not set(glob.meta) & {"members", "scaler", "entities", "cluster_profiles"}
    assert glob.meta["plan"]["start_hour"] == summary["train_hours"] and glob.meta["as_of"] == -1
    members = sorted(s for t in latest.values() if t.level == "cluster" for s in t.meta["members"])
    assert members == squares
    # each BS's last V-twinning update, older than any stream update (seq -1)
    assert all(t.meta["seq"] == -1 and t.meta["n_samples"] > 0 for t in latest.values() if t.level == "bs")

    with InfluxClient(isolated.influx) as influx:
        twins = [r for s in influx.query('SELECT * FROM "twin"') for r in s.rows()]
        membership = [r for s in influx.query('SELECT * FROM "membership"') for r in s.rows()]
    assert {(r["level"], r["twin_id"]) for r in twins} == {("global", "0")} | {
        ("cluster", c) for c in summary["clusters"]
    }
    assert all(r["version"] == 1 and r["n_updates"] == 12 for r in twins)
    assert sorted(int(r["entity"]) for r in membership) == members
    assert {r["epoch"] for r in membership} == {0}

    res = run_cli(isolated, "query", "twins", "--level", "global", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)[0]["n_members"] == 6


@pytest.mark.integration
def test_vtwin_bad_input_is_one_line(isolated: NettwinSettings, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("not,an,hourly,file\n1,2,3,4\n")
    res = run_cli(isolated, "vtwin", "--data", str(bad))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "not an hourly file" in res.stderr
