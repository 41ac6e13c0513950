"""Run nettwin's long-running commands as child processes: spawn with given settings, stop within a deadline.

Used by ``nettwin demo``, the benchmarks and the fault tests; a child is started as ``python -m
nettwin.cli.main ...`` (by name, not by import), so this module depends on no higher layer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ingest.settings import NettwinSettings


def spawn_cli(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "nettwin.cli.main", *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def settings_env(settings: NettwinSettings) -> dict[str, str]:
    """Environment that gives a child process exactly these settings."""
    env = dict(os.environ)
    env.pop("NETTWIN_CONFIG", None)
    env["NETTWIN_PROFILE"] = settings.profile
    env["NETTWIN_STATE_DIR"] = str(settings.state_dir)
    sections = ["kafka", "influx", "worker", "security", "edge"]
    if settings.twins.target is not None:  # else a config file's [twins] stays in force
        sections.append("twins")
    for section in sections:
        for key, value in getattr(settings, section).model_dump(mode="json").items():
            if value is None:
                continue
            secret = getattr(getattr(settings, section), key)
            if hasattr(secret, "get_secret_value"):
                value = secret.get_secret_value()
            env[f"NETTWIN_{section.upper()}__{key.upper()}"] = (
                json.dumps(value) if isinstance(value, list) else str(value)
            )
    return env
