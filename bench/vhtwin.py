"""Offline VH-Twin evaluation on an hourly traffic matrix: the protocol behind ``nettwin bench vhtwin``.

Split by time: the last 240 hours are test, the 240 before validation, the rest training. Scaling
statistics, V-twinning, the clustering inputs, ridge's alpha and psi's selection use training (and, where
said, validation) hours only. Validation and test hours are then replayed as a stream, hour by hour. For
each hour every method first forecasts it from what it has learnt so far (prequential). Only then does the
hour's value reach any twin.

Methods, all in one run:
- ``vhtwin``: DCS clusters, synchronous V-twinning on training hours, then asynchronous H-twinning. BSs
  train locally from their cluster twin, on a staggered schedule. Cluster twins are FedAvg of the members'
  latest updates. The global twin merges a cluster change only if ``eps > psi``. Forecasts come from the
  global twin (the network's twin). ``vhtwin_cluster`` reports the cluster twins' own forecasts.
- ``fedavg``: single-level synchronous FedAvg (no clusters). Every BS trains from the global twin in rounds
  with a barrier.
- ``central``: one model trained on all training samples, then fixed.
- ``ridge``: centralised ridge regression on the same 10 inputs, with alpha chosen on validation.
- ``persistence`` (last hour) and ``seasonal`` (same hour of the previous day).

psi does not change what the BSs and cluster twins do (they never read the global twin), so one stream
run carries one global twin per psi value: the sweep costs extra forecasts, not extra training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twin_store.federation import dcs
from twin_store.federation.local_updates import due_updates, profile_upto
from twin_store.federation.plan import (
    PSI_BEYOND,
    PSI_QUANTILES,
    TEST_HOURS,
    VAL_HOURS,
    VhTwinConfig,
    dcs_labels,
    load_matrix,
    split_hours,
    stream_plan,
)
from twin_store.federation.reclustering import MilanGrouping, Reclusterer
from twin_store.federation.samples import Scaler, inputs_at, samples
from twin_store.federation.twinning import GlobalTwin, VTwinResult, fedavg, v_twinning
from twin_store.models.forecaster import FitConfig, TwinModel


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float32)


def metrics(pred: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    err = pred - actual
    mse = float((err**2).mean())
    return {
        "mse": round(mse, 5),
        "mae": round(float(np.abs(err).mean()), 5),
        # RMSE over the standard deviation of the actual (z-scored) values in the same hours
        "nrmse": round(float(np.sqrt(mse) / actual.std()), 5),
    }


class _Stream:
    """Forecasts per method for the streamed hours, [S, hours] each."""

    def __init__(self, n_squares: int, n_hours: int) -> None:
        self.shape = (n_squares, n_hours)
        self.preds: dict[str, np.ndarray] = {}

    def put(self, method: str, col: int, values: np.ndarray) -> None:
        if method not in self.preds:
            self.preds[method] = np.full(self.shape, np.nan)
        self.preds[method][:, col] = values


@dataclass
class VTwinned:
    """The data, its temporal split and scaling, DCS labels and the V-twinned twins: every stream starts here."""

    series: np.ndarray  # [S, H] original units
    squares: np.ndarray
    z: np.ndarray  # [S, H] z-scored with training statistics
    scaler: Scaler
    val_start: int
    test_start: int
    model: TwinModel
    labels: np.ndarray
    init: torch.Tensor
    vt: VTwinResult
    milan_dir: Path
    walls: dict[str, float]


def v_twinned(data_path: Path, cfg: VhTwinConfig, gen: torch.Generator, rng: np.random.Generator) -> VTwinned:
    """Load, split by time, scale on training hours, cluster (DCS) and V-twin on training hours."""
    walls: dict[str, float] = {}
    series, squares = load_matrix(data_path, cfg.squares, cfg.seed)
    _, hours = series.shape
    val_start, test_start = split_hours(hours)
    scaler = Scaler.fit(series, val_start)
    z = scaler.transform(series)
    x_train, y_train = samples(z, 0, val_start)
    model = TwinModel(cfg.hidden)

    t0 = time.perf_counter()
    milan_dir = cfg.milan_dir or data_path.parent
    labels = dcs_labels(milan_dir, squares, z, val_start, cfg.clusters, cfg.seed)
    walls["dcs_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    init = model.init(1, cfg.seed)[0]
    vt = v_twinning(
        model,
        squares,
        labels,
        as_tensor(x_train),
        as_tensor(y_train),
        init,
        cfg.v_rounds,
        cfg.participation,
        cfg.local,
        gen,
        rng,
    )
    walls["vtwinning_s"] = time.perf_counter() - t0
    return VTwinned(
        series, squares, z, scaler, val_start, test_start, model, labels, init, vt, milan_dir, walls
    )


def run(
    data_path: Path, cfg: VhTwinConfig
) -> tuple[dict[str, Any], list[tuple[str, int, int, float, float]]]:
    """Run every method; return (the JSON report, prediction rows for the test hours in original units)."""
    torch.set_num_threads(1)  # 2 cores: one thread per process measured 4x faster than the default
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    begun = v_twinned(data_path, cfg, gen, rng)
    series, squares, z, scaler = begun.series, begun.squares, begun.z, begun.scaler
    val_start, test_start, model = begun.val_start, begun.test_start, begun.model
    labels, milan_dir, init = begun.labels, begun.milan_dir, begun.init
    walls, vt = begun.walls, begun.vt
    n_sq, hours = series.shape
    x_train, y_train = samples(z, 0, val_start)
    xt, yt = as_tensor(x_train), as_tensor(y_train)
    n_train = x_train.shape[1]
    ctwins, g_v = vt.clusters, vt.global_params
    transfers = {
        "vhtwin": {"uploads": vt.uploads, "downloads": vt.downloads},
        "fedavg": {"uploads": 0, "downloads": 0},
    }

    t0 = time.perf_counter()
    g_f = init.clone()
    for _ in range(cfg.v_rounds):
        part = np.flatnonzero(rng.random(n_sq) < cfg.participation)
        if part.size == 0:
            continue
        new, _ = model.fit(g_f.expand(part.size, -1), xt[part], yt[part], cfg.local, gen)
        g_f = fedavg(new, torch.full((part.size,), float(n_train)))
        transfers["fedavg"]["uploads"] += part.size
        transfers["fedavg"]["downloads"] += part.size
    walls["fedavg_rounds_s"] = time.perf_counter() - t0

    # ---- central model and ridge on pooled training samples
    t0 = time.perf_counter()
    pooled_x, pooled_y = xt.reshape(1, -1, xt.shape[2]), yt.reshape(1, -1)
    central, _ = model.fit(
        init.unsqueeze(0), pooled_x, pooled_y, FitConfig(cfg.central_steps, 1e-2, 256), gen
    )
    walls["central_s"] = time.perf_counter() - t0
    x_val, y_val = samples(z, val_start, test_start)
    ridge_w = _ridge(x_train, y_train, x_val, y_val)

    # ---- the stream: validation then test hours, hour by hour, under the live protocol (local_updates.py)
    t0 = time.perf_counter()
    plan = stream_plan(cfg, val_start)
    stream_hours = np.arange(val_start, hours)
    out = _Stream(n_sq, len(stream_hours))
    # cluster changes offered to the global twin, per stream hour: (cluster params, gamma), in update order
    offers: list[list[tuple[torch.Tensor, float]]] = [[] for _ in stream_hours]
    x_stream = as_tensor(
        inputs_at(z, stream_hours)
    )  # [S, hours, 10], each row only uses hours before its target
    reclusterer = Reclusterer(
        MilanGrouping(dcs.SquareAttributes.load(milan_dir, squares.tolist())),
        cfg.clusters,
        cfg.seed,
        plan.recluster_every,
        dcs.recluster(None, squares.tolist(), labels)[0],
    )
    moves = 0
    sq_list = squares.tolist()
    # each square's cluster twin as of the previous hour's close: what the forecast of this hour uses
    cluster_seen = torch.stack([ctwins.twins[ctwins.labels[s]] for s in sq_list])
    for col, t in enumerate(stream_hours.tolist()):
        x_now = x_stream[:, col : col + 1]
        out.put("persistence", col, z[:, t - 1])
        out.put("seasonal", col, z[:, t - 24])
        out.put("ridge", col, x_now[:, 0].numpy() @ ridge_w[:-1] + ridge_w[-1])
        out.put("central", col, model.predict(central.expand(n_sq, -1), x_now)[:, 0].numpy())
        out.put("fedavg", col, model.predict(g_f.expand(n_sq, -1), x_now)[:, 0].numpy())
        out.put("vhtwin_cluster", col, model.predict(cluster_seen, x_now)[:, 0].numpy())
        cluster_seen = torch.stack([ctwins.twins[ctwins.labels[s]] for s in sq_list])

        # hour t is now known: the due BSs train from their cluster twins (as of hour t - 1)
        trained = due_updates(model, plan, ctwins, sq_list, z, t)
        if trained:
            if reclusterer.due(t):  # the store re-clusters when the first update of a later hour arrives
                moves += len(reclusterer.run(ctwins, g_v))
            for u in trained:
                if u.n_samples == 0:
                    continue
                cid = ctwins.accept(u.square, u.params, u.n_samples)
                reclusterer.accepted(u.square, t, profile_upto(z[u.row], t))
                members = ctwins.members(cid)
                transfers["vhtwin"]["uploads"] += 1
                transfers["vhtwin"]["downloads"] += len(members)  # the members follow their cluster twin
                offers[col].append((ctwins.twins[cid].clone(), len(members) / n_sq))
        if (t - val_start) % cfg.update_every == 0:  # synchronous FedAvg round with a barrier
            xw, yw = samples(z, plan.first_target(t), t + 1)
            new, _ = model.fit(g_f.expand(n_sq, -1), as_tensor(xw), as_tensor(yw), cfg.stream, gen)
            g_f = fedavg(new, torch.full((n_sq,), float(xw.shape[1])))
            transfers["fedavg"]["uploads"] += n_sq
            transfers["fedavg"]["downloads"] += n_sq
    walls["stream_s"] = time.perf_counter() - t0

    # ---- H-twinning for every psi, replayed over the logged offers (BSs and clusters never read the global)
    t0 = time.perf_counter()
    val_cols = slice(0, VAL_HOURS)
    test_cols = slice(VAL_HOURS, len(stream_hours))
    actual = z[:, stream_hours]
    all_eps = _replay_global(model, g_v, 0.0, offers, x_stream)[2]
    val_eps = np.array(all_eps[: sum(len(o) for o in offers[:VAL_HOURS])])
    # the grid: 0 (synchronous updating) and quantiles of the divergences seen in validation hours
    candidates = {0.0, *(float(np.quantile(val_eps, q)) for q in PSI_QUANTILES)}
    candidates |= {float(val_eps.max()) * k for k in PSI_BEYOND}
    grid = sorted(candidates | ({cfg.psi} if cfg.psi is not None else set()))
    sweep: list[dict[str, Any]] = []
    for psi in grid:
        pred, g, _ = _replay_global(model, g_v, psi, offers, x_stream)
        out.preds[f"vhtwin@{psi!r}"] = pred
        sweep.append(
            {
                "psi": psi,
                "val_mse": metrics(pred[:, val_cols], actual[:, val_cols])["mse"],
                "test": metrics(pred[:, test_cols], actual[:, test_cols]),
                "global_syncs": g.syncs,
                "offers": g.offers,
            }
        )
    # model choice on validation: the lowest validation MSE, ties going to the larger psi (fewer syncs)
    best = min(sweep, key=lambda r: (r["val_mse"], -r["psi"]))
    chosen = cfg.psi if cfg.psi is not None else best["psi"]
    chosen_row = next(r for r in sweep if r["psi"] == chosen)
    sync0 = sweep[0]["global_syncs"]
    for row in sweep:
        row["sync_reduction_vs_psi0"] = round(1 - row["global_syncs"] / sync0, 3) if sync0 else None
        row["test_mse_vs_psi0"] = round(row["test"]["mse"] / sweep[0]["test"]["mse"], 3)
    walls["psi_sweep_s"] = time.perf_counter() - t0

    methods = ["vhtwin", "vhtwin_cluster", "fedavg", "central", "ridge", "persistence", "seasonal"]
    out.preds["vhtwin"] = out.preds[f"vhtwin@{chosen!r}"]
    report: dict[str, Any] = {"methods": {}}
    for m in methods:
        report["methods"][m] = metrics(out.preds[m][:, test_cols], actual[:, test_cols]) | {
            "val_mse": metrics(out.preds[m][:, val_cols], actual[:, val_cols])["mse"]
        }
    report["methods"]["vhtwin"] |= {
        "psi": chosen,
        "global_syncs": chosen_row["global_syncs"],
        **transfers["vhtwin"],
    }
    report["methods"]["fedavg"] |= {
        "global_syncs": cfg.v_rounds + len(range(0, len(stream_hours), cfg.update_every)),
        **transfers["fedavg"],
    }
    report["psi_sweep"] = sweep
    report["clusters"] = {
        "n": len(set(ctwins.labels.values())),
        "sizes": sorted((len(ctwins.members(c)) for c in set(ctwins.labels.values())), reverse=True),
        "moves_at_recluster": moves,
        "reclusterings": reclusterer.membership.epoch,
    }
    report["split"] = {"train_hours": val_start, "val_hours": VAL_HOURS, "test_hours": TEST_HOURS}
    report["wall_s"] = {k: round(v, 2) for k, v in walls.items()}

    rows: list[tuple[str, int, int, float, float]] = []
    for m in methods:
        rows += prediction_rows(
            m, squares, stream_hours[test_cols], series, scaler, out.preds[m][:, test_cols]
        )
    return report, rows


def prediction_rows(
    method: str,
    squares: np.ndarray,
    hours: np.ndarray,
    series: np.ndarray,
    scaler: Scaler,
    pred_z: np.ndarray,
) -> list[tuple[str, int, int, float, float]]:
    """``(method, square, hour_index, actual, predicted)`` in original units for z-scored ``pred_z [S, hours]``."""
    pred = scaler.inverse(pred_z).tolist()
    act = series[:, hours].tolist()
    rows: list[tuple[str, int, int, float, float]] = []
    for idx, square_id in enumerate(squares.tolist()):
        rows += [
            (method, square_id, hour, act[idx][j], pred[idx][j]) for j, hour in enumerate(hours.tolist())
        ]
    return rows


def _replay_global(
    model: TwinModel,
    start: torch.Tensor,
    psi: float,
    offers: list[list[tuple[torch.Tensor, float]]],
    x_stream: torch.Tensor,
) -> tuple[np.ndarray, GlobalTwin, list[float]]:
    """Forecast every stream hour with the global twin that H-twinning at ``psi`` has made of the updates
    up to two hours before (the forecast of hour t is issued when hour t - 1 closes; see local_updates.py).

    Also returns the twin and the divergence eps of every offer, in order.
    """
    g = GlobalTwin(start.clone(), psi)
    epsilons: list[float] = []
    n_sq, n_hours, _ = x_stream.shape
    pred = np.empty((n_sq, n_hours))
    seen = g.params  # the global as of the previous hour's close
    for col in range(n_hours):
        pred[:, col] = model.predict(seen.expand(n_sq, -1), x_stream[:, col : col + 1])[:, 0].numpy()
        seen = g.params
        for params, gamma in offers[col]:
            g.offer(params, gamma)
            epsilons.append(g.last_epsilon)
    return pred, g, epsilons


def _ridge(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> np.ndarray:
    """Closed-form ridge on pooled samples (with intercept); alpha by validation MSE."""
    a = np.concatenate([x.reshape(-1, x.shape[2]), np.ones((x.shape[0] * x.shape[1], 1))], axis=1)
    b = y.reshape(-1)
    av = np.concatenate(
        [x_val.reshape(-1, x_val.shape[2]), np.ones((x_val.shape[0] * x_val.shape[1], 1))], axis=1
    )
    best, best_w = np.inf, np.zeros(a.shape[1])
    for alpha in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):
        reg = alpha * np.eye(a.shape[1])
        reg[-1, -1] = 0.0  # the intercept is not shrunk
        w = np.linalg.solve(a.T @ a + reg, a.T @ b)
        mse = float(((av @ w - y_val.reshape(-1)) ** 2).mean())
        if mse < best:
            best, best_w = mse, w
    return best_w
