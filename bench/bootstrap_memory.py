"""The bootstrap V-twinning of a ``[twins]`` deployment of N synthetic entities: its peak RSS and wall time.

What ``nettwin htwin`` runs once the history is enough (``run_vtwin_from_influx``: read ``twin_input`` back from
InfluxDB, prepare, daily profiles, DCS, two V-twinning candidates, validation, publishing), on the shape of
``bench/twins_live.py``: one metric ``v``, 1-minute steps, ``--history`` steps, Louvain (``clusters = 0``). The
history is written once as the store writes it (``twin_step_lines``); then each code version bootstraps on it in
a fresh child process, which reports:

- ``rss_after_imports_mb``: the process before the bootstrap (Python, numpy, torch, the project);
- ``peak_rss_mb``: VmHWM at the end (the bootstrap's peak; the imports included);
- ``rss_after_mb``: VmRSS after it returned (what htwin carries into the live phase);
- ``seconds``: the bootstrap's wall time;
- ``messages_sha256``: a digest of every message published to ``twin.models`` (levels, keys, parameters,
  headers), so versions that must give the same twins can be compared.

``--baseline REF`` runs the same bootstrap on the same history from a temporary git worktree of ``REF`` (e.g.
the commit before the memory fixes) in the same run: the before figure beside the after one. Timings on the
shared machine are pessimistic; the load average is given.

Usage: .venv/bin/python -m bench.bootstrap_memory [--entities 10000] [--history 50] [--baseline a77adde]
Uses its own topics and database and deletes them afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.checkouts import REPO, run_in_checkout, worktree
from bench.live_scale import isolated_settings
from bench.twins_live import synthetic_twins
from ingest.schema import RecordBatch
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.provision import deprovision, provision
from twin_store.adapters.traffic import twin_step_lines
from twin_store.services.processes import settings_env

STEP_MS = 60_000
T0_MS = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000  # a UTC midnight

# Run in the child, with the checkout under test first on sys.path: only the public entry point is used, so
# the same code measures older versions too.
CHILD = r"""
import hashlib, json, sys, time
import numpy as np


def status(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(field))


from ingest.settings import load_settings
import twin_store.services.vtwin as vtwin

digest = hashlib.sha256()
n_messages = 0
publish = vtwin.twin_messages


def hashed(*args, **kwargs):
    global n_messages
    messages = publish(*args, **kwargs)
    for m in messages:
        digest.update(m.key)
        digest.update(np.ascontiguousarray(m.params, dtype=np.float32).tobytes())
        digest.update(json.dumps(m.meta, sort_keys=True, default=str).encode())
    n_messages = len(messages)
    return messages


vtwin.twin_messages = hashed
settings = load_settings()
imports = status("VmRSS:")
started = time.perf_counter()
summary = vtwin.run_vtwin_from_influx(settings)
seconds = time.perf_counter() - started
print(json.dumps({
    "rss_after_imports_mb": round(imports),
    "peak_rss_mb": round(status("VmHWM:")),
    "rss_after_mb": round(status("VmRSS:")),
    "seconds": round(seconds, 1),
    "messages": n_messages,
    "messages_sha256": digest.hexdigest(),
    "kept": summary["kept"],
    "validation_mse": summary["validation_mse"],
    "clusters": len(summary["clusters"]),
}))
"""


def history_lines(n: int, steps: int, seed: int = 1) -> list[str]:
    """``steps`` closed 1-minute steps of ``n`` entities (a daily shape per entity plus noise, as
    ``bench.twins_live``), as the store writes them to ``twin_input``."""
    rng = np.random.default_rng(seed)
    phase = np.arange(n) * 0.37
    names = {str(i + 1): f"e{i}" for i in range(n)}
    lines: list[str] = []
    for k in range(steps):
        base = 100 + 20 * np.sin(2 * np.pi * k / 1440 + phase) + 5 * np.sin(2 * np.pi * k / 37 + phase)
        batch = RecordBatch(
            "features",
            ("v", "n_values"),
            60,
            np.arange(1, n + 1, dtype=np.uint32),
            np.full(n, T0_MS + k * STEP_MS, dtype=np.int64),
            np.column_stack([np.round(base + rng.normal(0, 2, n), 3), np.ones(n)]),
            extra={"entities": names, "twins": {"metric": "v"}},
        )
        lines += twin_step_lines(batch)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--history", type=int, default=50, help="steps written before the bootstrap")
    ap.add_argument("--baseline", default=None, help="a git ref to measure beside this checkout")
    args = ap.parse_args()
    n = args.entities
    with tempfile.TemporaryDirectory(prefix="nettwin-bootstrap-memory-") as tmp_s:
        tmp = Path(tmp_s)
        settings = isolated_settings(tmp / "state", twins=synthetic_twins(n, args.history))
        provision(settings)
        try:
            lines = history_lines(n, args.history)
            with InfluxClient(settings.influx) as influx:
                for lo in range(0, len(lines), 50_000):
                    influx.write("\n".join(lines[lo : lo + 50_000]).encode(), precision="s")
            del lines
            env = settings_env(settings)
            out: dict[str, Any] = {"entities": n, "history_steps": args.history, "cadence": "1m"}
            if args.baseline:
                with worktree(args.baseline, tmp / "baseline") as checkout:
                    out["baseline_ref"] = args.baseline
                    out["baseline"] = run_in_checkout(CHILD, checkout, env)
            out["this"] = run_in_checkout(CHILD, REPO, env)
            if args.baseline:
                out["same_twins"] = out["this"]["messages_sha256"] == out["baseline"]["messages_sha256"]
            out["load_1m"] = round(os.getloadavg()[0], 1)
            print(json.dumps(out))
        finally:
            deprovision(settings)


if __name__ == "__main__":
    main()
