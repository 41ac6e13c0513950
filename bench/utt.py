"""The UTT benchmark on real FTM/IMU walks (+ the SIMULATED vision modality), walk-level split.

Split: walks with ground truth are grouped by (scene, device); the last walk (by name) of every group with
at least two walks is a test walk, never seen in training; the rest are training walks (one federated
client each: a local-area twin). Hyperparameters (the federated round kept, the fuser of the merged twin)
are chosen on validation blocks cut out of the training walks (blocks 2 and 5 of 8 in time), never on the
test walks. See :func:`run`.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twin_store.federation.utt_data import HORIZON, WINDOW, Data, Prepared, UttConfig, prepare
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


def run(data_paths: list[Path], cfg: UttConfig) -> tuple[dict[str, Any], list[list[Any]]]:
    """Train and evaluate every twin; returns the report and the positioning rows for the CSV."""
    torch.set_num_threads(cfg.threads)
    wall0 = time.perf_counter()
    prep = prepare(data_paths, cfg)
    t = time.perf_counter()
    data = Data(prep)
    timings = dict(prep.timings, windows_s=round(time.perf_counter() - t, 2))
    fed = FedConfig(rounds=cfg.rounds, local_epochs=cfg.local_epochs, seed=cfg.seed, defense=cfg.defense)
    report: dict[str, Any] = {
        "split": {
            "train_walks": prep.train,
            "test_walks": prep.test,
            "validation": "blocks 2 and 5 of 8 (in time) of each training walk",
            "unlabelled_walks_not_used": prep.unlabelled,
            "skipped_files": prep.skipped,
            "windows": {
                "train": int(sum(len(w) for w in data.train.values())),
                "val": len(data.val),
                "test_grid": int(sum(len(w) for w in data.test_grid.values())),
                "test_rows": int(sum(len(w) for w in data.test_rows.values())),
            },
        },
        "sites": {s: g.as_dict() for s, g in prep.geometry.items()},
        "vision": "SIMULATED (pinhole camera, 10 fps, pixel noise, 5% misses, pillar occlusion) from ground truth",
        "federation": {
            "clients": list(data.train),
            "rounds": cfg.rounds,
            "local_epochs": fed.local_epochs,
            "defense": cfg.defense,
        },
    }
    test_all = Windows.concat(list(data.test_grid.values()))
    training: dict[str, Any] = {}
    nm: dict[str, Any] = {}

    def score(twin: TaskTwin) -> float:
        task = twin.lineage.task
        return round(nmse(data.predict(twin, test_all), getattr(test_all, TASKS[task][0])), 4)

    def val_score(twin: TaskTwin) -> float:
        task = twin.lineage.task
        return nmse(data.predict(twin, data.val), getattr(data.val, TASKS[task][0]))

    # direct mapping: each task twin from its own modality
    t = time.perf_counter()
    direct: dict[str, TaskTwin] = {}
    for task, (_f, _c, modality) in TASKS.items():
        twin = new_twin(task, task, [modality], data.in_channels, data.lengths, cfg.d, seed=cfg.seed)
        training[f"direct {task}"] = _fed_summary(_fed(twin, data, fed))
        direct[task] = twin
    timings["direct_s"] = round(time.perf_counter() - t, 2)
    nm["direct"] = {task: score(tw) for task, tw in direct.items()}
    train_mean = {t_: data.out_scalers[t_].mean for t_ in TASKS}
    nm["mean predictor"] = {
        t_: round(
            nmse(
                np.broadcast_to(train_mean[t_], getattr(test_all, TASKS[t_][0]).shape),
                getattr(test_all, TASKS[t_][0]),
            ),
            4,
        )
        for t_ in TASKS
    }

    # transfer: position (FTM) -> trajectory
    t = time.perf_counter()
    tr = transfer(direct["position"], "trajectory<-position", "trajectory", data.lengths, cfg.seed)
    training["transfer position->trajectory"] = _fed_summary(_fed(tr, data, fed))
    nm["transfer position->trajectory"] = score(tr)
    timings["transfer_s"] = round(time.perf_counter() - t, 2)

    # merges and splits, per fuser
    t = time.perf_counter()
    merges: dict[str, dict[str, float]] = {
        "trajectory+tracking->position": {},
        "position+tracking->position (FTM+IMU)": {},
    }
    splits: dict[str, dict[str, float]] = {"position->trajectory": {}, "position->tracking": {}}
    merged_twins: dict[str, TaskTwin] = {}
    merged_val: dict[str, float] = {}
    # report key -> (training key, source twins); the FTM+IMU merge comes last and is split below
    merge_plan = {
        "trajectory+tracking->position": ("trajectory+tracking->position", ["trajectory", "tracking"]),
        "position+tracking->position (FTM+IMU)": ("position+tracking->position", ["position", "tracking"]),
    }
    for fz in cfg.fusers:
        for label, (name, sources) in merge_plan.items():
            twin_id = f"position<-{'+'.join(sources)}/{fz}"
            m2 = merge([direct[s] for s in sources], twin_id, "position", fz, data.lengths, cfg.seed)
            training[f"merge {name} {fz}"] = _fed_summary(_fed(m2, data, fed))
            merges[label][fz] = score(m2)
        merged_twins[fz] = m2
        merged_val[fz] = val_score(m2)
        parts = split(
            m2,
            {"trajectory": f"trajectory<-split/{fz}", "tracking": f"tracking<-split/{fz}"},
            data.lengths,
            cfg.seed,
        )
        for task, tw in parts.items():
            training[f"split position->{task} {fz}"] = _fed_summary(_fed(tw, data, fed))
            splits[f"position->{task}"][fz] = score(tw)
    timings["merge_split_s"] = round(time.perf_counter() - t, 2)
    nm["merge"] = merges
    nm["split"] = splits
    nm["direct mapping (for comparison)"] = {
        "position (FTM->position)": nm["direct"]["position"],
        "trajectory (vision->trajectory)": nm["direct"]["trajectory"],
        "tracking (IMU->tracking)": nm["direct"]["tracking"],
    }

    # the unified model: one model per fuser, loss = transfer + merge + split, same clients/rounds/test walks
    t = time.perf_counter()

    def function_specific(direction: str, fz: str) -> float | None:
        op, rest = direction.split(" ", 1)
        if op == "transfer":
            return float(nm[direction])
        return {"merge": merges, "split": splits}[op][rest].get(fz)

    def train_s(key: str) -> float:
        return float(training[key]["train_s"]) if key in training else math.nan

    unified: dict[str, dict[str, Any]] = {}
    for fz in cfg.unified_fusers:
        ut = UnifiedTwin(f"unified.{fz}", data.in_channels, data.lengths, cfg.d, fz, cfg.seed)
        r = _fed(ut, data, fed)
        training[f"unified {fz}"] = _fed_summary(r)
        fs_keys = [f"direct {t_}" for t_ in TASKS] + ["transfer position->trajectory"]
        fs_keys += [
            f"merge {d_} {fz}" for d_ in ("trajectory+tracking->position", "position+tracking->position")
        ]
        fs_keys += [f"split position->{t_} {fz}" for t_ in ("trajectory", "tracking")]
        unified[fz] = {
            "nmse": {
                name: {
                    "unified": score(ut.view(name, f"{name}/unified.{fz}")),
                    "function_specific": function_specific(name, fz),
                }
                for name in UNIFIED_DIRECTIONS
            },
            "train_s": {
                "unified": round(r.train_s, 2),
                "function_specific (3 direct + transfer + 2 merges + 2 splits)": round(
                    sum(train_s(k) for k in fs_keys), 2
                ),
            },
            "params": {
                "unified": r.n_params,
                "function_specific": int(sum(training[k]["params"] for k in fs_keys if k in training)),
            },
        }
    timings["unified_s"] = round(time.perf_counter() - t, 2)
    nm["unified"] = unified

    # seed spread of the merges: fuser/decoder initialisation and minibatch order re-seeded, the (frozen)
    # direct encoders kept; the first seed is the run above
    t = time.perf_counter()
    spread: dict[str, dict[str, Any]] = {}
    merge_sources = {
        "trajectory+tracking->position": ["trajectory", "tracking"],
        "position+tracking->position (FTM+IMU)": ["position", "tracking"],
    }
    seeds = [cfg.seed + 1000 * k for k in range(max(cfg.seed_repeats, 1))]
    for direction, srcs in merge_sources.items():
        for fz in (f for f in cfg.seed_fusers if f in cfg.fusers and cfg.seed_repeats > 1):
            vals, vvals = [merges[direction][fz]], [merged_val.get(fz, math.nan)]
            for s_ in seeds[1:]:
                m = merge(
                    [direct[x] for x in srcs], f"{direction}/{fz}/seed{s_}", "position", fz, data.lengths, s_
                )
                _fed(m, data, replace(fed, seed=s_))
                vals.append(score(m))
                vvals.append(val_score(m))
            spread.setdefault(direction, {})[fz] = {
                "seeds": seeds,
                "test_nmse": vals,
                "mean": round(float(np.mean(vals)), 4),
                "std": round(float(np.std(vals, ddof=1)), 4),
                "val_nmse": [round(v, 4) for v in vvals] if direction.endswith("(FTM+IMU)") else None,
            }
    timings["seed_spread_s"] = round(time.perf_counter() - t, 2)
    nm["merge_seed_spread"] = spread
    report["nmse_test"] = nm
    chosen = min(merged_val, key=lambda k: merged_val[k])
    report["merged_fuser"] = {
        "chosen_on_validation": chosen,
        "val_nmse": {k: round(v, 4) for k, v in merged_val.items()},
    }

    # downstream: positioning on every test row, trajectory 1 s ahead, IMU (tracking) generation
    t = time.perf_counter()
    rows: list[list[Any]] = []
    pos_err: dict[str, list[np.ndarray]] = {"trilateration": [], "position": [], "merged": []}
    true_all: list[np.ndarray] = []
    for n in prep.test:
        w, win = prep.walks[n], data.test_rows[n]
        assert w.gt is not None
        sel = w.t_ms >= w.t_ms[0] + (WINDOW - 1) * STEP_MS
        truth = w.gt[sel]
        t_raw = [r for r, s in zip(w.t_raw, sel, strict=True) if s]
        preds = {
            "trilateration": prep.fixes[n][sel],
            "position": data.predict(direct["position"], win)[:, -1],
            "merged": data.predict(merged_twins[chosen], win)[:, -1],
        }
        true_all.append(truth)
        for method, p in preds.items():
            pos_err[method].append(p)
            rows.extend(
                [
                    n,
                    tr_,
                    round(float(a[0]), 4),
                    round(float(a[1]), 4),
                    round(float(b[0]), 4),
                    round(float(b[1]), 4),
                    method,
                ]
                for tr_, a, b in zip(t_raw, truth, p, strict=True)
            )
    truth_cat = np.concatenate(true_all)
    positioning: dict[str, Any] = {m: _errors(np.concatenate(p), truth_cat) for m, p in pos_err.items()}
    tri = positioning["trilateration"]["median_m"]
    positioning["merged_vs_trilateration_median_gain"] = (
        round(1 - positioning["merged"]["median_m"] / tri, 3) if tri > 0 else math.nan
    )
    positioning["position_vs_trilateration_median_gain"] = (
        round(1 - positioning["position"]["median_m"] / tri, 3) if tri > 0 else math.nan
    )
    report["positioning_test_rows"] = positioning

    fut_true = test_all.future[:, -1]
    ok = np.isfinite(fut_true).all(axis=1)
    traj_direct = data.predict(direct["trajectory"], test_all)[:, -1]
    traj_transfer = data.predict(tr, test_all)[:, -1]
    cv = _constant_velocity(test_all, prep, list(data.test_grid))
    report["trajectory_1s_ahead"] = {
        "trajectory twin (vision, simulated)": _errors(traj_direct[ok], fut_true[ok]),
        "transfer position->trajectory (FTM)": _errors(traj_transfer[ok], fut_true[ok]),
        "constant velocity (back-projected detections)": _errors(
            cv[ok & np.isfinite(cv).all(axis=1)], fut_true[ok & np.isfinite(cv).all(axis=1)]
        ),
    }
    report["tracking_generation_nmse"] = {
        "direct (IMU->tracking)": nm["direct"]["tracking"],
        "mean predictor (training mean)": nm["mean predictor"]["tracking"],
        **{f"split position->tracking {fz}": v for fz, v in splits["position->tracking"].items()},
    }
    g, c = (
        merges["position+tracking->position (FTM+IMU)"].get("gating"),
        merges["position+tracking->position (FTM+IMU)"].get("concatenation"),
    )
    report["targets"] = {
        "merged_median_gain_ge_20pct": bool(positioning["merged_vs_trilateration_median_gain"] >= 0.2),
        "gating_nmse_le_concatenation (FTM+IMU merge)": bool(g is not None and c is not None and g <= c),
    }
    ftm_imu = spread.get("position+tracking->position (FTM+IMU)", {})
    if "gating" in ftm_imu and "concatenation" in ftm_imu:
        gs, cs = ftm_imu["gating"], ftm_imu["concatenation"]
        report["targets"]["gating_mean_le_concatenation_mean over seeds (FTM+IMU merge)"] = bool(
            gs["mean"] <= cs["mean"]
        )
        report["targets"]["gating - concatenation within one std (seed noise)"] = bool(
            abs(gs["mean"] - cs["mean"]) <= max(gs["std"], cs["std"])
        )
    timings["downstream_s"] = round(time.perf_counter() - t, 2)
    report["training"] = training
    report["timings"] = timings
    report["wall_s"] = round(time.perf_counter() - wall0, 1)
    report["threads"] = cfg.threads
    return report, rows


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
