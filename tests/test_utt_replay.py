"""``replay ftm`` against the real local broker: one walk with --limit, read back, bad row dead-lettered."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ingest.deadletter import DeadLetter
from ingest.kafka import make_consumer
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from nettwin.cli.replay_ftm import ftm

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "ftm_imu" / "raw"


def _read(
    settings: NettwinSettings, topic: str, expected: int, timeout: float = 20.0
) -> list[tuple[bytes, bytes, list]]:  # type: ignore[type-arg]
    consumer = make_consumer(settings, topic, group_id=None)
    out: list[tuple[bytes, bytes, list]] = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=500).values():
                out.extend((m.key, m.value, m.headers) for m in msgs)
    finally:
        consumer.close()
    return out


@pytest.mark.integration
@pytest.mark.skipif(not RAW.is_dir(), reason="../shared/data/ftm_imu/raw is absent")
def test_replay_ftm_publishes_three_streams_keyed_by_device_walk(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    lines = (RAW / "CarPark__5__524.csv").read_text().splitlines()
    lines[4] = "garbage,row"  # file line 5
    walk = tmp_path / "CarPark__5__524.csv"
    walk.write_text("\n".join(lines) + "\n")
    app = typer.Typer()
    app.command()(ftm)
    result = CliRunner().invoke(app, [str(walk), "--max", "--limit", "60", "--json"], obj=isolated)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["total"] == 60 and summary["dead_letters"] == 1
    topics = Topics.from_settings(isolated)
    ftm_recs = _read(isolated, topics.telemetry_ftm, summary["records"]["ftm"])
    imu_recs = _read(isolated, topics.telemetry_imu, summary["records"]["imu"])
    vis_recs = _read(isolated, topics.telemetry_vision_sim, summary["records"]["vision_sim"])
    assert len(ftm_recs) == summary["records"]["ftm"] > 0
    assert len(imu_recs) == summary["records"]["imu"] > 0
    assert len(vis_recs) == summary["records"]["vision_sim"] > 0
    assert {k for k, _v, _h in ftm_recs + imu_recs + vis_recs} == {b"M2/CarPark__5__524"}
    first = json.loads(ftm_recs[0][1])
    assert first["t_ms"] == 0.0 and first["line"] == 2
    assert first["aps"]["AP1"] == [36.5945, 0.315, -74.0] and "AP2" not in first["aps"]  # AP2 absent: 0s
    imu_t = [json.loads(v)["t_ms"] for _k, v, _h in imu_recs]
    assert imu_t == sorted(imu_t) and 5 not in [json.loads(v)["line"] for _k, v, _h in imu_recs]
    vis = json.loads(vis_recs[0][1])
    assert vis["simulated"] is True and set(vis) >= {"u", "v", "box_w", "box_h", "detected"}
    assert max(json.loads(v)["t_ms"] for _k, v, _h in ftm_recs + imu_recs + vis_recs) < 60_000
    dead = _read(isolated, topics.deadletter, 1)
    letter = DeadLetter.from_kafka(dead[0][1], dead[0][2])
    assert letter.original == b"garbage,row" and letter.position == "line 5" and letter.stage == "producer"
    # site metadata first, from the whole walk (not --limit); no site file here: one straight walk leaves
    # every AP mirror-ambiguous, which the record says
    ((key, value, _h),) = _read(isolated, topics.sites_ftm, 1)
    site = json.loads(value)
    assert key == b"CarPark" and site == summary["sites"]["CarPark"] and site["source"] == "recovered"
    assert (
        site["ap_ids"] == ["AP1", "AP2", "AP3", "AP4", "AP5", "AP6"] and site["ambiguous"] == site["ap_ids"]
    )
    assert max(site["residual_m"].values()) < 0.01 and site["n_obs"]["AP1"] > 800
    assert site["walks"] == ["CarPark__5__524"] and site["site_file"] is None


@pytest.mark.integration
@pytest.mark.skipif(not RAW.is_dir(), reason="../shared/data/ftm_imu/raw is absent")
def test_replay_ftm_publishes_no_site_for_a_scene_its_walks_cannot_determine(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    from kafka import TopicPartition

    log = tmp_path / "Office__circle1.csv"  # a phone log: no ground truth, no true distances, no site file
    log.write_text("\n".join((RAW / "Office__office_different_AP_positions__position1__circle1.csv")
                              .read_text().splitlines()[:40]) + "\n")  # fmt: skip
    app = typer.Typer()
    app.command()(ftm)
    result = CliRunner().invoke(app, [str(log), "--max", "--limit", "5"], obj=isolated)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console (stderr) wraps at its width
    assert (
        said.count("site Office") == 1
        and (
            "site Office: AP positions not published: scene Office: no walk has true distances and ground "
            "truth, and no site file names its APs"
        )
        in said
    )
    assert "replayed 5 records" in said  # the replay itself went on
    consumer = make_consumer(isolated, Topics.from_settings(isolated).sites_ftm, group_id=None)
    try:
        tp = TopicPartition(Topics.from_settings(isolated).sites_ftm, 0)
        assert consumer.end_offsets([tp])[tp] == 0
    finally:
        consumer.close()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not RAW.is_dir(), reason="../shared/data/ftm_imu/raw is absent")
def test_twin_operations_store_lineage_files_and_influx_rows(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    from nettwin.cli import twin
    from tests.conftest import run_cli
    from twin_store.adapters.influx import InfluxClient

    data = tmp_path / "raw"
    data.mkdir()
    for f in ("CarPark__5__513", "CarPark__5__524", "CarPark__6__613", "CarPark__6__624"):
        (data / f"{f}.csv").symlink_to(RAW / f"{f}.csv")
    common = ["--data", str(data), "--rounds", "1", "--json"]
    done = {}
    for args in (
        ["transfer", "--from", "position", "--to", "trajectory", "--defense", "median"],
        ["merge", "--from", "trajectory,tracking", "--to", "position", "--fuser", "attention"],
        ["split", "--from", "position", "--to", "trajectory,tracking"],
        ["merge", "--from", "position,tracking", "--to", "position", "--unified", "--fuser", "concatenation"],
    ):
        # in process (one torch import for all four); the error cases below go through the real CLI
        res = CliRunner().invoke(twin.app, [*args, *common], obj=isolated)
        assert res.exit_code == 0, res.output
        for rec in json.loads(res.stdout):
            done[rec["twin_id"]] = rec
    assert set(done) == {
        "trajectory.transfer.position",
        "position.merge.trajectory+tracking.attention",
        "trajectory.split.position",
        "tracking.split.position",
        "position.merge.position+tracking.unified.concatenation",
    }
    t = done["trajectory.transfer.position"]
    # validation is the held-out walk CarPark__5__524: the twins fit on CarPark__5__513 alone (1 client x 1 round)
    assert t["metrics"]["defense"] == "median" and t["metrics"]["accepted"] == 1
    assert t["version"] == 1 and t["model"] == "function-specific"
    u = done["position.merge.position+tracking.unified.concatenation"]
    assert (
        u["model"] == "unified.concatenation" and u["operation"] == "merge" and u["fuser"] == "concatenation"
    )
    assert u["modalities"] == ["ftm", "imu"] and 0 < u["metrics"]["test_nmse"] < 5
    unified = json.loads((Path(isolated.state_dir) / "utt" / "unified.concatenation.json").read_text())
    assert unified["operation"] == "unified" and unified["modalities"] == ["ftm", "imu", "vision"]
    m = done["position.merge.trajectory+tracking.attention"]
    assert (
        m["operation"] == "merge" and m["sources"] == ["trajectory", "tracking"] and m["fuser"] == "attention"
    )
    assert m["modalities"] == ["vision", "imu"] and 0 < m["metrics"]["test_nmse"] < 5
    state = Path(isolated.state_dir) / "utt"
    assert (state / "position.json").is_file()  # the source twin trained once, then reused
    assert json.loads((state / "tracking.split.position.json").read_text())["sources"] == ["position"]
    with InfluxClient(isolated.influx) as influx:
        rows = influx.query('SELECT * FROM "twin" WHERE "level" = \'utt\'')[0].rows()
    assert {r["twin_id"] for r in rows} == set(done)
    assert {r["operation"] for r in rows} == {"transfer", "merge", "split"}
    by_id = {r["twin_id"]: r for r in rows}
    assert by_id["trajectory.transfer.position"]["defense"] == "median"
    assert by_id["position.merge.position+tracking.unified.concatenation"]["model"] == "unified.concatenation"
    # one `update` row per client upload of every federated training the four operations ran
    res = run_cli(isolated, "query", "updates", "--json", "--limit", "1000")
    assert res.returncode == 0, res.stderr
    ups = json.loads(res.stdout)
    trained = {  # twin id -> trainings: 1 client x 1 round each; `position` trained with median, then mean
        "position": 2, "trajectory.transfer.position": 1, "trajectory": 1, "tracking": 1,
        "position.merge.trajectory+tracking.attention": 1, "trajectory.split.position": 1,
        "tracking.split.position": 1, "unified.concatenation": 1,
    }  # fmt: skip
    assert sorted(r["cluster"] for r in ups) == sorted(c for c, n in trained.items() for _ in range(n))
    assert {r["entity"] for r in ups} == {"CarPark__5__513"}  # the client's walk (524 is held out)
    assert all(r["decision"] == "accepted" and r["norm"] > 0 for r in ups)
    assert all(r["base_version"] == 0 and r["seq"] == 1 and r["reason"] == "" for r in ups)
    one = run_cli(isolated, "query", "updates", "--square", "CarPark__5__513", "--json", "--limit", "1000")
    assert len(json.loads(one.stdout)) == len(ups)
    held_out = run_cli(
        isolated, "query", "updates", "--square", "CarPark__5__524", "--json", "--limit", "1000"
    )
    assert json.loads(held_out.stdout) == []
    bad = run_cli(isolated, "twin", "merge", "--from", "position", "--to", "trajectory", *common)
    assert bad.returncode == 1 and "merge takes 2 --from twin(s)" in bad.stderr
    bad = run_cli(
        isolated, "twin", "transfer", "--from", "tracking", "--to", "position", "--unified", *common
    )
    assert (
        bad.returncode == 1
        and "the unified model is not trained for transfer tracking -> position" in bad.stderr
    )
    assert len(bad.stderr.strip().splitlines()) == 1
