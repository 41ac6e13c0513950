"""``nettwin bench``: offline evaluations that print figures beside their baselines."""

from __future__ import annotations

from pathlib import Path

import typer

from nettwin.cli.bench_diten import diten
from nettwin.cli.bench_poisoning import check_hourly, poisoning, save_report, write_figure
from nettwin.cli.bench_utt import utt
from nettwin.cli.common import console, print_json, print_table

app = typer.Typer(
    rich_markup_mode=None,
    help="Evaluate the twin methods offline (figures beside baselines).",
    no_args_is_help=True,
)
app.command("utt")(utt)
app.command("poisoning")(poisoning)
app.command("diten")(diten)


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
    plot: Path | None = typer.Option(None, "--plot", help="also write the figure (PNG) into this folder"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """VH-Twin vs FedAvg, central LSTM, ridge, persistence and seasonal on a temporal split."""
    check_hourly(data, fmt, "VH-Twin")  # before importing torch: a wrong option answers at once
    from bench.vhtwin import run
    from twin_store.federation.plan import VhTwinConfig

    cfg = VhTwinConfig(squares=squares, seed=seed, clusters=clusters or None, psi=psi, milan_dir=milan_dir)
    with console.status("training and streaming (a few minutes on 2 cores)"):
        report, rows = run(data, cfg)
    write_figure(report, plot, "psi_sweep")
    if save_report(report, rows, predictions, json_out):
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


@app.command()
def twins(
    data: Path = typer.Option(
        ..., help="canonical records: CSV (entity,time,<metrics>), JSON lines, or a PM-file dir"
    ),
    target: str = typer.Option(
        ..., help="the metric to twin and forecast (e.g. activity, temperature, internet)"
    ),
    cadence: str = typer.Option(..., help="the twins' step, 1m .. 1d, dividing a day (e.g. 2m, 30m, 1h)"),
    sites: Path | None = typer.Option(None, help="sites CSV: entity,lat,lon (or x,y metres)[,...] for DCS"),
    aggregate: str = typer.Option("mean", help="sum | mean | last | max of the raw values inside a step"),
    horizon: int = typer.Option(1, min=1, help="forecast this many steps ahead"),
    seed: int = typer.Option(1),
    clusters: int = typer.Option(4, min=0, help="DCS cluster count; 0: Louvain decides"),
    psi: float | None = typer.Option(None, help="H-twinning threshold; default: chosen on validation"),
    predictions: Path | None = typer.Option(None, help="CSV of test-step forecasts (original units)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """VH-Twin on any canonical-record data: test MSE (z-scores) per entity and pooled beside persistence,
    seasonal and ridge on the same inputs, plus the stream time to the first forecast."""
    import csv

    from ingest.errors import InputError
    from twin_store.federation.series import AGGREGATES, parse_cadence

    try:
        step_ms = parse_cadence(cadence)
    except ValueError as exc:
        raise InputError(f"--cadence: {exc}") from exc
    if aggregate not in AGGREGATES:
        raise InputError(f"--aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    if not data.exists():
        raise InputError(f"--data {data}: no such file or directory")
    if sites is not None and not sites.is_file():
        raise InputError(f"--sites {sites}: no such file")
    from bench.twins import TwinsConfig, run

    cfg = TwinsConfig(
        target=target,
        step_ms=step_ms,
        aggregate=aggregate,
        horizon=horizon,
        sites=sites,
        seed=seed,
        clusters=clusters or None,
        psi=psi,
    )
    with console.status("twinning and streaming"):
        report, rows = run(data, cfg)
    if predictions is not None:
        with open(predictions, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["method", "entity", "time", "actual", "predicted"])
            writer.writerows(rows)
        report["predictions"] = str(predictions)
    if json_out:
        print_json(report)
        return
    d = report["data"]
    console.print(
        f"{d['entities']} entities, {d['steps']} steps of {d['cadence']} ({d['aggregate']}), lags {report['plan']['lags']}"
    )
    table = [
        {"method": m, **{k: v.get(k) for k in ("mse", "mae", "nrmse", "val_mse")}}
        for m, v in report["methods"].items()
    ]
    print_table("test steps (z-scored, pooled)", table, ["method", "mse", "mae", "nrmse", "val_mse"])
    console.print(f"targets: {report['targets']}")
    console.print(f"first forecast: {report['first_forecast']}")
    console.print(f"wall time: {report['wall_s']}")


@app.command()
def nab(
    data: Path = typer.Option(..., help="folder of NAB CSVs (timestamp,value) and labels_windows.json"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Online telemetry screens (hst, robust) beside the rolling z-score baseline on labelled NAB windows."""
    from bench.nab import METHODS, run

    report = run(data)
    if json_out:
        print_json(report)
        return
    cols = ["file", "method", "tp", "fn", "fp", "precision", "recall", "early", "nab", "flagged", "seconds"]
    rows = [
        {
            "file": f["file"].removesuffix(".csv"),
            "method": m + (" (baseline)" if m == report["baseline"] else ""),
            **f[m],
        }
        for f in report["files"]
        for m in METHODS
    ]
    rows += [
        {"file": "overall", "method": m + (" (baseline)" if m == report["baseline"] else ""), **v}
        for m, v in report["overall"].items()
    ]
    from rich.console import Console
    from rich.table import Table

    table = Table(title="NAB windows (probation: first 15% of each file not scored)")
    for c in cols:
        table.add_column(c, no_wrap=c in ("file", "method"))
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in cols))
    Console(width=max(Console().width, 150)).print(table)
    console.print(
        "early: first detection's position in the window (0 start, 1 end); nab: standard profile, "
        f"0 = no detections, 100 = perfect; wall time: {report['wall_s']} s"
    )
