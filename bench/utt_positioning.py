"""Positioning on unseen walks, per scene: trilateration and a range Kalman filter beside the Position (FTM)
and merged (FTM + IMU) twins of :mod:`twin_store.federation.utt_positioning`, over several seeds.

The protocol (select fuser, rounds, ensemble and the shrink alpha on held-out walks; refit on every training
walk; test on unseen walks) is :class:`twin_store.federation.positioning_study.PositioningStudy`; here are the
per-scene summary over seeds (:func:`summarise`, the target check included) and the command line
(:func:`main`). The ablation refits the merged twin with one input group left out at a time (and without
AP-dropout augmentation) to show which inputs carry the gain.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from twin_store.federation.positioning_study import PositioningStudy, choose_shrink
from twin_store.federation.utt_data import Prepared, UttConfig
from twin_store.federation.utt_positioning import PositioningConfig
from twin_store.models.ftm_filter import FilterParams, kalman_track

__all__ = ["PositioningStudy", "choose_shrink", "filter_only", "main", "summarise"]

TARGET_GAIN = 0.2  # the merged twin's median at least 20% below trilateration's


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {
        "values": [round(float(v), 3) for v in arr],
        "mean": round(float(arr.mean()), 3),
        "std": round(float(arr.std(ddof=1)), 3) if len(arr) > 1 else 0.0,
    }


def summarise(study: PositioningStudy, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scene: baselines, the twins' medians over seeds (mean, std), gains and the target check."""
    base_test = study.baselines(study.prep.test)
    base_val = study.baselines(study.prep.val) if study.prep.val else {}
    per_scene: dict[str, Any] = {}
    for scene in study.scenes:
        tri, kf = base_test[scene]["trilateration"], base_test[scene]["kalman"]
        merged = _stats([r["test_median_m"]["merged"][scene] for r in runs])
        position = _stats([r["test_median_m"]["position"][scene] for r in runs])
        unshrunk = _stats([r["test_median_m"]["merged (unshrunk, alpha 1)"][scene] for r in runs])
        gain = 1 - merged["mean"] / tri if tri > 0 else math.nan
        per_scene[scene] = {
            "test_median_m": {
                "trilateration": tri,
                "kalman": kf,
                "position twin": position,
                "merged twin": merged,
                "merged twin, unshrunk (alpha 1)": unshrunk,
            },
            "val_median_m": {
                "trilateration": base_val.get(scene, {}).get("trilateration"),
                "kalman": base_val.get(scene, {}).get("kalman"),
                **{
                    label: _stats([r["val_median_m"][key][scene] for r in runs])
                    if all(scene in r["val_median_m"].get(key, {}) for r in runs)
                    else None
                    for label, key in (
                        ("merged twin", "merged (shrunk)"),
                        ("merged twin, unshrunk", "merged"),
                    )
                },
            },
            "alpha": [r["alpha"] for r in runs],
            "merged_gain_vs_trilateration": round(gain, 3),
            "merged_gain_vs_kalman": round(1 - merged["mean"] / kf, 3) if kf > 0 else math.nan,
            "below_kalman_every_seed": all(r["test_median_m"]["merged"][scene] < kf for r in runs),
            "target_met": bool(
                gain >= TARGET_GAIN and all(r["test_median_m"]["merged"][scene] < kf for r in runs)
            ),
        }
    return {
        "protocol": "select fuser, rounds and the shrink alpha on held-out walks (alpha also on "
        f"{study.pcfg.val_copies} sparser copies of each), refit on all training walks, test on unseen walks; "
        f"merged = filter + alpha * the twin's correction (mean over {study.pcfg.members} seed member(s))",
        "filter": {"params": study.filter.as_dict(), "tuned_on": study.prep.train, "grid": study.filter_grid},
        "inputs": {"ftm": list(study.pcfg.groups), "augment": study.pcfg.augment},
        "per_scene": per_scene,
        "seeds": runs,
    }


def filter_only(prep: Prepared, params: FilterParams) -> dict[str, np.ndarray]:
    """The filter's track of every test walk (for the predictions CSV)."""
    return {n: kalman_track(prep.walks[n], prep.geometry[prep.walks[n].scene], params) for n in prep.test}


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.utt_positioning DATA [DATA ...] [--seeds 3] [--ablation]``: the positioning study alone
    (no UTT matrix), one JSON document on stdout."""
    import argparse
    import json
    from pathlib import Path

    import torch

    from twin_store.federation.utt_data import prepare

    ap = argparse.ArgumentParser(prog="python -m bench.utt_positioning", description=main.__doc__)
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3, help="seeds (seed, seed + 1000, ...)")
    ap.add_argument("--rounds", type=int, default=PositioningConfig.rounds)
    ap.add_argument("--augment", type=int, default=PositioningConfig.augment)
    ap.add_argument("--selection", choices=("walk", "lowo"), default="walk")
    ap.add_argument("--patience", type=int, default=PositioningConfig.patience)
    ap.add_argument(
        "--members", type=int, default=PositioningConfig.members, help="seed-ensemble members per seed"
    )
    ap.add_argument(
        "--val-copies",
        type=int,
        default=PositioningConfig.val_copies,
        help="AP-dropout copies of each validation walk the shrink alpha is also chosen on",
    )
    ap.add_argument("--ablation", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = UttConfig(seed=args.seed)
    study = PositioningStudy(
        prepare(args.data, cfg),
        cfg,
        PositioningConfig(
            rounds=args.rounds,
            augment=args.augment,
            selection=args.selection,
            patience=args.patience,
            members=args.members,
            val_copies=args.val_copies,
        ),
    )
    runs = [study.run_seed(args.seed + 1000 * k) for k in range(args.seeds)]
    out = summarise(study, runs)
    if args.ablation:
        out["ablation"] = study.ablation(args.seed, runs[0]["chosen_fuser"])
    out["train_s"] = study.train_s
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
