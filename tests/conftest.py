"""Fixtures for the integration tier: the real local broker and InfluxDB (started by infra/up), a unique
topic prefix and database per test, and the worker/store run as real ``nettwin`` subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.settings import NettwinSettings, load_settings
from nettwin.cli.services import services_up
from twin_store.adapters.provision import deprovision, provision
from twin_store.services.processes import settings_env

REPO = Path(__file__).resolve().parents[1]
SHARED_MILAN = REPO.parent / "shared" / "data" / "milan"


@pytest.fixture(scope="session")
def services() -> NettwinSettings:
    """The services of infra/up; started here if they are not running (infra/up is idempotent)."""
    base = load_settings()
    kafka_ok, influx_ok = services_up(base)
    if not (kafka_ok and influx_ok):
        subprocess.run([str(REPO / "infra" / "up")], check=True)
    return base


@pytest.fixture
def isolated(services: NettwinSettings, tmp_path: Path) -> Iterator[NettwinSettings]:
    """Settings with a fresh topic prefix and database; both are created and removed around the test."""
    tag = uuid.uuid4().hex[:10]
    settings = load_settings(
        {
            "kafka": {"topic_prefix": f"t{tag}."},
            "influx": {"database": f"nettwin_t{tag}"},
            "state_dir": str(tmp_path / "state"),
        }
    )
    provision(settings)
    yield settings
    deprovision(settings)


def run_cli(
    settings: NettwinSettings, *args: str, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nettwin.cli.main", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def small_vtwin(settings: NettwinSettings) -> dict[str, object]:
    """`nettwin vtwin` on 6 real squares, 2 clusters, 2 rounds; returns its JSON summary."""
    hourly = SHARED_MILAN / "hourly_150squares_62days.csv"
    args = ["vtwin", "--data", str(hourly), "--squares", "6", "--rounds", "2", "--clusters", "2", "--json"]
    res = run_cli(settings, *args, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    summary: dict[str, object] = json.loads(res.stdout)
    return summary


class Pipeline:
    """Worker and store subprocesses for one test; logs are shown when the test fails."""

    def __init__(self, settings: NettwinSettings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "nettwin.cli.main", name],
            env=settings_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def stop(self, name: str, kill: bool = False) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.kill() if kill else proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.logdir.glob("*.log")))

    def assert_running(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{self.logs()}"


@pytest.fixture
def pipeline(isolated: NettwinSettings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pipeline]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    pipe = Pipeline(isolated, logdir)
    pipe.start("worker")
    pipe.start("store")
    yield pipe
    for name in list(pipe.procs):
        pipe.stop(name)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        sys.stderr.write(pipe.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
