"""Ingest benchmark: Milan-format traffic through producer -> Kafka -> worker -> store -> InfluxDB.

Input: the real 26-square day repeated with shifted square ids (39 copies -> 1,014 squares) and shifted
days, written in the official format. Prints one JSON line:
- throughput (records/s) of each stage with the stages running concurrently as a stream (--max replay),
- ceilings measured in the same run on the same records: a plain kafka-python consume-and-count of the
  telemetry topic, and a bare line-protocol write of the same points to InfluxDB (prebuilt, 10k per POST),
- end to end against the bare write twice: records/s against the records' own points, and points/s against
  a bare write of the same points the pipeline wrote (the records' plus the hourly rows it read back),
- end-to-end lag (source closes an interval -> its row written to InfluxDB) at --speed 600,
- peak RSS of every process.

Usage: .venv/bin/python bench/ingest.py [--days 3] [--copies 39] [--repeat 3] [--lag-hours 6] [--data FILE]
Needs the services of infra/up. Uses its own topics and database and deletes them afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

# run as `python bench/ingest.py`, this file's folder is first on sys.path and its name would shadow the
# `ingest` package: drop the folder before importing the project
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from ingest.kafka import make_consumer, make_producer  # noqa: E402
from ingest.readers.milan import read_raw  # noqa: E402
from ingest.schema import ACTIVITY_COLUMNS, RecordBatch, decode  # noqa: E402
from ingest.settings import NettwinSettings, load_settings  # noqa: E402
from ingest.topics import Topics  # noqa: E402
from producers.replay import Replayer  # noqa: E402
from twin_store.adapters.influx import InfluxClient  # noqa: E402
from twin_store.adapters.lineproto import columns_to_lines  # noqa: E402
from twin_store.adapters.provision import deprovision, provision  # noqa: E402
from twin_store.services.processes import settings_env, spawn_cli, stop_process  # noqa: E402
from twin_store.services.store import wait_for_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "milan" / "raw_2013-11-01_26squares.txt"
DAY_MS = 86_400_000


def write_scaled_files(src: Path, dest: Path, copies: int, days: int) -> tuple[list[Path], int]:
    """Official-format files: the source day with square ids shifted per copy, one file per day."""
    lines = [ln.split("\t") for ln in src.read_text().splitlines() if ln.strip()]
    max_square = max(int(f[0]) for f in lines)
    paths = []
    for d in range(days):
        path = dest / f"scaled-day{d}.txt"
        with open(path, "w") as fh:
            for c in range(copies):
                shift = c * max_square
                for f in lines:
                    fh.write(f"{int(f[0]) + shift}\t{int(f[1]) + d * DAY_MS}\t" + "\t".join(f[2:]) + "\n")
        paths.append(path)
    return paths, len(lines) * copies * days


def isolated_settings(tag: str, state: Path) -> NettwinSettings:
    return load_settings(
        {
            "kafka": {"topic_prefix": f"bench{tag}."},
            "influx": {"database": f"nettwin_bench{tag}"},
            "state_dir": str(state),
        }
    )


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (from /proc), 0 if it is gone."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_pid(name: str) -> int | None:
    f = REPO / ".state" / "run" / f"{name}.pid"
    return int(f.read_text()) if f.exists() else None


def replay_files(
    settings: NettwinSettings, tables: list[Any], speed: float | None, run: str
) -> dict[str, Any]:
    producer = make_producer(settings)
    replayer = Replayer.for_settings(settings, producer, speed, run=run)
    for t in tables:
        replayer.publish_table(t)
    summary = replayer.finish().as_dict()
    producer.close()
    return summary


def consume_and_count(settings: NettwinSettings, expected: int) -> float:
    """Ceiling: a plain kafka-python consumer reading the telemetry topic and counting records."""
    topic = Topics.from_settings(settings).telemetry_milan
    consumer = make_consumer(settings, topic, group_id=None, consumer_timeout_ms=5000)
    n = 0
    t0 = time.perf_counter()
    for m in consumer:
        n += len(decode(m.value))
        if n >= expected:
            break
    dt = time.perf_counter() - t0
    consumer.close()
    return n / dt


def hourly_lines(settings: NettwinSettings) -> list[str]:
    """The ``traffic_hourly`` rows a pipeline run wrote, as line protocol: the points the data model adds to
    the records' own, so that a bare write of records plus these is the same work the pipeline's writes do."""
    fields = list(ACTIVITY_COLUMNS)
    selected = ", ".join(f'"{f}"' for f in [*fields, "n_intervals"])
    with InfluxClient(settings.influx) as influx:
        series = influx.query(f'SELECT {selected} FROM "traffic_hourly" GROUP BY "entity"', epoch="s")
    lines: list[str] = []
    for s in series:
        rows = np.array(s.values, dtype=float)
        lines += columns_to_lines(
            "traffic_hourly",
            "entity",
            np.full(len(rows), int(s.tags["entity"])),
            rows[:, 0].astype(np.int64),
            fields,
            rows[:, 1 : 1 + len(fields)],
            {"n_intervals": rows[:, -1].astype(np.int64)},
        )
    return lines


def bare_influx_write(
    settings: NettwinSettings, tables: list[Any], extra_lines: list[str]
) -> tuple[float, float]:
    """Ceiling: prebuilt line protocol, POSTed 10k points at a time by one writer, timed twice in one write:
    records/s of the records' own points, then points/s of those plus ``extra_lines`` (the hourly rows)."""
    own_lines: list[str] = []
    for t in tables:
        own_lines += columns_to_lines(
            "traffic", "entity", t.squares, t.starts_ms // 1000, list(ACTIVITY_COLUMNS), t.values
        )
    step = settings.influx.batch_points

    def posts(lines: list[str]) -> list[bytes]:
        return ["\n".join(lines[i : i + step]).encode() for i in range(0, len(lines), step)]

    own, extra = posts(own_lines), posts(extra_lines)
    n = sum(len(t) for t in tables)
    with InfluxClient(settings.influx) as influx:
        t0 = time.perf_counter()
        for p in own:
            influx.write(p, precision="s")
        t_own = time.perf_counter() - t0
        for p in extra:
            influx.write(p, precision="s")
        t_all = time.perf_counter() - t0
    return n / t_own, (len(own_lines) + len(extra_lines)) / t_all


def run_pipeline(
    settings: NettwinSettings, tables: list[Any], speed: float | None, logdir: Path
) -> dict[str, Any]:
    env = settings_env(settings)
    worker_log = logdir / "worker.log"
    worker_log.unlink(missing_ok=True)
    worker = spawn_cli(["worker", "--loglevel", "info"], worker_log, env)
    store = spawn_cli(["store"], logdir / "store.log", env)
    try:
        time.sleep(6)  # both processes up and in their groups before the clock starts
        # the worker's start-up (imports, joining its group) is not its throughput: wait until it is ready
        deadline = time.monotonic() + 120
        while "[^Worker]: Ready" not in worker_log.read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: the worker did not get ready; see {worker_log}")
            time.sleep(0.2)
        run = uuid.uuid4().hex[:8]
        pids = {
            "worker": worker.pid,
            "store": store.pid,
            "tansu": service_pid("tansu"),
            "influxd": service_pid("influxd"),
            "producer_and_bench": os.getpid(),
        }
        cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
        t0 = time.time()
        summary = replay_files(settings, tables, speed, run)
        t_produced = time.time()
        with InfluxClient(settings.influx) as influx:
            rows = wait_for_run(influx, run, settings.kafka.partitions, timeout_s=600)
            t_done = max(int(r["time"]) for r in rows) / 1000
            lag = {}
            for window in (600, 3600):
                q = (
                    f"SELECT percentile(lag_ms,50), percentile(lag_ms,95), percentile(lag_ms,99), max(lag_ms), "
                    f"count(lag_ms) FROM pipeline WHERE run = '{run}' AND \"window\" = '{window}'"
                )
                s = influx.query(q)
                if s:
                    _, p50, p95, p99, mx, cnt = s[0].values[0]
                    lag[f"{window}s"] = {
                        "p50_ms": p50,
                        "p95_ms": p95,
                        "p99_ms": p99,
                        "max_ms": mx,
                        "messages": cnt,
                    }
            # the points the pipeline wrote: traffic plus the hourly rows the data model adds, so that its
            # rate can be set beside the bare write of points (like with like) as well as per record
            field = ACTIVITY_COLUMNS[0]
            points = sum(
                int(s.values[0][1])
                for m in ("traffic", "traffic_hourly")
                for s in influx.query(f'SELECT count("{field}") FROM "{m}"')
            )
        cpu = {k: round(cpu_seconds(v) - cpu0[k], 2) for k, v in pids.items()}
        worker_end = features_end(settings)
        rss = {"worker": peak_rss_mb(worker.pid), "store": peak_rss_mb(store.pid)}
    finally:
        stop_process(worker)
        stop_process(store)
    n = summary["records"]
    return {
        "records": n,
        "produce_records_per_s": round(n / (t_produced - t0)),
        "worker_records_per_s": round(n / (worker_end - t0)),
        "end_to_end_records_per_s": round(n / (t_done - t0)),
        "points_written": points,
        "end_to_end_points_per_s": round(points / (t_done - t0)),
        "seconds": round(t_done - t0, 2),
        "received": sum(int(r["received"]) for r in rows),
        "lag": lag,
        "peak_rss_mb": rss,
        "cpu_seconds": cpu,
    }


def features_end(settings: NettwinSettings) -> float:
    """When the worker emitted its last feature message (the final markers): their Kafka timestamps."""
    topic = Topics.from_settings(settings).features_traffic
    consumer = make_consumer(settings, topic, group_id=None, consumer_timeout_ms=3000)
    last = 0
    for m in consumer:
        batch: RecordBatch = decode(m.value)
        if batch.final:
            last = max(last, m.timestamp)
    consumer.close()
    return last / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument(
        "--plot", type=Path, default=None, help="also write the stages figure (PNG) into this folder"
    )
    ap.add_argument("--copies", type=int, default=39, help="shifted copies of the squares (39 x 26 = 1,014)")
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of the streaming run and bare write")
    ap.add_argument("--lag-hours", type=int, default=6, help="event hours replayed at --speed 600 for lag")
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"bench: {args.data}: no such file (give --data)")

    out: dict[str, Any] = {"bench": "ingest"}
    with tempfile.TemporaryDirectory(prefix="nettwin-bench-") as tmp_s:
        tmp = Path(tmp_s)
        paths, lines = write_scaled_files(args.data, tmp, args.copies, args.days)
        t0 = time.perf_counter()
        tables = [read_raw(p) for p in paths]
        parse_s = time.perf_counter() - t0
        n = sum(len(t) for t in tables)
        squares = len(np.unique(np.concatenate([t.squares for t in tables])))
        out["input"] = {"lines": lines, "records": n, "squares": squares, "days": args.days}
        out["parse_records_per_s"] = round(n / parse_s)

        tag = uuid.uuid4().hex[:8]
        # streaming run and bare-write ceiling alternate, each repeated: InfluxDB's background work
        # (snapshots, compactions) after one stage makes a single sample of the next noisy
        streams, bares, bares_same = [], [], []
        hourly: list[str] = []
        for rep in range(args.repeat):
            s_max = isolated_settings(f"{tag}m{rep}", tmp / f"state-max{rep}")
            provision(s_max)
            try:
                streams.append(run_pipeline(s_max, tables, None, tmp))
                if rep == 0:
                    out["ceiling_kafka_consume_count_records_per_s"] = round(consume_and_count(s_max, n))
                    hourly = hourly_lines(s_max)
            finally:
                deprovision(s_max)
            s_bare = isolated_settings(f"{tag}b{rep}", tmp / f"state-bare{rep}")
            provision(s_bare)
            try:
                own_rate, same_rate = bare_influx_write(s_bare, tables, hourly)
                bares.append(round(own_rate))
                bares_same.append(round(same_rate))
            finally:
                deprovision(s_bare)
        e2e_all = [r["end_to_end_records_per_s"] for r in streams]
        median_run = sorted(streams, key=lambda r: r["end_to_end_records_per_s"])[len(streams) // 2]
        out["stream_max"] = median_run | {"end_to_end_records_per_s_all": e2e_all}
        out["ceiling_influx_bare_write_points_per_s"] = int(np.median(bares))
        out["ceiling_influx_bare_write_points_per_s_all"] = bares
        out["end_to_end_vs_bare_write"] = round(float(np.median(e2e_all)) / float(np.median(bares)), 3)
        # like with like: the bare write of the same points the pipeline wrote (records' and hourly rows)
        e2e_points = [r["end_to_end_points_per_s"] for r in streams]
        out["ceiling_influx_bare_write_same_points_per_s_all"] = bares_same
        out["end_to_end_points_vs_bare_write_same_points"] = round(
            float(np.median(e2e_points)) / float(np.median(bares_same)), 3
        )

        if args.lag_hours > 0:
            first = tables[0]
            cut = first.starts_ms < first.starts_ms.min() + args.lag_hours * 3_600_000
            lag_table = type(first)(
                first.source,
                first.columns,
                first.step_s,
                first.squares[cut],
                first.starts_ms[cut],
                first.values[cut],
            )
            s_lag = isolated_settings(tag + "l", tmp / "state-lag")
            provision(s_lag)
            try:
                res = run_pipeline(s_lag, [lag_table], 600.0, tmp)
                out["speed600"] = {
                    "squares": len(np.unique(lag_table.squares)),
                    "records": res["records"],
                    "lag": res["lag"],
                }
            finally:
                deprovision(s_lag)

    out["peak_rss_mb"] = {
        **out["stream_max"]["peak_rss_mb"],
        "producer_and_bench": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tansu": peak_rss_mb(service_pid("tansu") or 0),
        "influxd": peak_rss_mb(service_pid("influxd") or 0),
    }
    if args.plot is not None:
        from bench.plots import ingest_stages

        out["figures"] = [str(ingest_stages(out, args.plot))]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
