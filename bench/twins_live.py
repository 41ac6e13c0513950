"""A [twins] deployment of N SYNTHETIC entities live through the real services (issue 12's scale check).

N entities report one metric a minute to a followed file (a ``file`` source of ``nettwin attach``); the worker
windows it to 1-minute steps, ``nettwin htwin`` bootstraps the twins once every entity has the history, then
``--live-steps`` steps are appended one every ``--step-s`` wall seconds: by default every 60 s, the deployment's
own cadence, as a live network would send them. A smaller ``--step-s`` compresses time (a stress test): each
step then brings the same work (forecasts for every entity, about N / 24 local updates) in less time. A step closes when the next step's
first records arrive, so the clock starts when that next step is acknowledged by the file (appended and
flushed) and stops when the forecast the closing made is queryable in InfluxDB. Prints one JSON line:

- ``close_to_forecast_s``: p50/p99 over every (entity, step) at the poll resolution ``--poll-s``, and
  ``later_steps_close_to_forecast_s`` the same without the first live step, which also waits for the agents to
  act on the steps they kept during the bootstrap (a cost paid once, when the twins arrive);
- ``bootstrap_s``: from the history being written to the global twin being queryable;
- ``peak_rss_mb``: per process (attach, store, worker, htwin) and in all;
- ``query_twins_ms``: the current-state query of ``nettwin query twins`` (``twin_current``; p50/p99 over 50
  runs, in process) and the whole command's wall time once (CLI start-up included); ``old_history_limit_1_*``
  the listing it replaced (``twin`` rows, a per-series ``LIMIT 1``) in the same runs; ``global_and_clusters_*``
  the network's twins only (``--level global`` and ``--level cluster``).

Targets (issue 12): p99 under 2 s, under 2 GB RSS in all, the query under 50 ms.

Usage: .venv/bin/python -m bench.twins_live [--entities 10000] [--live-steps 8] [--step-s 60]
Uses its own topics and database and deletes them afterwards (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.live_scale import Watcher, isolated_settings
from ingest.settings import NettwinSettings, TwinsSettings
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.provision import deprovision, provision
from twin_store.adapters.twin_rows import current_twins, latest_history_rows
from twin_store.services.processes import settings_env, spawn_cli, stop_process

STEP_MS = 60_000
T0_MS = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000  # a UTC midnight


def step_lines(k: int, n: int, rng: np.random.Generator) -> str:
    """One step of every entity: a daily shape per entity plus noise, two readings inside the step."""
    phase = np.arange(n) * 0.37
    base = 100 + 20 * np.sin(2 * np.pi * k / 1440 + phase) + 5 * np.sin(2 * np.pi * k / 37 + phase)
    out = []
    t = T0_MS + k * STEP_MS
    for i, v in enumerate((base + rng.normal(0, 2, n)).tolist()):
        out.append(f'{{"entity":"e{i}","time":{t + 5_000},"metrics":{{"v":{v:.3f}}}}}')
    return "\n".join(out) + "\n"


def synthetic_twins(entities: int, history: int) -> TwinsSettings:
    """The ``[twins]`` table of the synthetic deployment: metric ``v`` at 1-minute steps, bootstrapped once
    every entity has the history's steps but the last 5."""
    return TwinsSettings(
        target="v",
        cadence="1m",
        aggregate="mean",
        bootstrap_entities=entities,
        bootstrap_steps=history - 5,
        clusters=0,  # Louvain: Girvan-Newman to a fixed count takes minutes at thousands of entities
    )


def global_twin_rows(settings: NettwinSettings) -> int:
    with InfluxClient(settings.influx) as influx:
        try:
            s = influx.query('SELECT count("version") FROM "twin" WHERE "level" = \'global\'')
        except Exception:
            return 0
    return int(s[0].values[0][1]) if s and s[0].values else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--history", type=int, default=50, help="steps written before the bootstrap")
    ap.add_argument("--live-steps", type=int, default=8)
    ap.add_argument(
        "--step-s", type=float, default=STEP_MS / 1000, help="wall seconds between steps (60: real time)"
    )
    ap.add_argument("--poll-s", type=float, default=0.1)
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--logs", type=Path, default=None, help="keep the parts' logs in this directory")
    ap.add_argument(
        "--keep", action="store_true", help="keep the run's topics and database (named on stderr) to inspect"
    )
    args = ap.parse_args()
    # SIGTERM as Ctrl-C: the finally below stops the parts and deletes the topics and database
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    n = args.entities
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="nettwin-twins-live-") as tmp_s:
        tmp = Path(tmp_s)
        twins = synthetic_twins(n, args.history)
        settings = isolated_settings(tmp / "state", twins=twins)
        data = tmp / "readings.jsonl"
        config = tmp / "deploy.toml"
        config.write_text(
            f'[[source]]\nname = "synthetic"\ntype = "file"\npath = "{data}"\nformat = "json"\n'
        )
        provision(settings)
        env = settings_env(settings)
        logs = args.logs or tmp / "log"
        procs: dict[str, Any] = {}
        try:
            with data.open("w") as fh:
                for k in range(args.history):
                    fh.write(step_lines(k, n, rng))
            t0 = time.monotonic()
            for name, cmd in (
                ("store", ["store"]),
                ("worker", ["worker"]),
                ("htwin", ["htwin"]),
                ("attach", ["attach", "--config", str(config)]),
            ):
                procs[name] = spawn_cli(cmd, logs / f"{name}.log", env)
            first_ms = T0_MS + args.history * STEP_MS
            watcher = Watcher(
                settings, {k: p.pid for k, p in procs.items()}, first_ms, args.poll_s, step="1m", expect=n
            )
            watcher.start()
            deadline = t0 + args.timeout_s
            while global_twin_rows(settings) == 0:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                    tails = "\n".join(
                        f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(logs.glob("*.log"))
                    )
                    raise SystemExit(
                        f"no bootstrap within {args.timeout_s:.0f} s (or a part exited)\n{tails}"
                    )
                time.sleep(0.5)
            bootstrap_s = time.monotonic() - t0
            # the bootstrap's history ended at the newest closed step; the first live step closes it
            closed: dict[int, float] = {}
            for k in range(args.history, args.history + args.live_steps + 1):
                text = step_lines(k, n, rng)
                with data.open("a") as fh:
                    fh.write(text)
                    fh.flush()
                closed[T0_MS + (k - 1) * STEP_MS] = time.monotonic()  # step k - 1 closes now
                time.sleep(args.step_s)
            end = time.monotonic() + 60
            last_target = T0_MS + (args.history + args.live_steps) * STEP_MS
            while time.monotonic() < end and (watcher.seen.get(last_target) or [(0, 0)])[-1][1] < n:
                time.sleep(args.poll_s)
            watcher.halt.set()
            watcher.join()
            lat: list[float] = []
            later: list[float] = []  # the steps after the first: the first also waits for the kept history
            per_step: list[list[float]] = []  # the first and last forecast of each step: where the tail is
            for i, (step_ms, t_close) in enumerate(closed.items()):
                target = step_ms + twins.horizon * STEP_MS
                prev = 0
                seen = watcher.seen.get(target, [])
                for t, count in seen:
                    lat += [t - t_close] * (min(count, n) - prev)
                    if i:
                        later += [t - t_close] * (min(count, n) - prev)
                    prev = min(count, n)
                if seen:
                    per_step.append([round(seen[0][0] - t_close, 2), round(seen[-1][0] - t_close, 2)])
            expected = n * len(closed)
            with InfluxClient(settings.influx) as influx:
                q_ms, old_ms, net_ms = [], [], []
                for _ in range(50):  # interleaved: the three see the same load
                    q0 = time.perf_counter()
                    current_twins(influx)
                    q_ms.append((time.perf_counter() - q0) * 1000)
                    q0 = time.perf_counter()
                    latest_history_rows(influx)
                    old_ms.append((time.perf_counter() - q0) * 1000)
                    q0 = time.perf_counter()
                    current_twins(influx, "global")
                    current_twins(influx, "cluster")
                    net_ms.append((time.perf_counter() - q0) * 1000)
            c0 = time.perf_counter()
            cli = subprocess.run(
                [sys.executable, "-m", "nettwin.cli.main", "query", "twins", "--json"],
                env=env,
                capture_output=True,
                timeout=60,
            )
            cli_ms = (time.perf_counter() - c0) * 1000
            out = {
                "entities": n,
                "cadence": "1m",
                "step_s": args.step_s,
                "live_steps": len(closed),
                "forecasts_seen": len(lat),
                "forecasts_expected": expected,
                "close_to_forecast_s": {
                    "p50": round(float(np.percentile(lat, 50)), 3) if lat else None,
                    "p99": round(float(np.percentile(lat, 99)), 3) if lat else None,
                    "max": round(float(max(lat)), 3) if lat else None,
                },
                "later_steps_close_to_forecast_s": {
                    "p50": round(float(np.percentile(later, 50)), 3) if later else None,
                    "p99": round(float(np.percentile(later, 99)), 3) if later else None,
                },
                "per_step_first_last_s": per_step,
                "bootstrap_s": round(bootstrap_s, 1),
                "peak_rss_mb": {k: round(v) for k, v in watcher.peak.items()},
                "peak_rss_mb_all": round(sum(watcher.peak.values())),
                "query_twins_ms": {
                    "p50": round(float(np.percentile(q_ms, 50)), 2),
                    "p99": round(float(np.percentile(q_ms, 99)), 2),
                    "cli_wall_ms": round(cli_ms),
                    "cli_ok": cli.returncode == 0,
                    "old_history_limit_1_p50": round(float(np.percentile(old_ms, 50)), 2),
                    "old_history_limit_1_p99": round(float(np.percentile(old_ms, 99)), 2),
                    "global_and_clusters_p50": round(float(np.percentile(net_ms, 50)), 2),
                    "global_and_clusters_p99": round(float(np.percentile(net_ms, 99)), 2),
                },
                "targets": {"p99_s": 2.0, "rss_mb_all": 2048, "query_ms": 50},
            }
            print(json.dumps(out))
        finally:
            for p in procs.values():
                stop_process(p)
            if args.keep:
                print(
                    f"kept topics {settings.kafka.topic_prefix}* and database {settings.influx.database}",
                    file=sys.stderr,
                )
            else:
                deprovision(settings)


if __name__ == "__main__":
    main()
