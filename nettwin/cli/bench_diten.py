"""``nettwin bench diten``: DITEN's association and gamma policies in the paper's simulated setting."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from ingest.errors import InputError
from nettwin.cli.common import console, print_json, print_table, settings_of


def _numbers(text: str, kind: type, option: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{option} {text!r}: give comma-separated numbers") from None


def diten(
    ctx: typer.Context,
    servers: str = typer.Option("9,11,13,15,17,19,21", help="server counts, comma-separated"),
    phi: str = typer.Option("0,0.2,0.4,0.6", help="label-skew distances phi, comma-separated"),
    slots: int = typer.Option(750, help="evaluation slots per (servers, phi)"),
    seed: int = typer.Option(1),
    quick: bool = typer.Option(False, "--quick", help="seconds: first server count and phi, 20 slots"),
    baseline_prior: float | None = typer.Option(
        None,
        min=0.0,
        help="distance prior of B1's and B4's actors (default: PPO's, 10); 0: plain actor-critic and DDPG "
        "as the paper has them",
    ),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
    plot_dir: Path | None = typer.Option(None, "--plot", help="write SVG charts into this folder"),
    save_agent: Path | None = typer.Option(
        None, help="with --milan: save the trained PPO association here (for edge.policy = learned)"
    ),
    milan: Path | None = typer.Option(
        None,
        help="instead: run nearest, balanced and PPO on Milan's BSs (hourly file, grid, OpenCellID in this "
        "folder) with the sites of [[edge.sites]] (default: six declared landmark sites)",
    ),
) -> None:
    """PPO association + optimal gamma against B1 (actor-critic), B2 (nearest), B3 (nearest, random
    gamma), B4 (DDPG) and balanced: objective (eq. 22), utility and energy per slot."""
    if milan is not None:
        _milan(ctx, milan, seed, quick, json_out, save_agent)
        return
    from bench.diten import DitenBench, check, plot, run
    from bench.diten import quick as make_quick

    cfg = DitenBench(
        servers=_numbers(servers, int, "--servers"),
        phis=_numbers(phi, float, "--phi"),
        slots=slots,
        seed=seed,
    )
    if baseline_prior is not None:
        cfg = replace(cfg, plan=replace(cfg.plan, baseline_prior=baseline_prior))
    try:
        check(cfg)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if quick:
        cfg = make_quick(cfg)
    with console.status("training PPO, actor-critic and DDPG, then every method per setting"):
        report = run(cfg)
    if plot_dir is not None:
        report["plots"] = [str(p) for p in plot(report, plot_dir)]
    if json_out:
        print_json(report)
        return
    cols = ["servers", "phi", "method", "objective", "utility", "cost", "migrations", "gamma"]
    print_table("DITEN: mean per slot (objective eq. 22, energy = sum of C_s)", report["results"], cols)
    rows = [{"baseline": b, **v, "paper": report["paper_ratios"][b]} for b, v in report["ratios"].items()]
    print_table("PPO's objective, 'times higher' than each baseline", rows)
    console.print(f"wall time: {report['wall_s']} s")


def _milan(
    ctx: typer.Context, folder: Path, seed: int, quick: bool, json_out: bool, save_agent: Path | None
) -> None:
    import torch

    from bench.diten_milan import MILAN_PLAN, MILAN_SITES, QUICK_MILAN_PLAN, run
    from twin_store.federation.edge.ledger import Site

    torch.set_num_threads(1)
    declared = settings_of(ctx).edge.sites
    sites = (
        tuple(Site(s.name, s.lat, s.lon, s.capacity, s.eps, s.energy) for s in declared)
        if declared
        else MILAN_SITES
    )
    with console.status("Milan: training PPO on the deployment, then nearest, balanced and PPO"):
        report = run(folder, sites, QUICK_MILAN_PLAN if quick else MILAN_PLAN, seed, save_agent)
    if json_out:
        print_json(report)
        return
    cols = ["method", "cost", "energy_vs_nearest", "sync", "compute", "migration", "migrations", "objective"]
    print_table("Milan: energy per day (eqs. 13-15) beside nearest", report["milan"], cols)
    console.print(f"setting: {report['setting']}; wall time {report['wall_s']} s")
