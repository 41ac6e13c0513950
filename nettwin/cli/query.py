"""``nettwin query``: read twin state and traffic from InfluxDB (InfluxQL), and dead letters from Kafka."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from ingest.errors import InputError
from nettwin.cli.common import print_json, print_table, settings_of

if TYPE_CHECKING:
    from ingest.deadletter import DeadLetter
    from twin_store.adapters.influx import InfluxClient

app = typer.Typer(
    rich_markup_mode=None, help="Query twin state, traffic and dead letters.", no_args_is_help=True
)

RESOLUTIONS = {"10m": 600, "1h": 3600}


def _time_literal(value: str, option: str) -> str:
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError(f"{option} {value!r}: expected an ISO date/time such as 2013-11-01T06:00Z") from exc
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def traffic_rows(
    influx: InfluxClient,
    square: int,
    resolution: str,
    since: str | None,
    until: str | None,
    limit: int | None,
) -> list[dict[str, Any]]:
    from twin_store.adapters.traffic import measurement_for
    from twin_store.adapters.twin_rows import iso_ms

    measurement = measurement_for(RESOLUTIONS[resolution])
    q = f'SELECT * FROM "{measurement}" WHERE "entity" = \'{int(square)}\''
    if since:
        q += f" AND time >= '{_time_literal(since, '--since')}'"
    if until:
        q += f" AND time < '{_time_literal(until, '--until')}'"
    q += " ORDER BY time ASC"
    if limit:
        q += f" LIMIT {int(limit)}"
    rows = [r for s in influx.query(q) for r in s.rows()]
    for r in rows:
        r["time"] = iso_ms(r["time"])
        r["entity"] = str(r.get("entity", square))
    return rows


def twin_rows(influx: InfluxClient, level: str | None) -> list[dict[str, Any]]:
    """Each twin's latest state, from ``twin_current`` (one point per twin: no per-series scan)."""
    from twin_store.adapters.twin_rows import current_twins

    return current_twins(influx, level)


@app.command()
def traffic(
    ctx: typer.Context,
    square: int = typer.Option(..., "--square", "--entity", min=1, help="grid square id (its entity)"),
    resolution: str = typer.Option("10m", help="10m (measurement traffic) or 1h (traffic_hourly)"),
    since: str | None = typer.Option(None, help="ISO time, inclusive (UTC unless an offset is given)"),
    until: str | None = typer.Option(None, help="ISO time, exclusive"),
    limit: int | None = typer.Option(None, min=1),
    json_out: bool = typer.Option(False, "--json", help="one JSON array on stdout"),
) -> None:
    """Traffic of one square over time."""
    if resolution not in RESOLUTIONS:
        raise InputError(f"--resolution {resolution!r}: choose 10m or 1h")
    from twin_store.adapters.influx import InfluxClient

    settings = settings_of(ctx)
    with InfluxClient(settings.influx) as influx:
        rows = traffic_rows(influx, square, resolution, since, until, limit)
    if json_out:
        print_json(rows)
    else:
        print_table(f"traffic of square {square} ({resolution})", rows)


@app.command()
def twins(
    ctx: typer.Context,
    level: str | None = typer.Option(None, help="bs, cluster or global"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """The current state of every twin (its latest row, read from ``twin_current``)."""
    if level not in (None, "bs", "cluster", "global"):
        raise InputError(f"--level {level!r}: choose bs, cluster or global")
    from twin_store.adapters.influx import InfluxClient

    settings = settings_of(ctx)
    with InfluxClient(settings.influx) as influx:
        rows = twin_rows(influx, level)
    if json_out:
        print_json(rows)
    else:
        cols = ["level", "twin_id", "entity", "version", "epsilon", "loss", "n_updates", "n_members", "time"]
        print_table("twins", rows, [c for c in cols if rows and c in rows[0]])


def edge_rows(influx: InfluxClient, site: str | None, limit: int) -> list[dict[str, Any]]:
    from twin_store.adapters.twin_rows import iso_ms

    where = f" WHERE \"site\" = '{_quote(site)}'" if site else ""
    q = f'SELECT * FROM "edge_cost"{where} ORDER BY time DESC LIMIT {int(limit)}'
    rows = [r for s in influx.query(q) for r in s.rows()]
    for r in rows:
        r["time"] = iso_ms(r["time"])
    return rows


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


@app.command()
def edge(
    ctx: typer.Context,
    site: str | None = typer.Option(None, help="only this edge site"),
    limit: int = typer.Option(60, min=1, help="rows, newest first (one per site, kind and slot)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """The edge energy ledger (DITEN equations 13-15): energy and bytes per site, kind and slot."""
    from twin_store.adapters.influx import InfluxClient

    settings = settings_of(ctx)
    with InfluxClient(settings.influx) as influx:
        rows = edge_rows(influx, site, limit)
    if json_out:
        print_json(rows)
    else:
        print_table(f"edge ledger ({site or 'all sites'})", rows, ["time", "site", "kind", "energy", "bytes"])


POSITION_COLUMNS = [
    "time",
    "entity",
    "x",
    "y",
    "kf_x",
    "kf_y",
    "fix_x",
    "fix_y",
    "alpha",
    "twin",
    "twin_version",
]


def position_rows(
    influx: InfluxClient,
    entity: str | None,
    device: str | None,
    since: str | None,
    until: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The newest ``limit`` positions of the live windows (``position``), oldest first."""
    where = []
    if entity is not None:
        where.append(f"\"entity\" = '{_quote(entity)}'")
    if device is not None:
        where.append(f"\"device\" = '{_quote(device)}'")
    if since:
        where.append(f"time >= '{_time_literal(since, '--since')}'")
    if until:
        where.append(f"time < '{_time_literal(until, '--until')}'")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    q = f'SELECT * FROM "position"{clause} ORDER BY time DESC LIMIT {int(limit)}'
    # a window without a twin (or a fix) has no such fields: leave them out rather than null
    rows = [{k: v for k, v in r.items() if v is not None} for s in influx.query(q) for r in s.rows()]
    rows.reverse()
    for r in rows:
        r["end_ms"] = int(r["time"])  # the window's end: the walk's event time, ms
        r["time"] = datetime.fromtimestamp(r["end_ms"] / 1000, UTC).isoformat(timespec="milliseconds")
        r["time"] = r["time"].replace("+00:00", "Z")
    return rows


@app.command()
def positions(
    ctx: typer.Context,
    entity: str | None = typer.Option(None, "--entity", help="one device's walk: its key, DEVICE/WALK"),
    device: str | None = typer.Option(None, "--device", help="every walk of this device"),
    since: str | None = typer.Option(None, help="ISO time, inclusive (the walk's event time)"),
    until: str | None = typer.Option(None, help="ISO time, exclusive"),
    limit: int = typer.Option(1000, min=1, help="the newest N windows, printed oldest first"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Positions of the live multimodal windows: the positioning twin's (x, y), the range Kalman filter's
    (kf_x, kf_y) and the least-squares fix (fix_x, fix_y), at each window's end."""
    from twin_store.adapters.influx import InfluxClient

    settings = settings_of(ctx)
    with InfluxClient(settings.influx) as influx:
        rows = position_rows(influx, entity, device, since, until, limit)
    if json_out:
        print_json(rows)
    else:
        title = f"positions ({entity or device or 'all devices'})"
        print_table(title, rows, [c for c in POSITION_COLUMNS if any(c in r for r in rows)])


DECISIONS = ("accepted", "quarantined", "rejected")


def update_rows(
    influx: InfluxClient, decision: str | None, square: int | str | None, limit: int
) -> list[dict[str, Any]]:
    from twin_store.adapters.twin_rows import iso_ms

    where = []
    if decision:
        where.append(f"\"decision\" = '{decision}'")
    if square is not None:
        quoted = str(square).replace("\\", "\\\\").replace("'", "\\'")
        where.append(f"\"entity\" = '{quoted}'")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    q = f'SELECT * FROM "update"{clause} ORDER BY time DESC LIMIT {limit}'
    rows = [r for s in influx.query(q) for r in s.rows()]
    for r in rows:
        r["time"] = iso_ms(r["time"])
    return rows


@app.command()
def updates(
    ctx: typer.Context,
    decision: str | None = typer.Option(None, help="accepted, quarantined or rejected"),
    square: str | None = typer.Option(
        None, "--entity", "--square", help="only this BS (entity) or UTT client walk"
    ),
    limit: int = typer.Option(100, min=1, help="newest first"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """The store's decision on every local update: accepted, quarantined (screened out) or rejected."""
    if decision not in (None, *DECISIONS):
        raise InputError(f"--decision {decision!r}: choose {', '.join(DECISIONS)}")
    from twin_store.adapters.influx import InfluxClient

    settings = settings_of(ctx)
    with InfluxClient(settings.influx) as influx:
        rows = update_rows(influx, decision, square, limit)
    if json_out:
        print_json(rows)
    else:
        cols = ["time", "entity", "cluster", "decision", "score", "norm", "reason", "base_version", "seq"]
        print_table(f"updates ({decision or 'all'})", rows, [c for c in cols if rows and c in rows[0]])


def read_deadletters(settings: Any, limit: int, timeout_s: float = 3.0) -> list[DeadLetter]:
    from ingest.deadletter import DeadLetter
    from ingest.kafka import make_consumer
    from ingest.topics import Topics

    consumer = make_consumer(
        settings,
        Topics.from_settings(settings).deadletter,
        group_id=None,
        consumer_timeout_ms=int(timeout_s * 1000),
    )
    out: list[DeadLetter] = []
    try:
        for m in consumer:
            out.append(DeadLetter.from_kafka(m.value, m.headers))
            if len(out) >= limit:
                break
    finally:
        consumer.close()
    return out


@app.command()
def deadletters(
    ctx: typer.Context,
    limit: int = typer.Option(100, min=1),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Invalid input kept on the dead-letter topic: reason, source, position, original bytes."""
    rows = [d.as_dict() for d in read_deadletters(settings_of(ctx), limit)]
    if json_out:
        print_json(rows)
    else:
        print_table("dead letters", rows, ["stage", "source", "position", "reason", "original"])
