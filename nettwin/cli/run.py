"""``nettwin run --config FILE``: every part a deployment config declares, as supervised child processes.

Parts (``[run] parts``): ``attach`` (when the config has ``[[source]]`` tables), ``store``, ``worker``,
``htwin``, ``edge-ledger`` (the DITEN energy ledger of ``[[edge.sites]]``), ``cloud`` and ``edge`` (one
``nettwin edge --site NAME`` per declared site; with ``cloud`` they replace ``htwin``). A child that dies is restarted after ``restart_delay_s``; SIGTERM/SIGINT stop them all (SIGTERM,
then SIGKILL for any still running after 10 s). Logs go to ``<state_dir>/log/run-<part>.log``. On several
machines run the same parts separately against shared Kafka.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import typer

from nettwin.cli.attach import settings_with_config
from nettwin.cli.common import print_json, setup_service_logging

log = logging.getLogger("nettwin.run")

STOP_TIMEOUT_S = 10.0


def register(app: typer.Typer) -> None:
    app.command("run")(run_parts)


def _spawn(part: str, config: Path | None, log_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    from twin_store.services.processes import spawn_cli

    args = [part, "--config", str(config)] if part == "attach" and config is not None else [part]
    if part.startswith("edge:"):
        args = ["edge", "--site", part.removeprefix("edge:")]
    return spawn_cli(args, log_dir / f"run-{part.replace(':', '-')}.log", env)


def run_parts(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help="TOML deployment config"),
    max_seconds: float | None = typer.Option(None, help="stop everything after this many seconds"),
) -> None:
    """Start every part the config declares (sources, worker, store, twin service); restart any that dies."""
    setup_service_logging()
    settings = settings_with_config(ctx, config)
    declared = [p for p in settings.run.parts if p != "attach" or settings.source]
    parts = [
        q for p in declared for q in ([f"edge:{s.name}" for s in settings.edge.sites] if p == "edge" else [p])
    ]
    log_dir = settings.state_dir / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if config is not None:
        env["NETTWIN_CONFIG"] = str(config.resolve())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    procs = {p: _spawn(p, config, log_dir, env) for p in parts}
    restarts = dict.fromkeys(parts, 0)
    died_at: dict[str, float] = {}
    log.info("run: started %s (logs in %s)", {p: proc.pid for p, proc in procs.items()}, log_dir)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while not stop.wait(0.2):
        if deadline is not None and time.monotonic() >= deadline:
            break
        for part, proc in procs.items():
            if proc.poll() is None:
                continue
            now = time.monotonic()
            if part not in died_at:
                died_at[part] = now
                log.warning(
                    "run: %s exited with %s; restarting in %.1f s",
                    part,
                    proc.returncode,
                    settings.run.restart_delay_s,
                )
            elif now - died_at[part] >= settings.run.restart_delay_s:
                del died_at[part]
                restarts[part] += 1
                procs[part] = _spawn(part, config, log_dir, env)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs.values():
        try:
            proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print_json(
        {"parts": parts, "restarts": restarts, "exit_codes": {p: q.returncode for p, q in procs.items()}}
    )
