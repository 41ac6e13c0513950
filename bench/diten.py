"""``nettwin bench diten``: DITEN's experiment, PPO association + optimal gamma against B1..B4.

The paper's setting (20 users in 120 x 120 m, 9..21 servers, 750 slots, phi in {0, 0.2, 0.4, 0.6}, Table
II) in the simulator of ``twin_store.federation.edge``; users move by Gauss-Markov mobility (stated
there). Each learned method (``ppo``, ``b1`` actor-critic, ``b4`` DDPG) trains once on fresh scenarios
drawn over the whole sweep (server count and phi per episode: its networks score (twin, server) pairs, so
one policy serves every server count), then every method runs the same evaluation scenario per
(servers, phi): same servers, users, mobility and data (common random numbers).

Ratios are the paper's "PPO is x times higher than B": ``(obj_ppo - obj_b) / |obj_b|``, as the mean of the
per-setting ratios and as the ratio of the objectives averaged over all settings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from twin_store.federation.edge.learning import LEARNED, METHODS, TrainPlan, run_episode, train
from twin_store.federation.edge.simulator import DitenConfig

PAPER_RATIOS = {"b1": 0.1022, "b2": 0.5070, "b3": 0.6842, "b4": 1.5025}
BASELINES = ("b1", "b2", "b3", "b4")


@dataclass(frozen=True)
class DitenBench:
    servers: tuple[int, ...] = (9, 11, 13, 15, 17, 19, 21)
    phis: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6)
    slots: int = 750
    seed: int = 1
    plan: TrainPlan = field(default_factory=TrainPlan)
    methods: tuple[str, ...] = METHODS


QUICK_PLAN = TrainPlan(episodes=2, episode_slots=20, rollout=10, ddpg_every=4)


def quick(cfg: DitenBench) -> DitenBench:
    """Seconds, for tests: the first server count and phi, 20 slots, two tiny training episodes."""
    plan = replace(QUICK_PLAN, baseline_prior=cfg.plan.baseline_prior)
    return replace(cfg, servers=cfg.servers[:1], phis=cfg.phis[:1], slots=min(cfg.slots, 20), plan=plan)


def check(cfg: DitenBench) -> None:
    if not cfg.servers or min(cfg.servers) < 1:
        raise ValueError("--servers: give at least one server count, each >= 1")
    if not cfg.phis or any(not 0.0 <= p <= 1.0 for p in cfg.phis):
        raise ValueError("--phi: label-skew distances in [0, 1]")
    if cfg.slots < 1:
        raise ValueError("--slots must be >= 1")


def _ratio(ours: float, base: float) -> float | None:
    return None if base == 0 else (ours - base) / abs(base)


def run(cfg: DitenBench) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base = DitenConfig()
    agents = {}
    train_s = {}
    for i, method in enumerate(m for m in cfg.methods if m in LEARNED):
        t = time.perf_counter()
        agents[method] = train(method, base, cfg.servers, cfg.phis, cfg.plan, seed=cfg.seed * 1000 + i + 1)
        train_s[method] = round(time.perf_counter() - t, 1)
    results = []
    for servers in cfg.servers:
        for phi in cfg.phis:
            scenario = replace(base, servers=servers, phi=phi)
            # the evaluation scenario is never one the agents trained on (training seeds differ)
            seed = 10_000_000 + cfg.seed * 1000 + servers * 10 + round(phi * 10)
            for method in cfg.methods:
                r = run_episode(method, scenario, seed, cfg.slots, agents.get(method))
                row = {"servers": servers, "phi": phi, **asdict(r)}
                results.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    report: dict[str, Any] = {
        "results": results,
        "ratios": ratios(results),
        "paper_ratios": PAPER_RATIOS,
        "setting": {
            "users": base.users,
            "area_m": base.area_m,
            "servers": list(cfg.servers),
            "phi": list(cfg.phis),
            "slots": cfg.slots,
            "seed": cfg.seed,
            "mobility": f"Gauss-Markov, mean speed {base.mean_speed} m/slot, memory {base.memory}, reflecting",
            "training": {**asdict(cfg.plan), "seconds": train_s},
        },
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return report


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """PPO against each baseline: mean of per-setting ratios, and ratio of the mean objectives."""
    by: dict[tuple[int, float], dict[str, float]] = {}
    for r in results:
        by.setdefault((r["servers"], r["phi"]), {})[r["method"]] = r["objective"]
    out: dict[str, dict[str, float | None]] = {}
    for b in BASELINES:
        pairs = [(v["ppo"], v[b]) for v in by.values() if "ppo" in v and b in v]
        if not pairs:
            continue
        per = [x for x in (_ratio(o, q) for o, q in pairs) if x is not None]
        mean_ppo, mean_b = float(np.mean([o for o, _ in pairs])), float(np.mean([q for _, q in pairs]))
        means = _ratio(mean_ppo, mean_b)
        out[b] = {
            "mean_of_ratios": round(float(np.mean(per)), 4) if per else None,
            "ratio_of_means": None if means is None else round(means, 4),
            "ppo_wins": sum(o > q for o, q in pairs),
            "settings": len(pairs),
        }
    return out


def plot(report: dict[str, Any], folder: Path) -> list[Path]:
    """Two SVG line charts (no plotting library here): objective against servers (mean over phi) and phi."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = report["results"]
    methods = sorted({r["method"] for r in rows}, key=list(METHODS).index)
    paths = []
    for axis in ("servers", "phi"):
        xs = sorted({r[axis] for r in rows})
        series = {
            m: [
                float(np.mean([r["objective"] for r in rows if r["method"] == m and r[axis] == x]))
                for x in xs
            ]
            for m in methods
        }
        path = folder / f"diten_objective_vs_{axis}.svg"
        path.write_text(_svg(f"objective (eq. 22) vs {axis}", axis, xs, series))
        paths.append(path)
    return paths


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def _svg(title: str, xlabel: str, xs: list[float], series: dict[str, list[float]]) -> str:
    w, h, m = 640, 400, 60
    ys = [y for v in series.values() for y in v]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m)

    def py(y: float) -> float:
        return h - m - (y - lo) / (hi - lo) * (h - 2 * m)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<text x="{w / 2}" y="20" text-anchor="middle">{title}</text>',
        f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
        f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">{xlabel}</text>',
    ]
    for x in xs:
        parts.append(f'<text x="{px(x):.1f}" y="{h - m + 15}" text-anchor="middle">{x:g}</text>')
    for y in np.linspace(lo, hi, 5):
        parts.append(f'<text x="{m - 5}" y="{py(y):.1f}" text-anchor="end">{y:.3f}</text>')
    for i, (name, v) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, v, strict=True))
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{w - m + 5}" y="{m + 15 * i}" fill="{c}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
