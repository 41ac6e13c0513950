"""Attached-source benchmark: sustained records/s into Kafka per source type, beside a ``replay --max`` of the
same records in the same run, and the latency from a source accepting a record to its ``telemetry`` row being
queryable in InfluxDB at 1,000 entities x 1 record/s.

Records: ``--entities`` Milan-style squares x ``--per-entity`` 10-minute intervals with the five activity
columns, written once as an official-format file (for the replay baseline) and once as canonical JSON.
- http: ``POST /v1/records`` with JSON arrays of ``--batch`` records, ``--clients`` concurrent clients; a
  record counts when its request was answered 200 (which happens only after Kafka acknowledged it);
- mqtt batched: QoS 1 messages each holding a JSON array of ``--batch`` records;
- mqtt single: QoS 1 messages of one record each (``--single`` messages);
  MQTT records count when the attach process reports them acknowledged by Kafka (its ``/metrics``);
- replay: ``producers.replay.Replayer`` (what ``nettwin replay milan --max`` runs) on the same records.
- latency: ``nettwin store`` running; every 100 ms one request of 100 records (each entity once a second),
  event time = the request's 100 ms slot; InfluxDB is polled every 50 ms; latency = first poll that sees the
  slot's 100 rows - the time the request was sent. p50/p99/max over ``--latency-s`` seconds.

Usage: .venv/bin/python bench/sources.py [--entities 1000] [--per-entity 100] [--latency-s 20]
Needs the services of infra/up (Kafka, InfluxDB, Mosquitto). Uses its own topics and database, deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

# run as `python bench/sources.py`, this folder would shadow the `ingest` package: drop it from sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import requests  # noqa: E402

from ingest.kafka import make_producer  # noqa: E402
from ingest.readers.milan import read_raw  # noqa: E402
from ingest.schema import ACTIVITY_COLUMNS  # noqa: E402
from ingest.settings import NettwinSettings, load_settings  # noqa: E402
from producers.replay import Replayer  # noqa: E402
from twin_store.adapters.influx import InfluxClient  # noqa: E402
from twin_store.adapters.provision import deprovision, provision  # noqa: E402
from twin_store.services.processes import settings_env, spawn_cli, stop_process  # noqa: E402

T0_MS = 1_383_260_400_000  # 2013-11-01 00:00 Europe/Rome, the Milan day
STEP_MS = 600_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_records(entities: int, per_entity: int) -> list[dict[str, Any]]:
    out = []
    for i in range(per_entity):
        for sq in range(1, entities + 1):
            base = (sq * 7 + i * 3) % 97
            metrics = {c: float(base + j) for j, c in enumerate(ACTIVITY_COLUMNS)}
            out.append({"entity": str(sq), "time": T0_MS + i * STEP_MS, "metrics": metrics})
    return out


def write_milan(records: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w") as fh:
        for r in records:
            m = r["metrics"]
            cols = "\t".join(repr(m[c]) for c in ACTIVITY_COLUMNS)
            fh.write(f"{r['entity']}\t{r['time']}\t39\t{cols}\n")


def accepted(url: str, source: str) -> int:
    text = requests.get(url + "/metrics", timeout=5).text
    m = re.search(rf'nettwin_source_accepted_total{{source="{source}"[^}}]*}} (\d+)', text)
    return int(m.group(1)) if m else 0


def wait_accepted(url: str, source: str, n: int, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while accepted(url, source) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{source}: only {accepted(url, source)} of {n} records acknowledged")
        time.sleep(0.02)
    return time.monotonic()


def bench_http(url: str, bodies: list[bytes], per_body: int, clients: int) -> dict[str, Any]:
    queue = list(range(len(bodies)))
    lock = threading.Lock()
    done = [0]
    statuses: dict[int, int] = {}

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            while True:
                r = session.post(url + "/v1/records", data=bodies[i], timeout=60)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    break
                time.sleep(float(r.headers.get("Retry-After", "0.1")))
            with lock:
                done[0] += per_body

    t = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = time.monotonic() - t
    return {
        "records": done[0],
        "seconds": round(s, 3),
        "records_per_s": round(done[0] / s),
        "statuses": statuses,
    }


def bench_mqtt(
    url: str, port: int, topic: str, payloads: list[bytes], records: int, source: str, tmp: Path
) -> dict[str, Any]:
    """Publish with ``mosquitto_pub -l`` (one message per line, C client) so the publisher is not the limit;
    paho-mqtt in Python tops out near 6k QoS 1 messages/s here with nothing else running."""
    before = accepted(url, source)
    lines = tmp / f"{topic.replace('/', '_')}.lines"
    lines.write_bytes(b"\n".join(payloads) + b"\n")
    t = time.monotonic()
    with open(lines, "rb") as fh:
        pub = subprocess.Popen(["mosquitto_pub", "-p", str(port), "-q", "1", "-t", topic, "-l"], stdin=fh)
    end = wait_accepted(url, source, before + records)
    pub.wait(60)
    s = end - t
    return {
        "records": records,
        "messages": len(payloads),
        "seconds": round(s, 3),
        "records_per_s": round(records / s),
        "messages_per_s": round(len(payloads) / s),
    }


def bench_replay(settings: NettwinSettings, path: Path) -> dict[str, Any]:
    table = read_raw(path)
    producer = make_producer(settings)
    try:
        t = time.monotonic()
        replayer = Replayer.for_settings(settings, producer, None)
        replayer.publish_table(table)
        summary = replayer.finish()
        s = time.monotonic() - t
    finally:
        producer.close()
    return {"records": summary.records, "seconds": round(s, 3), "records_per_s": round(summary.records / s)}


def bench_latency(url: str, influx: InfluxClient, entities: int, seconds: float) -> dict[str, Any]:
    per_req = entities // 10
    start_ms = (int(time.time() * 1000) // 1000 + 2) * 1000
    sent: dict[int, float] = {}  # slot start ms -> wall time the request was sent
    seen: dict[int, float] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set() or len(seen) < len(sent):
            q = (
                f'SELECT count("lat") FROM "telemetry" WHERE time >= {start_ms}ms '
                "GROUP BY time(100ms) fill(none)"
            )
            now = time.time()
            for series in influx.query(q):
                for ts, n in series.values:
                    slot = int(ts) if isinstance(ts, int | float) else _iso_ms(ts)
                    if n >= per_req and slot not in seen:
                        seen[slot] = now
            if stop.is_set() and time.time() - last_send[0] > 30:
                return
            time.sleep(0.05)

    last_send = [time.time()]
    poller = threading.Thread(target=poll)
    poller.start()
    session = requests.Session()
    n_slots = int(seconds * 10)
    for k in range(n_slots):
        slot = start_ms + k * 100
        delay = slot / 1000 - time.time()
        if delay > 0:
            time.sleep(delay)
        group = k % 10
        body = json.dumps(
            [
                {"entity": f"lat-{e}", "time": slot, "metrics": {"lat": 1.0}}
                for e in range(group * per_req, (group + 1) * per_req)
            ]
        ).encode()
        sent[slot] = time.time()
        last_send[0] = sent[slot]
        session.post(url + "/v1/records", data=body, timeout=30).raise_for_status()
    stop.set()
    poller.join()
    lat = sorted(seen[s] - sent[s] for s in sent if s in seen)
    if not lat:
        return {"requests": len(sent), "visible": 0}

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3)

    return {
        "entities": entities,
        "records_per_s": entities,
        "requests": len(sent),
        "visible": len(lat),
        "p50_s": pct(0.5),
        "p99_s": pct(0.99),
        "max_s": round(lat[-1], 3),
        "poll_interval_s": 0.05,
    }


def wait_store_ready(url: str, influx: InfluxClient, timeout: float = 120) -> None:
    """One warm-up record end to end, so the store has joined its group before latency is measured."""
    body = json.dumps({"entity": "warmup", "time": int(time.time() * 1000), "metrics": {"warm": 1.0}})
    requests.post(url + "/v1/records", data=body, timeout=30).raise_for_status()
    deadline = time.monotonic() + timeout
    while not influx.query('SELECT count("warm") FROM "telemetry"'):
        if time.monotonic() > deadline:
            raise RuntimeError("the store wrote nothing within the timeout; see store.log")
        time.sleep(0.1)


def _iso_ms(ts: str) -> int:
    from ingest.sources.record import parse_time

    return parse_time(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entities", type=int, default=1000)
    ap.add_argument("--per-entity", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--single", type=int, default=20_000)
    ap.add_argument("--latency-s", type=float, default=20.0)
    args = ap.parse_args()

    tag = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="nettwin-bench-sources-"))
    settings = load_settings(
        {
            "kafka": {"topic_prefix": f"bsrc{tag}."},
            "influx": {"database": f"bench_sources_{tag}"},
            "state_dir": str(tmp / "state"),
        }
    )
    mqtt_port = int(os.environ.get("NETTWIN_INFRA_MQTT_PORT", "1883"))
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    cfg = tmp / "sources.toml"
    cfg.write_text(
        f'[[source]]\nname = "http"\ntype = "http"\nlisten = "127.0.0.1:{http_port}"\n\n'
        f'[[source]]\nname = "mqtt"\ntype = "mqtt"\nurl = "mqtt://127.0.0.1:{mqtt_port}"\n'
        f'topics = ["bench{tag}/#"]\nqos = 1\nclient_id = "bench-attach-{tag}"\n'
    )
    records = make_records(args.entities, args.per_entity)
    milan = tmp / "milan.txt"
    write_milan(records, milan)
    chunks = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    bodies = [json.dumps(c).encode() for c in chunks]
    singles = [json.dumps(r).encode() for r in records[: args.single]]
    env = settings_env(settings)
    result: dict[str, Any] = {"bench": "sources", "records": len(records), "entities": args.entities}
    provision(settings)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(spawn_cli(["attach", "--config", str(cfg)], tmp / "attach.log", env))
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"attach did not start; see {tmp / 'attach.log'}")
            time.sleep(0.2)
        time.sleep(1.0)  # MQTT subscribed
        # warm-up: registers the entities (first use of a name claims its key on the registry topic)
        bench_http(url, bodies[: max(1, args.entities // args.batch)], args.batch, 1)
        result["replay_max"] = bench_replay(settings, milan)
        result["http_batched"] = bench_http(url, bodies, args.batch, args.clients)
        result["mqtt_batched"] = bench_mqtt(
            url, mqtt_port, f"bench{tag}/b", bodies, len(records), "mqtt", tmp
        )
        result["mqtt_single_qos1"] = bench_mqtt(
            url, mqtt_port, f"bench{tag}/s", singles, len(singles), "mqtt", tmp
        )
        procs.append(spawn_cli(["store"], tmp / "store.log", env))
        with InfluxClient(settings.influx) as influx:
            wait_store_ready(url, influx)
            result["latency_http_to_influx"] = bench_latency(url, influx, args.entities, args.latency_s)
    finally:
        for p in procs:
            stop_process(p)
        deprovision(settings)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
