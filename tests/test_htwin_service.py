"""Live H-twinning on the real services: twins follow BS updates, survive a restart, ignore replays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ingest.kafka import make_producer
from ingest.settings import NettwinSettings, load_settings
from ingest.topics import Topics
from tests.conftest import run_cli, small_vtwin
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.provision import deprovision, provision
from twin_store.federation.models_topic import ROSTER_KEY, TwinMessage
from twin_store.federation.samples import Scaler, samples
from twin_store.models.forecaster import FitConfig, TwinModel
from twin_store.services.htwin import TwinService, read_latest_twins

HOURLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan" / "hourly_150squares_62days.csv"
pytestmark = [pytest.mark.integration, pytest.mark.skipif(not HOURLY.exists(), reason="real data not found")]


def bootstrap(settings: NettwinSettings) -> dict[bytes, TwinMessage]:
    small_vtwin(settings)
    return read_latest_twins(settings)


def local_updates(latest: dict[bytes, TwinMessage], rounds: int) -> list[TwinMessage]:
    """Real local updates: each BS fine-tunes its cluster twin on its own recent hours."""
    glob = latest[b"global:0"]
    squares = sorted(int(s) for s in latest[ROSTER_KEY].meta["scaler"])
    cluster_of = {s: k for k, t in latest.items() if t.level == "cluster" for s in t.meta["members"]}
    table = np.loadtxt(HOURLY, delimiter=",", skiprows=1)
    rows = {int(r[0]): r[1:] for r in table}
    series = np.stack([rows[s] for s in squares])
    z = Scaler.fit(series, 1008).transform(series)
    model = TwinModel(glob.hidden)
    gen = torch.Generator().manual_seed(0)
    out = []
    for r in range(rounds):
        for i, s in enumerate(squares):
            x, y = samples(z[i : i + 1], 1008 + 24 * r, 1008 + 24 * (r + 1))
            start = torch.as_tensor(latest[cluster_of[s]].params).unsqueeze(0)
            new, loss = model.fit(
                start,
                torch.as_tensor(x, dtype=torch.float32),
                torch.as_tensor(y, dtype=torch.float32),
                FitConfig(5, 1e-2, 16),
                gen,
            )
            out.append(
                TwinMessage(
                    "bs",
                    str(s),
                    1,
                    glob.hidden,
                    new[0].numpy(),
                    {"seq": r, "n_samples": int(x.shape[1]), "loss": float(loss[0])},
                )
            )
    return out


def publish(settings: NettwinSettings, updates: list[TwinMessage]) -> None:
    producer = make_producer(settings)
    for u in updates:  # one partition: a fixed order, so runs are comparable
        producer.send(Topics.from_settings(settings).updates_local, key=u.key, value=u.encode(), partition=0)
    producer.flush()
    producer.close()


def test_updates_move_cluster_and_global_twins(isolated: NettwinSettings) -> None:
    latest = bootstrap(isolated)
    updates = local_updates(latest, rounds=2)
    publish(isolated, [*updates, updates[0]])  # the last one is a resend: a replay
    counters = TwinService(isolated, psi=0.0).run(idle_exit_s=3)
    assert counters["uploads"] == 12 and counters["replays"] == 1
    assert counters["downloads"] > 0 and counters["global_version"] == 1 + 12  # psi 0: every change syncs
    after = read_latest_twins(isolated)
    assert after[b"global:0"].version == 13
    assert not np.allclose(after[b"global:0"].params, latest[b"global:0"].params)
    assert {k for k in after if k.startswith(b"bs:")} == {u.key for u in updates}
    with InfluxClient(isolated.influx) as influx:
        rows = [r for s in influx.query('SELECT * FROM "twin" WHERE "level" = \'global\'') for r in s.rows()]
    assert max(r["version"] for r in rows) == 13


def test_restart_resumes_from_the_snapshot_and_matches_an_uninterrupted_run(
    isolated: NettwinSettings,
) -> None:
    latest = bootstrap(isolated)
    updates = local_updates(latest, rounds=2)
    publish(isolated, updates)
    first = TwinService(isolated, psi=1e-4).run(max_messages=5)  # stops (and commits) after 5 updates
    assert first["uploads"] == 5
    second = TwinService(isolated, psi=1e-4).run(idle_exit_s=3)  # a new process: state from twin.models
    assert second["uploads"] == 7 and second["replays"] == 0  # counters are per process: 12 - 5
    resumed = read_latest_twins(isolated)

    # the same input through one uninterrupted service, on a second isolated deployment
    other = load_settings(
        {
            "kafka": {"topic_prefix": isolated.kafka.topic_prefix + "b."},
            "influx": {"database": isolated.influx.database + "b"},
        }
    )
    provision(other)
    try:
        producer = make_producer(other)
        for msg in latest.values():
            producer.send(Topics.from_settings(other).twin_models, key=msg.key, value=msg.encode())
        producer.flush()
        producer.close()
        publish(other, updates)
        TwinService(other, psi=1e-4).run(idle_exit_s=3)
        straight = read_latest_twins(other)
    finally:
        deprovision(other)
    assert set(resumed) == set(straight)
    for key in straight:
        assert resumed[key].version == straight[key].version, key
        np.testing.assert_array_equal(resumed[key].params, straight[key].params)


def test_htwin_without_twins_is_a_one_line_error(isolated: NettwinSettings) -> None:
    res = run_cli(isolated, "htwin", "--idle-exit", "1")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "nettwin vtwin" in res.stderr
