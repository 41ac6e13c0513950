"""The VH-Twin benchmark run as a live stream: ``nettwin demo --hourly``.

Same data, squares, seed and protocol as ``nettwin bench vhtwin``, but through the real services:
``nettwin vtwin`` on the training hours -> worker (windows + BS agents), store and ``nettwin htwin``
running -> the hourly file replayed into Kafka (training hours packed, then validation and test hours
paced at ``speed``, so the twin round trip fits between hours) -> forecasts in InfluxDB. With
``compare``, the offline benchmark runs on the same data and the live test-hour forecasts are compared
with its ``vhtwin`` forecasts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ingest.errors import InputError, ServiceError
from ingest.kafka import make_producer
from ingest.readers.milan import HOUR_MS, HOURLY_START_MS, TrafficTable, read_hourly
from ingest.settings import NettwinSettings
from producers.replay import Replayer
from twin_store.adapters.influx import InfluxClient
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.plan import TEST_HOURS, VhTwinConfig, load_matrix, split_hours
from twin_store.federation.samples import Scaler
from twin_store.services.store import wait_for_run
from twin_store.services.vtwin import VTwinJob


@dataclass(frozen=True)
class LiveConfig:
    data: Path
    squares: int = 50
    seed: int = 1
    clusters: int | None = 4
    psi: float = 0.01
    recluster_every: int = StreamPlan.recluster_every
    speed: float = 36_000.0  # event time x N for the streamed hours: 0.1 s per hour
    timeout_s: float = 900.0


def subset_file(data: Path, squares: int, seed: int, dest: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The benchmark's squares of ``data`` (same draw) as their own hourly file, values written exactly."""
    series, picked = load_matrix(data, squares, seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w") as fh:
        fh.write("square_id," + ",".join(f"h{i}" for i in range(series.shape[1])) + "\n")
        for sq, row in zip(picked.tolist(), series.tolist(), strict=True):
            fh.write(f"{sq}," + ",".join(map(repr, row)) + "\n")
    return dest, series, picked


def table_rows(table: TrafficTable, a: int, b: int) -> TrafficTable:
    """Rows ``[a, b)`` of a (time-sorted) table, as a table of their own to replay."""
    return dataclasses.replace(
        table,
        squares=table.squares[a:b],
        starts_ms=table.starts_ms[a:b],
        values=table.values[a:b],
        lines=0,
        bad=[],
    )


def replay_split(
    settings: NettwinSettings,
    path: Path,
    start_hour: int,
    speed: float,
    timeout_s: float,
    end_hour: int | None = None,
) -> list[str]:
    """Replay hours before ``start_hour`` as fast as possible, then the rest (up to ``end_hour``, exclusive;
    default: the end of the file) at ``speed``; return run ids.

    The paced part starts once the store has written the whole history, so the streamed hours do not
    queue behind it (a queue would leave the twins no time for their round trip between hours).
    """
    table = read_hourly(path)
    cut = int(np.searchsorted(table.starts_ms, HOURLY_START_MS + start_hour * HOUR_MS))
    end = len(table)
    if end_hour is not None:
        end = int(np.searchsorted(table.starts_ms, HOURLY_START_MS + end_hour * HOUR_MS))
    runs = []
    producer = make_producer(settings)
    try:
        history = Replayer.for_settings(settings, producer, None)
        history.publish_table(table_rows(table, 0, cut))
        runs.append(history.finish().run)
        with InfluxClient(settings.influx) as influx:
            wait_for_run(influx, runs[0], settings.kafka.partitions, timeout_s)
        stream = Replayer.for_settings(settings, producer, speed)
        stream.publish_table(table_rows(table, cut, end))
        runs.append(stream.finish().run)
    finally:
        producer.close()
    return runs


def live_forecasts(
    influx: InfluxClient, first_hour: int, last_hour: int
) -> dict[tuple[int, int], dict[str, Any]]:
    """(square, hour) -> forecast row, for target hours in [first_hour, last_hour]."""
    lo = HOURLY_START_MS + first_hour * HOUR_MS
    hi = HOURLY_START_MS + last_hour * HOUR_MS
    q = f'SELECT * FROM "forecast" WHERE time >= {lo}ms AND time <= {hi}ms GROUP BY "entity"'
    out = {}
    for series in influx.query(q, epoch="ms"):
        for row in series.rows():
            hour = (int(row["time"]) - HOURLY_START_MS) // HOUR_MS
            out[(int(row["entity"]), hour)] = row
    return out


def wait_for_forecasts(
    influx: InfluxClient,
    squares: int,
    first_hour: int,
    last_hour: int,
    timeout_s: float,
    alive: Callable[[], None],
) -> dict[tuple[int, int], dict[str, Any]]:
    """Wait until every square has an outcome (actual known) for every hour in [first_hour, last_hour]."""
    deadline = time.monotonic() + timeout_s
    want = squares * (last_hour - first_hour + 1)
    while True:
        alive()
        rows = live_forecasts(influx, first_hour, last_hour)
        done = sum(1 for r in rows.values() if r.get("actual") is not None)
        if done >= want:
            return rows
        if time.monotonic() > deadline:
            raise ServiceError(
                f"only {done} of {want} forecast outcomes in InfluxDB after {timeout_s:.0f} s; see the logs"
            )
        time.sleep(1.0)


def z_scales(series: np.ndarray, squares: np.ndarray, train_hours: int) -> dict[int, tuple[float, float]]:
    """square -> (mean, std) of its training hours: the benchmark's ``Scaler``, keyed by square."""
    scaler = Scaler.fit(series, train_hours)
    return {
        int(s): (float(m), float(d))
        for s, m, d in zip(squares.tolist(), scaler.mean, scaler.std, strict=True)
    }


def live_test_mse(
    live: dict[tuple[int, int], dict[str, Any]], scales: dict[int, tuple[float, float]]
) -> float:
    """MSE of the live forecasts with outcomes, on z-scores."""
    errors = [
        ((float(r["predicted"]) - float(r["actual"])) / scales[square][1]) ** 2
        for (square, _), r in live.items()
        if r.get("actual") is not None
    ]
    return float(np.mean(errors))


def agreement(
    live: dict[tuple[int, int], dict[str, Any]],
    offline: list[tuple[str, int, int, float, float]],
    scales: dict[int, tuple[float, float]],
) -> dict[str, Any]:
    """Live vs offline ``vhtwin`` test forecasts, in z units (training statistics of each square)."""
    mean = {s: m for s, (m, _) in scales.items()}
    std = {s: d for s, (_, d) in scales.items()}
    diffs, live_err, off_err = [], [], []
    missing = 0
    for method, square, hour, actual, predicted in offline:
        if method != "vhtwin":
            continue
        row = live.get((square, hour))
        if row is None or row.get("predicted") is None:
            missing += 1
            continue
        z_live = (float(row["predicted"]) - mean[square]) / std[square]
        z_off = (predicted - mean[square]) / std[square]
        z_act = (actual - mean[square]) / std[square]
        diffs.append(abs(z_live - z_off))
        live_err.append((z_live - z_act) ** 2)
        off_err.append((z_off - z_act) ** 2)
    d = np.array(diffs)
    return {
        "compared": int(d.size),
        "missing": missing,
        "abs_diff_z": {
            "median": round(float(np.median(d)), 6) if d.size else None,
            "p99": round(float(np.quantile(d, 0.99)), 6) if d.size else None,
            "max": round(float(d.max()), 6) if d.size else None,
        },
        "test_mse_live": round(float(np.mean(live_err)), 5) if d.size else None,
        "test_mse_offline": round(float(np.mean(off_err)), 5) if d.size else None,
    }


def offline_config(cfg: LiveConfig) -> VhTwinConfig:
    return VhTwinConfig(
        squares=cfg.squares,
        seed=cfg.seed,
        clusters=cfg.clusters,
        psi=cfg.psi,
        recluster_every=cfg.recluster_every,
    )


def vtwin_job(cfg: LiveConfig, subset: Path) -> VTwinJob:
    """The V-twinning and stream plan the offline benchmark runs for ``cfg``, on the subset file."""
    off = offline_config(cfg)
    return VTwinJob(
        data=subset,
        squares=None,
        seed=cfg.seed,
        clusters=cfg.clusters,
        rounds=off.v_rounds,
        participation=off.participation,
        hidden=off.hidden,
        milan_dir=cfg.data.parent,
        update_every=off.update_every,
        window=off.window,
        stream=off.stream,
        recluster_every=off.recluster_every,
        fit=off.local,
    )


def test_span(hours: int) -> tuple[int, int]:
    """(first, last) test hour of a series of ``hours`` hours."""
    split_hours(hours)  # the same length check as the benchmark
    return hours - TEST_HOURS, hours - 1


def check_data(cfg: LiveConfig) -> None:
    if not cfg.data.is_file():
        raise InputError(f"{cfg.data}: no such file")
    if cfg.speed <= 0:
        raise InputError(f"--speed {cfg.speed}: must be positive")
