"""The benchmarks keep working: each runs at a small size against the real services (not timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.settings import NettwinSettings
from twin_store.services.processes import settings_env

REPO = Path(__file__).resolve().parents[1]
MILAN = REPO.parent / "shared" / "data" / "milan"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not MILAN.is_dir(), reason="../shared/data/milan is absent"),
]


def _bench(services: NettwinSettings, *args: str) -> dict[str, object]:
    res = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=settings_env(services),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_ingest_bench_small(services: NettwinSettings) -> None:
    out = _bench(
        services, "bench/ingest.py", "--copies", "2", "--days", "1", "--repeat", "1", "--lag-hours", "1"
    )
    assert out["input"]["squares"] == 52  # type: ignore[index]
    assert out["stream_max"]["records"] == out["input"]["records"]  # type: ignore[index]
    assert out["ceiling_influx_bare_write_points_per_s"] > 0  # type: ignore[operator]
    # every record's traffic row plus the hourly rows, counted back from InfluxDB
    records, points = out["input"]["records"], out["stream_max"]["points_written"]  # type: ignore[index]
    assert records < points < 1.5 * records and out["end_to_end_points_vs_bare_write_same_points"] > 0  # type: ignore[operator]
    assert set(out["stream_max"]["cpu_seconds"]) >= {"worker", "store"}  # type: ignore[index]


def test_live_scale_bench_small(services: NettwinSettings) -> None:
    out = _bench(services, "-m", "bench.live_scale", "--bss", "20", "--live-hours", "3", "--hour-s", "2")
    assert out["forecasts"] == 20 * 3 and out["forecasts_missing"] == 0
    assert out["close_to_forecast_queryable_s"]["p99"] is not None  # type: ignore[index]
    assert out["baseline_offline_stacked_updates_per_s"] > 0  # type: ignore[operator]
    assert set(out["peak_rss_mb"]) == {"worker", "store", "htwin"}  # type: ignore[arg-type]


def test_store_lines_bench_small(services: NettwinSettings) -> None:
    out = _bench(services, "-m", "bench.store_lines", "--copies", "2", "--days", "1", "--repeat", "1")
    assert out["records"] == 2 * 3683  # the real 26-square day has 3,683 (square, interval) records
    assert 1 < out["points_per_record"] < 1.5  # type: ignore[operator]
    assert out["store_format_cpu_s"] > 0 and out["influxd_cpu_s"] >= 0  # type: ignore[operator]
