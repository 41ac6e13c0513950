"""``nettwin data fetch milan``: download the Telecom Italia Milan daily files from Harvard Dataverse."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from nettwin.cli.common import console, print_json

app = typer.Typer(help="Download public data sets.", no_args_is_help=True)
fetch_app = typer.Typer(help="Download a data set.", no_args_is_help=True)
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
    json_out: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Write a Milan day as 3GPP PM XML files (TS 32.435), one per 10-minute interval, for the pm-files source."""
    from producers.pm_export import write_pm_files
    from producers.replay import load_table

    table = load_table(data, "raw")
    files = write_pm_files(table, out)
    summary = {"files": len(files), "records": len(table), "squares": len(set(table.squares.tolist()))}
    if json_out:
        print_json(summary)
    else:
        console.print(f"wrote {summary['files']} PM files ({summary['records']:,} records) to {out}")
