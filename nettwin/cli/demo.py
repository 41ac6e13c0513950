"""``nettwin demo``: the whole twin lifecycle on the embedded data, then the web view.

By default: V-twinning on the history, the live stream (BS agents forecast and send signed local updates,
H-twinning merges them, DCS re-clusters), one poisoning attempt refused (a fake BS rejected, a compromised
BS quarantined), the twin state, and ``nettwin ui`` on the demo's database until Ctrl-C. Everything runs in
the demo's own topics (prefix ``demo.``) and database (``<database>_demo``), fresh on every run.

``--hourly FILE`` runs the VH-Twin benchmark's protocol live (``bench/live_vhtwin.py``); ``--ingest-only``
replays one real Milan day through worker and store and shows what reached InfluxDB.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ingest.errors import InputError
from nettwin.cli.common import print_json, settings_of
from nettwin.cli.services import REPO_ROOT

# numpy, torch, kafka and requests come with nettwin.lifecycle, imported when the command runs
DEFAULT_HOURLY = REPO_ROOT.parent / "shared" / "data" / "milan" / "hourly_150squares_62days.csv"


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    ctx: typer.Context,
    data: Path = typer.Option(DEFAULT_HOURLY, help="hourly traffic file (square_id,h0..hN)"),
    squares: int | None = typer.Option(
        None, min=2, help="squares drawn with --seed (default 12; --hourly 50)"
    ),
    seed: int = typer.Option(1, help="seed of the square draw, the clustering and local training"),
    psi: float = typer.Option(0.01, min=0.0, help="H-twinning threshold: merge a cluster twin if eps > psi"),
    stream_hours: int = typer.Option(
        72, min=24, help="hours streamed live after the V-twinning history (--hourly: every remaining hour)"
    ),
    recluster_every: int | None = typer.Option(
        None, min=0, help="accepted updates between DCS re-clusterings (0: never; default 12; --hourly 500)"
    ),
    speed: float | None = typer.Option(
        None, help="replay speed (event time x N); default 36000 (0.1 s per hour); --ingest-only: max"
    ),
    timeout: float = typer.Option(600.0, help="seconds to wait for the pipeline to finish"),
    no_ui: bool = typer.Option(False, "--no-ui", help="end at once instead of serving the web view"),
    host: str = typer.Option("127.0.0.1", help="web view address"),
    port: int = typer.Option(8080, min=1, max=65535, help="web view port"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON object"),
    ingest_only: bool = typer.Option(
        False, "--ingest-only", help="only replay one real Milan day through worker and store"
    ),
    hourly: Path | None = typer.Option(
        None, help="run the VH-Twin benchmark live on this hourly file instead (bench/live_vhtwin.py)"
    ),
    compare: bool = typer.Option(False, help="--hourly: also run the offline benchmark and compare"),
) -> None:
    """The whole twin lifecycle on the embedded data, then the web view until Ctrl-C.

    V-twinning, live BS agents with H-twinning and re-clustering, forecasts and their outcomes, a fake BS
    rejected and a compromised BS quarantined; then the twin state and the web view's URL.
    """
    import signal

    from nettwin.lifecycle import (
        Lifecycle,
        LifecycleConfig,
        demo_hourly,
        demo_ingest,
        interrupt,
        print_report,
    )

    settings = settings_of(ctx)
    if ingest_only:
        demo_ingest(settings, speed, timeout)
        return
    if speed is not None and speed <= 0:
        raise InputError(f"--speed {speed}: must be positive")
    if hourly is not None:
        from bench.live_vhtwin import LiveConfig

        cfg = LiveConfig(
            hourly,
            squares or 50,
            seed,
            psi=psi,
            recluster_every=500 if recluster_every is None else recluster_every,
            speed=speed or 36_000.0,
            timeout_s=max(timeout, 900.0),
        )
        demo_hourly(settings, cfg, compare, json_out)
        return
    run = Lifecycle(
        settings,
        LifecycleConfig(
            data,
            squares or 12,
            seed,
            psi,
            stream_hours,
            12 if recluster_every is None else recluster_every,
            speed or 36_000.0,
            timeout,
        ),
        quiet=json_out,
    )
    url = f"http://{host}:{port}/"
    # SIGTERM as Ctrl-C: the children (pipeline, web view) are stopped on the way out, never orphaned
    signal.signal(signal.SIGTERM, interrupt)
    try:
        report = run.run(None if no_ui else (host, port))
    except BaseException:
        run.stop_ui()
        raise
    report["url"] = url
    if json_out:
        print_json(report)
    else:
        print_report(report, run.settings)
    if not no_ui:
        run.serve_until_interrupted(url)
