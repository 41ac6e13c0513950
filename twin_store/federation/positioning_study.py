"""The positioning protocol on unseen walks: select on held-out walks, refit on every training walk, test.

Per seed (nothing is ever chosen on a test walk):

1. **select**: fit the Position twin (FTM features), the tracking twin (IMU) and one merged twin per fuser on
   the fitting walks; early-stop each on the held-out validation walks; choose the fuser with the lowest
   validation NMSE; then choose the **shrink** ``alpha`` of the merged twin's correction on the same
   validation walks and ``pcfg.val_copies`` sparser AP-dropout copies of each (:func:`choose_shrink`;
   a sparser walk is what an unseen walk looks like): the deployed position is ``anchor + alpha *
   correction``, where the anchor is the range Kalman filter's position, so ``alpha = 0`` is the filter
   itself (the fallback); with ``pcfg.members`` above 1, every twin is a seed ensemble (corrections averaged);
2. **refit**: train the three twins again on every training walk (fitting + validation walks) for the rounds
   each kept in step 1, with the chosen fuser and ``alpha``;
3. **test**: position every row of the test walks (the window ending at that row, its last step), per scene.

The Kalman filter's constants are tuned on the training walks (grid search, :func:`tune_filter`). The
ablation refits the merged twin with one input group left out at a time (and without AP-dropout augmentation)
to show which inputs carry the gain. :class:`~twin_store.federation.utt_locator.Locator` is the refit merged
twin packed for ``nettwin twin position`` and the live windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import numpy as np

from twin_store.federation.utt_data import Prepared, UttConfig
from twin_store.federation.utt_locator import Locator
from twin_store.federation.utt_positioning import (
    SHRINK_GRID,
    PositionData,
    PositioningConfig,
    Tracks,
    eval_ends,
    tracks_of,
)
from twin_store.federation.utt_training import FedConfig, fed_train
from twin_store.models.ftm_features import drop_aps
from twin_store.models.ftm_filter import tune_filter
from twin_store.models.utt import TaskTwin, merge, new_twin


def _median(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.median(np.linalg.norm(pred - true, axis=1)))


def choose_shrink(
    anchor: dict[str, np.ndarray],
    correction: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    scene_of: dict[str, str],
    grid: tuple[float, ...] = SHRINK_GRID,
) -> tuple[float, dict[str, dict[str, float]]]:
    """The ``alpha`` whose worst scene does best. Per scene, the median error of ``anchor + alpha *
    correction`` over that scene's walks is divided by the anchor's own (the filter alone); the largest ratio
    over scenes is minimised over ``grid``, ties going to the smaller alpha (nearer the filter). Call it with
    validation walks only. Returns alpha and the median error (m) per alpha and scene (``"0.0"``: the
    filter)."""

    def medians(a: float) -> dict[str, float]:
        out = {}
        for s in sorted(set(scene_of.values())):
            ns = [n for n in anchor if scene_of[n] == s]
            pred = np.concatenate([anchor[n] + a * correction[n] for n in ns])
            out[s] = float(np.median(np.linalg.norm(pred - np.concatenate([truth[n] for n in ns]), axis=1)))
        return out

    base = medians(0.0)
    curve: dict[str, dict[str, float]] = {}
    best = (math.inf, 0.0)
    for a in sorted(set(grid) | {0.0}):
        med = medians(a)
        curve[str(a)] = {s: round(v, 4) for s, v in med.items()}
        worst = max(v / base[s] if base[s] > 0 else v for s, v in med.items())
        if worst < best[0] - 1e-9:
            best = (worst, a)
    return best[1], curve


def _best_round(curves: list[list[float]], rounds: int) -> int:
    """The round with the lowest mean validation loss over folds; curves cut short by early stopping are
    padded with inf (no better than their best)."""
    if not curves or not curves[0]:
        return rounds
    n = max(len(c) for c in curves)
    padded = np.array([list(c) + [math.inf] * (n - len(c)) for c in curves])
    return int(np.argmin(padded.mean(axis=0))) + 1


def _fold_mean(
    per_walk: dict[str, list[tuple[np.ndarray, np.ndarray]]],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(anchor, correction) per walk, the correction averaged over the folds that held the walk out."""
    anchor = {n: v[0][0] for n, v in per_walk.items()}
    corr = {n: np.mean([rel for _a, rel in v], axis=0) for n, v in per_walk.items()}
    return anchor, corr


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
        self.locators: dict[int, Locator] = {}  # seed -> the refit merged twin, packed

    def _rows(self, name: str) -> np.ndarray:
        walk = self.tracks[name].walk
        return np.searchsorted(walk.t_ms, eval_ends(walk))

    def _truth(self, names: list[str]) -> np.ndarray:
        gts = []
        for n in names:
            gt = self.tracks[n].walk.gt
            assert gt is not None
            gts.append(gt[self._rows(n)])
        return np.concatenate(gts)

    def sparse_copies(self, names: list[str], seed: int, k: int) -> list[str]:
        """``k`` AP-dropout copies of each walk in ``names`` (what a sparser, unseen walk looks like), their
        tracks added under ``<walk>~sparse<seed>.<i>``; the names of the copies. Only ever called with
        validation walks: the shrink is chosen on them and their copies."""
        out = []
        for n in names:
            rng = np.random.default_rng([seed, 15, sum(map(ord, n))])
            for i in range(k):
                key = f"{n}~sparse{seed}.{i}"
                if key not in self.tracks:
                    copy = drop_aps(self.tracks[n].walk, rng, self.pcfg.p_ap, self.pcfg.p_reading)
                    self.tracks[key] = tracks_of(copy, self.prep.geometry[copy.scene], self.filter)
                out.append(key)
        return out

    def scene_walks(self, names: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(self.tracks[n].walk.scene, []).append(n)
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
            patience=pcfg.patience if val else 0,
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

    def run_seed(self, seed: int, pcfg: PositioningConfig | None = None) -> dict[str, Any]:
        """Select on the validation walks, refit on all training walks, test; one seed. With
        ``pcfg.members`` above 1 every twin is trained once per member seed (``seed``, ``seed + 1``, ...: other
        initial weights and minibatches, the same data and scalers) and the members' corrections are averaged
        (a seed ensemble): the fuser, the rounds and alpha are chosen for that average."""
        prep, pcfg = self.prep, pcfg or self.pcfg
        fusers = pcfg.fusers
        members = [seed + k for k in range(max(1, pcfg.members))]
        t0 = time.perf_counter()
        folds = self.folds() if pcfg.selection == "lowo" else [(prep.fit, prep.val)]
        val_nmse_folds: list[dict[str, float]] = []
        curves: dict[int, dict[str, list[list[float]]]] = {m: {} for m in members}
        val_corr: dict[
            str, dict[str, list[tuple[np.ndarray, np.ndarray]]]
        ] = {}  # twin -> walk -> (anchor, rel), one per member (and fold holding the walk out)
        for fit, val in folds:
            # the data (AP-dropout copies, scalers) is the seed's; only the twins differ between members
            sel = PositionData(self.tracks, prep.geometry, self.filter, fit, val, pcfg, seed)
            for m in members:
                twins, _ = self._twins(sel, m, fusers, None, pcfg)
                val_nmse_folds.append(
                    {k: sel.nmse(t, sel.val_windows) for k, t in twins.items() if k != "tracking"}
                )
                for k, t in twins.items():
                    curves[m].setdefault(k, []).append(self.curves[t.lineage.twin_id])
                    for n in val + self.sparse_copies(val, seed, pcfg.val_copies) if k != "tracking" else []:
                        val_corr.setdefault(k, {}).setdefault(n, []).append(sel.corrections(t, n))
        # rounds (per member): the lowest mean validation loss over the folds (a fold stopped early counts as
        # no better); fuser: the lowest mean validation NMSE over folds and members
        kept_by = {m: {k: _best_round(c, pcfg.rounds) for k, c in curves[m].items()} for m in members}
        kept = kept_by[seed]
        val_nmse = {k: round(float(np.mean([f[k] for f in val_nmse_folds])), 4) for k in val_nmse_folds[0]}
        merged_val = {fz: val_nmse[f"merged {fz}"] for fz in fusers}
        chosen = min(merged_val, key=lambda k: (math.isnan(merged_val[k]), merged_val[k]))
        # the deployed correction: the chosen fuser's twin, or the mean of every fuser's twin (an ensemble:
        # less variance), whichever the validation walks prefer once shrunk; never the test walks
        options = {"single": [chosen]} | ({"ensemble": list(fusers)} if len(fusers) > 1 else {})
        shrink: dict[str, tuple[float, dict[str, dict[str, float]], float]] = {}
        for option, fzs in options.items() if val_corr else ():
            parts = [_fold_mean(val_corr[f"merged {fz}"]) for fz in fzs]
            anchor_val = parts[0][0]
            corr_val = {n: np.mean([c[n] for _a, c in parts], axis=0) for n in anchor_val}
            a, curve = choose_shrink(
                anchor_val,
                corr_val,
                {n: self._truth([n]) for n in anchor_val},
                {n: self.tracks[n].walk.scene for n in anchor_val},
                pcfg.shrink_grid,
            )
            worst = max(v / curve["0.0"][s] if curve["0.0"][s] > 0 else v for s, v in curve[str(a)].items())
            shrink[option] = (a, curve, worst)
        option = min(shrink, key=lambda k: (shrink[k][2], k != "single")) if shrink else "single"
        alpha, shrink_curve = (shrink[option][0], shrink[option][1]) if shrink else (1.0, {})
        deployed = options[option]
        val_median: dict[str, dict[str, float]] = {}
        for k in ("position", f"merged {chosen}"):
            if k in val_corr:
                anc, rel = _fold_mean(val_corr[k])
                val_median[k.split(" ")[0]] = self._medians(
                    {n: anc[n] + rel[n] for n in anc if n in prep.walks}
                )
        if shrink:
            # the walks themselves (the curve also counts their sparse copies when pcfg.val_copies > 0)
            parts = [_fold_mean(val_corr[f"merged {fz}"]) for fz in deployed]
            val_median["merged (shrunk)"] = self._medians(
                {
                    n: parts[0][0][n] + alpha * np.mean([c[n] for _a, c in parts], axis=0)
                    for n in parts[0][0]
                    if n in prep.walks
                }
            )
        t_sel = time.perf_counter() - t0
        full = PositionData(self.tracks, prep.geometry, self.filter, prep.train, [], pcfg, seed)
        refits = [self._twins(full, m, tuple(deployed), kept_by[m], pcfg)[0] for m in members]
        refit = refits[0]
        merged = [r[f"merged {fz}"] for r in refits for fz in deployed]  # member-major, as the Locator loads
        test_corr: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for n in prep.test:
            parts_t = [full.corrections(t, n) for t in merged]
            test_corr[n] = (parts_t[0][0], np.mean([rel for _a, rel in parts_t], axis=0))
        predictions = {
            n: {
                "position": np.mean([full.positions(r["position"], n) for r in refits], axis=0),
                "merged": test_corr[n][0] + alpha * test_corr[n][1],
                "merged_unshrunk": test_corr[n][0] + test_corr[n][1],
            }
            for n in prep.test
        }
        self.predictions.setdefault(seed, predictions)  # the seed's first run (an ablation run is not kept)
        scalers = {
            "ftm": full.in_scalers["ftm"],
            "imu": full.in_scalers["imu"],
            "position": full.out_scalers["position"],
        }
        arch = {
            "fusers": deployed,
            "in_channels": full.in_channels,
            "lengths": full.lengths,
            "d": self.cfg.d,
            "seed": seed,
            "members": len(members),
        }
        self.locators.setdefault(seed, Locator(merged, scalers, self.filter, pcfg.groups, alpha, arch))
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
            "members": members,
            "alpha": alpha,
            "deployed": option if option == "single" else "ensemble of " + ", ".join(deployed),
            "val_median_m_by_option (shrunk)": {
                k: {s: round(m, 3) for s, m in v[1][str(v[0])].items()} | {"alpha": v[0]}
                for k, v in shrink.items()
            },
            "shrink_val_median_m": shrink_curve,
            "val_nmse": val_nmse,
            "test_nmse_refit": test_nmse,
            "val_median_m": val_median,
            "selection": pcfg.selection,
            "test_median_m": {
                "position": self._medians({n: v["position"] for n, v in predictions.items()}),
                "merged": self._medians({n: v["merged"] for n, v in predictions.items()}),
                "merged (unshrunk, alpha 1)": self._medians(
                    {n: v["merged_unshrunk"] for n, v in predictions.items()}
                ),
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
                "merged val median_m": r["val_median_m"].get("merged (shrunk)", {}),
                "alpha": r["alpha"],
                "merged unshrunk test median_m": r["test_median_m"]["merged (unshrunk, alpha 1)"],
                "merged unshrunk val median_m": r["val_median_m"].get("merged", {}),
                "position (FTM only) test median_m": r["test_median_m"]["position"],
            }
        return out
