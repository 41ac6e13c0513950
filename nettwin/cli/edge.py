"""``nettwin edge-ledger``: book the edge sites' energy (DITEN eqs. 13-15) per slot into InfluxDB."""

from __future__ import annotations

from pathlib import Path

import typer

from nettwin.cli.common import print_json, settings_of, setup_service_logging


def register(app: typer.Typer) -> None:
    app.command("edge-ledger")(edge_ledger)


def edge_ledger(
    ctx: typer.Context,
    milan_dir: Path | None = typer.Option(None, help="grid and base stations: where each BS is"),
    idle_exit: float | None = typer.Option(None, help="exit after this many seconds without updates"),
    json_out: bool = typer.Option(False, "--json", help="print counters as JSON on exit"),
) -> None:
    """Place BS twins on the declared edge sites ([edge] in the settings) by policy, record migrations,
    and write the energy ledger (edge_cost, edge_migration, edge_host) per slot."""
    import signal

    from twin_store.services.edge import EdgeLedgerService

    setup_service_logging()
    service = EdgeLedgerService(settings_of(ctx), milan_dir)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(service, "stopping", True))
    counters = service.run(idle_exit_s=idle_exit)
    if json_out:
        print_json(counters)
