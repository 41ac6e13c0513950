"""``nettwin bench utt``: UTT task twins on real FTM/IMU walks (+ SIMULATED vision), walk-level split."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import typer

from ingest.errors import InputError
from nettwin.cli.bench_poisoning import write_figure
from nettwin.cli.common import console, print_json, print_table

PREDICTION_COLUMNS = ["walk", "t_ms", "true_x", "true_y", "pred_x", "pred_y", "method"]


def utt(
    data: list[Path] = typer.Option(
        ...,
        help="folder of walk CSVs (laid out like ftm_imu/raw), per-scene site files; repeat for more scenes",
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
    position_rounds: int = typer.Option(
        10,
        min=1,
        help="federated rounds of the positioning twins in selection (the refit trains the rounds kept)",
    ),
    position_fusers: str = typer.Option(
        "gating,concatenation,average",
        help="fusers the merged positioning twin is chosen from (on validation)",
    ),
    augment: int = typer.Option(
        2, min=0, help="AP-dropout copies of every training walk (positioning twins)"
    ),
    selection: str = typer.Option(
        "walk",
        help="positioning twins' selection: walk (the held-out walk per scene) or lowo (leave-one-walk-out)",
    ),
    patience: int = typer.Option(
        4,
        min=0,
        help="early stopping of the positioning twins: a twin stops after this many rounds without a better "
        "validation loss (0: off)",
    ),
    val_copies: int = typer.Option(
        2,
        min=0,
        help="sparser AP-dropout copies of each validation walk the shrink alpha is also chosen on "
        "(what an unseen, sparser walk looks like; 0: the validation walks alone)",
    ),
    members: int = typer.Option(
        1,
        min=1,
        help="seed ensemble of the positioning twins: each trained with this many seeds, corrections averaged",
    ),
    matrix_patience: int = typer.Option(
        0,
        min=0,
        help="early stopping of the UTT matrix's twins (0: off, every round; they generalise badly to the "
        "validation walks, so stopping there raised their test NMSE)",
    ),
    ablation: bool = typer.Option(
        False, "--ablation", help="also refit the merged positioning twin with each input group left out"
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="a smoke run for tests: 2 rounds, fusers gating+concatenation, one unified model, 2 seeds, "
        "1 AP-dropout copy, patience 1 for both, 1 seed-ensemble member (overrides those options)",
    ),
    plot: Path | None = typer.Option(None, "--plot", help="also write the figure (PNG) into this folder"),
    json_out: bool = typer.Option(False, "--json", help="print the report as one JSON line"),
) -> None:
    """Direct, transfer, merge and split twins (every fuser) vs trilateration, constant velocity, mean."""
    from bench.utt import run
    from twin_store.federation.screening import DEFENSES
    from twin_store.federation.utt_data import UttConfig
    from twin_store.federation.utt_positioning import PositioningConfig
    from twin_store.models.utt import FUSERS

    for d in data:
        if not d.exists():
            raise InputError(f"{d}: no such file or folder")
    if quick:
        rounds, position_rounds, seed_repeats, augment, patience, matrix_patience = 2, 2, 2, 1, 1, 1
        members = 1
        fusers = position_fusers = "gating,concatenation"
        unified_fusers = "gating"
    chosen = tuple(f.strip() for f in fusers.split(",") if f.strip())
    bad = [f for f in chosen if f not in FUSERS]
    if bad or not chosen:
        raise InputError(f"--fusers: {', '.join(bad) or 'empty'}; choose from {', '.join(FUSERS)}")
    pos_fusers = tuple(f.strip() for f in position_fusers.split(",") if f.strip())
    if not pos_fusers or [f for f in pos_fusers if f not in FUSERS]:
        raise InputError(f"--position-fusers: {position_fusers}; choose from {', '.join(FUSERS)}")
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
        ablation=ablation,
        patience=matrix_patience,
    )
    if selection not in ("walk", "lowo"):
        raise InputError(f"--selection {selection!r}: one of walk, lowo")
    pcfg = PositioningConfig(
        rounds=position_rounds,
        fusers=pos_fusers,
        augment=augment,
        selection=selection,
        patience=patience,
        members=members,
        val_copies=val_copies,
    )
    with console.status("training the twins (a few minutes on 2 cores)"):
        report, rows = run(list(data), cfg, pcfg)
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
    console.print(f"validation: {sp['validation']}; fit walks: {', '.join(sp['fit_walks'])}")
    console.print(f"windows: {sp['windows']}")
    for scene, site in report["sites"].items():
        print_table(
            f"AP positions, scene {scene} ({site['source']})",
            [{"ap": a, **v} for a, v in site["aps"].items()],
        )
    nm, nv = report["nmse_test"], report["nmse_val"]
    rows_nm = [
        {"twin": f"direct {t}", "fuser": "-", "val nmse": nv["direct"][t], "test nmse": v}
        for t, v in nm["direct"].items()
    ]
    rows_nm += [
        {"twin": f"mean predictor {t}", "fuser": "-", "val nmse": "-", "test nmse": v}
        for t, v in nm["mean predictor"].items()
    ]
    tr_key = "transfer position->trajectory"
    rows_nm.append({"twin": tr_key, "fuser": "-", "val nmse": nv[tr_key], "test nmse": nm[tr_key]})
    for op in ("merge", "split"):
        for direction, per in nm[op].items():
            rows_nm += [
                {"twin": f"{op} {direction}", "fuser": f, "val nmse": nv[op][direction][f], "test nmse": v}
                for f, v in per.items()
            ]
    print_table(
        "normalised MSE, validation (held-out walks) beside test (unseen walks); vision is SIMULATED",
        rows_nm,
        ["twin", "fuser", "val nmse", "test nmse"],
    )
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
    _print_positioning(report)
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


def _spread(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    return f"{v['mean']:.3f} ± {v['std']:.3f}"


def _print_positioning(report: dict[str, Any]) -> None:
    pz = report["positioning"]
    console.print(f"positioning protocol: {pz['protocol']}; range Kalman filter: {pz['filter']['params']}")
    rows = []
    for scene, v in pz["per_scene"].items():
        t, va = v["test_median_m"], v["val_median_m"]
        rows.append(
            {
                "scene": scene,
                "trilateration": t["trilateration"],
                "kalman": t["kalman"],
                "position twin": _spread(t["position twin"]),
                "merged twin": _spread(t["merged twin"]),
                "merged (val walks)": _spread(va["merged twin"]),
                "gain vs trilat.": v["merged_gain_vs_trilateration"],
                "gain vs kalman": v["merged_gain_vs_kalman"],
                "target met": v["target_met"],
            }
        )
    print_table("median positioning error (m) on unseen walks, per scene; twins: mean ± std over seeds", rows)
    print_table(
        "per seed and scene: median error (m), validation walks (selection twins) beside test walks (refit)",
        [
            {
                "seed": r["seed"],
                "scene": scene,
                "deployed": f"{r['deployed']} ({r['chosen_fuser']})",
                "alpha": r["alpha"],
                "val: kalman": v["val_median_m"]["kalman"],
                "val: merged": r["val_median_m"].get("merged (shrunk)", {}).get(scene, "-"),
                "test: kalman": v["test_median_m"]["kalman"],
                "test: merged": r["test_median_m"]["merged"][scene],
                "test: alpha 1": r["test_median_m"]["merged (unshrunk, alpha 1)"][scene],
            }
            for r in pz["seeds"]
            for scene, v in pz["per_scene"].items()
        ],
    )
    print_table(
        "per seed: fuser chosen on validation, validation NMSE (selection) beside test NMSE (refit)",
        [
            {
                "seed": r["seed"],
                "chosen": r["chosen_fuser"],
                "val nmse": r["val_nmse"],
                "test nmse": r["test_nmse_refit"],
            }
            for r in pz["seeds"]
        ],
    )
    if "ablation" in pz:
        print_table(
            "ablation: the twins refit without one input group (median m per scene, first seed)",
            [{"variant": k, **{n: str(x) for n, x in v.items()}} for k, v in pz["ablation"].items()],
        )
    pos = report["positioning_test_rows"]
    print_table(
        "positioning error on every test row (first seed; matrix_merged = the UTT matrix's absolute twin)",
        [{"method": m, **v} for m, v in pos.items() if isinstance(v, dict)],
    )
