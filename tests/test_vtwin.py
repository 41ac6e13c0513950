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


@pytest.mark.integration
def test_bootstrap_reads_the_history_in_pieces(isolated: NettwinSettings) -> None:
    """The bootstrap reads twin_input as InfluxDB's chunked MessagePack answer, piece by piece into columns:
    the pieces (a series split over several) hold exactly the one-shot answer's rows, and the grid has every
    step, without the row that has no key."""
    from twin_store.services.vtwin import read_twin_steps

    t0 = 1_700_000_000 - 1_700_000_000 % 86_400
    lines = [
        f"twin_input,entity=e{i},metric=v value={i * 100 + k}.5,n_values=1i,key={i + 1}i {t0 + 60 * k}"
        for i in range(3)
        for k in range(7)
    ]
    lines.append(f"twin_input,entity=x,metric=v value=1.0,n_values=1i {t0}")  # no key: not a stream row
    lines.append(f"twin_input,entity=e0,metric=w value=9.0,n_values=1i,key=1i {t0}")  # another metric
    with InfluxClient(isolated.influx) as influx:
        influx.write("\n".join(lines).encode(), precision="s")
        q = 'SELECT "value", "key" FROM "twin_input" WHERE "metric" = \'v\' GROUP BY "entity"'
        whole = influx.query(q)
        pieces = list(influx.query_chunks(q, chunk_size=3))
        grid = read_twin_steps(influx, "v", 60)
    assert len(pieces) > len(whole)  # a series came in several pieces
    for s in whole:
        rows = [r for p in pieces if p.tags == s.tags for r in p.values]
        assert rows == s.values
    assert grid.names == ["e0", "e1", "e2"] and grid.keys.tolist() == [1, 2, 3] and grid.steps == 7
    np.testing.assert_array_equal(grid.values, np.arange(3)[:, None] * 100 + np.arange(7)[None, :] + 0.5)


def test_compacted_v_twinning_publishes_the_same_twins() -> None:
    """``compact`` keeps what publishing needs (every twin, every BS's last update, the labels) in one tensor
    and drops V-twinning's working state: the messages are the same, float for float."""
    import torch

    from twin_store.federation.twinning import v_twinning
    from twin_store.models.forecaster import FitConfig
    from twin_store.services.vtwin import compact, pack_latest, twin_messages

    model = TwinModel(hidden=8, n_inputs=5)
    squares = np.arange(1, 41)
    labels = squares % 3
    x, y = torch.randn(40, 30, 5), torch.randn(40, 30)
    result = v_twinning(model, squares, labels, x, y, model.init(1, 0)[0], 4, 0.3, FitConfig(steps=3),
                        torch.Generator().manual_seed(0), np.random.default_rng(0))  # fmt: skip
    small = compact(result)
    pack_latest(small.clusters)
    assert 0 < len(small.clusters.latest) < 40  # partial participation: some BSs never trained
    assert len({p.untyped_storage().data_ptr() for p, _ in small.clusters.latest.values()}) == 1
    meta = {"loss": 0.5, "members": squares.tolist(), "entities": {str(s): f"e{s}" for s in squares}}
    before, after = twin_messages(result, 8, meta), twin_messages(small, 8, meta)
    assert [(m.key, m.meta) for m in after] == [(m.key, m.meta) for m in before]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a.params, b.params)
