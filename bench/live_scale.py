"""Live VH-Twin at scale: N BSs of SYNTHETIC hourly traffic through the real services.

``nettwin vtwin`` on the training hours, then the worker (windows + BS agents), ``nettwin htwin`` and the store
run while the history is replayed packed and ``--live-hours`` hours are streamed one hour every
``--hour-s`` seconds. Prints one JSON line:
- how long the agents took to catch up with the packed history (screening, histories, the first forecasts);
- BS-agent local updates/s and forecasts/s during the streamed hours (``update`` rows and ``forecast`` rows in
  InfluxDB; both are bounded by the schedule: every BS forecasts every hour and trains every 24 hours);
- the time from an hour closing at the source (its last record and watermark acknowledged by Kafka) to the
  forecast of the next hour being queryable in InfluxDB, p50/p99 over every (BS, hour), at the poll
  resolution ``--poll-s``;
- the baseline measured in the same run: the same BSs' local updates computed offline in one stacked pass
  (the compute ceiling of the agents), updates/s;
- peak RSS of every process.

Usage: .venv/bin/python -m bench.live_scale [--bss 1000] [--live-hours 12] [--hour-s 2] [--rounds 2]
Needs the services of infra/up and ../shared/data/milan (the grid and base stations DCS reads).
Uses its own topics and database and deletes them afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.live_vhtwin import LiveConfig, table_rows, vtwin_job
from ingest.kafka import make_producer
from ingest.readers.milan import HOUR_MS, HOURLY_START_MS, read_hourly
from ingest.settings import NettwinSettings, load_settings
from producers.replay import Replayer
from producers.synthetic import synthetic_hourly
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.provision import deprovision, provision
from twin_store.federation.keys import KeyRegistry
from twin_store.federation.local_updates import StreamPlan, local_updates
from twin_store.federation.plan import TEST_HOURS, VAL_HOURS, load_matrix
from twin_store.federation.samples import FIRST_TARGET, Scaler
from twin_store.federation.series import parse_cadence
from twin_store.models.forecaster import TwinModel
from twin_store.services.processes import settings_env, spawn_cli, stop_process
from twin_store.services.store import wait_for_run
from twin_store.services.vtwin import run_vtwin

MILAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan"


def isolated_settings(state_dir: Path, **update: Any) -> NettwinSettings:
    """The configured settings with the run's own topic prefix and database (a random tag), so a bench touches
    nothing else and ``deprovision`` removes all it made; ``update`` sets further fields."""
    base = load_settings()
    tag = uuid.uuid4().hex[:8]
    return base.model_copy(
        update={
            "kafka": base.kafka.model_copy(update={"topic_prefix": f"bench{tag}."}),
            "influx": base.influx.model_copy(update={"database": f"nettwin_bench{tag}"}),
            "state_dir": state_dir,
            **update,
        }
    )


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Watcher(threading.Thread):
    """Polls InfluxDB for forecast counts per target hour and every process's RSS until stopped."""

    def __init__(
        self,
        settings: NettwinSettings,
        pids: dict[str, int],
        first_ms: int,
        poll_s: float,
        step: str = "1h",
        expect: int | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.settings, self.pids, self.first_ms, self.poll_s = settings, pids, first_ms, poll_s
        self.step = step  # the forecasts' step, as an InfluxQL duration
        # forecasts per complete target: the poll then counts only from the oldest incomplete target on (a
        # count over every target since the first took 250 ms at 10,000 entities and 8 steps, and grew with
        # each step: a forecast was seen up to one such query late)
        self.expect = expect
        self.seen: dict[int, list[tuple[float, int]]] = {}  # target hour ms -> [(time, count)]
        self.peak = dict.fromkeys(pids, 0.0)
        self.halt = threading.Event()

    def run(self) -> None:
        step_ms = parse_cadence(self.step)
        lower = self.first_ms
        with InfluxClient(self.settings.influx) as influx:
            while not self.halt.is_set():
                while self.expect is not None and (self.seen.get(lower) or [(0.0, 0)])[-1][1] >= self.expect:
                    lower += step_ms
                now = time.monotonic()
                q = (
                    f'SELECT count("predicted") FROM "forecast" WHERE time >= {lower}ms '
                    f"GROUP BY time({self.step}) fill(none)"
                )
                try:
                    found = influx.query(q, epoch="ms")
                except Exception:  # the store has not created the database yet
                    found = []
                for series in found:
                    for row in series.rows():
                        hist = self.seen.setdefault(int(row["time"]), [])
                        if not hist or hist[-1][1] != int(row["count"]):
                            hist.append((now, int(row["count"])))
                for name, pid in self.pids.items():
                    self.peak[name] = max(self.peak[name], _rss_mb(pid))
                self.halt.wait(self.poll_s)


def latencies(closed: dict[int, float], seen: dict[int, list[tuple[float, int]]], bss: int) -> list[float]:
    """Per forecast: when it became queryable minus when the hour before its target closed."""
    out: list[float] = []
    for hour_ms, t_close in closed.items():
        prev = 0
        for t, count in seen.get(hour_ms + HOUR_MS, []):
            out += [t - t_close] * (min(count, bss) - prev)
            prev = min(count, bss)
    return out


def offline_baseline(data: Path, train_hours: int, bss: int) -> float:
    """Local updates/s of all BSs in one stacked pass (what the agents compute), from one start twin."""
    torch.set_num_threads(1)
    series, squares = load_matrix(data, None, 1)
    z = Scaler.fit(series, train_hours).transform(series)
    model = TwinModel(32)
    plan = StreamPlan(seed=1, start_hour=train_hours, start_ms=0)
    starts = model.init(1, 1)[0].expand(bss, -1).clone()
    t0 = time.perf_counter()
    local_updates(model, starts, [z[i] for i in range(bss)], squares[:bss].tolist(), train_hours + 1, plan)
    return bss / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bss", type=int, default=1000)
    ap.add_argument("--live-hours", type=int, default=12)
    ap.add_argument("--hour-s", type=float, default=2.0, help="wall seconds per streamed hour")
    ap.add_argument("--rounds", type=int, default=2, help="V-twinning rounds (accuracy is not measured here)")
    ap.add_argument("--poll-s", type=float, default=0.1)
    ap.add_argument("--timeout-s", type=float, default=600.0)
    args = ap.parse_args()
    train_hours = FIRST_TARGET + 24 * 7 * 2 + 24  # two weeks of training samples after the period inputs
    hours = train_hours + VAL_HOURS + TEST_HOURS
    with tempfile.TemporaryDirectory(prefix="nettwin-live-scale-") as tmp_s:
        tmp = Path(tmp_s)
        settings = isolated_settings(tmp / "state")
        data = synthetic_hourly(tmp / f"synthetic-hourly-{args.bss}.csv", args.bss, hours)
        provision(settings)
        procs: dict[str, Any] = {}
        try:
            job = dataclasses.replace(
                vtwin_job(LiveConfig(data=data, squares=args.bss), data), rounds=args.rounds, milan_dir=MILAN
            )
            t0 = time.perf_counter()
            vt = run_vtwin(settings, job)
            vtwin_s = time.perf_counter() - t0
            keys = tmp / "keys.json"
            KeyRegistry.create(str(s) for s in range(1, args.bss + 1)).save(keys)
            settings = settings.model_copy(
                update={"security": settings.security.model_copy(update={"keys_file": keys})}
            )
            env = settings_env(settings)
            logs = tmp / "log"
            procs = {
                name: spawn_cli(cmd, logs / f"{name}.log", env)
                for name, cmd in (("worker", ["worker"]), ("store", ["store"]), ("htwin", ["htwin"]))
            }
            table = read_hourly(data)
            cut = int(np.searchsorted(table.starts_ms, HOURLY_START_MS + vt["train_hours"] * HOUR_MS))
            producer = make_producer(settings)
            history = Replayer.for_settings(settings, producer, None)
            history.publish_table(table_rows(table, 0, cut))
            with InfluxClient(settings.influx) as influx:
                wait_for_run(influx, history.finish().run, settings.kafka.partitions, args.timeout_s)
            first_ms = HOURLY_START_MS + vt["train_hours"] * HOUR_MS
            watcher = Watcher(
                settings, {n: p.pid for n, p in procs.items()}, first_ms, args.poll_s, expect=args.bss
            )
            watcher.start()
            # the agents have caught up with the history once every BS forecast the first streamed hour (made
            # when the last history hour closed): the streamed hours are measured from there, not behind a queue
            t0 = time.monotonic()
            deadline = t0 + args.timeout_s
            while time.monotonic() < deadline and (watcher.seen.get(first_ms) or [(0, 0)])[-1][1] < args.bss:
                time.sleep(args.poll_s)
            catchup_s = time.monotonic() - t0
            stream = Replayer.for_settings(settings, producer, None)
            closed: dict[int, float] = {}
            live_t0 = time.monotonic()
            for h in range(args.live_hours):
                hour_ms = first_ms + h * HOUR_MS
                a, b = np.searchsorted(table.starts_ms, [hour_ms, hour_ms + HOUR_MS])
                stream.publish_table(table_rows(table, int(a), int(b)))
                producer.flush()
                closed[hour_ms] = time.monotonic()
                time.sleep(max(0.0, live_t0 + (h + 1) * args.hour_s - time.monotonic()))
            stream.finish()
            producer.close()
            # the forecasts of the last streamed hour's successor, then stop watching
            deadline = time.monotonic() + args.timeout_s
            last = first_ms + args.live_hours * HOUR_MS
            while time.monotonic() < deadline and (watcher.seen.get(last) or [(0, 0)])[-1][1] < args.bss:
                time.sleep(args.poll_s)
            live_s = time.monotonic() - live_t0
            watcher.halt.set()
            watcher.join()
            with InfluxClient(settings.influx) as influx:
                upd = influx.query(f'SELECT count("seq") FROM "update" WHERE time >= {first_ms}ms')
                n_updates = int(upd[0].values[0][1]) if upd else 0
            lat = latencies(closed, watcher.seen, args.bss)
            n_forecasts = sum(min(h[-1][1], args.bss) for k, h in watcher.seen.items() if k > first_ms)
            out = {
                "bench": "live_scale",
                "bss": args.bss,
                "synthetic": True,
                "live_hours": args.live_hours,
                "hour_s": args.hour_s,
                "vtwin_s": round(vtwin_s, 1),
                "clusters": vt["clusters"],
                "history_hours": vt["train_hours"],
                "history_catchup_s": round(catchup_s, 1),
                "live_s": round(live_s, 1),
                "bs_agent_updates": n_updates,
                "bs_agent_updates_per_s": round(n_updates / live_s, 1),
                "forecasts": n_forecasts,
                "forecasts_per_s": round(n_forecasts / live_s, 1),
                "forecasts_missing": args.bss * args.live_hours - len(lat),
                "close_to_forecast_queryable_s": {
                    "p50": round(float(np.percentile(lat, 50)), 3) if lat else None,
                    "p99": round(float(np.percentile(lat, 99)), 3) if lat else None,
                    "max": round(float(np.max(lat)), 3) if lat else None,
                    "poll_resolution_s": args.poll_s,
                },
                "baseline_offline_stacked_updates_per_s": round(
                    offline_baseline(data, vt["train_hours"], args.bss), 1
                ),
                "peak_rss_mb": {k: round(v, 1) for k, v in watcher.peak.items()},
            }
        finally:
            for p in procs.values():
                stop_process(p)
            deprovision(settings)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
