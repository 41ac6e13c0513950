"""``nettwin bench utt``: UTT task twins on real FTM/IMU walks (+ SIMULATED vision), walk-level split."""

from __future__ import annotations

import csv
from pathlib import Path

import typer

from ingest.errors import InputError
from nettwin.cli.bench_poisoning import write_figure
from nettwin.cli.common import console, print_json, print_table

PREDICTION_COLUMNS = ["walk", "t_ms", "true_x", "true_y", "pred_x", "pred_y", "method"]


def utt(
    data: Path = typer.Option(
        ..., help="folder of walk CSVs (laid out like ftm_imu/raw), per-scene site files"
    ),
    predictions: Path | None = typer.Option(
        None, help="CSV of test-walk positions: " + ",".join(PREDICTION_COLUMNS)
    ),
    seed: int = typer.Option(1, help="seeds the simulated vision, the weights and the minibatches"),
    rounds: int = typer.Option(20, min=1, help="federated rounds per twin (the best on validation is kept)"),
    fusers: str = typer.Option(
        ",".join(
            ["addition", "average", "concatenation", "multiplication", "max", "min", "gating", "attention"]
        ),
        help="comma-separated fusers",
    ),
    test_walks: str = typer.Option(
        "", help="comma-separated test walks (default: last walk of each scene+device)"
    ),
    threads: int = typer.Option(1, min=1, max=8, help="torch threads"),
    defense: str = typer.Option(
        "mean", help="twin_store.federation.screening defense of every federated aggregation (mean = FedAvg)"
    ),
    unified_fusers: str = typer.Option(
        "gating,concatenation",
        help="comma-separated fusers of the unified model (one model each; empty: none)",
    ),
    seed_repeats: int = typer.Option(
        3, min=1, help="train the gating and concatenation merges with this many seeds (mean ± std)"
    ),
    plot: Path | None = typer.Option(None, "--plot", help="also write the figure (PNG) into this folder"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Direct, transfer, merge and split twins (every fuser) vs trilateration, constant velocity, mean."""
    from bench.utt import run
    from twin_store.federation.screening import DEFENSES
    from twin_store.federation.utt_data import UttConfig
    from twin_store.models.utt import FUSERS

    if not data.exists():
        raise InputError(f"{data}: no such file or folder")
    chosen = tuple(f.strip() for f in fusers.split(",") if f.strip())
    bad = [f for f in chosen if f not in FUSERS]
    if bad or not chosen:
        raise InputError(f"--fusers: {', '.join(bad) or 'empty'}; choose from {', '.join(FUSERS)}")
    unified = tuple(f.strip() for f in unified_fusers.split(",") if f.strip())
    if [f for f in unified if f not in FUSERS]:
        raise InputError(f"--unified-fusers: {unified_fusers}; choose from {', '.join(FUSERS)}")
    if defense not in DEFENSES:
        raise InputError(f"--defense {defense!r}: one of {', '.join(DEFENSES)}")
    cfg = UttConfig(
        seed=seed,
        rounds=rounds,
        fusers=chosen,
        test_walks=tuple(t.strip() for t in test_walks.split(",") if t.strip()),
        threads=threads,
        defense=defense,
        unified_fusers=unified,
        seed_repeats=seed_repeats,
    )
    with console.status("training the twins (a few minutes on 2 cores)"):
        report, rows = run([data], cfg)
    if predictions is not None:
        try:
            with open(predictions, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(PREDICTION_COLUMNS)
                writer.writerows(rows)
        except OSError as exc:
            raise InputError(f"{predictions}: cannot write ({exc.strerror})") from exc
        report["predictions"] = str(predictions)
    write_figure(report, plot, "utt_matrix")
    if json_out:
        print_json(report)
        return
    sp = report["split"]
    console.print(
        f"train walks: {', '.join(sp['train_walks'])}; test walks (unseen): {', '.join(sp['test_walks'])}"
    )
    console.print(f"validation: {sp['validation']}; windows: {sp['windows']}")
    for scene, site in report["sites"].items():
        print_table(
            f"AP positions, scene {scene} ({site['source']})",
            [{"ap": a, **v} for a, v in site["aps"].items()],
        )
    nm = report["nmse_test"]
    rows_nm = [{"twin": f"direct {t}", "fuser": "-", "nmse": v} for t, v in nm["direct"].items()]
    rows_nm += [
        {"twin": f"mean predictor {t}", "fuser": "-", "nmse": v} for t, v in nm["mean predictor"].items()
    ]
    rows_nm.append(
        {"twin": "transfer position->trajectory", "fuser": "-", "nmse": nm["transfer position->trajectory"]}
    )
    for op in ("merge", "split"):
        for direction, per in nm[op].items():
            rows_nm += [{"twin": f"{op} {direction}", "fuser": f, "nmse": v} for f, v in per.items()]
    print_table("normalised MSE on the test walks (vision is SIMULATED)", rows_nm, ["twin", "fuser", "nmse"])
    for fz, u in nm["unified"].items():
        print_table(
            f"unified model ({fz}; loss = transfer + merge + split) beside the function-specific twins, NMSE",
            [{"direction": d, **v} for d, v in u["nmse"].items()],
        )
        console.print(f"training time (s): {u['train_s']}; parameters: {u['params']}")
    for direction, per in nm["merge_seed_spread"].items():
        print_table(
            f"merge {direction}: NMSE over seeds (fuser/decoder init + minibatch order)",
            [{"fuser": f, "seeds": v["seeds"], "nmse": v["test_nmse"], "mean": v["mean"], "std": v["std"]}
             for f, v in per.items()],
        )  # fmt: skip
    pos = report["positioning_test_rows"]
    print_table(
        f"positioning error on the test walks (merged fuser: {report['merged_fuser']['chosen_on_validation']}, chosen on validation)",
        [{"method": m, **v} for m, v in pos.items() if isinstance(v, dict)],
    )
    console.print(
        f"median gain vs trilateration: merged {pos['merged_vs_trilateration_median_gain']}, "
        f"position {pos['position_vs_trilateration_median_gain']}"
    )
    print_table(
        "trajectory 1 s ahead", [{"method": m, **v} for m, v in report["trajectory_1s_ahead"].items()]
    )
    print_table(
        "tracking (IMU motion/orientation) generation, NMSE",
        [{"twin": k, "nmse": v} for k, v in report["tracking_generation_nmse"].items()],
    )
    print_table(
        "training (federated) and communication", [{"twin": k, **v} for k, v in report["training"].items()]
    )
    console.print(f"targets: {report['targets']}")
    console.print(f"timings (s): {report['timings']}; wall time: {report['wall_s']} s")
