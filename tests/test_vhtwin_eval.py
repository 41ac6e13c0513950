"""The VH-Twin evaluation protocol on small real data: every method reported, no leakage from test hours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.vhtwin import run
from twin_store.federation.plan import TEST_HOURS, VAL_HOURS, VhTwinConfig
from twin_store.models.forecaster import FitConfig

MILAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan"
HOURLY = MILAN / "hourly_150squares_62days.csv"
pytestmark = pytest.mark.skipif(not HOURLY.exists(), reason=f"real data not found at {HOURLY}")

SMALL = VhTwinConfig(
    squares=6,
    seed=3,
    clusters=2,
    hidden=8,
    v_rounds=2,
    local=FitConfig(3, 1e-2, 32),
    stream=FitConfig(2, 1e-2, 32),
    central_steps=10,
    milan_dir=MILAN,
)


def subset(dest: Path, corrupt_test: bool) -> Path:
    """The first 8 squares of the real file; optionally with absurd values in the test hours."""
    lines = HOURLY.read_text().splitlines()
    header, rows = lines[0], lines[1:9]
    if corrupt_test:
        out_rows = []
        for r in rows:
            fields = r.split(",")
            hours = len(fields) - 1
            fields[1 + hours - TEST_HOURS :] = ["999"] * TEST_HOURS
            out_rows.append(",".join(fields))
        rows = out_rows
    path = dest / ("corrupt.csv" if corrupt_test else "clean.csv")
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.slow
def test_reports_every_method_and_writes_test_predictions(tmp_path: Path) -> None:
    report, rows = run(subset(tmp_path, False), SMALL)
    methods = {"vhtwin", "vhtwin_cluster", "fedavg", "central", "ridge", "persistence", "seasonal"}
    assert set(report["methods"]) == methods
    for m in report["methods"].values():
        assert m["mse"] > 0 and m["mae"] > 0 and m["nrmse"] > 0
    assert report["split"] == {"train_hours": 1488 - 480, "val_hours": VAL_HOURS, "test_hours": TEST_HOURS}
    assert len(rows) == len(methods) * 6 * TEST_HOURS
    assert {r[2] for r in rows} == set(range(1488 - TEST_HOURS, 1488))
    # persistence in original units is exactly the previous hour's value
    actual = {(r[1], r[2]): r[3] for r in rows if r[0] == "persistence"}
    for _, sq, h, _, pred in (r for r in rows if r[0] == "persistence" and r[2] > 1488 - TEST_HOURS):
        np.testing.assert_allclose(pred, actual[(sq, h - 1)], rtol=1e-9)
    sweep = report["psi_sweep"]
    assert sweep[0]["psi"] == 0.0 and sweep[0]["sync_reduction_vs_psi0"] == 0.0
    syncs = [r["global_syncs"] for r in sweep]
    assert syncs == sorted(syncs, reverse=True)  # a higher threshold never syncs more
    assert report["methods"]["vhtwin"]["psi"] in [r["psi"] for r in sweep]


@pytest.mark.slow
def test_test_hours_cannot_leak_into_training_or_model_choice(tmp_path: Path) -> None:
    clean, _ = run(subset(tmp_path, False), SMALL)
    corrupt, _ = run(subset(tmp_path, True), SMALL)
    for method, figures in clean["methods"].items():
        assert corrupt["methods"][method]["val_mse"] == figures["val_mse"], method
    assert corrupt["methods"]["vhtwin"]["psi"] == clean["methods"]["vhtwin"]["psi"]
    assert [r["val_mse"] for r in corrupt["psi_sweep"]] == [r["val_mse"] for r in clean["psi_sweep"]]
    # while the test figures do see the corrupted hours
    assert corrupt["methods"]["persistence"]["mse"] != clean["methods"]["persistence"]["mse"]


def test_cli_reports_a_missing_data_file_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "pred.csv"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "nettwin.cli.main",
            "bench",
            "vhtwin",
            "--data",
            str(tmp_path / "nope.csv"),
            "--predictions",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        res.returncode == 1
        and res.stderr.strip().startswith("nettwin: error:")
        and "no such file" in res.stderr
    )
    assert not out.exists()
