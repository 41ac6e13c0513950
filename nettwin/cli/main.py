"""Entry point: global options build the settings; user mistakes become one line and a non-zero exit.

Start-up time matters (every command pays it): the command modules import heavy libraries (numpy, pandas,
torch, kafka, requests, faust) inside the commands that use them, never at module level.
tests/test_cli_startup.py holds this."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from ingest.errors import NettwinError
from nettwin.cli import (
    attach,
    bench,
    data,
    demo,
    edge,
    infra,
    query,
    replay,
    security,
    services,
    twin,
    ui,
    vhtwin,
)
from nettwin.cli import run as run_cmd

# plain help text in every command group (rich_markup_mode=None): Typer's rich help pulls in rich's
# markdown, traceback and pretty-printing modules, about 40% of `nettwin --help`'s CPU time (issue 16)
app = typer.Typer(
    rich_markup_mode=None,
    name="nettwin",
    help="Keep network digital twins current while telemetry flows (Kafka -> Faust -> twin store -> InfluxDB).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's plain help fits commands' summaries to the terminal, but never wider than 80 columns by default
    context_settings={"max_content_width": 120},
)
app.add_typer(infra.app, name="infra")
app.add_typer(replay.app, name="replay")
app.add_typer(data.app, name="data")
app.add_typer(query.app, name="query")
app.add_typer(bench.app, name="bench")
app.add_typer(twin.app, name="twin")
services.register(app)
demo.register(app)
ui.register(app)
vhtwin.register(app)
security.register(app)
attach.register(app)
run_cmd.register(app)
edge.register(app)


@app.callback()
def main(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", help="TOML settings file (else $NETTWIN_CONFIG)"),
    bootstrap_servers: str | None = typer.Option(None, help="Kafka bootstrap servers, comma-separated"),
    topic_prefix: str | None = typer.Option(None, help="prefix of every topic name"),
    influx_url: str | None = typer.Option(None, help="InfluxDB base URL (v1 HTTP API)"),
    database: str | None = typer.Option(None, help="InfluxDB database"),
    profile: str | None = typer.Option(None, help="local (short group timeouts) or external"),
    keys: Path | None = typer.Option(None, "--keys", help="BS key registry: sign and verify local updates"),
) -> None:
    overrides: dict[str, Any] = {}
    if profile is not None:
        overrides["profile"] = profile
    kafka = {
        k: v for k, v in {"bootstrap_servers": bootstrap_servers, "topic_prefix": topic_prefix}.items() if v
    }
    influx = {k: v for k, v in {"url": influx_url, "database": database}.items() if v}
    if kafka:
        overrides["kafka"] = kafka
    if influx:
        overrides["influx"] = influx
    if keys is not None:
        overrides["security"] = {"keys_file": keys}
    from ingest.settings import load_settings  # pydantic: only when a command runs, not for --help

    ctx.obj = load_settings(overrides, config_file=config)


def _click_errors(name: str) -> tuple[type[Exception], ...]:
    """Click's exception class ``name`` (UsageError, ClickException, Abort): Typer >= 0.20 raises those of its
    own vendored copy (typer._click), older Typer those of click; found through public classes, both kinds."""
    found = [c for c in typer.BadParameter.__mro__ if c.__name__ == name and issubclass(c, Exception)]
    click = sys.modules.get("click")  # only if Typer itself loaded it: importing it costs start-up time
    if click is not None and hasattr(click.exceptions, name):
        found.append(getattr(click.exceptions, name))
    return tuple(found)


def fail(message: str) -> NoReturn:
    """Every user mistake ends the same way: one line on stderr and exit code 1."""
    print(f"nettwin: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(1)


def run(args: list[str] | None = None) -> None:
    usage_errors, click_errors = _click_errors("UsageError"), _click_errors("ClickException")
    aborts: tuple[type[BaseException], ...] = (KeyboardInterrupt, typer.Abort, *_click_errors("Abort"))
    try:
        # standalone_mode=False: Click hands us its usage errors instead of printing a boxed message, exit 2
        code = app(args=args, prog_name="nettwin", standalone_mode=False)
    except usage_errors as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(getattr(exc, "format_message", exc.__str__)())  # a bare group: its help, not an error
            sys.exit(0)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        fail(getattr(exc, "format_message", exc.__str__)() + hint)
    except click_errors as exc:
        fail(getattr(exc, "format_message", exc.__str__)())
    except NettwinError as exc:
        fail(str(exc))
    except aborts:
        print("nettwin: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
