"""Store formatting benchmark: CPU the twin store spends turning feature batches into line protocol, next to
the CPU influxd spends ingesting the same points (issue 16: the store may cost at most 20% of influxd).

Input: the real 26-square day repeated with shifted square ids and days (default 39 copies x 3 days =
1,014 squares, the size of bench/ingest.py), cut into the feature batches the worker emits (one per
partition and closed window: 10-minute ``traffic`` and hourly ``traffic_hourly``). Measured in one run:
- ``store_format_cpu_s``: ``batch_points`` + progress rows + the payload bytes, as ``nettwin store`` does
  (best of ``--repeat``, process CPU time);
- ``influxd_cpu_s``: influxd's CPU (from /proc) while the same payloads are POSTed by one writer
  (the bare write), with its points/s;
- ``points_per_record`` and the ratio ``store_format_cpu_s / influxd_cpu_s``.

Usage: .venv/bin/python -m bench.store_lines [--copies 39] [--days 3] [--repeat 3] [--influxd-pid PID]
Needs the InfluxDB of infra/up (its pid from .state/run/influxd.pid); uses its own database.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from ingest.readers.milan import read_raw
from ingest.schema import ACTIVITY_COLUMNS, N_INTERVALS, RecordBatch
from ingest.settings import load_settings
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.traffic import TwinRegistry, batch_points

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "milan" / "raw_2013-11-01_26squares.txt"
DAY_MS = 86_400_000
PARTITIONS = 4


def scaled_records(copies: int, days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = read_raw(DEFAULT_DATA)
    top = int(t.squares.max())
    squares = np.concatenate([t.squares + c * top for d in range(days) for c in range(copies)])
    starts = np.concatenate([t.starts_ms + d * DAY_MS for d in range(days) for _ in range(copies)])
    values = np.concatenate([t.values for _ in range(days) for _ in range(copies)])
    return squares.astype(np.uint32), starts.astype(np.int64), values


def feature_batches(
    squares: np.ndarray, starts: np.ndarray, values: np.ndarray
) -> list[tuple[int, RecordBatch]]:
    """(partition, batch) as the worker emits them: per partition, one batch per closed 10-minute window and
    one per closed hour, the hour's rows summed per square with their interval counts."""
    cols = (*ACTIVITY_COLUMNS, N_INTERVALS)
    out: list[tuple[int, RecordBatch]] = []
    part = squares % PARTITIONS
    for p in range(PARTITIONS):
        mine = part == p
        sq, st, va = squares[mine], starts[mine], values[mine]
        hours = st // 3_600_000 * 3_600_000
        for h in np.unique(hours).tolist():
            in_hour = hours == h
            for t in np.unique(st[in_hour]).tolist():
                m = st == t
                vals = np.column_stack([va[m], np.ones(int(m.sum()))])
                out.append((p, RecordBatch("features", cols, 600, sq[m], st[m], vals, closed_ms=t + 600_000)))
            hs, inverse = np.unique(sq[in_hour], return_inverse=True)
            sums = np.zeros((len(hs), va.shape[1]))
            np.add.at(sums, inverse, va[in_hour])
            counts = np.bincount(inverse, minlength=len(hs)).astype(float)
            vals = np.column_stack([sums, counts])
            starts_h = np.full(len(hs), h, np.int64)
            out.append((p, RecordBatch("features", cols, 3600, hs, starts_h, vals, closed_ms=h + 3_600_000)))
    return out


def format_like_the_store(
    batches: list[tuple[int, RecordBatch]], step: int
) -> tuple[float, list[tuple[bytes, str]], int]:
    """CPU seconds to build every payload the store would send (a payload once ``step`` points are
    pending), the payloads with their time precision, and the records."""
    t0 = time.process_time()
    twins = TwinRegistry()
    now_ms = int(time.time() * 1000)
    pending: dict[str, list[str]] = {"s": [], "ms": []}
    pending_points = {"s": 0, "ms": 0}
    payloads: list[tuple[bytes, str]] = []
    records = 0

    def add(lines: list[str], n: int, precision: str, force: bool = False) -> None:
        pending[precision] += lines
        pending_points[precision] += n
        if pending[precision] and (force or pending_points[precision] >= step):
            payloads.append(("\n".join(pending[precision]).encode(), precision))
            pending[precision], pending_points[precision] = [], 0

    for p, batch in batches:
        points = batch_points(batch, p, twins, now_ms)
        records += points.records if batch.step_s == 600 else 0
        add(points.lines, points.n_points, points.precision)
        progress = points.progress_lines(now_ms)
        add(progress, len(progress), "ms")
    add([], 0, "s", force=True)
    add([], 0, "ms", force=True)
    return time.process_time() - t0, payloads, records


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=39)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--influxd-pid", type=int, default=None)
    args = ap.parse_args()
    pid_file = REPO / ".state" / "run" / "influxd.pid"
    pid = args.influxd_pid or int(pid_file.read_text())
    settings = load_settings({"influx": {"database": f"nettwin_benchlines{uuid.uuid4().hex[:8]}"}})
    batches = feature_batches(*scaled_records(args.copies, args.days))
    step = settings.influx.batch_points
    runs = [format_like_the_store(batches, step) for _ in range(args.repeat)]
    fmt_cpu = min(r[0] for r in runs)
    _, payloads, records = runs[0]
    points = sum(p.count(b"\n") + 1 for p, _ in payloads)
    with InfluxClient(settings.influx) as influx:
        influx.create_database()
        try:
            c0, t0 = cpu_seconds(pid), time.perf_counter()
            for p, precision in payloads:
                influx.write(p, precision=precision)
            wall = time.perf_counter() - t0
            influxd_cpu = cpu_seconds(pid) - c0
        finally:
            influx.drop_database(settings.influx.database)
    print(
        json.dumps(
            {
                "records": records,
                "points": points,
                "points_per_record": round(points / records, 4),
                "feature_messages": len(batches),
                "store_format_cpu_s": round(fmt_cpu, 3),
                "store_format_cpu_s_all": [round(r[0], 3) for r in runs],
                "store_format_points_per_cpu_s": int(points / fmt_cpu),
                "influxd_cpu_s": round(influxd_cpu, 3),
                "bare_write_points_per_s": int(points / wall),
                "store_format_vs_influxd_cpu": round(fmt_cpu / influxd_cpu, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
