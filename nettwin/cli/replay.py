"""``nettwin replay``: replay data sets into Kafka as live streams."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ingest.kafka import make_producer
from ingest.topics import Topics
from nettwin.cli.common import console, print_json, settings_of
from nettwin.errors import InputError
from producers.replay import Replayer, load_table

app = typer.Typer(help="Replay data sets into Kafka as live streams.", no_args_is_help=True)


@app.command()
def milan(
    ctx: typer.Context,
    files: list[Path] = typer.Argument(..., help="official daily files (.txt/.gz) or an hourly CSV"),
    fmt: str = typer.Option("raw", "--format", help="raw (official TSV) or hourly (square_id,h0..hN)"),
    speed: float | None = typer.Option(None, help="event time runs N x real time (600: 10 min per second)"),
    as_fast: bool = typer.Option(False, "--max", help="as fast as possible (the default without --speed)"),
    limit: int | None = typer.Option(None, min=1, help="stop after this many records"),
    run: str | None = typer.Option(
        None, help="run id (default: random); the store reports completion per run"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the summary as one JSON line"),
) -> None:
    """Publish Milan traffic, one record per (square, interval), batched per partition and interval."""
    if as_fast and speed is not None:
        raise InputError("give either --speed N or --max, not both")
    settings = settings_of(ctx)
    topics = Topics.from_settings(settings)
    for f in files:  # check every path before publishing anything
        if not f.is_file():
            raise InputError(f"{f}: no such file")
    producer = make_producer(settings)
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,} records"),
            TimeElapsedColumn(),
            console=console,
            disable=json_out or not console.is_terminal,
        ) as progress:
            task = progress.add_task("replay", total=None)
            replayer = Replayer.for_settings(
                settings,
                producer,
                speed,
                limit=limit,
                on_records=lambda n: progress.advance(task, n),
                run=run,
            )
            for f in files:
                if replayer.exhausted:
                    break
                progress.update(task, description=f"replay {f.name}")
                table = load_table(f, fmt)
                replayer.publish_table(table)
                if len(table) == 0:
                    producer.flush()  # the dead letters are kept before we stop
                    first = f" (first: {table.bad[0].position}: {table.bad[0].reason})" if table.bad else ""
                    raise InputError(
                        f"{f}: no valid {fmt} records in {table.lines} line(s){first}; "
                        f"bad lines are on the dead-letter topic {topics.deadletter}"
                    )
            summary = replayer.finish()
    finally:
        producer.close()
    if json_out:
        print_json(summary.as_dict())
        return
    d = summary.as_dict()
    console.print(
        f"replayed {d['records']:,} records from {d['files']} file(s) ({d['lines']:,} lines, "
        f"{d['malformed']:,} malformed -> {topics.deadletter}) in {d['seconds']} s "
        f"({d['records_per_s'] or 0:,.0f} records/s), run {d['run']}"
    )
