"""Figures of the benchmark reports (``--plot DIR``): each function takes the report a benchmark prints and
writes one PNG, returning its path. matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def psi_sweep(report: dict[str, Any], out_dir: Path) -> Path:
    """``nettwin bench vhtwin``: global syncs against test MSE for each psi (the H-twinning trade-off)."""
    rows = [r for r in report["psi_sweep"] if r.get("test", {}).get("mse") is not None]
    if not rows:
        raise ValueError("the report has no psi sweep")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    syncs = [r["global_syncs"] for r in rows]
    mse = [r["test"]["mse"] for r in rows]
    ax.plot(syncs, mse, "o-", color="#1e88e5")
    for r, x, y in zip(rows, syncs, mse, strict=True):
        ax.annotate(f"ψ={r['psi']:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    chosen = report.get("psi")
    if chosen is not None:
        for r, x, y in zip(rows, syncs, mse, strict=True):
            if r["psi"] == chosen:
                ax.plot([x], [y], "o", ms=11, mfc="none", mec="#e53935", label=f"chosen ψ={chosen:.3g}")
                ax.legend(fontsize=8)
    ax.set_xlabel("global twin synchronisations (merges)")
    ax.set_ylabel("test MSE (z-scored)")
    ax.set_title("H-twinning: ψ sweep, syncs against accuracy")
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, "psi_sweep.png")


def _heatmap(
    values: list[list[float | None]], rows: list[str], cols: list[str], title: str, label: str, fmt: str
) -> Figure:
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 3.2, 0.45 * len(rows) + 1.8))
    data = [[math.nan if v is None else float(v) for v in row] for row in values]
    im = ax.imshow(data, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=10)
    return fig


def attack_matrix(report: dict[str, Any], out_dir: Path) -> Path:
    """``nettwin bench poisoning``: the global twin's test MSE over the clean run, attack x defense."""
    runs = report["runs"]
    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    defenses = list(dict.fromkeys(r["defense"] for r in runs))
    cell = {(r["attack"], r["defense"]): r.get("test_mse_vs_clean") for r in runs}
    values = [[cell.get((a, d)) for d in defenses] for a in attacks]
    fig = _heatmap(
        values,
        attacks,
        defenses,
        f"global twin under attack ({report.get('malicious', 0):.0%} malicious BSs)",
        "test MSE / clean run",
        ".3f",
    )
    return _save(fig, out_dir, "attack_defense.png")


def utt_matrix(report: dict[str, Any], out_dir: Path) -> Path:
    """``nettwin bench utt``: test NMSE of each merge and split direction for each fuser."""
    nm = report["nmse_test"]
    directions: dict[str, dict[str, float]] = {}
    for op in ("merge", "split"):
        for direction, by_fuser in nm.get(op, {}).items():
            directions[f"{op} {direction}"] = by_fuser
    if not directions:
        raise ValueError("the report has no merge or split results")
    fusers = list(dict.fromkeys(f for by in directions.values() for f in by))
    values = [[by.get(f) for f in fusers] for by in directions.values()]
    fig = _heatmap(values, list(directions), fusers, "UTT: direction x fuser", "test NMSE", ".3f")
    return _save(fig, out_dir, "utt_direction_fuser.png")


def ingest_stages(report: dict[str, Any], out_dir: Path) -> Path:
    """``bench/ingest.py``: records/s of each stage running as a stream, beside the ceilings of the run."""
    stream = report.get("stream_max", {})
    bars = [
        ("parse", report.get("parse_records_per_s")),
        ("produce", stream.get("produce_records_per_s")),
        ("worker", stream.get("worker_records_per_s")),
        ("end to end", stream.get("end_to_end_records_per_s")),
        ("ceiling: Kafka consume", report.get("ceiling_kafka_consume_count_records_per_s")),
        ("ceiling: InfluxDB bare write", report.get("ceiling_influx_bare_write_points_per_s")),
    ]
    bars = [(k, v) for k, v in bars if v is not None]
    if not bars:
        raise ValueError("the report has no stage throughputs")
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    colours = ["#90a4ae" if k.startswith("ceiling") else "#1e88e5" for k, _ in bars]
    ax.barh([k for k, _ in bars], [v for _, v in bars], color=colours)
    for i, (_, v) in enumerate(bars):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("records/s (points/s for the InfluxDB ceiling)")
    ax.set_title("ingest stages, running concurrently (blue) and ceilings (grey)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out_dir, "ingest_stages.png")
