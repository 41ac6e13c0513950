"""Authenticated updates and screening on the real services: fake BSs and a compromised BS attack a live
store; nothing they send moves a twin, and every decision is queryable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ingest.kafka import make_consumer
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from tests.conftest import run_cli
from tests.test_htwin_service import bootstrap, local_updates, publish
from twin_store.federation.keys import KeyRegistry
from twin_store.federation.models_topic import ROSTER_KEY
from twin_store.services.htwin import TwinService, read_latest_twins

HOURLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan" / "hourly_150squares_62days.csv"
pytestmark = [pytest.mark.integration, pytest.mark.skipif(not HOURLY.exists(), reason="real data not found")]


def test_fake_and_compromised_bs_updates_are_refused_and_listed(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    latest = bootstrap(isolated)
    keys_file = tmp_path / "bs-keys.json"
    res = run_cli(isolated, "keys", "create", str(keys_file), "--from-twins")
    assert res.returncode == 0, res.stderr
    secured = isolated.model_copy(
        update={"security": isolated.security.model_copy(update={"keys_file": keys_file})}
    )
    keys = KeyRegistry.load(keys_file)
    squares = sorted(int(s) for s in latest[ROSTER_KEY].meta["scaler"])
    assert sorted(int(k) for k in keys.keys) == squares

    honest = local_updates(latest, rounds=2)  # 12 real updates: past the screen's warm-up
    for u in honest:
        u.meta["base_version"], u.meta["cluster"] = 1, -1
        keys.sign(u)
    publish(secured, honest)
    victim = squares[0]
    attacks = [
        ("mpaf", "--bs", "90001,90002"),  # fake BSs: no key
        ("tpi", "--bs", "90003"),
        ("signflip", "--bs", str(squares[1])),  # a real BS's id without its key: unsigned
    ]
    for args in attacks:
        res = run_cli(secured, "attack", *args, "--json")
        assert res.returncode == 0, res.stderr
    counters = TwinService(secured, psi=0.0).run(idle_exit_s=3)
    assert counters["uploads"] == 12 and counters["rejected"] == 4 and counters["quarantined"] == 0
    before = read_latest_twins(secured)

    # a compromised BS holds a genuine key: it passes authentication, the temporal screen stops it
    res = run_cli(secured, "attack", "scale", "--bs", str(victim), "--keys", str(keys_file), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["signed"] == 1, res.stderr
    counters = TwinService(secured, psi=0.0).run(idle_exit_s=3)
    rows = json.loads(run_cli(secured, "query", "updates", "--json").stdout)
    assert counters["quarantined"] == 1 and counters["uploads"] == 0, (counters, rows[:3])
    after = read_latest_twins(secured)
    assert not any(k.startswith(b"bs:9000") for k in after)
    ack = after[f"bs:{victim}".encode()].meta
    assert ack["decided_seq"] > ack["seq"]  # the agent of the victim learns its update was decided on
    assert ack["evicted"]  # and its earlier accepted update left its cluster twin
    cid = ack["cluster"]
    for key, twin in before.items():
        if twin.level == "cluster" and twin.twin_id != str(cid):
            assert np.array_equal(after[key].params, twin.params), key
    # the victim's cluster twin is the FedAvg of the remaining members' accepted updates
    # (or, if it was the cluster's only reporting member, the global twin)
    members = after[f"cluster:{cid}".encode()].meta["members"]
    kept = [after[f"bs:{s}".encode()] for s in members if s != victim]
    if kept:
        weights = np.array([m.meta["n_samples"] for m in kept], dtype=np.float64)
        expected = (np.stack([m.params for m in kept]) * (weights / weights.sum())[:, None]).sum(axis=0)
    else:
        expected = after[b"global:0"].params
    assert np.allclose(after[f"cluster:{cid}".encode()].params, expected, atol=1e-5)

    res = run_cli(secured, "query", "updates", "--decision", "rejected", "--json")
    assert res.returncode == 0, res.stderr
    rejected = json.loads(res.stdout)
    reasons = sorted(r["reason"] for r in rejected)
    assert len(rejected) == 4 and sum(r.startswith("unknown BS 9000") for r in reasons) == 3
    assert "unsigned update" in reasons
    res = run_cli(secured, "query", "updates", "--decision", "quarantined", "--json")
    quarantined = json.loads(res.stdout)
    assert [int(r["entity"]) for r in quarantined] == [victim] and quarantined[0]["reason"].startswith(
        "outlier"
    )
    res = run_cli(secured, "query", "updates", "--decision", "accepted", "--json")
    assert len(json.loads(res.stdout)) == 12

    # every refused update is kept, with its decision and reason, on updates.quarantine
    consumer = make_consumer(
        secured, Topics.from_settings(secured).updates_quarantine, group_id=None, consumer_timeout_ms=3000
    )
    kept = [dict(m.headers) for m in consumer]
    consumer.close()
    assert sorted(h["decision"].decode() for h in kept) == ["quarantined"] + ["rejected"] * 4


def test_bad_security_input_is_one_line(isolated: NettwinSettings, tmp_path: Path) -> None:
    res = run_cli(isolated, "--keys", str(tmp_path / "none.json"), "htwin", "--idle-exit", "1")
    assert (
        res.returncode == 1 and res.stderr.count("\n") == 1 and "cannot read the key registry" in res.stderr
    )
    res = run_cli(isolated, "query", "updates", "--decision", "maybe")
    assert res.returncode == 1 and "--decision 'maybe'" in res.stderr
    res = run_cli(isolated, "keys", "create", str(tmp_path / "k.json"))
    assert res.returncode == 1 and "--ids" in res.stderr
    res = run_cli(isolated, "bench", "poisoning", "--data", str(HOURLY), "--attack", "nuke")
    assert res.returncode == 1 and "unknown attack 'nuke'" in res.stderr and res.stderr.count("\n") == 1


def test_telemetry_attack_writes_a_poisoned_copy_to_replay(isolated: NettwinSettings, tmp_path: Path) -> None:
    original = np.loadtxt(HOURLY, delimiter=",", skiprows=1)
    victims = [int(original[0, 0]), int(original[5, 0])]
    out = tmp_path / "poisoned.csv"
    args = ["attack", "telemetry", "--bs", ",".join(map(str, victims)), "--data", str(HOURLY)]
    res = run_cli(isolated, *args, "--out", str(out), "--from-hour", "1000", "--json")
    assert res.returncode == 0, res.stderr
    poisoned = np.loadtxt(out, delimiter=",", skiprows=1)
    changed = np.abs(poisoned[:, 1:] - original[:, 1:]) > 1e-3 * (1 + np.abs(original[:, 1:]))
    assert sorted(poisoned[changed.any(axis=1), 0].astype(int).tolist()) == victims
    assert not changed[:, :1000].any() and changed[[0, 5], 1000:].mean() > 0.05
    res = run_cli(
        isolated, "attack", "telemetry", "--bs", "99999999", "--data", str(HOURLY), "--out", str(out)
    )
    assert res.returncode == 1 and "not in" in res.stderr and res.stderr.count("\n") == 1


def test_bench_poisoning_reports_the_pair_beside_the_clean_run(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    out = tmp_path / "pred.csv"
    args = ["bench", "poisoning", "--data", str(HOURLY), "--squares", "8", "--seed", "2", "--attack", "scale"]
    res = run_cli(
        isolated,
        *args,
        "--malicious",
        "0.25",
        "--defense",
        "mean,default",
        "--predictions",
        str(out),
        "--plot",
        str(tmp_path / "figures"),
        "--json",
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["figures"] == [str(tmp_path / "figures" / "attack_defense.png")]
    assert (tmp_path / "figures" / "attack_defense.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {(r["attack"], r["defense"]): r for r in report["runs"]}
    assert set(runs) == {("none", "mean"), ("scale", "mean"), ("scale", "default")}
    assert runs[("none", "mean")]["test_mse_vs_clean"] == 1.0
    undefended, defended = runs[("scale", "mean")], runs[("scale", "default")]
    assert (
        undefended["decisions"]["compromised_accepted"] > 0
        and "compromised_quarantined" not in undefended["decisions"]
    )
    assert defended["decisions"]["compromised_quarantined"] > defended["decisions"].get(
        "compromised_accepted", 0
    )
    assert defended["test"]["mse"] < undefended["test"]["mse"]
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["method", "square", "hour_index", "actual", "predicted"] and len(rows) == 8 * 240
