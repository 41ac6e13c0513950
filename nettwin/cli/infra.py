"""``nettwin infra``: create the database and topics the pipeline needs (infra/up calls ``init``)."""

from __future__ import annotations

import typer

from nettwin.cli.common import console, print_json, settings_of

app = typer.Typer(
    rich_markup_mode=None, help="Initialise Kafka topics and the InfluxDB database.", no_args_is_help=True
)


@app.command()
def init(
    ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="machine-readable output")
) -> None:
    """Create every topic (explicit partition counts, compaction where state is kept) and the database."""
    from twin_store.adapters.provision import provision

    settings = settings_of(ctx)
    version, status = provision(settings)
    if json_out:
        print_json({"influxdb": version, "database": settings.influx.database, "topics": status})
        return
    console.print(f"influxdb {version}: database '{settings.influx.database}' ready")
    for name, state in status.items():
        console.print(f"topic {name}: {state}")
