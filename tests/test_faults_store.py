"""Fault tests of the twin store on the real services, with real processes killed for real.

- ``nettwin htwin``: poison on ``updates.local`` and on the compacted ``twin.models`` is dead-lettered (reason,
  position, original bytes) and skipped, in the running service and at every restart; kill -9 mid-stream and
  a restart leave the same twins as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ingest.deadletter import DeadLetter
from ingest.kafka import make_consumer, make_producer
from ingest.settings import NettwinSettings, load_settings
from ingest.topics import Topics
from tests.conftest import run_cli, wait_until
from tests.test_htwin_service import HOURLY, bootstrap, local_updates, publish
from twin_store.adapters.provision import deprovision, provision
from twin_store.federation.models_topic import MAGIC, TwinMessage
from twin_store.services.htwin import read_latest_twins
from twin_store.services.processes import settings_env

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not HOURLY.exists(), reason="real data not found")]


def deadletters(
    settings: NettwinSettings, expect: int, timeout_s: float = 20.0
) -> list[tuple[DeadLetter, str]]:
    """The dead letters on the topic (with the original bytes) once ``expect`` are there."""
    topic = Topics.from_settings(settings).deadletter
    out: list[tuple[DeadLetter, str]] = []
    consumer = make_consumer(settings, topic, group_id=None, consumer_timeout_ms=1000)
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for m in consumer:
                out.append((DeadLetter.from_kafka(m.value, m.headers), m.value or b""))
    finally:
        consumer.close()
    return out  # type: ignore[return-value]


def header_message(header: dict[str, object], n_params: int) -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + b"\0" * (4 * n_params)


def poison_updates(good: TwinMessage) -> dict[str, bytes]:
    """Bad local updates, each with what its dead letter must say."""
    n = good.params.size
    head = {"level": "bs", "twin_id": good.twin_id, "version": 1, "hidden": good.hidden, "n_params": n}
    meta = dict(good.meta)
    wrong_profile = TwinMessage(
        "bs", good.twin_id, 1, good.hidden, good.params, meta | {"profile": [1.0, 2.0]}
    )
    return {
        "bad magic": b"XXXX" + good.encode()[4:],
        "twin_id": header_message({k: v for k, v in head.items() if k != "twin_id"} | {"meta": meta}, n),
        "version must be an integer": header_message(head | {"version": "x", "meta": meta}, n),
        "meta must be an object": header_message(head | {"meta": [1, 2]}, n),
        "hour must be an integer": header_message(head | {"meta": meta | {"hour": "x"}}, n),
        "profile must be a list of 24": wrong_profile.encode(),
        "parameters": TwinMessage("bs", good.twin_id, 1, good.hidden, good.params[:-1], meta).encode(),
    }


def send_raw(settings: NettwinSettings, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = make_producer(settings)
    for key, value in messages:
        producer.send(topic, key=key, value=value, partition=0)
    producer.flush()
    producer.close()


def test_poison_on_updates_and_twin_models_is_dead_lettered_and_htwin_keeps_running(
    isolated: NettwinSettings,
) -> None:
    latest = bootstrap(isolated)
    updates = local_updates(latest, rounds=2)
    topics = Topics.from_settings(isolated)
    poison = poison_updates(updates[0])
    # poison first, then every good update: one bad message must cost that message only
    send_raw(isolated, topics.updates_local, [(updates[0].key, v) for v in poison.values()])
    publish(isolated, updates)
    # and on the compacted snapshot, where a restart reads it again: bad magic, a header without twin_id,
    # a message whose key names another twin, and a bs twin with a list-valued profile of the wrong size
    glob = latest[b"global:0"]
    bs_key = next(k for k in latest if k.startswith(b"bs:"))
    broken_bs = latest[bs_key]
    snapshot_poison = [
        (b"global:0", b"NTM0" + glob.encode()[4:]),
        (b"cluster:0", header_message({"level": "cluster", "version": 1, "hidden": 4, "n_params": 0}, 0)),
        (b"cluster:1", glob.encode()),
        (
            bs_key,
            TwinMessage(
                "bs",
                broken_bs.twin_id,
                9,
                broken_bs.hidden,
                broken_bs.params,
                broken_bs.meta | {"profile": [1.0, 2.0]},
            ).encode(),
        ),
    ]
    send_raw(isolated, topics.twin_models, snapshot_poison)

    res = run_cli(isolated, "htwin", "--psi", "0", "--idle-exit", "3", "--json", timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    counters = json.loads(res.stdout)
    assert counters["uploads"] == len(updates), counters
    assert counters["deadletters"] == len(poison), counters
    letters = deadletters(isolated, len(poison) + len(snapshot_poison))
    assert len(letters) == len(poison) + len(snapshot_poison)
    snapshot_letters = [(d, v) for d, v in letters if d.source == topics.twin_models]
    update_letters = [(d, v) for d, v in letters if d.source == topics.updates_local]
    assert {v for _, v in snapshot_letters} == {v for _, v in snapshot_poison}  # original bytes kept
    for (letter, original), (what, value) in zip(update_letters, poison.items(), strict=True):
        assert what in letter.reason and original == value, (what, letter.reason)
        assert letter.position.startswith(f"{topics.updates_local}[0]@")
    # the bad snapshot messages left their keys at the last good twin: the service ran on them
    assert read_latest_twins(isolated)[b"global:0"].version == len(updates) + 1

    # a restart reads the same poison on twin.models again (compaction keeps it) and still starts
    res = run_cli(isolated, "htwin", "--psi", "0", "--idle-exit", "2", "--json", timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["uploads"] == 0
    assert len(deadletters(isolated, 2 * len(snapshot_poison) + len(poison))) == 2 * len(
        snapshot_poison
    ) + len(poison)


def start_htwin(settings: NettwinSettings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "nettwin.cli.main", "htwin", "--psi", "1e-4", "--json", *args],
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def decision_rows(settings: NettwinSettings) -> int:
    """``update`` rows: one per decision (accepted, quarantined or rejected) on an update."""
    from twin_store.adapters.influx import InfluxClient

    with InfluxClient(settings.influx) as influx:
        series = influx.query('SELECT count("seq") FROM "update"')
    return int(series[0].values[0][1]) if series else 0


def test_kill_9_of_htwin_mid_stream_loses_nothing_and_applies_nothing_twice(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    latest = bootstrap(isolated)
    updates = local_updates(latest, rounds=4)  # 24 updates
    log = tmp_path / "htwin.log"
    before = decision_rows(isolated)  # V-twinning's rows
    proc = start_htwin(isolated, log)
    feeder = threading.Thread(target=lambda: [publish(isolated, [u]) or time.sleep(0.3) for u in updates[1:]])
    try:
        publish(isolated, updates[:1])
        wait_until(lambda: decision_rows(isolated) > before, 120, "htwin running")
        feeder.start()
        # kill -9 once a part has been applied, while updates keep arriving
        wait_until(lambda: decision_rows(isolated) >= before + 8, 120, "the first updates applied")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        at_kill = decision_rows(isolated) - before
        feeder.join(60)
        assert at_kill < len(updates), "killed too late to test anything"
        proc = start_htwin(isolated, log, "--idle-exit", "4")
        proc.wait(180)
        assert proc.returncode == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    resumed = read_latest_twins(isolated)

    other = load_settings(
        {
            "kafka": {"topic_prefix": isolated.kafka.topic_prefix + "b."},
            "influx": {"database": isolated.influx.database + "b"},
            "state_dir": str(tmp_path / "other"),
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
        res = run_cli(other, "htwin", "--psi", "1e-4", "--idle-exit", "3", "--json", timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        straight = read_latest_twins(other)
    finally:
        deprovision(other)
    assert set(resumed) == set(straight)
    for key in straight:
        assert resumed[key].version == straight[key].version, key
        np.testing.assert_array_equal(resumed[key].params, straight[key].params)
    assert decision_rows(isolated) == before + len(updates)  # every update's bs row once
