"""The CLI as a user meets it: one-line errors and non-zero exits for user mistakes, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ingest.kafka import make_consumer, make_producer
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from tests.conftest import SHARED_MILAN, run_cli
from twin_store.federation.models_topic import TwinMessage

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


def test_bad_twins_table_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "twins.toml"
    cfg.write_text('[twins]\ntarget = "down"\ncadence = "30s"\n')
    res = nettwin("--config", str(cfg), "query", "twins")
    assert_one_line_error(res, "twins.cadence", "1m and 1d", str(cfg))


def test_vtwin_needs_a_file_or_influx() -> None:
    assert_one_line_error(nettwin("vtwin"), "--data FILE or --from-influx")
    res = nettwin("vtwin", "--from-influx", env={"NETTWIN_INFLUX__URL": "http://127.0.0.1:1"})
    assert_one_line_error(res, "[twins] has no target")


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
    assert_one_line_error(res, str(DAY), "not an hourly file", "--format raw")
    assert "Kafka" not in res.stderr


def test_help_lists_the_commands() -> None:
    res = nettwin("--help")
    assert res.returncode == 0
    for cmd in ("worker", "store", "demo", "replay", "query", "data", "infra"):
        assert cmd in res.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--bogus"], ["No such option: --bogus", "nettwin --help"]),
        (["replay", "milan"], ["Missing argument", "nettwin replay milan --help"]),
        (["query", "traffic", "--square", "x"], ["'--square'", "integer"]),
        (["replay", "milan", "--limit", "0", "x.txt"], ["'--limit'"]),
        (["no-such-command"], ["No such command 'no-such-command'"]),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(args: list[str], fragments: list[str]) -> None:
    # Click's own convention is a boxed multi-line message and exit 2; the README promises one line and 1
    assert_one_line_error(nettwin(*args), *fragments)


def test_a_bare_command_group_shows_its_help() -> None:
    res = nettwin("replay")
    assert res.returncode == 0 and "milan" in res.stdout and res.stderr == ""


@pytest.mark.parametrize("fmt_args", [["--format", "xyz"], ["--format", "raw"]])
def test_bench_and_replay_options_are_checked_before_kafka(tmp_path: Path, fmt_args: list[str]) -> None:
    f = tmp_path / "h.csv"
    f.write_text("square_id,h0\n1,2\n")
    res = nettwin("--bootstrap-servers", "127.0.0.1:1", "replay", "milan", *fmt_args, str(f))
    assert_one_line_error(res, "--format")
    assert "Kafka" not in res.stderr
    res = nettwin("--bootstrap-servers", "127.0.0.1:1", "bench", "vhtwin", "--data", str(f), *fmt_args)
    assert_one_line_error(res, "--format")


def test_a_directory_given_as_a_file_is_called_a_directory(tmp_path: Path) -> None:
    res = nettwin("--bootstrap-servers", "127.0.0.1:1", "replay", "milan", str(tmp_path))
    assert_one_line_error(res, str(tmp_path), "is a directory")
    assert "no such file" not in res.stderr


def test_a_bad_setting_in_the_config_file_names_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "prod.toml"
    cfg.write_text("[kafka]\npartitions = 0\n")
    res = nettwin("--config", str(cfg), "query", "twins")
    assert_one_line_error(res, "kafka.partitions", f"config file {cfg}")
    assert "NETTWIN_KAFKA__PARTITIONS" not in res.stderr
    # the environment wins over the file, and is named when it is the culprit
    res = nettwin("--config", str(cfg), "query", "twins", env={"NETTWIN_KAFKA__PARTITIONS": "x"})
    assert_one_line_error(res, "env NETTWIN_KAFKA__PARTITIONS")
    res = nettwin("--profile", "nope", "query", "twins")
    assert_one_line_error(res, "profile", "command line")


@pytest.mark.integration
def test_a_replay_into_a_prefix_never_set_up_is_refused(services: NettwinSettings, tmp_path: Path) -> None:
    f = tmp_path / "one.txt"
    f.write_text("1\t1383260400000\t39\t1\t1\t1\t1\t1\n")
    settings = services.model_copy(
        update={"kafka": services.kafka.model_copy(update={"topic_prefix": "never."})}
    )
    res = run_cli(settings, "replay", "milan", str(f))
    assert_one_line_error(res, "topic never.telemetry.milan does not exist", "nettwin infra init")
    probe = make_consumer(settings, group_id=None)
    try:
        assert not [t for t in probe.topics() if t.startswith("never.")], (
            "the check must not create the topic"
        )
    finally:
        probe.close()


@pytest.mark.integration
def test_attack_mpaf_without_cluster_twins_is_one_line(isolated: NettwinSettings) -> None:
    glob = TwinMessage("global", "0", 1, 8, np.zeros(10, np.float32), {"as_of": 3})
    producer = make_producer(isolated)
    try:
        producer.send(Topics.from_settings(isolated).twin_models, key=glob.key, value=glob.encode())
        producer.flush()
    finally:
        producer.close()
    res = run_cli(isolated, "attack", "mpaf", "--bs", "9001")
    assert_one_line_error(res, "no cluster twin")  # was a ZeroDivisionError traceback


def test_twin_position_user_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    assert_one_line_error(nettwin("twin", "position", "--data", "/no/such/folder"), "/no/such/folder")
    assert_one_line_error(
        nettwin("twin", "position", "--data", str(tmp_path), "--fusers", "nope"), "--fusers", "gating"
    )
