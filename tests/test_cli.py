"""The CLI as a user meets it: one-line errors and non-zero exits for user mistakes, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_MILAN

DAY = SHARED_MILAN / "raw_2013-11-01_26squares.txt"


def nettwin(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NETTWIN_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "nettwin.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )


def assert_one_line_error(res: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert res.returncode == 1, (res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err
    assert err.count("\n") == 0, err
    assert err.startswith("nettwin: error: ")
    for fragment in fragments:
        assert fragment in err


def test_unreachable_kafka(tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("1\t1383260400000\t39\t1\t1\t1\t1\t1\n")
    res = nettwin("--bootstrap-servers", "127.0.0.1:1", "replay", "milan", str(f))
    assert_one_line_error(res, "Kafka unreachable", "127.0.0.1:1")


def test_unreachable_influx() -> None:
    res = nettwin("--influx-url", "http://127.0.0.1:1", "query", "twins")
    assert_one_line_error(res, "InfluxDB unreachable at http://127.0.0.1:1")


def test_missing_file() -> None:
    res = nettwin("replay", "milan", "/no/such/file.txt")
    assert_one_line_error(res, "/no/such/file.txt", "no such file")


def test_bad_setting_names_the_variable() -> None:
    res = nettwin("query", "twins", env={"NETTWIN_KAFKA__PARTITIONS": "zero"})
    assert_one_line_error(res, "kafka.partitions", "NETTWIN_KAFKA__PARTITIONS")


def test_bad_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("profile = [unclosed\n")
    res = nettwin("--config", str(cfg), "query", "twins")
    assert_one_line_error(res, str(cfg), "TOML")


def test_bad_time_option() -> None:
    res = nettwin(
        "--influx-url", "http://127.0.0.1:1", "query", "traffic", "--square", "1", "--since", "yesterday"
    )
    assert_one_line_error(res, "--since", "ISO")


def test_hourly_format_on_a_raw_file() -> None:
    if not DAY.exists():
        pytest.skip("real data not found")
    res = nettwin("--bootstrap-servers", "127.0.0.1:1", "replay", "milan", "--format", "hourly", str(DAY))
    # the file check and format check happen before any service is contacted
    assert_one_line_error(res)


def test_help_lists_the_commands() -> None:
    res = nettwin("--help")
    assert res.returncode == 0
    for cmd in ("worker", "store", "demo", "replay", "query", "data", "infra"):
        assert cmd in res.stdout
