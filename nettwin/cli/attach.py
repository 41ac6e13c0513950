"""``nettwin attach --config FILE``: run the ``[[source]]`` tables of a config in one process."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ingest.errors import ConfigError
from nettwin.cli.common import settings_of, setup_service_logging

if TYPE_CHECKING:
    from ingest.settings import NettwinSettings


def register(app: typer.Typer) -> None:
    app.command()(attach)


def settings_with_config(ctx: typer.Context, config: Path | None) -> NettwinSettings:
    """The root settings, or those of ``config`` when the command names one (env still applies)."""

    from ingest.settings import load_settings  # pydantic: only when a command runs

    if config is None:
        return settings_of(ctx)
    if not config.is_file():
        raise ConfigError(f"config file {config}: not found")
    return load_settings(config_file=config)


def attach(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help="TOML config with \\[\\[source]] tables"),
    max_seconds: float | None = typer.Option(None, help="stop after this many seconds (tests, demos)"),
) -> None:
    """Attach live sources (mqtt, http, pm-files, kafka-lineprotocol, file) -> telemetry.records, at least once."""
    from ingest.sources.attach import Attachment

    setup_service_logging()
    settings = settings_with_config(ctx, config)
    if not settings.source:
        raise ConfigError("the config declares no [[source]] tables; see docs/sources.md")
    try:
        attachment = Attachment(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    attachment.start()
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    while not stop.wait(0.2):  # short waits: the signal handler runs between them
        if deadline is not None and time.monotonic() >= deadline:
            break
    attachment.stop()
