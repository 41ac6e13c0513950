"""``--plot DIR``: each benchmark's figure from a report shaped as the benchmark prints it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_psi_sweep(tmp_path: Path) -> None:
    report = {
        "psi": 0.01,
        "psi_sweep": [
            {"psi": p, "global_syncs": s, "test": {"mse": m}}
            for p, s, m in ((0.0, 1000, 0.233), (0.01, 420, 0.234), (0.1, 40, 0.26))
        ],
    }
    path = plots.psi_sweep(report, tmp_path / "new")
    assert path == tmp_path / "new" / "psi_sweep.png" and path.read_bytes()[:8] == PNG


def test_attack_matrix(tmp_path: Path) -> None:
    runs = [
        {"attack": a, "defense": d, "test_mse_vs_clean": v}
        for a, d, v in (("none", "mean", 1.0), ("signflip", "mean", 17.2), ("signflip", "default", 1.004))
    ]
    path = plots.attack_matrix({"runs": runs, "malicious": 0.2}, tmp_path)
    assert path.name == "attack_defense.png" and path.read_bytes()[:8] == PNG


def test_utt_matrix(tmp_path: Path) -> None:
    nm = {
        "merge": {
            "FTM+IMU->position": {"gating": 0.1, "concat": 0.12},
            "FTM+vision->position": {"gating": 0.2},
        },
        "split": {"position->trajectory": {"gating": 0.3, "concat": 0.31}},
    }
    path = plots.utt_matrix({"nmse_test": nm}, tmp_path)
    assert path.name == "utt_direction_fuser.png" and path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no merge or split"):
        plots.utt_matrix({"nmse_test": {}}, tmp_path)


def test_ingest_stages(tmp_path: Path) -> None:
    report = {
        "parse_records_per_s": 900_000,
        "stream_max": {
            "produce_records_per_s": 300_000,
            "worker_records_per_s": 120_000,
            "end_to_end_records_per_s": 90_000,
        },
        "ceiling_kafka_consume_count_records_per_s": 800_000,
        "ceiling_influx_bare_write_points_per_s": 150_000,
    }
    path = plots.ingest_stages(report, tmp_path)
    assert path.name == "ingest_stages.png" and path.read_bytes()[:8] == PNG
