"""Fault tests of the twin store on the real services, with real processes killed for real.

- ``nettwin htwin``: poison on ``updates.local`` and on the compacted ``twin.models`` is dead-lettered (reason,
  position, original bytes) and skipped, in the running service and at every restart; kill -9 mid-stream and
  a restart leave the same twins as an uninterrupted run.
- ``nettwin store``: kill -9 mid-replay and a restart, or a test-local InfluxDB stopped for ``OUTAGE_S`` mid-replay:
  every ``traffic`` and ``traffic_hourly`` row once with the right sums, and the store resumes by itself (its
  memory stays bounded meanwhile). InfluxDB refusing the store's credentials is one line and exit 1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from pydantic import SecretStr

from ingest.deadletter import DeadLetter
from ingest.errors import NettwinError
from ingest.kafka import make_consumer, make_producer
from ingest.readers.milan import read_raw
from ingest.settings import NettwinSettings, load_settings
from ingest.topics import Topics
from tests.conftest import REPO, SHARED_MILAN, Pipeline, run_cli, wait_until
from tests.test_htwin_service import HOURLY, bootstrap, local_updates, publish
from tests.test_integration import T0, features
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.provision import deprovision, provision
from twin_store.federation.models_topic import MAGIC, TwinMessage
from twin_store.services.htwin import read_latest_twins
from twin_store.services.processes import settings_env
from twin_store.services.store import wait_for_run

pytestmark = pytest.mark.integration
needs_hourly = pytest.mark.skipif(not HOURLY.exists(), reason="real data not found")
DAY = SHARED_MILAN / "raw_2013-11-01_26squares.txt"
OUTAGE_S = (
    20.0  # issue 9 says 60 s; 20 s keeps the test short and still spans many back-off rounds (0.5 s .. 10 s)
)


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


@needs_hourly
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
    with InfluxClient(settings.influx) as influx:
        series = influx.query('SELECT count("seq") FROM "update"')
    return int(series[0].values[0][1]) if series else 0


@needs_hourly
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


# --- `nettwin store`: kill -9 mid-replay, InfluxDB stopped mid-replay, InfluxDB refusing the store ---------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalInflux:
    """A test-local influxd (the infra/ config with its own ports and data) we may stop and start again."""

    def __init__(self, root: Path, auth: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = (REPO / "infra" / "influxdb.conf.in").read_text()
        conf = conf.replace("@STATE@", str(root)).replace("@HTTP_PORT@", str(self.port))
        conf = conf.replace("@RPC_PORT@", str(free_port()))
        if auth:
            conf = conf.replace("[http]\n", "[http]\n  auth-enabled = true\n")
        self.config = root / "influxdb.conf"
        self.config.write_text(conf)
        self.log = root / "influxd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(["influxd", "-config", str(self.config)], stdout=out, stderr=out)
        wait_until(lambda: self._ping(), 30, "the test-local influxd")

    def _ping(self) -> bool:
        try:
            return requests.get(self.url + "/ping", timeout=1).status_code == 204
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None


def with_influx(
    settings: NettwinSettings, url: str, username: str | None = None, password: str | None = None
) -> NettwinSettings:
    update: dict[str, object] = {"url": url}
    if username is not None:
        update |= {"username": username, "password": SecretStr(password or "")}
    return settings.model_copy(update={"influx": settings.influx.model_copy(update=update)})


def expected_traffic() -> dict[str, dict[int, tuple[int, float]]]:
    """Rows and internet sums per square, 10-minute and hourly, of the real 26-square day."""
    table = read_raw(DAY)
    hours = table.starts_ms // 3_600_000
    out: dict[str, dict[int, tuple[int, float]]] = {"traffic": {}, "traffic_hourly": {}}
    for s in np.unique(table.squares).tolist():
        mask = table.squares == s
        out["traffic"][s] = (int(mask.sum()), float(table.values[mask, 4].sum()))
        out["traffic_hourly"][s] = (len(np.unique(hours[mask])), float(table.values[mask, 4].sum()))
    return out


def found_traffic(settings: NettwinSettings) -> dict[str, dict[int, tuple[int, float]]]:
    out: dict[str, dict[int, tuple[int, float]]] = {}
    with InfluxClient(settings.influx) as influx:
        for measurement in ("traffic", "traffic_hourly"):
            q = f'SELECT count("internet"), sum("internet") FROM "{measurement}" GROUP BY "entity"'
            out[measurement] = {
                int(s.tags["entity"]): (int(s.values[0][1]), float(s.values[0][2])) for s in influx.query(q)
            }
    return out


def assert_exact(settings: NettwinSettings) -> None:
    expected, found = expected_traffic(), found_traffic(settings)
    for measurement, rows in expected.items():
        assert set(found[measurement]) == set(rows), measurement
        for square, (n, total) in rows.items():
            got_n, got_total = found[measurement][square]
            assert got_n == n, (measurement, square, got_n, n)
            assert got_total == pytest.approx(total, rel=1e-9), (measurement, square)


def replay(settings: NettwinSettings, run: str, speed: float, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nettwin.cli.main",
                "replay",
                "milan",
                str(DAY),
                "--speed",
                str(speed),
                "--run",
                run,
            ],
            env=settings_env(settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def traffic_rows(settings: NettwinSettings) -> int:
    try:
        with InfluxClient(settings.influx) as influx:
            series = influx.query('SELECT count("internet") FROM "traffic"')
    except NettwinError:
        return -1
    return int(series[0].values[0][1]) if series else 0


@pytest.mark.skipif(not DAY.exists(), reason="real data not found")
def test_kill_9_of_the_store_mid_replay_writes_every_row_once(pipeline: Pipeline, tmp_path: Path) -> None:
    settings = pipeline.settings
    total = sum(n for n, _ in expected_traffic()["traffic"].values())
    feeder = replay(settings, "store-kill", 144 * 600 / 12, tmp_path / "replay.log")  # the day in ~12 s
    try:
        wait_until(lambda: traffic_rows(settings) > 0, 90, "the first rows")
        pipeline.stop("store", kill=True)
        at_kill = traffic_rows(settings)
        assert at_kill < total, "killed too late to test anything"
        time.sleep(1)
        pipeline.start("store")
        assert feeder.wait(120) == 0, (tmp_path / "replay.log").read_text()[-2000:]
        with InfluxClient(settings.influx) as influx:
            wait_for_run(influx, "store-kill", settings.kafka.partitions, timeout_s=120)
    finally:
        if feeder.poll() is None:
            feeder.kill()
            feeder.wait()
    pipeline.assert_running()
    assert_exact(settings)


@pytest.mark.skipif(not DAY.exists(), reason="real data not found")
def test_influxdb_stopped_mid_replay_loses_nothing_and_the_store_resumes(
    isolated: NettwinSettings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """InfluxDB down for OUTAGE_S in the middle of a replay: the store keeps retrying (memory bounded), and once
    InfluxDB is back every row is there exactly once, without restarting anything."""
    influxd = LocalInflux(tmp_path / "influx")
    influxd.start()
    settings = with_influx(isolated, influxd.url)
    pipe = Pipeline(settings, tmp_path)
    feeder: subprocess.Popen[bytes] | None = None
    try:
        with InfluxClient(settings.influx) as influx:
            influx.create_database()
        pipe.start("worker")
        pipe.start("store")
        store = psutil.Process(pipe.procs["store"].pid)
        feeder = replay(settings, "outage", 144 * 600 / 20, tmp_path / "replay.log")  # the day in ~20 s
        wait_until(lambda: traffic_rows(settings) > 0, 90, "the first rows")
        rss_before = store.memory_info().rss
        influxd.stop()
        peak, down_since = rss_before, time.monotonic()
        while time.monotonic() - down_since < OUTAGE_S:
            peak = max(peak, store.memory_info().rss)
            pipe.assert_running()
            time.sleep(0.5)
        influxd.start()
        assert feeder.wait(120) == 0
        with InfluxClient(settings.influx) as influx:
            wait_for_run(influx, "outage", settings.kafka.partitions, timeout_s=120)
        pipe.assert_running()
        assert_exact(settings)
        growth_mb = (peak - rss_before) / 2**20
        print(
            f"store RSS {rss_before / 2**20:.0f} MB before the outage, peak {peak / 2**20:.0f} MB during it"
        )
        assert growth_mb < 50, f"store RSS grew {growth_mb:.0f} MB while InfluxDB was down"
    except BaseException:
        sys.stderr.write(pipe.logs())
        raise
    finally:
        if feeder is not None and feeder.poll() is None:
            feeder.kill()
            feeder.wait()
        for name in list(pipe.procs):
            pipe.stop(name)
        influxd.stop()


def test_wrong_influx_password_is_one_clear_error_at_start_and_mid_run(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    influxd = LocalInflux(tmp_path / "influx", auth=True)
    influxd.start()
    try:
        resp = requests.post(
            influxd.url + "/query",
            data={"q": "CREATE USER admin WITH PASSWORD 'right-one' WITH ALL PRIVILEGES"},
        )
        assert resp.status_code == 200, resp.text
        good = with_influx(isolated, influxd.url, "admin", "right-one")
        with InfluxClient(good.influx) as influx:
            influx.create_database()

        # at start: a wrong password is one line and exit 1, not a hang
        wrong = with_influx(isolated, influxd.url, "admin", "wrong")
        started = time.monotonic()
        res = run_cli(wrong, "store", "--idle-exit", "30", timeout=60)
        assert res.returncode == 1 and time.monotonic() - started < 30
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("nettwin: error: InfluxDB") and "401" in last and "PASSWORD" in last, (
            res.stderr
        )
        assert "Traceback" not in res.stderr

        # mid-run: the password changes under a running store; its next write fails for good and it says so
        log = tmp_path / "store.log"
        with log.open("ab") as out:
            store = subprocess.Popen(
                [sys.executable, "-m", "nettwin.cli.main", "store"],
                env=settings_env(good),
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        try:
            producer = make_producer(good)
            topic = Topics.from_settings(good).features_traffic
            producer.send(topic, features(5, T0).encode(), partition=0)
            producer.flush()
            with InfluxClient(good.influx) as influx:
                wait_until(lambda: traffic_count(influx) == 5, 60, "the first rows")
                influx.query("SET PASSWORD FOR admin = 'changed'", method="POST", database=None)
            producer.send(topic, features(5, T0 + 600_000).encode(), partition=0)
            producer.flush()
            producer.close()
            assert store.wait(30) == 1
        finally:
            if store.poll() is None:
                store.kill()
                store.wait()
        text = log.read_text()
        last = text.strip().splitlines()[-1]
        assert last.startswith("nettwin: error: InfluxDB") and "401" in last and "Traceback" not in text, (
            text[-2000:]
        )
    finally:
        influxd.stop()


def traffic_count(influx: InfluxClient) -> int:
    series = influx.query('SELECT count("internet") FROM "traffic"')
    return int(series[0].values[0][1]) if series else 0
