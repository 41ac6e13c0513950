"""``nettwin bench``: offline evaluations that print figures beside their baselines."""

from __future__ import annotations

import csv
from pathlib import Path

import typer

from nettwin.cli.common import console, print_json, print_table
from nettwin.errors import InputError

app = typer.Typer(help="Evaluate the twin methods offline (figures beside baselines).", no_args_is_help=True)


@app.command()
def vhtwin(
    data: Path = typer.Option(..., help="hourly traffic CSV (square_id,h0..hN)"),
    fmt: str = typer.Option("hourly", "--format", help="only 'hourly' is supported"),
    squares: int = typer.Option(50, min=2, help="squares (BSs) drawn from the file with --seed"),
    seed: int = typer.Option(1),
    clusters: int = typer.Option(4, min=0, help="DCS cluster count (Girvan-Newman); 0: Louvain decides"),
    psi: float | None = typer.Option(None, help="H-twinning threshold; default: chosen on validation"),
    predictions: Path | None = typer.Option(None, help="CSV of test-hour forecasts (original units)"),
    milan_dir: Path | None = typer.Option(
        None, help="folder with the grid and base stations (default: --data's)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """VH-Twin vs FedAvg, central LSTM, ridge, persistence and seasonal on a temporal split."""
    from twin_store.evaluation import VhTwinConfig, run

    if fmt != "hourly":
        raise InputError(f"--format {fmt!r}: the VH-Twin benchmark reads the hourly layout only")
    if not data.is_file():
        raise InputError(f"{data}: no such file")
    cfg = VhTwinConfig(squares=squares, seed=seed, clusters=clusters or None, psi=psi, milan_dir=milan_dir)
    with console.status("training and streaming (a few minutes on 2 cores)"):
        report, rows = run(data, cfg)
    if predictions is not None:
        with open(predictions, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["method", "square", "hour_index", "actual", "predicted"])
            writer.writerows(rows)
        report["predictions"] = str(predictions)
    if json_out:
        print_json(report)
        return
    table = [{"method": m, **v} for m, v in report["methods"].items()]
    print_table("test hours (z-scored)", table, ["method", "mse", "mae", "nrmse", "val_mse"])
    print_table(
        "psi sweep",
        [
            {
                "psi": r["psi"],
                "val_mse": r["val_mse"],
                "test_mse": r["test"]["mse"],
                "global_syncs": r["global_syncs"],
                "sync_reduction": r["sync_reduction_vs_psi0"],
                "mse_vs_psi0": r["test_mse_vs_psi0"],
            }
            for r in report["psi_sweep"]
        ],
    )
    console.print(f"wall time: {report['wall_s']}")
