"""Positioning on unseen walks, per scene: trilateration and a range Kalman filter beside the Position (FTM)
and merged (FTM + IMU) twins of :mod:`twin_store.federation.utt_positioning`, over several seeds.

Protocol per seed (nothing is ever chosen on a test walk):

1. **select**: fit the Position twin (FTM features), the tracking twin (IMU) and one merged twin per fuser on
   the fitting walks; early-stop each on the held-out validation walks; choose the fuser with the lowest
   validation NMSE;
2. **refit**: train the three twins again on every training walk (fitting + validation walks) for the rounds
   each kept in step 1, with the chosen fuser;
3. **test**: position every row of the test walks (the window ending at that row, its last step), per scene.

The Kalman filter's constants are tuned on the training walks (grid search, :func:`tune_filter`). The
ablation refits the merged twin with one input group left out at a time (and without AP-dropout augmentation)
to show which inputs carry the gain.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import numpy as np

from twin_store.federation.utt_data import Prepared, UttConfig
from twin_store.federation.utt_positioning import (
    PositionData,
    PositioningConfig,
    Tracks,
    eval_ends,
    tracks_of,
)
from twin_store.federation.utt_training import FedConfig, fed_train
from twin_store.models.ftm_filter import FilterParams, kalman_track, tune_filter
from twin_store.models.utt import TaskTwin, merge, new_twin

TARGET_GAIN = 0.2  # the merged twin's median at least 20% below trilateration's


def _median(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.median(np.linalg.norm(pred - true, axis=1)))


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {
        "values": [round(float(v), 3) for v in arr],
        "mean": round(float(arr.mean()), 3),
        "std": round(float(arr.std(ddof=1)), 3) if len(arr) > 1 else 0.0,
    }


class PositioningStudy:
    """Filter tuning, per-walk tracks, and the select / refit / test protocol of the module docstring."""

    def __init__(self, prep: Prepared, cfg: UttConfig, pcfg: PositioningConfig | None = None) -> None:
        self.prep, self.cfg = prep, cfg
        self.pcfg = pcfg or PositioningConfig()
        t0 = time.perf_counter()
        train_walks = [prep.walks[n] for n in prep.train]
        self.filter, self.filter_grid = tune_filter(train_walks, prep.geometry)
        self.tracks: dict[str, Tracks] = {
            n: tracks_of(prep.walks[n], prep.geometry[prep.walks[n].scene], self.filter, prep.fixes[n])
            for n in prep.train + prep.test
        }
        self.scenes = sorted({prep.walks[n].scene for n in prep.test})
        self.timings = {"filter_and_tracks_s": round(time.perf_counter() - t0, 2)}
        self.train_s: dict[str, float] = {}  # per twin and phase, summed over seeds
        self.curves: dict[str, list[float]] = {}  # the last selection's validation curve per twin id
        self.predictions: dict[
            int, dict[str, dict[str, np.ndarray]]
        ] = {}  # seed -> test walk -> twin -> rows

    def _rows(self, name: str) -> np.ndarray:
        walk = self.prep.walks[name]
        return np.searchsorted(walk.t_ms, eval_ends(walk))

    def _truth(self, names: list[str]) -> np.ndarray:
        gts = []
        for n in names:
            gt = self.prep.walks[n].gt
            assert gt is not None
            gts.append(gt[self._rows(n)])
        return np.concatenate(gts)

    def scene_walks(self, names: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(self.prep.walks[n].scene, []).append(n)
        return out

    def baselines(self, names: list[str]) -> dict[str, dict[str, float]]:
        """Median error (m) per scene of trilateration and the filter on the scored rows of ``names``."""
        out: dict[str, dict[str, float]] = {}
        for scene, ns in self.scene_walks(names).items():
            truth = self._truth(ns)
            tri = np.concatenate([self.tracks[n].fix[self._rows(n)] for n in ns])
            kf = np.concatenate([self.tracks[n].kf[self._rows(n)] for n in ns])
            out[scene] = {
                "trilateration": round(_median(tri, truth), 3),
                "kalman": round(_median(kf, truth), 3),
            }
        return out

    def _fed(
        self, twin: TaskTwin, data: PositionData, rounds: int, seed: int, val: bool, pcfg: PositioningConfig
    ) -> int:
        t0 = time.perf_counter()
        tasks = (twin.lineage.task,)
        fed = FedConfig(
            rounds=rounds,
            local_epochs=pcfg.local_epochs,
            batch=pcfg.batch,
            seed=seed,
            defense=self.cfg.defense,
            weight_decay=pcfg.weight_decay,
        )
        res = fed_train(twin, data.clients(tasks), data.val_client(tasks) if val else None, fed)
        key = twin.lineage.twin_id + (" select" if val else " refit")
        self.train_s[key] = round(self.train_s.get(key, 0.0) + time.perf_counter() - t0, 2)
        self.curves[twin.lineage.twin_id] = res.val_curve
        return res.best_round

    def _twins(
        self,
        data: PositionData,
        seed: int,
        fusers: tuple[str, ...],
        rounds: dict[str, int] | None,
        pcfg: PositioningConfig,
    ) -> tuple[dict[str, TaskTwin], dict[str, int]]:
        """Position, tracking and one merged twin per fuser; with ``rounds`` (refit) each trains exactly that
        many rounds with no validation, otherwise each is early-stopped on the validation client."""
        d, val = self.cfg.d, rounds is None
        kept: dict[str, int] = {}

        def n_rounds(key: str) -> int:
            return pcfg.rounds if rounds is None else rounds[key]

        pos = new_twin("position/ftm", "position", ["ftm"], data.in_channels, data.lengths, d, seed=seed)
        kept["position"] = self._fed(pos, data, n_rounds("position"), seed, val, pcfg)
        trk = new_twin("tracking/imu", "tracking", ["imu"], data.in_channels, data.lengths, d, seed=seed)
        kept["tracking"] = self._fed(trk, data, n_rounds("tracking"), seed, val, pcfg)
        twins = {"position": pos, "tracking": trk}
        for fz in fusers:
            m = merge([pos, trk], f"position<-position+tracking/{fz}", "position", fz, data.lengths, seed)
            kept[f"merged {fz}"] = self._fed(m, data, n_rounds(f"merged {fz}"), seed, val, pcfg)
            twins[f"merged {fz}"] = m
        return twins, kept

    def folds(self) -> list[tuple[list[str], list[str]]]:
        """Leave-one-walk-out: fold k holds out the k-th training walk of every scene that has two or more."""
        per_scene = self.scene_walks(self.prep.train)
        n = max(len(v) for v in per_scene.values())
        out = []
        for k in range(n if n >= 2 else 0):
            val = sorted(v[k] for v in per_scene.values() if len(v) >= 2 and k < len(v))
            out.append(([w for w in self.prep.train if w not in val], val))
        return out or [(self.prep.fit, self.prep.val)]

    def _medians(self, preds: dict[str, np.ndarray]) -> dict[str, float]:
        """Median error (m) per scene of absolute predictions at the scored rows of each walk."""
        return {
            scene: round(_median(np.concatenate([preds[n] for n in ns]), self._truth(ns)), 3)
            for scene, ns in self.scene_walks(list(preds)).items()
        }

    def _errors(self, data: PositionData, twin: TaskTwin, names: list[str]) -> dict[str, float]:
        out = {}
        for scene, ns in self.scene_walks(names).items():
            pred = np.concatenate([data.positions(twin, n) for n in ns])
            out[scene] = round(_median(pred, self._truth(ns)), 3)
        return out

    def run_seed(self, seed: int, pcfg: PositioningConfig | None = None) -> dict[str, Any]:
        """Select on the validation walks, refit on all training walks, test; one seed."""
        prep, pcfg = self.prep, pcfg or self.pcfg
        fusers = pcfg.fusers
        t0 = time.perf_counter()
        folds = self.folds() if pcfg.selection == "lowo" else [(prep.fit, prep.val)]
        val_nmse_folds: list[dict[str, float]] = []
        curves: dict[str, list[list[float]]] = {}
        val_pred: dict[str, dict[str, list[np.ndarray]]] = {}
        for fit, val in folds:
            sel = PositionData(self.tracks, prep.geometry, self.filter, fit, val, pcfg, seed)
            twins, _ = self._twins(sel, seed, fusers, None, pcfg)
            val_nmse_folds.append(
                {k: sel.nmse(t, sel.val_windows) for k, t in twins.items() if k != "tracking"}
            )
            for k, t in twins.items():
                curves.setdefault(k, []).append(self.curves[t.lineage.twin_id])
                for n in val if k != "tracking" else []:
                    val_pred.setdefault(k, {}).setdefault(n, []).append(sel.positions(t, n))
        # rounds: the lowest mean validation loss over the folds; fuser: the lowest mean validation NMSE
        kept = {k: int(np.argmin(np.mean(c, axis=0))) + 1 if c[0] else pcfg.rounds for k, c in curves.items()}
        val_nmse = {k: round(float(np.mean([f[k] for f in val_nmse_folds])), 4) for k in val_nmse_folds[0]}
        merged_val = {fz: val_nmse[f"merged {fz}"] for fz in fusers}
        chosen = min(merged_val, key=lambda k: (math.isnan(merged_val[k]), merged_val[k]))
        val_median = {
            k.split(" ")[0]: self._medians({n: np.mean(p, axis=0) for n, p in val_pred[k].items()})
            for k in ("position", f"merged {chosen}")
            if k in val_pred
        }
        t_sel = time.perf_counter() - t0
        full = PositionData(self.tracks, prep.geometry, self.filter, prep.train, [], pcfg, seed)
        refit, _ = self._twins(full, seed, (chosen,), kept, pcfg)
        self.predictions.setdefault(
            seed,
            {
                n: {
                    k: full.positions(refit[t], n)
                    for k, t in (("position", "position"), ("merged", f"merged {chosen}"))
                }
                for n in prep.test
            },
        )
        test_windows = {n: full.windows_of(n) for n in prep.test}
        test_nmse = {
            k: round(float(np.mean([full.nmse(t, w) for w in test_windows.values()])), 4)
            for k, t in refit.items()
            if k != "tracking"
        }
        return {
            "seed": seed,
            "chosen_fuser": chosen,
            "rounds_kept": kept,
            "val_nmse": val_nmse,
            "test_nmse_refit": test_nmse,
            "val_median_m": val_median,
            "selection": pcfg.selection,
            "test_median_m": {
                "position": self._errors(full, refit["position"], prep.test),
                "merged": self._errors(full, refit[f"merged {chosen}"], prep.test),
            },
            "select_s": round(t_sel, 1),
            "refit_s": round(time.perf_counter() - t0 - t_sel, 1),
        }

    def ablation(self, seed: int, fuser: str) -> dict[str, dict[str, Any]]:
        """The merged twin (fixed fuser) refit with one input group left out, or without augmentation."""
        variants = {
            "all inputs": self.pcfg,
            "without kf (anchor: fix)": replace(self.pcfg, groups=("fix", "quality")),
            "without quality": replace(self.pcfg, groups=("fix", "kf")),
            "without fix": replace(self.pcfg, groups=("kf", "quality")),
            "without AP-dropout augmentation": replace(self.pcfg, augment=0),
        }
        out: dict[str, dict[str, Any]] = {}
        for label, pc in variants.items():
            r = self.run_seed(seed, replace(pc, fusers=(fuser,)))
            out[label] = {
                "merged test median_m": r["test_median_m"]["merged"],
                "merged val median_m": r["val_median_m"].get("merged", {}),
                "position (FTM only) test median_m": r["test_median_m"]["position"],
            }
        return out


def summarise(study: PositioningStudy, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scene: baselines, the twins' medians over seeds (mean, std), gains and the target check."""
    base_test = study.baselines(study.prep.test)
    base_val = study.baselines(study.prep.val) if study.prep.val else {}
    per_scene: dict[str, Any] = {}
    for scene in study.scenes:
        tri, kf = base_test[scene]["trilateration"], base_test[scene]["kalman"]
        merged = _stats([r["test_median_m"]["merged"][scene] for r in runs])
        position = _stats([r["test_median_m"]["position"][scene] for r in runs])
        gain = 1 - merged["mean"] / tri if tri > 0 else math.nan
        per_scene[scene] = {
            "test_median_m": {
                "trilateration": tri,
                "kalman": kf,
                "position twin": position,
                "merged twin": merged,
            },
            "val_median_m": {
                "trilateration": base_val.get(scene, {}).get("trilateration"),
                "kalman": base_val.get(scene, {}).get("kalman"),
                "merged twin": _stats(
                    [
                        r["val_median_m"]["merged"][scene]
                        for r in runs
                        if "merged" in r["val_median_m"] and scene in r["val_median_m"]["merged"]
                    ]
                )
                if base_val.get(scene)
                else None,
            },
            "merged_gain_vs_trilateration": round(gain, 3),
            "merged_gain_vs_kalman": round(1 - merged["mean"] / kf, 3) if kf > 0 else math.nan,
            "target_met": bool(
                gain >= TARGET_GAIN and all(r["test_median_m"]["merged"][scene] < kf for r in runs)
            ),
        }
    return {
        "protocol": "select fuser and rounds on held-out walks, refit on all training walks, test on unseen walks",
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
    ap.add_argument("--ablation", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = UttConfig(seed=args.seed)
    study = PositioningStudy(
        prepare(args.data, cfg),
        cfg,
        PositioningConfig(rounds=args.rounds, augment=args.augment, selection=args.selection),
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
