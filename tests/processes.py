"""``nettwin`` child processes of one test, each logging to its own file, killed at the end; their logs are
written to stderr when the test failed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from ingest.settings import NettwinSettings
from twin_store.services.processes import settings_env, spawn_cli


class Processes:
    """Named ``nettwin`` child processes, started with ``settings`` as they are when each one starts."""

    def __init__(self, settings: NettwinSettings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        self.procs[name] = spawn_cli(list(args), self.logdir / f"{name}.log", settings_env(self.settings))
        return self.procs[name]

    def signal(self, name: str, sig: int) -> float:
        """Send ``sig`` and wait (bounded) for the process to exit; return how long it took (inf: killed)."""
        proc = self.procs[name]
        started = time.monotonic()
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return float("inf")
        return time.monotonic() - started

    def assert_running(self, *names: str) -> None:
        for name in names:
            code = self.procs[name].poll()
            assert code is None, f"{name} exited with {code}\n{self.logs()}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logdir.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


P = TypeVar("P", bound=Processes)


def managed(processes: P, request: pytest.FixtureRequest) -> Iterator[P]:
    """The body of a ``procs`` fixture: yield, kill what still runs, show the logs if the test failed."""
    yield processes
    processes.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(processes.logs())
