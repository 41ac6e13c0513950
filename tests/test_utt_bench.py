"""``nettwin bench utt`` end to end through the CLI on the real CarPark walks (short training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from nettwin.settings import load_settings
from tests.conftest import run_cli

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "ftm_imu" / "raw"
FILES = [
    "CarPark__5__513",
    "CarPark__5__524",
    "CarPark__6__613",
    "CarPark__6__624",
    "CarPark__AP_idx_CarPark",
]


@pytest.mark.slow
@pytest.mark.skipif(not RAW.is_dir(), reason="../shared/data/ftm_imu/raw is absent")
def test_bench_utt_cli_writes_positioning_csv_for_unseen_walks(tmp_path: Path) -> None:
    data = tmp_path / "raw"
    data.mkdir()
    for f in FILES:
        (data / f"{f}.csv").symlink_to(RAW / f"{f}.csv")
    (data / "CarPark__7__broken.csv").write_text("hello,world\n1,2\n")  # not a walk: skipped, reported
    out = tmp_path / "pred.csv"
    proc = run_cli(
        load_settings(),
        "bench", "utt", "--data", str(data), "--predictions", str(out),
        "--rounds", "2", "--fusers", "gating,concatenation", "--json",
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["split"]["test_walks"] == ["CarPark__6__613", "CarPark__6__624"]
    assert set(report["split"]["train_walks"]).isdisjoint(report["split"]["test_walks"])
    assert "CarPark__7__broken.csv" in report["split"]["skipped_files"]
    assert set(report["nmse_test"]["merge"]["trajectory+tracking->position"]) == {"gating", "concatenation"}
    pos = report["positioning_test_rows"]
    assert pos["trilateration"]["n"] == pos["merged"]["n"] == pos["position"]["n"] > 1000
    assert 0 < pos["trilateration"]["median_m"] < 10
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["walk", "t_ms", "true_x", "true_y", "pred_x", "pred_y", "method"]
    assert {r[6] for r in rows[1:]} == {"trilateration", "position", "merged"}
    assert {r[0] for r in rows[1:]} == {"CarPark__6__613", "CarPark__6__624"}
    first = next(r for r in rows[1:] if r[0] == "CarPark__6__624")
    with open(RAW / "CarPark__6__624.csv", newline="") as fh:
        raw_times = {r[0] for r in list(csv.reader(fh))[1:]}
    assert first[1] in raw_times  # t_ms is the walk's own timestamp text
    assert len(rows) - 1 == 3 * pos["merged"]["n"]


def test_bench_utt_rejects_a_folder_without_walks(tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    proc = run_cli(load_settings(), "bench", "utt", "--data", str(tmp_path), "--rounds", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("nettwin: error:") and "no FTM/IMU walk file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
