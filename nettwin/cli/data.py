"""``nettwin data fetch milan``: download the Telecom Italia Milan daily files from Harvard Dataverse."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from nettwin.cli.common import console, print_json

app = typer.Typer(rich_markup_mode=None, help="Download public data sets.", no_args_is_help=True)
fetch_app = typer.Typer(rich_markup_mode=None, help="Download a data set.", no_args_is_help=True)
app.add_typer(fetch_app, name="fetch")


@fetch_app.command()
def milan(
    days: str = typer.Option(
        ..., "--days", help="day or inclusive range: 2013-11-05 or 2013-11-01..2013-11-07"
    ),
    dest: Path = typer.Option(..., "--dest", help="directory for the files (created if missing)"),
    base_url: str | None = typer.Option(
        None,
        "--base-url",
        envvar="NETTWIN_DATAVERSE_URL",
        help="Dataverse installation serving the files (default: https://dataverse.harvard.edu)",
    ),
    files_table: Path | None = typer.Option(
        None, "--files-table", hidden=True, help="id table in the milan_files.json format (mirrors, tests)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print a one-line JSON summary to stdout"),
) -> None:
    """Fetch the Milan 'sms-call-internet-mi' daily files (2013-11-01..2014-01-01), resumable and verified.

    Re-running resumes partial downloads and skips files already present and verified.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from producers import dataverse

    base_url = base_url or dataverse.DEFAULT_BASE_URL
    table = dataverse.load_table(files_table)
    entries = dataverse.select_days(table.files, days)
    dataverse.ensure_dest(dest)
    started = time.monotonic()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("milan", total=dataverse.pending_bytes(entries, dest))
        results = dataverse.fetch_files(
            entries,
            dest,
            base_url=base_url,
            progress=lambda n: progress.advance(task, n),
            on_file=lambda e: progress.update(task, description=e.filename),
        )
        progress.update(task, description=f"{len(results)} file(s)")
        if not json_out:
            for r in results:
                progress.console.print(f"{r.status:<10} {r.path} ({r.bytes_downloaded} bytes transferred)")
    seconds = time.monotonic() - started
    transferred = sum(r.bytes_downloaded for r in results)
    if json_out:
        print_json(
            {
                "files": len(results),
                "bytes": transferred,
                "seconds": round(seconds, 3),
                "dest": str(dest),
                "results": [
                    {"filename": r.filename, "status": r.status, "bytes": r.bytes_downloaded} for r in results
                ],
            }
        )
        return
    # ODbL asks users of the data to keep the attribution with it
    if table.attribution or table.licence:
        console.print(
            f"data: {table.attribution or 'unattributed'}; licence {table.licence or 'unknown'}"
            + (f"; {table.doi}" if table.doi else "")
        )


@app.command("milan-to-pm")
def milan_to_pm(
    data: Path = typer.Argument(..., help="an official Milan daily file (.txt or .gz)"),
    out: Path = typer.Option(..., "--out", help="directory for the PM files (watched by a pm-files source)"),
    granularity: str = typer.Option(
        "10m",
        "--granularity",
        help="granularity period of the files: 10m (the data's) or a multiple, e.g. 30m",
    ),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Write a Milan day as 3GPP PM XML files (TS 32.435), one per granularity period (default 10 minutes, the
    data's own; coarser periods sum the counters), for the pm-files source."""
    from ingest.errors import InputError
    from producers.pm_export import write_pm_files
    from producers.replay import load_table
    from twin_store.federation.series import parse_cadence

    try:
        period_s = parse_cadence(granularity) // 1000
    except ValueError as exc:
        raise InputError(f"--granularity: {exc}") from exc
    table = load_table(data, "raw")
    if period_s % table.step_s:
        raise InputError(
            f"--granularity {granularity}: must be a multiple of the data's {table.step_s // 60} minutes"
        )
    files = write_pm_files(table, out, period_s)
    summary = {"files": len(files), "records": len(table), "squares": len(set(table.squares.tolist()))}
    if json_out:
        print_json(summary)
    else:
        console.print(f"wrote {summary['files']} PM files ({summary['records']:,} records) to {out}")


@app.command("to-records")
def to_records(
    shape: str = typer.Argument(..., help="milan-hourly or intel"),
    files: list[Path] = typer.Argument(
        ..., help="the data file(s): an hourly Milan CSV, or Intel Lab matrices"
    ),
    out: Path = typer.Option(..., "--out", help="canonical-record CSV to write (entity,time,<metric>)"),
    sites_out: Path | None = typer.Option(None, "--sites-out", help="also write the entities' sites file"),
    squares: int | None = typer.Option(
        None, min=1, help="milan-hourly: squares drawn with --seed (default all)"
    ),
    seed: int = typer.Option(1, help="milan-hourly: the draw of --squares (as bench vhtwin draws them)"),
    milan_dir: Path | None = typer.Option(
        None, help="milan-hourly: grid + OpenCellID folder (default: the file's)"
    ),
    mote_locs: Path | None = typer.Option(None, help="intel: mote_locs.txt (default: beside the matrices)"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Write a known data set as a canonical-record CSV (and its sites file), for nettwin bench twins."""
    from bench import twins_data
    from ingest.errors import InputError

    summary: dict[str, object] = {"out": str(out)}
    if shape == "milan-hourly":
        if len(files) != 1:
            raise InputError("milan-hourly takes one hourly CSV")
        ids = twins_data.milan_hourly_records(files[0], out, squares, seed)
        summary["entities"] = len(ids)
        if sites_out is not None:
            twins_data.milan_sites(milan_dir or files[0].parent, ids, sites_out)
    elif shape == "intel":
        motes = twins_data.intel_records(files, out)
        summary["entities"] = len(motes)
        if sites_out is not None:
            twins_data.intel_sites(mote_locs or files[0].parent / "mote_locs.txt", sites_out)
    else:
        raise InputError(f"shape {shape!r}: expected milan-hourly or intel")
    if sites_out is not None:
        summary["sites"] = str(sites_out)
    if json_out:
        print_json(summary)
    else:
        console.print(
            f"wrote {summary['entities']} entities to {out}" + (f" and {sites_out}" if sites_out else "")
        )


@app.command("milan-sites")
def milan_sites(
    data: Path = typer.Argument(
        ..., help="a Milan file whose squares to place: hourly CSV or an official raw day"
    ),
    out: Path = typer.Option(..., "--out", help="sites CSV to write (entity,lat,lon,n_base_stations,bs_*)"),
    entity_format: str = typer.Option(
        "{square}", help="entity names, e.g. 'ManagedElement=milan,Square={square}' for milan-to-pm files"
    ),
    milan_dir: Path | None = typer.Option(None, help="grid + OpenCellID folder (default: the file's)"),
) -> None:
    """Write the sites file of Milan squares (grid centroids, OpenCellID serving BSs) for DCS on positions."""
    from bench import twins_data

    n = twins_data.milan_sites(milan_dir or data.parent, twins_data.milan_squares(data), out, entity_format)
    console.print(f"wrote {n} sites to {out}")
