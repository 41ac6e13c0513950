"""``nettwin attach`` and ``nettwin run`` as a user meets them without services: one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


def test_attach_port_taken(tmp_path: Path) -> None:
    """A listen address in use is one line, not a traceback (needs the local broker: skipped without it)."""
    import socket

    from ingest.kafka import ensure_kafka_reachable
    from ingest.settings import load_settings

    try:
        ensure_kafka_reachable(load_settings(), timeout_s=1)
    except Exception:
        pytest.skip("no Kafka broker (infra/up)")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = tmp_path / "http.toml"
        cfg.write_text(f'[[source]]\nname = "h"\ntype = "http"\nlisten = "127.0.0.1:{port}"\n')
        env = {k: v for k, v in os.environ.items() if k.startswith("NETTWIN_")}
        assert_one_line_error(nettwin("attach", "--config", str(cfg), env=env), "cannot listen on")
