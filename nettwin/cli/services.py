"""``nettwin worker`` and ``nettwin store``, and the check that the services answer (``nettwin demo`` uses it)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ingest.errors import ServiceError
from nettwin.cli.common import console, print_json, settings_of, setup_service_logging

# kafka, requests, numpy, pandas and faust are imported inside the commands (CLI start-up time)
if TYPE_CHECKING:
    from ingest.settings import NettwinSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(store)


def worker(ctx: typer.Context, loglevel: str = typer.Option("warning", help="faust log level")) -> None:
    """Run the Faust worker: 10-minute and hourly windows per square -> feature records."""
    from ingest.kafka import ensure_kafka_reachable
    from stream_processors.worker import run_worker

    settings = settings_of(ctx)
    ensure_kafka_reachable(settings)
    run_worker(settings, loglevel=loglevel)


def store(
    ctx: typer.Context,
    idle_exit: float | None = typer.Option(None, help="exit after this many seconds without input"),
    json_out: bool = typer.Option(False, "--json", help="print counters as JSON on exit"),
) -> None:
    """Run the twin store: features -> InfluxDB (traffic, traffic_hourly, twin), committing after each write."""
    from twin_store.services.store import TwinStore

    setup_service_logging()
    twin_store = TwinStore(settings_of(ctx))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(twin_store, "stopping", True))
    counters = twin_store.run(idle_exit_s=idle_exit)
    if json_out:
        print_json(counters.__dict__)


def services_up(settings: NettwinSettings) -> tuple[bool, bool]:
    from ingest.kafka import ensure_kafka_reachable
    from twin_store.adapters.influx import InfluxClient

    try:
        ensure_kafka_reachable(settings, timeout_s=1.0)
        kafka = True
    except ServiceError:
        kafka = False
    try:
        with InfluxClient(settings.influx) as influx:
            influx.ping()
        influx_ok = True
    except ServiceError:
        influx_ok = False
    return kafka, influx_ok


def ensure_services(settings: NettwinSettings) -> None:
    kafka_ok, influx_ok = services_up(settings)
    if not (kafka_ok and influx_ok):
        if settings.profile != "local":
            raise ServiceError("Kafka or InfluxDB unreachable and profile is external: start them yourself")
        console.print("starting local services (infra/up) ...")
        if subprocess.run([str(REPO_ROOT / "infra" / "up")], check=False).returncode != 0:
            raise ServiceError("infra/up failed; see .state/log/")
