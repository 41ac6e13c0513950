"""``nettwin query twins`` at N BS twins: the current-state listing (``twin_current``) beside the old one.

Writes a synthetic deployment's twin rows through the writers' own code (``twin_state_lines``, the store's first
BS rows, V-twinning's global and cluster rows): N BS twins, C clusters and the global twin, each BS updated
``--updates`` times, every update moving its cluster and the global. Then, in the same run and database, times
the listing of every twin's latest state both ways, ``--runs`` times each, in process:

- ``old``: ``twin`` rows with a per-series ``LIMIT 1`` (``latest_history_rows``, what the command ran before);
- ``new``: one scan of ``twin_current`` (``current_twins``, what ``nettwin query twins`` runs now);

plus the whole command's wall time once (CLI start-up included), whether both listings are the same rows,
and the load average. Prints one JSON line. Target (issue 12): the current-state query under 50 ms.

Usage: .venv/bin/python -m bench.twins_query [--bss 10000] [--clusters 30] [--updates 5] [--runs 50]
Uses its own database and drops it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import numpy as np

from ingest.settings import load_settings
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.traffic import TwinRegistry
from twin_store.adapters.twin_rows import current_twins, latest_history_rows, twin_state_lines
from twin_store.services.processes import settings_env
from twin_store.services.vtwin import first_twin_rows


def deployment_lines(bss: int, clusters: int, updates: int, seed: int = 1) -> list[tuple[list[str], str]]:
    """(lines, precision) writes in the order a deployment makes them: the store's first BS rows, V-twinning's,
    then ``updates`` rounds in which every BS is updated and moves its cluster and the global twin."""
    rng = np.random.default_rng(seed)
    writes = [(TwinRegistry().first_rows(np.arange(bss), int(time.time()) - 60), "s")]
    writes.append((first_twin_rows(0.5, bss, {c: bss // clusters for c in range(clusters)}, {}), "s"))
    t = (int(time.time()) + 1) * 1_000_000_000  # after V-twinning's rows (stamped now, in seconds)
    version = {c: 1 for c in range(clusters)}
    for u in range(1, updates + 1):
        lines: list[str] = []
        for s, loss in enumerate(rng.uniform(0.05, 0.5, bss).tolist()):
            t += 1_000
            c = s % clusters
            version[c] += 1
            bs = {"version": u, "loss": loss, "n_updates": u, "n_members": 1}
            lines += twin_state_lines("bs", str(s), bs, t, "ns", f"cell-{s}")
            cluster = {"version": version[c], "epsilon": loss / 10, "n_updates": u * bss, "n_members": 1}
            lines += twin_state_lines("cluster", str(c), cluster | {"n_offers": s}, t, "ns")
            glob = {"version": u * bss + s, "epsilon": loss / 10, "n_updates": s, "n_members": bss}
            lines += twin_state_lines("global", "0", glob | {"n_offers": s}, t, "ns")
        writes.append((lines, "ns"))
    return writes


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bss", type=int, default=10_000)
    ap.add_argument("--clusters", type=int, default=30)
    ap.add_argument("--updates", type=int, default=5, help="updates of every BS twin")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    base = load_settings()
    settings = base.model_copy(
        update={
            "influx": base.influx.model_copy(update={"database": f"nettwin_twinsq{uuid.uuid4().hex[:8]}"})
        }
    )
    with InfluxClient(settings.influx) as influx:
        influx.create_database()
        try:
            w0 = time.perf_counter()
            for lines, precision in deployment_lines(args.bss, args.clusters, args.updates):
                influx.write_lines(lines, precision, lambda: True, lambda exc, d: None)
            write_s = time.perf_counter() - w0
            load_before = os.getloadavg()[0]
            old_ms: list[float] = []
            new_ms: list[float] = []
            old: list[dict[str, Any]] = []
            new: list[dict[str, Any]] = []
            for _ in range(args.runs):  # interleaved: both see the same load
                q0 = time.perf_counter()
                old = latest_history_rows(influx)
                old_ms.append((time.perf_counter() - q0) * 1000)
                q0 = time.perf_counter()
                new = current_twins(influx)
                new_ms.append((time.perf_counter() - q0) * 1000)
            c0 = time.perf_counter()
            cli = subprocess.run(
                [sys.executable, "-m", "nettwin.cli.main", "query", "twins", "--json"],
                env=settings_env(settings),
                capture_output=True,
                timeout=120,
            )
            cli_ms = (time.perf_counter() - c0) * 1000
            listed = json.loads(cli.stdout) if cli.returncode == 0 else []
        finally:
            influx.drop_database(settings.influx.database)
    same = [{k: v for k, v in r.items() if k != "entity"} for r in new] == old
    out = {
        "bss": args.bss,
        "clusters": args.clusters,
        "updates_per_bs": args.updates,
        "twins_listed": len(new),
        "write_s": round(write_s, 1),
        "old_history_limit_1_ms": percentiles(old_ms),
        "new_twin_current_ms": percentiles(new_ms),
        "same_rows": same,
        "cli_wall_ms": round(cli_ms),
        "cli_rows": len(listed),
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "target_ms": 50,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
