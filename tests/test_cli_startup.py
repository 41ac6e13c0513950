"""CLI start-up: every `nettwin` call pays for what `nettwin.cli.main` imports, so heavy libraries are imported
inside the commands that use them (issue 16). A module-list check, not a timing assertion: timings on a shared
machine are noise, a module that is imported is a fact."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# seconds each on this machine when they were imported at start-up (torch alone ~1.5 s)
HEAVY = ("torch", "faust", "pandas", "numpy", "kafka", "requests", "scipy", "river", "networkx", "aiokafka")


def imported_modules(*args: str, full: bool = False) -> set[str]:
    """Top-level names (``full``: dotted names) of every module ``python -X importtime ARGS`` imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETTWIN_")}
    res = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=60, env=env
    )
    names = set()
    for line in res.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name if full else name.split(".")[0])
    assert "nettwin" in names, res.stderr[-2000:]
    return names


def test_importing_the_cli_pulls_in_no_heavy_library() -> None:
    loaded = imported_modules("-c", "import nettwin.cli.main")
    assert sorted(loaded & set(HEAVY)) == []
    assert "pydantic" not in loaded, "settings are built when a command runs, not at import"


def test_help_pulls_in_no_heavy_library() -> None:
    loaded = imported_modules("-m", "nettwin.cli.main", "--help")
    assert sorted(loaded & set(HEAVY)) == []


def test_help_is_plain_text_without_richs_help_renderer() -> None:
    """Typer's rich help imports rich's markdown, traceback and pretty-printing (attrs too): 40% of the CPU time
    of `nettwin --help` (measured 0.24 s against 0.15 s)."""
    loaded = imported_modules("-m", "nettwin.cli.main", "--help", full=True)
    loaded |= imported_modules("-m", "nettwin.cli.main", "query", "--help", full=True)
    assert sorted(loaded & {"typer.rich_utils", "rich.markdown", "rich.traceback"}) == []


@pytest.mark.parametrize("args", [["query", "twins"], ["query", "traffic", "--square", "1"]])
def test_a_query_loads_only_settings_and_http(args: list[str]) -> None:
    # InfluxDB on port 1 is unreachable: the command fails after it imported everything it needs
    loaded = imported_modules("-m", "nettwin.cli.main", "--influx-url", "http://127.0.0.1:1", *args)
    assert sorted(loaded & {"torch", "faust", "pandas", "kafka", "scipy", "river", "networkx"}) == []
