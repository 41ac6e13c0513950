"""``nettwin ui``: the web view (map, entity panel, twins, pipeline), live over server-sent events."""

from __future__ import annotations

from pathlib import Path

import typer

from nettwin.cli.common import console, settings_of
from nettwin.cli.services import REPO_ROOT

DEFAULT_GRID = REPO_ROOT.parent / "shared" / "data" / "milan" / "milano-grid.geojson"


def register(app: typer.Typer) -> None:
    app.command()(ui)


def ui(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8080, min=1, max=65535, help="port to listen on"),
    grid: Path = typer.Option(
        DEFAULT_GRID, help="GeoJSON grid of the deployment (cellId polygons); absent: squares laid out by id"
    ),
    refresh: float = typer.Option(2.0, min=0.2, max=60.0, help="seconds between reads of InfluxDB"),
) -> None:
    """Serve the web view of the twins over InfluxDB and twin.models, updated live, until Ctrl-C."""
    import logging

    from nettwin.web import WebConfig, serve

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    settings = settings_of(ctx)
    cfg = WebConfig(settings, host, port, grid if grid.is_file() else None, refresh)
    serve(
        cfg,
        lambda url: console.print(f"web view at {url} (database {settings.influx.database}; Ctrl-C stops)"),
    )
