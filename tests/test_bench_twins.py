"""``nettwin bench twins`` on any canonical-record data: the three real shapes, small and late-joining
deployments, no leakage, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.twins import TwinsConfig, run
from tests.conftest import SHARED_MILAN
from tests.test_cli import assert_one_line_error, nettwin
from twin_store.federation.series import parse_cadence

INTEL = SHARED_MILAN.parent / "sensors" / "intel_lab"
HOURLY = SHARED_MILAN / "hourly_150squares_62days.csv"
RAW_DAY = SHARED_MILAN / "raw_2013-11-01_26squares.txt"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000


def synthetic(
    path: Path, entities: int, days: float, step_min: int, late: dict[int, int] | None = None, seed: int = 0
) -> None:
    """JSON lines: a daily cycle per entity plus AR(1) noise, one record per step with jitter inside the step,
    every 50th step missing, a duplicate now and then. ``late``: entity -> first step (a late clock)."""
    rng = np.random.default_rng(seed)
    steps = int(days * 1440 / step_min)
    per_day = 1440 // step_min
    with path.open("w") as fh:
        for e in range(entities):
            phase, level, noise = rng.uniform(0, 6.28), rng.uniform(5, 50), 0.0
            for k in range((late or {}).get(e, 0), steps):
                noise = 0.8 * noise + rng.normal(0, 1)
                if k % 50 == 7:
                    continue
                t = T0 + k * step_min * 60_000 + int(rng.integers(0, step_min * 60_000))
                v = level + 10 * math.sin(2 * math.pi * k / per_day + phase) + 3 * noise
                rec = {"entity": f"node-{e}", "time": t, "metrics": {"load": v}}
                fh.write(json.dumps(rec) + "\n")
                if k % 97 == 0:
                    fh.write(json.dumps(rec) + "\n")


def check_targets(report: dict) -> None:
    m = report["methods"]
    assert m["twin"]["mse"] < m["persistence"]["mse"], m
    assert m["twin"]["mse"] <= 1.02 * m["ridge"]["mse"], m


@pytest.mark.slow
@pytest.mark.parametrize("entities", [1, 2, 3])
def test_small_deployments(tmp_path: Path, entities: int) -> None:
    data = tmp_path / "small.jsonl"
    synthetic(data, entities, 6, 30)
    report, rows = run(data, TwinsConfig(target="load", step_ms=parse_cadence("30m")))
    assert report["data"]["entities"] == entities and report["clusters"]["n"] <= entities
    assert set(report["per_entity_mse"]) == {f"node-{e}" for e in range(entities)}
    assert report["methods"]["twin"]["mse"] < report["methods"]["persistence"]["mse"]
    assert rows and {r[0] for r in rows} == {"twin", "twin_cluster", "ridge", "persistence", "seasonal"}


@pytest.mark.slow
def test_a_week_of_two_minute_data_gets_twins(tmp_path: Path) -> None:
    data = tmp_path / "week.jsonl"
    synthetic(data, 4, 7, 2)
    report, _ = run(data, TwinsConfig(target="load", step_ms=parse_cadence("2m")))
    assert (
        report["plan"]["season_steps"] == 720 and len(report["plan"]["lags"]) > 5
    )  # same step, earlier days
    assert report["methods"]["seasonal"]["mse"] is not None
    assert report["first_forecast"]["stream_time_s"] < 7 * 86_400
    check_targets(report)


@pytest.mark.slow
def test_late_joiners_are_counted_assigned_and_scored(tmp_path: Path) -> None:
    data = tmp_path / "late.jsonl"
    synthetic(data, 4, 6, 30, late={3: 200})  # node-3 starts 200 steps in: after the training steps
    sites = tmp_path / "sites.csv"
    sites.write_text("entity,lat,lon\nnode-0,45.0,9.0\nnode-1,45.01,9.0\nnode-2,45.5,9.5\nnode-3,45.51,9.5\n")
    cfg = TwinsConfig(target="load", step_ms=parse_cadence("30m"), sites=sites)
    report, _ = run(data, cfg)
    assert report["late_joiners"] == {"n": 1, "assigned_by": {"node-3": "position"}}
    assert (
        report["per_entity_mse"]["node-3"]["twin"] is not None
    )  # forecast and scored after its first stretch
    no_sites, _ = run(data, TwinsConfig(target="load", step_ms=parse_cadence("30m")))
    assert no_sites["late_joiners"]["assigned_by"] == {"node-3": "profile"}
    assert no_sites["clusters"]["dcs_inputs"] == "profiles"


@pytest.mark.slow
def test_no_leakage_from_test_steps(tmp_path: Path) -> None:
    """Corrupting every record of the test steps changes no validation figure and no choice made on them."""
    clean = tmp_path / "clean.jsonl"
    synthetic(clean, 3, 5, 30)
    lines = clean.read_text().splitlines()
    times = sorted({json.loads(x)["time"] for x in lines})
    steps = (times[-1] - T0) // 1_800_000 + 1
    test_from = T0 + (steps - min(240, steps // 6)) * 1_800_000
    dirty = tmp_path / "dirty.jsonl"
    with dirty.open("w") as fh:
        for x in lines:
            rec = json.loads(x)
            if rec["time"] >= test_from:
                rec["metrics"]["load"] = 1e6
            fh.write(json.dumps(rec) + "\n")
    cfg = TwinsConfig(target="load", step_ms=parse_cadence("30m"))
    a, _ = run(clean, cfg)
    b, _ = run(dirty, cfg)
    for m in ("twin", "twin_cluster", "ridge", "persistence", "seasonal"):
        assert a["methods"][m]["val_mse"] == b["methods"][m]["val_mse"], m
    assert a["methods"]["twin"]["psi"] == b["methods"]["twin"]["psi"]
    assert (
        a["vtwinning"] == b["vtwinning"] and a["methods"]["ridge"]["alpha"] == b["methods"]["ridge"]["alpha"]
    )
    assert a["methods"]["twin"]["mse"] != b["methods"]["twin"]["mse"]  # the corruption did reach the test


# ---- the three real shapes


@pytest.mark.slow
@pytest.mark.skipif(not HOURLY.exists(), reason="needs ../shared/data/milan")
def test_milan_hourly(tmp_path: Path) -> None:
    records, sites = tmp_path / "milan.csv", tmp_path / "sites.csv"
    res = nettwin(
        "data", "to-records", "milan-hourly", str(HOURLY), "--squares", "20", "--seed", "1",
        "--out", str(records), "--sites-out", str(sites),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    cfg = TwinsConfig(target="activity", step_ms=parse_cadence("1h"), sites=sites)
    report, _ = run(records, cfg)
    assert report["plan"]["lags"] == [120, 96, 72, 48, 24, 5, 4, 3, 2, 1]  # Milan keeps today's inputs
    assert report["split"] == {"train_steps": 1008, "val_steps": 240, "test_steps": 240}
    assert report["clusters"]["dcs_inputs"] == "positions+profiles"
    check_targets(report)


@pytest.mark.slow
@pytest.mark.skipif(not RAW_DAY.exists(), reason="needs ../shared/data/milan")
def test_milan_day_as_30_minute_pm_files(tmp_path: Path) -> None:
    pm, sites, preds = tmp_path / "pm", tmp_path / "sites.csv", tmp_path / "preds.csv"
    assert (
        nettwin("data", "milan-to-pm", str(RAW_DAY), "--out", str(pm), "--granularity", "30m").returncode == 0
    )
    res = nettwin(
        "data", "milan-sites", str(RAW_DAY), "--out", str(sites),
        "--entity-format", "ManagedElement=milan,Square={square}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = nettwin(
        "bench", "twins", "--data", str(pm), "--target", "internet", "--cadence", "30m",
        "--aggregate", "sum", "--sites", str(sites), "--json", "--predictions", str(preds),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["data"]["entities"] == 26 and report["data"]["steps"] == 48
    # one day of 30-minute steps covers no season: close inputs only, no seasonal baseline, stated
    assert report["plan"]["lags"] == [5, 4, 3, 2, 1] and report["methods"]["seasonal"]["mse"] is None
    assert "season" in report["methods"]["seasonal"]["reason"]
    check_targets(report)
    header = preds.read_text().splitlines()[0]
    assert header == "method,entity,time,actual,predicted"


@pytest.mark.slow
@pytest.mark.skipif(not INTEL.exists(), reason="needs ../shared/data/sensors/intel_lab")
def test_intel_lab_motes(tmp_path: Path) -> None:
    records, sites = tmp_path / "intel.csv", tmp_path / "sites.csv"
    files = [str(INTEL / "intelTemperatureTrain.csv"), str(INTEL / "intelTemperatureTest.csv")]
    res = nettwin("data", "to-records", "intel", *files, "--out", str(records), "--sites-out", str(sites))
    assert res.returncode == 0, res.stderr
    report, _ = run(records, TwinsConfig(target="temperature", step_ms=parse_cadence("30m"), sites=sites))
    assert report["plan"]["lags"] == [96, 48, 5, 4, 3, 2, 1]
    assert report["clusters"]["dcs_inputs"] == "positions+profiles"
    check_targets(report)


def test_option_mistakes_are_one_line(tmp_path: Path) -> None:
    """Checked before the heavy imports: the answer is immediate."""
    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"entity": "a", "time": T0, "metrics": {"x": 1.0}}) + "\n")
    base = ["bench", "twins", "--data", str(data), "--target", "x"]
    assert_one_line_error(nettwin(*base, "--cadence", "7m"), "--cadence", "divide a day")
    missing = ["bench", "twins", "--data", str(tmp_path / "none.csv"), "--target", "x", "--cadence", "1h"]
    assert_one_line_error(nettwin(*missing), "no such file")


@pytest.mark.slow
def test_data_mistakes_are_one_line(tmp_path: Path) -> None:
    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"entity": "a", "time": T0, "metrics": {"x": 1.0}}) + "\n")
    base = ["bench", "twins", "--data", str(data), "--target", "x"]
    assert_one_line_error(nettwin(*base, "--cadence", "1h", "--aggregate", "median"), "--aggregate")
    assert_one_line_error(nettwin(*base[:-1], "y", "--cadence", "1h"), "--target 'y'", "x")
    assert_one_line_error(nettwin(*base, "--cadence", "1h"), "too short")
