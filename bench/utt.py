"""The UTT benchmark on real FTM/IMU walks (+ the SIMULATED vision modality), walk-level split.

Split: walks with ground truth are grouped by (scene, device); the last walk (by name) of every group with
at least two walks is a test walk, never seen in training; the rest are training walks. Hyperparameters (the
federated round kept, the fuser of the merged twin, the filter's constants) are chosen on **held-out walks**
(the last training walk of every scene with two or more), never on the test walks, and every NMSE on the test
walks has the validation NMSE beside it. The twins of the UTT matrix fit on the remaining training walks
(one federated client each: a local-area twin).

Positioning on unseen walks (:mod:`bench.utt_positioning`): trilateration and a range Kalman filter beside the
Position and merged twins built to generalise (AP-independent FTM features, positions relative to an anchor,
AP-dropout augmentation), selected on the held-out walks, refit on every training walk, over several seeds,
per scene. See :func:`run`.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.utt_positioning import PositioningStudy, summarise
from twin_store.federation.utt_data import HORIZON, WINDOW, Data, Prepared, UttConfig, prepare
from twin_store.federation.utt_positioning import PositioningConfig, eval_ends
from twin_store.federation.utt_training import FedConfig, FedResult, fed_train
from twin_store.models.multimodal import STEP_MS, Windows
from twin_store.models.utt import (
    TASKS,
    UNIFIED_DIRECTIONS,
    TaskTwin,
    UnifiedTwin,
    merge,
    new_twin,
    nmse,
    split,
    transfer,
)


def _errors(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    e = np.linalg.norm(pred - true, axis=1)
    return {"median_m": round(float(np.median(e)), 3), "p90_m": round(float(np.percentile(e, 90)), 3),
            "mean_m": round(float(e.mean()), 3), "n": len(e)}  # fmt: skip


def _fed(twin: TaskTwin | UnifiedTwin, data: Data, fed: FedConfig) -> FedResult:
    tasks = tuple(TASKS) if isinstance(twin, UnifiedTwin) else (twin.lineage.task,)
    return fed_train(twin, data.clients(tasks), data.val_client(tasks), fed)


def _fed_summary(r: FedResult) -> dict[str, Any]:
    return {
        "train_s": round(r.train_s, 2),
        "comm_s": round(r.comm_s, 4),
        "comm_mb": round(r.comm_bytes / 1e6, 2),
        "params": r.n_params,
        "round_kept": r.best_round,
        "val_loss": round(min(r.val_curve), 4) if r.val_curve else math.nan,
        "version": r.version,
        "defense": r.defense,
        "accepted": r.accepted,
        "quarantined": r.quarantined,
    }


MERGE_PLAN = {  # report key -> (training key, source twins); the FTM+IMU merge comes last and is split
    "trajectory+tracking->position": ("trajectory+tracking->position", ["trajectory", "tracking"]),
    "position+tracking->position (FTM+IMU)": ("position+tracking->position", ["position", "tracking"]),
}
FTM_IMU = "position+tracking->position (FTM+IMU)"
POSITION_METHODS = ("trilateration", "kalman", "position", "merged", "merged_unshrunk", "matrix_merged")


class _Timer:
    """Adds the wall time of a ``with`` block to ``timings[key]`` (seconds, 2 decimals)."""

    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self.timings[self.key] = round(time.perf_counter() - self.t0, 2)


class UttRun:
    """One benchmark run, as named steps sharing the data, the federation settings and the results so far.
    :func:`run` calls them in order; each step adds its part of the report."""

    def __init__(self, data_paths: list[Path], cfg: UttConfig, pcfg: PositioningConfig | None = None) -> None:
        self.cfg = cfg
        self.pcfg = pcfg or PositioningConfig()
        self.prep = prepare(data_paths, cfg)
        t = time.perf_counter()
        self.data = Data(self.prep)
        self.timings: dict[str, float] = dict(self.prep.timings, windows_s=round(time.perf_counter() - t, 2))
        self.fed = FedConfig(
            rounds=cfg.rounds,
            local_epochs=cfg.local_epochs,
            seed=cfg.seed,
            defense=cfg.defense,
            patience=cfg.patience,
        )
        self.test_all = Windows.concat(list(self.data.test_grid.values()))
        self.training: dict[str, Any] = {}
        self.nm: dict[str, Any] = {}
        self.nm_val: dict[str, Any] = {}  # the same keys as nm, on the held-out validation walks
        self.report: dict[str, Any] = {}
        self.direct: dict[str, TaskTwin] = {}
        self.merges: dict[str, dict[str, float]] = {label: {} for label in MERGE_PLAN}
        self.splits: dict[str, dict[str, float]] = {"position->trajectory": {}, "position->tracking": {}}
        self.merged_twins: dict[str, TaskTwin] = {}
        self.merged_val: dict[str, float] = {}
        self.merges_val: dict[str, dict[str, float]] = {label: {} for label in MERGE_PLAN}
        self.splits_val: dict[str, dict[str, float]] = {"position->trajectory": {}, "position->tracking": {}}
        self.spread: dict[str, dict[str, Any]] = {}

    def score(self, twin: TaskTwin) -> float:
        """Test NMSE of a twin's task on every test window."""
        field_ = TASKS[twin.lineage.task][0]
        return round(nmse(self.data.predict(twin, self.test_all), getattr(self.test_all, field_)), 4)

    def val_score(self, twin: TaskTwin) -> float:
        """Validation NMSE (held-out walks) of a twin's task."""
        field_ = TASKS[twin.lineage.task][0]
        return round(nmse(self.data.predict(twin, self.data.val), getattr(self.data.val, field_)), 4)

    def train(self, key: str, twin: TaskTwin | UnifiedTwin) -> FedResult:
        r = _fed(twin, self.data, self.fed)
        self.training[key] = _fed_summary(r)
        return r

    def describe_split(self) -> None:
        prep, data, cfg = self.prep, self.data, self.cfg
        self.report.update(
            split={
                "train_walks": prep.train,
                "fit_walks": prep.fit,
                "validation_walks": prep.val,
                "test_walks": prep.test,
                "validation": prep.validation_rule(),
                "unlabelled_walks_not_used": prep.unlabelled,
                "skipped_files": prep.skipped,
                "windows": {
                    "train": int(sum(len(w) for w in data.train.values())),
                    "val": len(data.val),
                    "test_grid": int(sum(len(w) for w in data.test_grid.values())),
                    "test_rows": int(sum(len(w) for w in data.test_rows.values())),
                },
            },
            sites={s: g.as_dict() for s, g in prep.geometry.items()},
            vision="SIMULATED (pinhole camera, 10 fps, pixel noise, 5% misses, pillar occlusion) from ground truth",
            federation={
                "clients": list(data.train),
                "rounds": cfg.rounds,
                "local_epochs": self.fed.local_epochs,
                "defense": cfg.defense,
                "patience": cfg.patience,
            },
        )

    def direct_twins(self) -> None:
        """Each task twin from its own modality, and the training-mean predictor beside them."""
        data, cfg = self.data, self.cfg
        with _Timer(self.timings, "direct_s"):
            for task, (_f, _c, modality) in TASKS.items():
                twin = new_twin(task, task, [modality], data.in_channels, data.lengths, cfg.d, seed=cfg.seed)
                self.train(f"direct {task}", twin)
                self.direct[task] = twin
        self.nm["direct"] = {task: self.score(tw) for task, tw in self.direct.items()}
        self.nm_val["direct"] = {task: self.val_score(tw) for task, tw in self.direct.items()}
        self.nm["mean predictor"] = {
            t_: round(
                nmse(
                    np.broadcast_to(data.out_scalers[t_].mean, getattr(self.test_all, TASKS[t_][0]).shape),
                    getattr(self.test_all, TASKS[t_][0]),
                ),
                4,
            )
            for t_ in TASKS
        }

    def transfer_twin(self) -> None:
        """position (FTM) -> trajectory."""
        with _Timer(self.timings, "transfer_s"):
            tr = transfer(
                self.direct["position"],
                "trajectory<-position",
                "trajectory",
                self.data.lengths,
                self.cfg.seed,
            )
            self.train("transfer position->trajectory", tr)
            self.nm["transfer position->trajectory"] = self.score(tr)
            self.nm_val["transfer position->trajectory"] = self.val_score(tr)
        self.transferred = tr

    def merges_and_splits(self) -> None:
        """Per fuser: both merges, then the FTM+IMU merge split into trajectory and tracking twins."""
        data, cfg = self.data, self.cfg
        with _Timer(self.timings, "merge_split_s"):
            for fz in cfg.fusers:
                for label, (name, sources) in MERGE_PLAN.items():
                    twin_id = f"position<-{'+'.join(sources)}/{fz}"
                    m2 = merge(
                        [self.direct[s] for s in sources], twin_id, "position", fz, data.lengths, cfg.seed
                    )
                    self.train(f"merge {name} {fz}", m2)
                    self.merges[label][fz] = self.score(m2)
                    self.merges_val[label][fz] = self.val_score(m2)
                self.merged_twins[fz] = m2
                self.merged_val[fz] = self.val_score(m2)
                parts = split(
                    m2,
                    {"trajectory": f"trajectory<-split/{fz}", "tracking": f"tracking<-split/{fz}"},
                    data.lengths,
                    cfg.seed,
                )
                for task, tw in parts.items():
                    self.train(f"split position->{task} {fz}", tw)
                    self.splits[f"position->{task}"][fz] = self.score(tw)
                    self.splits_val[f"position->{task}"][fz] = self.val_score(tw)
        self.nm["merge"] = self.merges
        self.nm["split"] = self.splits
        self.nm_val["merge"] = self.merges_val
        self.nm_val["split"] = self.splits_val
        self.nm["direct mapping (for comparison)"] = {
            "position (FTM->position)": self.nm["direct"]["position"],
            "trajectory (vision->trajectory)": self.nm["direct"]["trajectory"],
            "tracking (IMU->tracking)": self.nm["direct"]["tracking"],
        }

    def _function_specific(self, direction: str, fz: str) -> float | None:
        op, rest = direction.split(" ", 1)
        if op == "transfer":
            return float(self.nm[direction])
        return {"merge": self.merges, "split": self.splits}[op][rest].get(fz)

    def _train_s(self, key: str) -> float:
        return float(self.training[key]["train_s"]) if key in self.training else math.nan

    def unified_models(self) -> None:
        """One unified model per fuser (loss = transfer + merge + split), beside the function-specific twins
        trained for the same directions on the same clients, rounds and test walks."""
        data, cfg = self.data, self.cfg
        unified: dict[str, dict[str, Any]] = {}
        with _Timer(self.timings, "unified_s"):
            for fz in cfg.unified_fusers:
                ut = UnifiedTwin(f"unified.{fz}", data.in_channels, data.lengths, cfg.d, fz, cfg.seed)
                r = self.train(f"unified {fz}", ut)
                fs_keys = [f"direct {t_}" for t_ in TASKS] + ["transfer position->trajectory"]
                fs_keys += [f"merge {name} {fz}" for name, _ in MERGE_PLAN.values()]
                fs_keys += [f"split position->{t_} {fz}" for t_ in ("trajectory", "tracking")]
                unified[fz] = {
                    "nmse": {
                        name: {
                            "unified": self.score(ut.view(name, f"{name}/unified.{fz}")),
                            "function_specific": self._function_specific(name, fz),
                            "unified_val": self.val_score(ut.view(name, f"{name}/unified.{fz}")),
                        }
                        for name in UNIFIED_DIRECTIONS
                    },
                    "train_s": {
                        "unified": round(r.train_s, 2),
                        "function_specific (3 direct + transfer + 2 merges + 2 splits)": round(
                            sum(self._train_s(k) for k in fs_keys), 2
                        ),
                    },
                    "params": {
                        "unified": r.n_params,
                        "function_specific": int(
                            sum(self.training[k]["params"] for k in fs_keys if k in self.training)
                        ),
                    },
                }
        self.nm["unified"] = unified

    def seed_spread(self) -> None:
        """The merges again with other seeds: fuser/decoder initialisation and minibatch order re-seeded, the
        (frozen) direct encoders kept; the first seed is the run above."""
        data, cfg = self.data, self.cfg
        seeds = [cfg.seed + 1000 * k for k in range(max(cfg.seed_repeats, 1))]
        with _Timer(self.timings, "seed_spread_s"):
            for direction, (_name, srcs) in MERGE_PLAN.items():
                for fz in (f for f in cfg.seed_fusers if f in cfg.fusers and cfg.seed_repeats > 1):
                    vals, vvals = [self.merges[direction][fz]], [self.merged_val.get(fz, math.nan)]
                    for s_ in seeds[1:]:
                        m = merge(
                            [self.direct[x] for x in srcs],
                            f"{direction}/{fz}/seed{s_}",
                            "position",
                            fz,
                            data.lengths,
                            s_,
                        )
                        _fed(m, data, replace(self.fed, seed=s_))
                        vals.append(self.score(m))
                        vvals.append(self.val_score(m))
                    self.spread.setdefault(direction, {})[fz] = {
                        "seeds": seeds,
                        "test_nmse": vals,
                        "mean": round(float(np.mean(vals)), 4),
                        "std": round(float(np.std(vals, ddof=1)), 4),
                        "val_nmse": [round(v, 4) for v in vvals],
                    }
        self.nm["merge_seed_spread"] = self.spread
        self.report["nmse_test"] = self.nm
        self.report["nmse_val"] = self.nm_val
        self.chosen = min(self.merged_val, key=lambda k: self.merged_val[k])
        self.report["merged_fuser"] = {
            "chosen_on_validation": self.chosen,
            "val_nmse": {k: round(v, 4) for k, v in self.merged_val.items()},
        }

    def positioning(self) -> list[list[Any]]:
        """Positioning on every test row, per scene and over seeds: trilateration and the range Kalman filter
        beside the generalising Position and merged twins (:mod:`bench.utt_positioning`), and the UTT matrix's
        merged twin (absolute coordinates, fuser chosen on validation). Returns the CSV rows (first seed)."""
        prep, data, cfg = self.prep, self.data, self.cfg
        with _Timer(self.timings, "positioning_s"):
            study = PositioningStudy(prep, cfg, self.pcfg)
            seeds = [cfg.seed + 1000 * k for k in range(max(cfg.seed_repeats, 1))]
            runs = [study.run_seed(s_) for s_ in seeds]
            self.report["positioning"] = summarise(study, runs)
            self.report["positioning"]["train_s"] = study.train_s
        if cfg.ablation:
            with _Timer(self.timings, "ablation_s"):
                self.report["positioning"]["ablation"] = study.ablation(cfg.seed, runs[0]["chosen_fuser"])
        first = study.predictions[seeds[0]]
        rows: list[list[Any]] = []
        pos_err: dict[str, list[np.ndarray]] = {m: [] for m in POSITION_METHODS}
        true_all: list[np.ndarray] = []
        for n in prep.test:
            w, win = prep.walks[n], data.test_rows[n]
            assert w.gt is not None
            at = np.searchsorted(w.t_ms, eval_ends(w))
            truth = w.gt[at]
            t_raw = [w.t_raw[i] for i in at]
            preds = {
                "trilateration": study.tracks[n].fix[at],
                "kalman": study.tracks[n].kf[at],
                "position": first[n]["position"],
                "merged": first[n]["merged"],
                "merged_unshrunk": first[n]["merged_unshrunk"],
                "matrix_merged": data.predict(self.merged_twins[self.chosen], win)[:, -1],
            }
            true_all.append(truth)
            for method, p in preds.items():
                pos_err[method].append(p)
                rows.extend(
                    [n, tr_, *(round(float(v), 4) for v in (a[0], a[1], b[0], b[1])), method]
                    for tr_, a, b in zip(t_raw, truth, p, strict=True)
                )
        truth_cat = np.concatenate(true_all)
        positioning: dict[str, Any] = {m: _errors(np.concatenate(p), truth_cat) for m, p in pos_err.items()}
        tri = positioning["trilateration"]["median_m"]
        for method in ("merged", "position", "kalman", "matrix_merged"):
            positioning[f"{method}_vs_trilateration_median_gain"] = (
                round(1 - positioning[method]["median_m"] / tri, 3) if tri > 0 else math.nan
            )
        self.report["positioning_test_rows"] = positioning
        return rows

    def trajectory_and_tracking(self) -> None:
        """Trajectory 1 s ahead against constant velocity, and IMU (tracking) generation against the mean."""
        test_all, data = self.test_all, self.data
        fut_true = test_all.future[:, -1]
        ok = np.isfinite(fut_true).all(axis=1)
        traj_direct = data.predict(self.direct["trajectory"], test_all)[:, -1]
        traj_transfer = data.predict(self.transferred, test_all)[:, -1]
        cv = _constant_velocity(test_all, self.prep, list(data.test_grid))
        cv_ok = ok & np.isfinite(cv).all(axis=1)
        self.report["trajectory_1s_ahead"] = {
            "trajectory twin (vision, simulated)": _errors(traj_direct[ok], fut_true[ok]),
            "transfer position->trajectory (FTM)": _errors(traj_transfer[ok], fut_true[ok]),
            "constant velocity (back-projected detections)": _errors(cv[cv_ok], fut_true[cv_ok]),
        }
        self.report["tracking_generation_nmse"] = {
            "direct (IMU->tracking)": self.nm["direct"]["tracking"],
            "mean predictor (training mean)": self.nm["mean predictor"]["tracking"],
            **{f"split position->tracking {fz}": v for fz, v in self.splits["position->tracking"].items()},
        }

    def targets(self) -> None:
        g, c = self.merges[FTM_IMU].get("gating"), self.merges[FTM_IMU].get("concatenation")
        per_scene = self.report["positioning"]["per_scene"]
        targets = {
            "merged_median_gain_ge_20pct_and_below_kalman (every scene, every seed)": all(
                v["target_met"] for v in per_scene.values()
            ),
            **{f"target met on {scene}": v["target_met"] for scene, v in per_scene.items()},
            "gating_nmse_le_concatenation (FTM+IMU merge)": bool(g is not None and c is not None and g <= c),
        }
        ftm_imu = self.spread.get(FTM_IMU, {})
        if "gating" in ftm_imu and "concatenation" in ftm_imu:
            gs, cs = ftm_imu["gating"], ftm_imu["concatenation"]
            targets["gating_mean_le_concatenation_mean over seeds (FTM+IMU merge)"] = bool(
                gs["mean"] <= cs["mean"]
            )
            targets["gating - concatenation within one std (seed noise)"] = bool(
                abs(gs["mean"] - cs["mean"]) <= max(gs["std"], cs["std"])
            )
        self.report["targets"] = targets


def run(
    data_paths: list[Path], cfg: UttConfig, pcfg: PositioningConfig | None = None
) -> tuple[dict[str, Any], list[list[Any]]]:
    """Train and evaluate every twin; returns the report and the positioning rows for the CSV."""
    torch.set_num_threads(cfg.threads)
    wall0 = time.perf_counter()
    r = UttRun(data_paths, cfg, pcfg)
    r.describe_split()
    r.direct_twins()
    r.transfer_twin()
    r.merges_and_splits()
    r.unified_models()
    r.seed_spread()
    with _Timer(r.timings, "downstream_s"):
        rows = r.positioning()
        r.trajectory_and_tracking()
        r.targets()
    r.report.update(training=r.training, timings=r.timings, wall_s=round(time.perf_counter() - wall0, 1))
    r.report["threads"] = cfg.threads
    return r.report, rows


def _constant_velocity(win: Windows, prep: Prepared, names: list[str]) -> np.ndarray:
    """Back-project each window's detected boxes to the floor, fit a line in time over the window's
    detections, and extrapolate 1 s past the window's end (NaN with fewer than two detections)."""
    out = np.full((len(win), 2), np.nan)
    tt = (np.arange(WINDOW) - (WINDOW - 1)) * STEP_MS / 1000.0
    cams = {n: prep.vision[n].camera for n in names}
    for i in range(len(win)):
        det = win.vision[i, :, 4] > 0
        if det.sum() < 2:
            continue
        cam = cams[win.walk[i]]
        xy = cam.ground_point(win.vision[i, det, 0], win.vision[i, det, 1])
        a = np.column_stack([np.ones(det.sum()), tt[det]])
        coef, *_ = np.linalg.lstsq(a, xy, rcond=None)
        out[i] = coef[0] + coef[1] * (HORIZON * STEP_MS / 1000.0)
    return out
