"""``nettwin replay``: replay data sets into Kafka as live streams."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ingest.errors import InputError
from nettwin.cli import replay_ftm
from nettwin.cli.common import console, print_json, settings_of

if TYPE_CHECKING:
    from rich.progress import Progress

FORMATS = ("raw", "hourly")

app = typer.Typer(
    rich_markup_mode=None, help="Replay data sets into Kafka as live streams.", no_args_is_help=True
)


def replay_progress(unit: str, quiet: bool) -> Progress:
    """The bar every replay shows on a terminal (not with --json)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,} " + unit),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    )


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
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: choose raw or hourly")
    from ingest.kafka import ensure_topics_exist, make_producer
    from ingest.readers.milan import check_layout
    from ingest.topics import Topics
    from producers.replay import Replayer, load_table

    settings = settings_of(ctx)
    topics = Topics.from_settings(settings)
    for f in files:  # check every path and layout before contacting Kafka or publishing anything
        check_layout(f, fmt)
    ensure_topics_exist(settings, [topics.telemetry_milan, topics.deadletter])
    producer = make_producer(settings)
    try:
        with replay_progress("records", json_out) as progress:
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


@app.command()
def sensors(
    ctx: typer.Context,
    files: list[Path] = typer.Argument(
        ..., help="sensor CSVs: NAB (timestamp,value), any CSV with a time column, or Intel Lab matrices"
    ),
    time_column: str | None = typer.Option(
        None, help="name of the time column (default: 'timestamp'); ISO 8601 or epoch s/ms"
    ),
    value_columns: str | None = typer.Option(
        None, help="comma-separated value columns (default: every other numeric column)"
    ),
    source: str | None = typer.Option(None, help="source name for a single CSV file (default: file stem)"),
    intel_start: str = typer.Option(
        "2004-02-28T00:00Z",
        help="Intel Lab matrices carry no times: SYNTHESISED at 30-minute steps from this start "
        "(Test columns continue after Train when both are given)",
    ),
    speed: float | None = typer.Option(None, help="event time runs N x real time (600: 10 min per second)"),
    as_fast: bool = typer.Option(False, "--max", help="as fast as possible (the default without --speed)"),
    limit: int | None = typer.Option(None, min=1, help="stop after this many readings (in time order)"),
    run: str | None = typer.Option(
        None, help="run id (default: random); the store reports completion per run"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the summary as one JSON line"),
) -> None:
    """Publish sensor readings to telemetry.sensors, one message per source and tick, key = source name.

    Layouts are recognised by header: NAB files (timestamp,value; source = file stem), any CSV with a
    named time column (source = stem, or stem:column for several value columns), and the headerless Intel
    Lab matrices intel{Temperature,Humidity}{Train,Test}.csv (source = kind:mote<row>), whose timestamps
    are synthesised. Rows that cannot be parsed go to the dead-letter topic with their line number.
    """
    from ingest.deadletter import DeadLetterSink
    from ingest.kafka import ensure_topics_exist, make_producer
    from ingest.readers.sensors import iso_to_ms, read_sensor_files
    from ingest.topics import Topics
    from producers.sensor_replay import SensorReplayer

    if as_fast and speed is not None:
        raise InputError("give either --speed N or --max, not both")
    settings = settings_of(ctx)
    topics = Topics.from_settings(settings)
    columns = [c.strip() for c in value_columns.split(",") if c.strip()] if value_columns else None
    if value_columns is not None and not columns:
        raise InputError("--value-columns: give at least one column name")
    tables = read_sensor_files(files, time_column, columns, source, iso_to_ms(intel_start, "--intel-start"))
    ensure_topics_exist(settings, [topics.telemetry_sensors, topics.deadletter])
    producer = make_producer(settings)
    try:
        empty = [t for t in tables if len(t) == 0]
        if empty:
            sink = DeadLetterSink(producer, topics.deadletter)
            for letter in [d for t in empty for d in t.bad]:
                sink.send(letter)
            producer.flush()  # the dead letters are kept before we stop
            t = empty[0]
            first = f" (first: {t.bad[0].position}: {t.bad[0].reason})" if t.bad else ""
            raise InputError(
                f"{t.path}: no valid readings in {t.lines} line(s){first}; "
                f"bad lines are on the dead-letter topic {topics.deadletter}"
            )
        with replay_progress("readings", json_out) as progress:
            total = sum(len(t) for t in tables)
            task = progress.add_task("replay sensors", total=min(total, limit) if limit else total)
            replayer = SensorReplayer.for_settings(
                settings,
                producer,
                speed,
                limit=limit,
                on_records=lambda n: progress.advance(task, n),
                run=run,
            )
            replayer.publish(tables)
            summary = replayer.finish()
    finally:
        producer.close()
    detail = [
        {
            "file": t.path,
            "layout": t.layout,
            "sources": len(t.sources),
            "readings": len(t),
            "malformed": len(t.bad),
            "value_columns": list(t.value_columns),
            "times": t.time_note,
        }
        for t in tables
    ]
    d = summary.as_dict() | {"topic": topics.telemetry_sensors, "file_detail": detail}
    if json_out:
        print_json(d)
        return
    for f in detail:
        console.print(
            f"{f['file']}: {f['layout']}, {f['sources']} source(s), {f['readings']:,} readings, "
            f"{f['malformed']} malformed, times {f['times']}"
        )
    console.print(
        f"replayed {d['records']:,} readings from {d['files']} file(s) ({d['lines']:,} lines, "
        f"{d['malformed']:,} malformed -> {topics.deadletter}) to {topics.telemetry_sensors} in "
        f"{d['seconds']} s ({d['records_per_s'] or 0:,.0f} readings/s), run {d['run']}"
    )


app.command("ftm")(replay_ftm.ftm)
