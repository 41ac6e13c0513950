"""Training and running DITEN's policies in the simulator (no I/O).

Methods (the paper's names): ``ppo`` (PPO association + optimal gamma), ``b1`` (plain actor-critic +
optimal gamma), ``b2`` (nearest + optimal gamma), ``b3`` (nearest + random gamma), ``b4`` (DDPG +
optimal gamma); ``balanced`` (capacity-aware greedy + optimal gamma) is the running system's third policy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from twin_store.federation.edge.costs import SlotTerms
from twin_store.federation.edge.features import FEATURES, pair_features
from twin_store.federation.edge.gamma import solve_gamma
from twin_store.federation.edge.policies import Balanced, nearest, random_gamma
from twin_store.federation.edge.simulator import (
    DitenConfig,
    DitenEnv,
    FeatureScale,
    Servers,
    Trace,
    coefficients,
    move_gains,
)
from twin_store.models.diten_agents import A2C, DDPG, PPO, ActorCritic, AgentConfig

METHODS = ("ppo", "b1", "b2", "b3", "b4", "balanced")
LEARNED = {"ppo": PPO, "b1": A2C, "b4": DDPG}
Agent = ActorCritic | DDPG


@dataclass(frozen=True)
class TrainPlan:
    """How long each learned policy trains: episodes of fresh scenarios, phi drawn per episode."""

    episodes: int = 80
    episode_slots: int = 100
    rollout: int = 50
    ddpg_every: int = 8
    # the distance prior of the baselines' actors (B1, B4); None: PPO's (AgentConfig.distance_prior).
    # 0 trains them as the paper describes them, plain actor-critic and DDPG without a nearest-server start
    baseline_prior: float | None = None


def _features(env: DitenEnv) -> np.ndarray:
    return pair_features(env.servers, env.ctx, env.cfg.params, env.last_terms, env.feature_scale)


@dataclass(frozen=True)
class Deployment:
    """A fixed deployment to train and run on instead of random scenarios (Milan): its servers, its
    users' trace and its feature scale. Its users' samples are their training windows, which already
    reuse earlier data, so gamma stays 0 there."""

    servers: Servers
    trace: Trace
    scale: FeatureScale
    capacity: np.ndarray | None = None  # declared samples per slot per server (``balanced`` respects them)


def _env(cfg: DitenConfig, seed: int, deployment: Deployment | None, start: int = 0) -> DitenEnv:
    if deployment is None:
        return DitenEnv(cfg, seed)
    d = deployment
    return DitenEnv(cfg, seed, servers=d.servers, trace=d.trace, scale=d.scale, start=start)


def _gamma(env: DitenEnv, host: np.ndarray) -> np.ndarray:
    if env.trace is not None:
        return np.zeros(len(host))
    co = coefficients(env.servers, env.ctx, host, env.cfg.params)
    return solve_gamma(env.servers.compute_cap, env.ctx, co, env.cfg.params)


def _optimal_step(env: DitenEnv, host: np.ndarray) -> tuple[SlotTerms, np.ndarray]:
    gamma = _gamma(env, host)
    return env.step(host, gamma), gamma


def train(
    method: str,
    cfg: DitenConfig,
    servers: tuple[int, ...],
    phis: tuple[float, ...],
    plan: TrainPlan,
    seed: int,
    deployment: Deployment | None = None,
) -> Agent:
    """Train one learned method on ``plan.episodes`` fresh scenarios, server count and phi drawn per episode.

    The networks score (twin, server) pairs, so one policy serves every server count of the sweep.
    """
    rng = np.random.default_rng(seed)
    agent_cfg = AgentConfig()
    if method != "ppo" and plan.baseline_prior is not None:
        agent_cfg = replace(agent_cfg, distance_prior=plan.baseline_prior)
    agent: Agent = LEARNED[method](FEATURES, agent_cfg, seed)  # type: ignore[assignment]
    for episode in range(plan.episodes):
        scenario = replace(cfg, servers=int(rng.choice(servers)), phi=float(rng.choice(phis)))
        days = 1 if deployment is None else len(deployment.trace.samples)
        env = _env(scenario, seed * 100_003 + episode, deployment, start=int(rng.integers(days)))
        if isinstance(agent, DDPG):
            _ddpg_episode(agent, env, plan)
        else:
            _actor_critic_episode(agent, env, plan)
    return agent


def _actor_critic_episode(agent: ActorCritic, env: DitenEnv, plan: TrainPlan) -> None:
    rows: list[tuple[Any, ...]] = []
    x = _features(env)
    for t in range(plan.episode_slots):
        d = agent.act(x)
        ctx = env.ctx
        terms, gamma = _optimal_step(env, d.host)
        # counterfactual credit: this slot's objective minus its expectation over the twin's own choice
        credit = -(d.probs * move_gains(env.servers, ctx, d.host, gamma, env.cfg.params)).sum(-1)
        reward = np.float32(terms.objective)
        rows.append((x, d.host.astype(np.float32), d.logp, np.float32(d.value), reward, credit))
        x = _features(env)
        if len(rows) == plan.rollout or t == plan.episode_slots - 1:
            feats, hosts, logps, values, rewards, credits = zip(*rows, strict=True)
            batch = {
                "features": np.stack(feats),
                "host": np.stack(hosts),
                "logp": np.stack(logps).astype(np.float32),
                "value": np.asarray(values, dtype=np.float32),
                "reward": np.asarray(rewards, dtype=np.float32),
                "credit": np.stack(credits).astype(np.float32),
            }
            agent.update(batch, agent.act(x).value)  # type: ignore[attr-defined]
            rows = []


def _ddpg_episode(agent: DDPG, env: DitenEnv, plan: TrainPlan) -> None:
    x = _features(env)
    for t in range(plan.episode_slots):
        a = agent.scores(x, explore=True)
        terms, _ = _optimal_step(env, agent.choose(x, a))
        x_next = _features(env)
        agent.remember(x, a, terms.objective, x_next)
        if t % plan.ddpg_every == 0:
            agent.update()
        x = x_next


@dataclass(frozen=True)
class EpisodeResult:
    method: str
    objective: float  # mean over slots of eq. 22
    utility: float  # mean rho
    cost: float  # mean energy per slot (sum of C_s)
    migration: float
    sync: float
    compute: float
    migrations: float  # twins moved per slot
    gamma: float  # mean reuse share


def run_episode(
    method: str,
    cfg: DitenConfig,
    seed: int,
    slots: int,
    agent: Agent | None = None,
    deployment: Deployment | None = None,
) -> EpisodeResult:
    """One evaluation episode: same seed, same users, mobility and data for every method."""
    env = _env(cfg, seed, deployment)
    p = cfg.params
    rng = np.random.default_rng(seed + 7)
    balanced_policy = Balanced(None if deployment is None else deployment.capacity)
    acc = np.zeros(8)
    for _ in range(slots):
        ctx = env.ctx
        if method in ("b2", "b3"):
            host = nearest(ctx.distance)
        elif method == "balanced":
            host = balanced_policy.associate(env.servers, ctx, p)
        elif isinstance(agent, DDPG):
            x = _features(env)
            host = agent.choose(x, agent.scores(x, explore=False))
        elif isinstance(agent, ActorCritic):
            host = agent.act(_features(env), greedy=True).host
        else:
            raise ValueError(f"method {method!r} needs a trained agent")
        gamma = random_gamma(len(host), rng) if method == "b3" else _gamma(env, host)
        moved = float(np.sum((ctx.prev_host >= 0) & (ctx.prev_host != host)))
        terms = env.step(host, gamma)
        acc += [
            terms.objective,
            terms.utility,
            terms.cost,
            float(terms.migration.sum()),
            float(terms.sync.sum()),
            float(terms.compute.sum()),
            moved,
            float(gamma.mean()),
        ]
    m = acc / max(slots, 1)
    return EpisodeResult(method, *(float(v) for v in m))
