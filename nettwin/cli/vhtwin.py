"""``nettwin vtwin``: initial global and cluster twins from history (synchronous V-twinning)."""

from __future__ import annotations

from pathlib import Path

import typer

from nettwin.cli.common import console, print_json, run_until_signalled, settings_of, setup_service_logging


def register(app: typer.Typer) -> None:
    app.command()(vtwin)
    app.command()(htwin)


def htwin(
    ctx: typer.Context,
    psi: float = typer.Option(
        0.0, min=0.0, help="merge a cluster change into the global twin only if eps > psi"
    ),
    gamma: float | None = typer.Option(
        None, min=0.0, max=1.0, help="H-twinning step size (default: the changed cluster's share of the BSs)"
    ),
    idle_exit: float | None = typer.Option(None, help="exit after this many seconds without updates"),
    milan_dir: Path | None = typer.Option(
        None, help="grid and base stations for re-clustering (default: the folder vtwin used)"
    ),
    defense: str | None = typer.Option(
        None, help="screening/aggregation of updates: mean, median, trimmed, krum, clip, tid, temporal"
    ),
    json_out: bool = typer.Option(False, "--json", help="print counters as JSON on exit"),
) -> None:
    """Live H-twinning: BS updates (updates.local) -> cluster and global twins (twin.models, InfluxDB)."""
    from twin_store.services.htwin import TwinService

    setup_service_logging()
    settings = settings_of(ctx)
    if defense is not None:
        settings = settings.model_copy(
            update={"security": settings.security.model_copy(update={"defense": defense})}
        )
    service = TwinService(settings, psi, milan_dir, gamma)
    run_until_signalled(service, idle_exit, json_out)


def vtwin(
    ctx: typer.Context,
    data: Path | None = typer.Option(None, help="hourly traffic history (square_id,h0..hN)"),
    from_influx: bool = typer.Option(
        False,
        "--from-influx",
        help="V-twin on the [twins] steps the stream wrote to InfluxDB (twin_input) instead of a file",
    ),
    squares: int | None = typer.Option(None, min=2, help="draw this many squares with --seed (default: all)"),
    seed: int = typer.Option(1),
    clusters: int = typer.Option(4, min=0, help="DCS cluster count; 0: Louvain decides"),
    rounds: int = typer.Option(10, min=1, help="synchronous rounds"),
    participation: float = typer.Option(1.0, help="share of BSs in each round, (0, 1]"),
    train_hours: int | None = typer.Option(
        None, help="hours of history to use (default: all but the last 480)"
    ),
    milan_dir: Path | None = typer.Option(
        None, help="folder with the grid and base stations (default: --data's)"
    ),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Run V-twinning on history; publish the twins to twin.models and write twin/membership rows."""
    from ingest.errors import InputError
    from twin_store.services.vtwin import StreamJob, VTwinJob, run_vtwin, run_vtwin_from_influx

    if from_influx == (data is not None):
        raise InputError("give either --data FILE or --from-influx")
    if from_influx:
        with console.status("V-twinning from InfluxDB"):
            result = run_vtwin_from_influx(
                settings_of(ctx), StreamJob(seed=seed, rounds=rounds, participation=participation)
            )
        if json_out:
            print_json(result)
        else:
            console.print(
                f"V-twinning: {result['entities']} entities, {result['rounds']} rounds on {result['train_steps']} "
                f"steps (inputs {result['lags']}), clusters {result['clusters']}, validation MSE "
                f"{result['validation_mse']} (persistence {result['persistence_mse']}); twins published to "
                f"{result['topic']} ({result['seconds']} s)"
            )
        return
    assert data is not None
    job = VTwinJob(
        data=data,
        squares=squares,
        seed=seed,
        clusters=clusters or None,
        rounds=rounds,
        participation=participation,
        train_hours=train_hours,
        milan_dir=milan_dir,
    )
    with console.status("V-twinning"):
        summary = run_vtwin(settings_of(ctx), job)
    if json_out:
        print_json(summary)
        return
    console.print(
        f"V-twinning: {summary['squares']} BSs, {summary['rounds']} rounds on {summary['train_hours']} hours, "
        f"clusters {summary['clusters']}, final loss {summary['final_loss']}; twins published to "
        f"{summary['topic']} and written to InfluxDB ({summary['seconds']} s)\n"
        "see them: nettwin query twins"
    )
