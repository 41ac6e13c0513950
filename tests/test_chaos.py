"""Fault tests on the real processes (issue 9): bad messages in every consumed topic, processes killed,
stopped, added, InfluxDB down; InfluxDB compared with the input file exactly.

The machinery is ``bench/chaos.py`` (the same scenarios at a larger size print JSON there); these tests run
it small: the real 26-square day, a replay of about 20 s, faults injected at 30 % of the rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import (
    DAY,
    HOURLY,
    SCENARIOS,
    FuzzConfig,
    ScenarioConfig,
    run_fuzz,
    run_scenario,
)
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from tests.conftest import REPO

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (DAY.exists() and HOURLY.exists()), reason=f"real data not found at {DAY.parent}"),
]

SMALL = ScenarioConfig(days=1, replay_s=20.0, fault_at=0.3, timeout_s=120.0, influx_down_s=15.0)


def consumed_topics(settings: NettwinSettings) -> set[str]:
    """Every topic ``nettwin worker``, ``nettwin store`` and ``nettwin htwin`` read."""
    t = Topics.from_settings(settings)
    return {
        t.telemetry_milan,  # worker: windows
        t.telemetry_sensors,  # worker: sensor-screen
        t.features_traffic,  # worker: bs-twins; store
        t.telemetry_ftm,  # worker: multimodal
        t.telemetry_imu,
        t.telemetry_vision_sim,
        t.sites_ftm,  # worker: followed by the multimodal windows
        t.twin_models,  # worker: followed by the BS agents; htwin: its state at start
        t.forecasts,  # store
        t.features_sensors,  # store
        t.telemetry_records,  # store: records of attached sources
        t.features_multimodal,  # store: the live windows' positions
        t.updates_local,  # htwin
    }


def failure(report: dict[str, Any]) -> str:
    logs = report.pop("logs", "")
    return json.dumps(report, indent=1) + "\n" + logs


def test_fuzz_of_every_consumed_topic_dead_letters_each_bad_message_and_the_day_arrives(
    services: NettwinSettings, tmp_path: Path
) -> None:
    """>= 10,000 bad messages (1,000 per topic, 13 topics) while worker, store and htwin run, then the real
    day."""
    report = run_fuzz(services, FuzzConfig(per_topic=1000), tmp_path)
    why = failure(dict(report))
    assert report["published"] >= 10_000
    # every consumed topic got its share (the report names them without the deployment's prefix)
    prefix = services.kafka.topic_prefix
    assert set(report["topics"]) == {t.removeprefix(prefix) for t in consumed_topics(services)}, why
    problems = []  # all of them at once: one run of a few minutes shows every finding
    if report["exited"]:
        problems.append(f"processes exited: {report['exited']}")
    if report["agent_crashes"]:  # a crashed Faust agent leaves its process alive
        problems.append(f"agents crashed: {report['agent_crashes']}")
    for topic, acc in report["topics"].items():
        if not acc["ok"]:
            problems.append(f"{topic}: {acc}")
    for measurement in ("traffic", "traffic_hourly"):
        rows = report[measurement]
        if rows["found"] != rows["expected"] or rows["extra"]:
            problems.append(f"{measurement} after the fuzz: {rows}")
    if report["htwin_sigterm_stop_s"] is None:
        problems.append("htwin did not stop within 10 s of SIGTERM")
    assert not problems, "\n".join(problems) + "\n" + why


FAULTS = [name for name in SCENARIOS if name != "baseline"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAULTS)
def test_fault_mid_replay_loses_and_duplicates_nothing(
    services: NettwinSettings, tmp_path: Path, name: str
) -> None:
    report = run_scenario(SCENARIOS[name], services, SMALL, tmp_path)
    why = failure(dict(report))
    assert report["fault_during_replay"], why  # the fault hit while the replay was still publishing
    assert report["exited"] == {} and report["agent_crashes"] == {}, why
    for measurement in ("traffic", "traffic_hourly"):
        rows = report[measurement]
        assert rows["duplicated"] == 0 and rows["wrong"] == 0 and rows["extra"] == 0, why
        assert rows["found"] == rows["expected"], why
    assert report["complete_s"] is not None and report["recover_s"] is not None, why
    if name == "worker_sigterm":
        assert report["sigterm_stop_s"] is not None, f"the worker ignored SIGTERM for 10 s\n{why}"
    if name == "influx_stopped":
        # the store holds at most two polls while InfluxDB is down: memory does not grow with the outage
        rss = report["store_rss_mb"]
        assert rss["max_down"] <= rss["at_stop"] + 50, why


@pytest.mark.slow
def test_bench_chaos_prints_one_json_line_per_run(services: NettwinSettings) -> None:
    args = ["--days", "1", "--replay-s", "10", "--scenarios", "baseline,worker_kill9", "--timeout-s", "120"]
    res = subprocess.run(
        [sys.executable, str(REPO / "bench" / "chaos.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout[-3000:]
    out = json.loads(lines[0])
    assert out["bench"] == "chaos" and set(out["scenarios"]) == {"baseline", "worker_kill9"}
    for name, rep in out["scenarios"].items():
        for measurement in ("traffic", "traffic_hourly"):
            assert set(rep[measurement]) >= {"expected", "found", "duplicated"}, name
        assert "complete_s" in rep and "exited" in rep and "logs" not in rep
    base, killed = out["scenarios"]["baseline"], out["scenarios"]["worker_kill9"]
    assert base["ok"], json.dumps(base)
    assert base["traffic"]["found"] == base["traffic"]["expected"] == 3683
    assert "recover_s" in killed and killed["fault_during_replay"]
