"""``nettwin bench utt`` end to end through the CLI on the real CarPark walks plus a synthetic second scene in the
data set's Laboratory layout (8 APs, two never ranged; ``bench.ftm_synthetic``), short training (``--quick``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.ftm_synthetic import write_scene
from ingest.settings import load_settings
from nettwin.cli import bench
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
    write_scene(tmp_path / "lab", seed=5)
    out = tmp_path / "pred.csv"
    res = CliRunner().invoke(
        bench.app,
        ["utt", "--data", str(data), "--data", str(tmp_path / "lab"), "--predictions", str(out), "--quick", "--json"],
        obj=load_settings(),
    )  # fmt: skip  # in process: one torch import (the error case below goes through the real CLI)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["federation"]["patience"] == 1  # --quick early-stops the matrix too (default: off)
    sp = report["split"]
    assert sp["test_walks"] == [
        "CarPark__6__613",
        "CarPark__6__624",
        "Laboratory__2__213",
        "Laboratory__2__223",
    ]
    assert sp["validation_walks"] == [
        "CarPark__5__524",
        "Laboratory__1__123",
    ]  # held-out walks, one per scene
    assert sp["fit_walks"] == ["CarPark__5__513", "Laboratory__1__113"]
    assert set(sp["train_walks"]).isdisjoint(sp["test_walks"]) and set(sp["fit_walks"]).isdisjoint(
        sp["validation_walks"]
    )
    for op in ("merge", "split"):  # every test NMSE has its validation NMSE beside it
        for direction, per in report["nmse_test"][op].items():
            assert set(report["nmse_val"][op][direction]) == set(per)
    assert set(report["nmse_val"]["direct"]) == set(report["nmse_test"]["direct"])
    assert "CarPark__7__broken.csv" in report["split"]["skipped_files"]
    assert set(report["nmse_test"]["merge"]["trajectory+tracking->position"]) == {"gating", "concatenation"}
    unified = report["nmse_test"]["unified"]["gating"]  # one model, every direction, beside the specific ones
    assert set(unified["nmse"]) == {
        "transfer position->trajectory",
        "merge trajectory+tracking->position",
        "merge position+tracking->position (FTM+IMU)",
        "split position->trajectory",
        "split position->tracking",
    }
    for direction, v in unified["nmse"].items():
        assert 0 < v["unified"] < 5 and 0 < v["function_specific"] < 5, direction
    fs = report["nmse_test"]["merge"]["position+tracking->position (FTM+IMU)"]["gating"]
    assert unified["nmse"]["merge position+tracking->position (FTM+IMU)"]["function_specific"] == fs
    assert report["training"]["unified gating"]["round_kept"] in (1, 2)
    assert (
        unified["train_s"]["unified"] > 0
        and unified["params"]["unified"] < unified["params"]["function_specific"]
    )
    spread = report["nmse_test"]["merge_seed_spread"]["position+tracking->position (FTM+IMU)"]
    assert spread["gating"]["seeds"] == [1, 1001] and spread["gating"]["test_nmse"][0] == fs
    assert spread["gating"]["std"] > 0 and spread["concatenation"]["mean"] > 0
    assert report["federation"]["defense"] == "mean"
    assert report["training"]["direct position"]["accepted"] == 2 * 2  # 2 fit walks x 2 rounds, all accepted
    per_scene = report["positioning"]["per_scene"]
    assert set(per_scene) == {"CarPark", "Laboratory"}
    for scene, v in per_scene.items():
        t = v["test_median_m"]
        assert 0 < t["kalman"] < t["trilateration"] < 10, scene  # the filter beats raw trilateration
        assert len(t["merged twin"]["values"]) == len(t["position twin"]["values"]) == 2  # two seeds
        assert len(v["val_median_m"]["merged twin"]["values"]) == 2
        assert all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in v["alpha"])
        assert isinstance(v["target_met"], bool)
    assert [r["seed"] for r in report["positioning"]["seeds"]] == [1, 1001]
    for r in report["positioning"]["seeds"]:
        # the shrink alpha is chosen on the validation walks and their sparser copies: there the shrunk twin
        # is never worse than the filter in any scene (alpha 0 is the filter itself)
        curve = r["shrink_val_median_m"]
        assert curve["0.0"].keys() == per_scene.keys()
        assert all(curve[str(r["alpha"])][s] <= curve["0.0"][s] + 1e-9 for s in per_scene)
    assert all(r["chosen_fuser"] in ("gating", "concatenation") for r in report["positioning"]["seeds"])
    assert report["positioning"]["filter"]["tuned_on"] == sp["train_walks"]
    pos = report["positioning_test_rows"]
    assert pos["trilateration"]["n"] == pos["merged"]["n"] == pos["kalman"]["n"] > 1000
    assert 0 < pos["trilateration"]["median_m"] < 10
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["walk", "t_ms", "true_x", "true_y", "pred_x", "pred_y", "method"]
    methods = {"trilateration", "kalman", "position", "merged", "merged_unshrunk", "matrix_merged"}
    assert {r[6] for r in rows[1:]} == methods
    assert {r[0] for r in rows[1:]} == set(sp["test_walks"])
    first = next(r for r in rows[1:] if r[0] == "CarPark__6__624")
    with open(RAW / "CarPark__6__624.csv", newline="") as fh:
        raw_times = {r[0] for r in list(csv.reader(fh))[1:]}
    assert first[1] in raw_times  # t_ms is the walk's own timestamp text
    assert len(rows) - 1 == 6 * pos["merged"]["n"]


def test_bench_utt_rejects_a_folder_without_walks(tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    proc = run_cli(load_settings(), "bench", "utt", "--data", str(tmp_path), "--rounds", "1")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("nettwin: error:") and "no FTM/IMU walk file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bench_utt_rejects_an_unknown_selection_rule(tmp_path: Path) -> None:
    proc = run_cli(load_settings(), "bench", "utt", "--data", str(tmp_path), "--selection", "blocks")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "nettwin: error: --selection 'blocks': one of walk, lowo"
