"""``nettwin bench poisoning``: VH-Twin's stream under attack, per defense, beside the clean run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import typer

from ingest.errors import InputError
from nettwin.cli.common import console, print_json, print_table


def check_hourly(data: Path, fmt: str, bench: str) -> None:
    if fmt != "hourly":
        raise InputError(f"--format {fmt!r}: the {bench} benchmark reads the hourly layout only")
    if data.is_dir():
        raise InputError(f"{data}: is a directory, expected the hourly CSV")
    if not data.is_file():
        raise InputError(f"{data}: no such file")


def write_figure(report: dict[str, Any], out_dir: Path | None, figure: str) -> None:
    """``--plot DIR``: the benchmark's figure (``bench/plots.py``), its path added to the report."""
    if out_dir is None:
        return
    from bench import plots

    try:
        path = getattr(plots, figure)(report, out_dir)
    except OSError as exc:
        raise InputError(f"--plot {out_dir}: cannot write ({exc.strerror})") from exc
    report.setdefault("figures", []).append(str(path))
    console.print(f"figure: {path}")


def save_report(
    report: dict[str, Any],
    rows: list[tuple[str, int, int, float, float]],
    predictions: Path | None,
    json_out: bool,
) -> bool:
    """Write the test-hour forecasts CSV if asked; with --json print the report. True: nothing more to print."""
    if predictions is not None:
        with open(predictions, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["method", "square", "hour_index", "actual", "predicted"])
            writer.writerows(rows)
        report["predictions"] = str(predictions)
    if json_out:
        print_json(report)
    return json_out


def poisoning(
    data: Path = typer.Option(..., help="hourly traffic CSV (square_id,h0..hN)"),
    fmt: str = typer.Option("hourly", "--format", help="only 'hourly' is supported"),
    squares: int = typer.Option(50, min=2, help="squares (BSs) drawn from the file with --seed"),
    seed: int = typer.Option(1),
    attack: str = typer.Option(
        "none", help="none, mpaf, tpi, signflip, scale, telemetry; comma-separated for several"
    ),
    malicious: float = typer.Option(0.2, help="share of BSs that are fake or compromised"),
    defense: str = typer.Option(
        "default",
        help="mean, median, trimmed, krum, clip, tid, temporal (statistics only), auth (keys + mean), "
        "default (keys + temporal + telemetry screening); comma-separated for several",
    ),
    psi: float = typer.Option(0.01, min=0.0, help="H-twinning threshold of the global twin"),
    predictions: Path | None = typer.Option(None, help="CSV of the first pair's test-hour forecasts"),
    milan_dir: Path | None = typer.Option(None, help="grid and base stations (default: --data's folder)"),
    plot: Path | None = typer.Option(None, "--plot", help="also write the figure (PNG) into this folder"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Global twin's test MSE under attack for every attack x defense, beside the clean run (FedAvg)."""
    check_hourly(data, fmt, "poisoning")  # before importing torch: a wrong option answers at once
    from bench.poisoning import PoisonConfig, check, run
    from twin_store.federation.plan import VhTwinConfig

    cfg = PoisonConfig(
        base=VhTwinConfig(squares=squares, seed=seed, milan_dir=milan_dir),
        attacks=tuple(a.strip() for a in attack.split(",")),
        defenses=tuple(d.strip() for d in defense.split(",")),
        malicious=malicious,
        psi=psi,
    )
    try:
        check(cfg)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    with console.status("V-twinning, then one stream per attack x defense"):
        report, rows = run(data, cfg)
    write_figure(report, plot, "attack_matrix")
    if save_report(report, rows, predictions, json_out):
        return
    table = [
        {
            "attack": r["attack"],
            "defense": r["defense"],
            "test_mse": r["test"]["mse"],
            "vs_clean": r["test_mse_vs_clean"],
            "val_mse": r["val_mse"],
            "honest_false_q": r["honest_false_quarantine"],
            "decisions": " ".join(f"{k}={v}" for k, v in r["decisions"].items()),
            "seconds": r["wall_s"],
        }
        for r in report["runs"]
    ]
    print_table(
        f"global twin under attack ({report['malicious']:.0%} malicious BSs), test MSE z-scored", table
    )
    console.print(f"clean run (no attack, FedAvg): test MSE {report['clean_test_mse']}")
