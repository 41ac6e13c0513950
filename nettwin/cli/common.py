"""Helpers shared by the command modules: settings from the context, output, one-line errors."""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from ingest.settings import NettwinSettings

console = Console(stderr=True)


def settings_of(ctx: typer.Context) -> NettwinSettings:
    from ingest.settings import NettwinSettings

    settings = ctx.find_root().obj
    assert isinstance(settings, NettwinSettings), "root callback sets the settings"
    return settings


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    from rich.table import Table

    if not rows:
        Console().print(f"{title}: no rows")
        return
    columns = columns or list(rows[0])
    table = Table(title=title)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    Console().print(table)


def setup_service_logging() -> None:
    """Long-running commands log our progress at INFO; kafka-python's per-connection INFO chatter is muted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)


def run_until_signalled(service: Any, idle_exit: float | None, json_out: bool) -> None:
    """Run a service whose loop ends once ``service.stopping`` is set: SIGTERM and SIGINT set it (the loop
    finishes the step it is in); its counters are printed as JSON with ``--json``."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(service, "stopping", True))
    counters = service.run(idle_exit_s=idle_exit)
    if json_out:
        print_json(counters)
