"""DITEN's policies on Milan (``nettwin bench diten --milan DIR``): BS twins on declared edge sites.

- BSs: the squares of the hourly file, each at its serving LTE base station from OpenCellID
  (``twin_store.federation.dcs.SquareAttributes``).
- Sites: ``[[edge.sites]]`` of the settings when declared, else :data:`MILAN_SITES` (six sites at
  landmarks of the city, capacities in samples per day summing to ~1.1x the demand).
- Data sizes: VH-Twin's stream (``StreamPlan`` defaults): every BS trains once a day on the hours of its
  window (``window`` hours, from ``FIRST_TARGET`` on) that hold traffic; a slot is a day. The twin's
  size is its LSTM's parameters. The window is the stream's reuse of earlier data, so gamma is 0 here
  (as in the running ledger).
- Radio: :data:`MILAN_PARAMS` (an LTE carrier at macro-BS power; the paper's user uplink does not reach
  kilometres).
- Caps and Norm's f0 follow the deployment: q_s and p_s are a site's share (by declared capacity) of
  ``HEADROOM`` times the compute and sync energy of all BSs at their nearest sites; f0 is a quarter of
  the mean per-site energy under ``nearest``, so Norm is mid-range there.
- Policies: ``nearest``, ``balanced`` (capacity-aware greedy on the declared capacities in samples, the
  running ledger's rule) and ``ppo`` (the learned association,
  trained on this deployment: episodes start on different days). Energies are eqs. 13-15 summed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ingest.errors import InputError
from twin_store.federation import dcs
from twin_store.federation.edge.costs import DitenParams, compute_energy_per_sample, sync_cost
from twin_store.federation.edge.deployed import save_agent as save
from twin_store.federation.edge.learning import Deployment, TrainPlan, run_episode, train
from twin_store.federation.edge.ledger import Site, project
from twin_store.federation.edge.simulator import DitenConfig, FeatureScale, Servers, Trace
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.samples import FIRST_TARGET
from twin_store.models.diten_agents import ActorCritic

HOURLY_FILE = "hourly_150squares_62days.csv"
# six declared sites (landmarks; capacity in samples trained per day)
MILAN_SITES = (
    Site("duomo", 45.4642, 9.1900, 12_000),
    Site("centrale", 45.4861, 9.2045, 10_000),
    Site("garibaldi", 45.4845, 9.1873, 9_000),
    Site("porta-romana", 45.4517, 9.2036, 9_000),
    Site("navigli", 45.4540, 9.1700, 8_000),
    Site("citta-studi", 45.4780, 9.2270, 8_000),
)
# the deployment's radio: a BS reaches a site kilometres away, so eq. 14 takes an LTE carrier (20 MHz)
# at macro-BS power (40 W) instead of the paper's 15 kHz / 200 mW user uplink, whose rate vanishes
# beyond a few hundred metres; the other constants are Table II's
MILAN_PARAMS = DitenParams(sample_bits=8 * 250, bandwidth_hz=20e6, power_w=40.0)
LSTM_PARAMS = 17_217
HEADROOM = 1.5  # the VH-Twin LSTM (64 hidden) as the store publishes it: 4 bytes each
SAMPLE_BYTES = 250


@dataclass(frozen=True)
class MilanScenario:
    cfg: DitenConfig
    servers: Servers
    trace: Trace
    scale: FeatureScale
    sites: tuple[Site, ...]
    squares: list[int]


def daily_samples(series: np.ndarray, plan: StreamPlan) -> np.ndarray:
    """(days, BSs): samples each BS trains on in its daily local update (finite hours of its window)."""
    hours = series.shape[1]
    days = []
    for day in range(FIRST_TARGET // 24 + 1, hours // 24):
        hour = day * 24 + 23
        lo = plan.first_target(hour)
        days.append(np.isfinite(series[:, lo : hour + 1]).sum(axis=1))
    return np.asarray(days, dtype=float)


def load(
    milan_dir: Path, sites: tuple[Site, ...] = MILAN_SITES, params: DitenParams | None = None
) -> MilanScenario:
    p = params or MILAN_PARAMS
    path = milan_dir / HOURLY_FILE
    if not path.is_file():
        raise InputError(f"{path}: no such file (the Milan run reads the hourly traffic of {HOURLY_FILE})")
    frame = pd.read_csv(path)
    squares = frame["square_id"].astype(int).tolist()
    series = frame.drop(columns=["square_id"]).to_numpy(dtype=float)
    attrs = dcs.SquareAttributes.load(milan_dir, squares)
    lat0, lon0 = float(np.mean([s.lat for s in sites])), float(np.mean([s.lon for s in sites]))
    bs_xy = project(attrs.bs_lat, attrs.bs_lon, lat0, lon0)
    site_xy = project(np.array([s.lat for s in sites]), np.array([s.lon for s in sites]), lat0, lon0)
    samples = daily_samples(series, StreamPlan(seed=1, start_hour=FIRST_TARGET, start_ms=0))
    twin = np.full(len(squares), LSTM_PARAMS * 4 / SAMPLE_BYTES)
    dist = np.sqrt(((bs_xy[:, None, :] - site_xy[None, :, :]) ** 2).sum(axis=2))
    eps = np.array([s.eps for s in sites])
    energy = np.array([s.energy for s in sites])
    capacity = np.array([s.capacity for s in sites])
    near = dist.argmin(axis=1)
    d_near = dist[np.arange(len(near)), near]
    mean_d = float(samples.mean())
    cmp_near = mean_d * compute_energy_per_sample(eps[near], energy[near], d_near, p)
    syn_near = mean_d * sync_cost(np.ones_like(d_near), d_near, p)
    share = capacity / capacity.sum()
    servers = Servers(
        position=site_xy,
        compute_cap=share * HEADROOM * float(cmp_near.sum()),
        sync_cap=share * HEADROOM * float(syn_near.sum()),
        eps=eps,
        energy=energy,
        manhattan=np.abs(site_xy[:, None, :] - site_xy[None, :, :]).sum(axis=2),
    )
    # f0: a quarter of the mean per-site energy when every BS trains at its nearest site
    near = dist.argmin(axis=1)
    d_near = dist[np.arange(len(near)), near]
    mean_d = float(samples.mean())
    per_bs = mean_d * (
        compute_energy_per_sample(eps[near], energy[near], d_near, p)
        + sync_cost(np.ones_like(d_near), d_near, p)
    )
    f0 = float(per_bs.sum() / len(sites) / 4)
    p = replace(p, f0=f0)
    span = float(np.ptp(bs_xy, axis=0).max())
    cfg = DitenConfig(users=len(squares), servers=len(sites), area_m=span, phi=0.0, params=p)
    scale = FeatureScale(
        distance=span,
        compute=float(np.median(per_bs)) * 0.8,
        sync=float(np.median(syn_near)),
        migration=float(p.n_mig * np.median(servers.manhattan) * (mean_d + twin[0])),
        server_cost=4 * f0,
        samples=max(mean_d, 1.0),
        energy=float(energy.mean()),
    )
    return MilanScenario(cfg, servers, Trace(bs_xy, samples, twin), scale, sites, squares)


MILAN_METHODS = ("nearest", "balanced", "ppo")
QUICK_MILAN_PLAN = TrainPlan(episodes=1, episode_slots=5, rollout=5)
MILAN_PLAN = TrainPlan(episodes=30, episode_slots=40, rollout=20)


def run(
    milan_dir: Path, sites: tuple[Site, ...], plan: TrainPlan, seed: int, save_agent: Path | None = None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    sc = load(milan_dir, sites)
    days = len(sc.trace.samples)
    capacity = np.array([s.capacity for s in sc.sites])
    deployment = Deployment(sc.servers, sc.trace, sc.scale, capacity)
    agent = train("ppo", sc.cfg, (sc.cfg.servers,), (0.0,), plan, seed, deployment)
    if save_agent is not None:
        assert isinstance(agent, ActorCritic)
        save(save_agent, agent, sc.servers, sc.scale, sc.cfg.params, float(sc.trace.twin_size[0]))
    out = []
    for method in MILAN_METHODS:
        name = {"nearest": "b2", "balanced": "balanced", "ppo": "ppo"}[method]
        res = run_episode(name, sc.cfg, seed, days, agent if method == "ppo" else None, deployment)
        out.append({"method": method, **{k: round(v, 4) for k, v in asdict(res).items() if k != "method"}})
    base = next(r for r in out if r["method"] == "nearest")
    for row in out:
        row["energy_vs_nearest"] = round(row["cost"] / base["cost"], 4) if base["cost"] else None
    return {
        "milan": out,
        "setting": {
            "bss": len(sc.squares),
            "sites": [s.name for s in sc.sites],
            "days": days,
            "mean_samples_per_update": round(float(sc.trace.samples.mean()), 1),
            "f0": round(sc.cfg.params.f0, 1),
            "training": plan.__dict__,
        },
        "wall_s": round(time.perf_counter() - t0, 1),
    }
