"""``nettwin attach`` and ``nettwin run`` as a user meets them without services: one-line errors."""

from __future__ import annotations

from pathlib import Path

from tests.test_cli import assert_one_line_error, nettwin


def test_attach_without_sources(tmp_path: Path) -> None:
    cfg = tmp_path / "empty.toml"
    cfg.write_text('[kafka]\ntopic_prefix = "x."\n')
    assert_one_line_error(nettwin("attach", "--config", str(cfg)), "no [[source]] tables")


def test_attach_missing_config(tmp_path: Path) -> None:
    assert_one_line_error(nettwin("attach", "--config", str(tmp_path / "nope.toml")), "not found")


def test_attach_unknown_type(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[source]]\nname = "x"\ntype = "carrier-pigeon"\n')
    assert_one_line_error(nettwin("attach", "--config", str(cfg)), "source")


def test_attach_kafka_unreachable(tmp_path: Path) -> None:
    cfg = tmp_path / "http.toml"
    cfg.write_text('[[source]]\nname = "h"\ntype = "http"\nlisten = "127.0.0.1:0"\n')
    res = nettwin("attach", "--config", str(cfg), env={"NETTWIN_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert_one_line_error(res, "Kafka unreachable")


def test_help_lists_attach_and_run() -> None:
    res = nettwin("--help")
    assert res.returncode == 0 and "attach" in res.stdout and "run" in res.stdout
