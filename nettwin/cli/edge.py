"""``nettwin edge --site NAME``: one edge site hosting its cluster twins; ``nettwin cloud``: the global twin;
``nettwin edge-ledger``: book the edge sites' energy (DITEN eqs. 13-15) per slot into InfluxDB."""

from __future__ import annotations

from pathlib import Path

import typer

from nettwin.cli.common import run_until_signalled, settings_of, setup_service_logging


def register(app: typer.Typer) -> None:
    app.command("edge-ledger")(edge_ledger)
    app.command("edge")(edge_site)
    app.command("cloud")(cloud)


def edge_site(
    ctx: typer.Context,
    site: str = typer.Option(..., help="the declared edge site ([[edge.sites]] name) this process runs"),
    milan_dir: Path | None = typer.Option(
        None, help="grid and base stations: where each BS is (default: edge.milan_dir, else vtwin's folder)"
    ),
    timeout: float = typer.Option(
        6.0, min=2.0, help="seconds without a heartbeat after which a site counts as dead"
    ),
    idle_exit: float | None = typer.Option(None, help="exit after this many seconds without updates"),
    json_out: bool = typer.Option(False, "--json", help="print counters as JSON on exit"),
) -> None:
    """Run one edge site: host the cluster twins the placement policy gives it (edge.policy over the live
    sites), decide their BSs' updates, hand clusters over through the topics when the placement changes."""
    from twin_store.services.edge_site import SiteService

    setup_service_logging()
    service = SiteService(settings_of(ctx), site, milan_dir, timeout)
    run_until_signalled(service, idle_exit, json_out)


def cloud(
    ctx: typer.Context,
    psi: float = typer.Option(
        0.0, min=0.0, help="merge a cluster change into the global twin only if eps > psi"
    ),
    gamma: float | None = typer.Option(
        None, min=0.0, max=1.0, help="H-twinning step size (default: the changed cluster's share of the BSs)"
    ),
    recluster_every: int | None = typer.Option(
        None, min=0, help="accepted updates between DCS re-clusterings (default: the stream plan's; 0: never)"
    ),
    milan_dir: Path | None = typer.Option(
        None, help="grid and base stations for re-clustering (default: the folder vtwin used)"
    ),
    idle_exit: float | None = typer.Option(None, help="exit after this many seconds without cluster changes"),
    json_out: bool = typer.Option(False, "--json", help="print counters as JSON on exit"),
) -> None:
    """Run the cloud: merge the cluster twins the edge sites publish into the global twin (psi rule)."""
    from twin_store.services.cloud import CloudService

    setup_service_logging()
    service = CloudService(settings_of(ctx), psi, gamma, milan_dir, recluster_every)
    run_until_signalled(service, idle_exit, json_out)


def edge_ledger(
    ctx: typer.Context,
    milan_dir: Path | None = typer.Option(None, help="grid and base stations: where each BS is"),
    idle_exit: float | None = typer.Option(None, help="exit after this many seconds without updates"),
    json_out: bool = typer.Option(False, "--json", help="print counters as JSON on exit"),
) -> None:
    """Place BS twins on the declared edge sites ([edge] in the settings) by policy, record migrations,
    and write the energy ledger (edge_cost, edge_migration, edge_host) per slot."""
    from twin_store.services.edge import EdgeLedgerService

    setup_service_logging()
    service = EdgeLedgerService(settings_of(ctx), milan_dir)
    run_until_signalled(service, idle_exit, json_out)
