"""`nettwin demo`: the whole twin lifecycle on the embedded data, end to end through the real services."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.settings import NettwinSettings
from tests.conftest import run_cli
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.provision import deprovision

HOURLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan" / "hourly_150squares_62days.csv"
pytestmark = [pytest.mark.integration, pytest.mark.skipif(not HOURLY.exists(), reason="real data not found")]

KEYS = {
    "global_version",
    "cluster_versions",
    "global_syncs",
    "sync_offers",
    "forecasts",
    "mse",
    "persistence_mse",
    "rejected",
    "quarantined",
    "url",
}


def demo_settings(settings: NettwinSettings) -> NettwinSettings:
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"topic_prefix": settings.kafka.topic_prefix + "demo."}
            ),
            "influx": settings.influx.model_copy(update={"database": settings.influx.database + "_demo"}),
        }
    )


def test_default_demo_moves_the_twins_and_refuses_the_attack(isolated: NettwinSettings) -> None:
    demo = demo_settings(isolated)
    try:
        # 8 squares, 2 days streamed: a shorter run of the default demo (12 squares, 3 days)
        res = run_cli(
            isolated,
            *(
                "demo",
                "--no-ui",
                "--json",
                "--squares",
                "8",
                "--stream-hours",
                "48",
                "--recluster-every",
                "6",
            ),
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        report = json.loads(res.stdout)
        assert set(report) >= KEYS
        assert report["forecasts"] == 8 * 48
        # every BS updated once a day: 16 accepted updates, re-clustered every 6 of them
        assert report["updates"]["accepted"] == 16 and report["membership_epochs"] >= 3
        # versions moved: V-twinning leaves every twin at version 1
        assert report["global_version"] == 1 + report["global_syncs"] and report["global_syncs"] >= 1
        assert max(report["cluster_versions"].values()) > 1
        assert report["sync_offers"] >= report["global_syncs"]
        assert 0 < report["mse"] < report["persistence_mse"]
        fake, compromised = report["attack"]["fake_bs"], report["attack"]["compromised_bs"]
        assert fake["square"] == 90001 and fake["decision"] == "rejected"
        assert fake["reason"].startswith("unknown BS")
        assert compromised["decision"] == "quarantined" and compromised["reason"].startswith("outlier")
        # the refused lists hold the attack's updates (and any honest update the screen refused)
        assert [r["square"] for r in report["rejected"]] == [90001]
        assert any(r["square"] == compromised["square"] for r in report["quarantined"])

        with InfluxClient(demo.influx) as influx:
            glob = influx.query('SELECT last("version") FROM "twin" WHERE "level" = \'global\'')
            forecasts = influx.query('SELECT count("abs_error") FROM "forecast"')
        assert int(glob[0].values[0][1]) == report["global_version"]
        assert int(forecasts[0].values[0][1]) >= report["forecasts"]
    finally:
        deprovision(demo)
