"""The paper's setting as a seeded simulator: users moving in a square area, edge servers, slots.

Mobility (the paper gives none): Gauss-Markov. Each user keeps a speed and a heading that relax
towards their means with memory ``alpha`` plus Gaussian noise; users reflect off the borders. A slot's
new data ``D_{u,t}`` is drawn uniformly in [200, 2000] samples, independently per user and slot.

A slot is described by :class:`SlotContext` (positions, distances, data, previous hosts); the energy of
an association and gamma follows from :func:`coefficients` (each twin's cost is affine in its gamma)
and :func:`evaluate` (eq. 22). The gamma solver and the policies use the same two functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from twin_store.federation.edge.costs import (
    Array,
    DitenParams,
    SlotTerms,
    barrier,
    compute_energy_per_sample,
    norm,
    slot_objective,
    sync_cost,
    utility,
)

IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class DitenConfig:
    """The simulated setting: Table II ranges and our mobility model."""

    users: int = 20
    servers: int = 9
    area_m: float = 120.0
    phi: float = 0.0
    min_samples: int = 200
    max_samples: int = 2000
    compute_cap: tuple[float, float] = (1.4e3, 1.5e3)  # q_s
    sync_cap: tuple[float, float] = (120.0, 130.0)  # p_s
    eps_s: tuple[float, float] = (54.0, 56.0)
    twin_size: tuple[float, float] = (4.4e3, 4.6e3)  # D^twin
    # ours: E_s, the per-sample training energy of a server (servers differ in efficiency)
    server_energy: tuple[float, float] = (2e3, 1.2e4)
    # ours: Gauss-Markov mobility (metres per slot, memory, noise)
    mean_speed: float = 3.0
    speed_std: float = 1.0
    heading_std: float = 0.6
    memory: float = 0.85
    params: DitenParams = field(default_factory=DitenParams)


@dataclass(frozen=True)
class FeatureScale:
    """What each feature column is divided by (the simulator's typical magnitudes by default); a
    deployment at another scale (Milan: kilometres, hundreds of twins) passes its own."""

    distance: float = 120.0
    compute: float = 100.0  # a pair's compute energy at gamma = 0
    sync: float = 20.0
    migration: float = 50.0
    server_cost: float = 800.0
    samples: float = 2000.0
    energy: float = 1e4  # E_s


@dataclass(frozen=True)
class Trace:
    """A deployment replayed as a scenario: users (BSs) that do not move, and their samples per slot."""

    position: Array  # (U, 2) metres
    samples: Array  # (T, U) samples each user trains on in each slot
    twin_size: Array  # (U,) D^twin in samples


class StaticUsers:
    def __init__(self, position: Array) -> None:
        self.position = position

    def step(self) -> Array:
        return self.position


@dataclass(frozen=True)
class Servers:
    """The edge servers of one scenario (positions in metres, capacities and energies)."""

    position: Array  # (S, 2)
    compute_cap: Array  # q_s
    sync_cap: Array  # p_s
    eps: Array
    energy: Array  # E_s
    manhattan: Array  # (S, S) l_{s,s'}

    @property
    def count(self) -> int:
        return len(self.compute_cap)


def make_servers(position: Array, cfg: DitenConfig, rng: np.random.Generator) -> Servers:
    n = len(position)
    manhattan = np.abs(position[:, None, :] - position[None, :, :]).sum(axis=2)
    return Servers(
        position=position,
        compute_cap=rng.uniform(*cfg.compute_cap, n),
        sync_cap=rng.uniform(*cfg.sync_cap, n),
        eps=rng.uniform(*cfg.eps_s, n),
        energy=rng.uniform(*cfg.server_energy, n),
        manhattan=manhattan,
    )


@dataclass(frozen=True)
class SlotContext:
    """What the cloud knows when it decides slot t."""

    t: int
    position: Array  # (U, 2)
    distance: Array  # (U, S) Euclidean user-server
    samples: Array  # D_{u,t}
    prev_samples: Array  # D_{u,t-1} (what gamma can reuse)
    prev_host: IntArray  # kappa^{t-1}: server index, -1 before the first slot
    twin_size: Array  # D^twin_u
    phi: float


@dataclass(frozen=True)
class Coefficients:
    """Each twin's cost as affine functions of its gamma: cost = c0 + a gamma, compute = b0 + b gamma."""

    host: IntArray
    c0: Array
    a: Array
    b0: Array
    b: Array
    sync: Array
    migration_fixed: Array  # migration energy at gamma = 0
    migration_slope: Array


def coefficients(servers: Servers, ctx: SlotContext, host: IntArray, p: DitenParams) -> Coefficients:
    users = np.arange(len(host))
    dist = ctx.distance[users, host]
    moved = (ctx.prev_host >= 0) & (ctx.prev_host != host)
    mig_dist = np.where(moved, servers.manhattan[np.maximum(ctx.prev_host, 0), host], 0.0)
    per_sample = compute_energy_per_sample(servers.eps[host], servers.energy[host], dist, p)
    sync = sync_cost(ctx.samples, dist, p)
    mig0 = p.n_mig * mig_dist * (ctx.samples + ctx.twin_size)
    mig_a = p.n_mig * mig_dist * ctx.prev_samples
    return Coefficients(
        host=host,
        c0=mig0 + sync + per_sample * ctx.samples,
        a=mig_a + per_sample * ctx.prev_samples,
        b0=per_sample * ctx.samples,
        b=per_sample * ctx.prev_samples,
        sync=sync,
        migration_fixed=mig0,
        migration_slope=mig_a,
    )


def pair_coefficients(servers: Servers, ctx: SlotContext, p: DitenParams) -> Coefficients:
    """The coefficients of every twin on every server at once: each field is (users, servers)."""
    users, n = ctx.distance.shape
    host = np.broadcast_to(np.arange(n, dtype=np.int64), (users, n))
    prev = ctx.prev_host[:, None]
    moved = (prev >= 0) & (prev != host)
    mig_dist = np.where(moved, servers.manhattan[np.maximum(ctx.prev_host, 0)], 0.0)
    per_sample = compute_energy_per_sample(servers.eps[None, :], servers.energy[None, :], ctx.distance, p)
    new, old = ctx.samples[:, None], ctx.prev_samples[:, None]
    sync = sync_cost(new, ctx.distance, p)
    mig0 = p.n_mig * mig_dist * (new + ctx.twin_size[:, None])
    mig_a = p.n_mig * mig_dist * old
    return Coefficients(
        host=host,
        c0=mig0 + sync + per_sample * new,
        a=mig_a + per_sample * old,
        b0=per_sample * new,
        b=per_sample * old,
        sync=sync,
        migration_fixed=mig0,
        migration_slope=mig_a,
    )


def evaluate_coefficients(
    servers: Servers, ctx: SlotContext, co: Coefficients, gamma: Array, p: DitenParams
) -> SlotTerms:
    n = servers.count
    dbar = ctx.samples + gamma * ctx.prev_samples
    rho = utility(dbar, ctx.phi)
    mig = np.bincount(co.host, co.migration_fixed + co.migration_slope * gamma, minlength=n).astype(float)
    sync = np.bincount(co.host, co.sync, minlength=n).astype(float)
    comp = np.bincount(co.host, co.b0 + co.b * gamma, minlength=n).astype(float)
    return slot_objective(rho, mig, sync, comp, servers.compute_cap, servers.sync_cap, p)


def evaluate(servers: Servers, ctx: SlotContext, host: IntArray, gamma: Array, p: DitenParams) -> SlotTerms:
    """Eq. 22 of one slot for an association ``host`` (server per twin) and reuse shares ``gamma``."""
    return evaluate_coefficients(servers, ctx, coefficients(servers, ctx, host, p), gamma, p)


class GaussMarkov:
    """Gauss-Markov mobility in a square, reflecting at the borders (seeded)."""

    def __init__(self, n: int, cfg: DitenConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.rng = rng
        self.position = rng.uniform(0.0, cfg.area_m, (n, 2))
        self.speed = np.full(n, cfg.mean_speed)
        self.heading = rng.uniform(-np.pi, np.pi, n)
        self.mean_heading = self.heading.copy()

    def step(self) -> Array:
        c, m = self.cfg, self.cfg.memory
        n = len(self.speed)
        noise = np.sqrt(1.0 - m * m)
        self.speed = np.maximum(
            m * self.speed + (1 - m) * c.mean_speed + noise * c.speed_std * self.rng.standard_normal(n), 0.0
        )
        self.heading = (
            m * self.heading
            + (1 - m) * self.mean_heading
            + noise * c.heading_std * (self.rng.standard_normal(n))
        )
        step = self.speed[:, None] * np.stack([np.cos(self.heading), np.sin(self.heading)], axis=1)
        pos = self.position + step
        # reflect off the walls and turn the heading (and its mean) around
        for axis in (0, 1):
            low, high = pos[:, axis] < 0, pos[:, axis] > c.area_m
            pos[low, axis] = -pos[low, axis]
            pos[high, axis] = 2 * c.area_m - pos[high, axis]
            hit = low | high
            if hit.any():
                if axis == 0:
                    self.heading[hit] = np.pi - self.heading[hit]
                    self.mean_heading[hit] = np.pi - self.mean_heading[hit]
                else:
                    self.heading[hit] = -self.heading[hit]
                    self.mean_heading[hit] = -self.mean_heading[hit]
        self.position = np.clip(pos, 0.0, c.area_m)
        return self.position


class DitenEnv:
    """One episode of the paper's setting: ``reset`` then ``step(host, gamma)`` per slot."""

    def __init__(
        self,
        cfg: DitenConfig,
        seed: int,
        servers: Servers | None = None,
        trace: Trace | None = None,
        scale: FeatureScale | None = None,
        start: int = 0,
    ) -> None:
        """With ``trace`` the users stand still and train on the trace's samples from slot ``start`` on."""
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        if servers is None:
            servers = make_servers(self.rng.uniform(0.0, cfg.area_m, (cfg.servers, 2)), cfg, self.rng)
        self.servers = servers
        self.trace = trace
        self.start = start
        self.feature_scale = scale or FeatureScale(distance=cfg.area_m)
        self.mobility: GaussMarkov | StaticUsers
        if trace is None:
            self.twin_size = self.rng.uniform(*cfg.twin_size, cfg.users)
            self.mobility = GaussMarkov(cfg.users, cfg, self.rng)
        else:
            self.twin_size = trace.twin_size
            self.mobility = StaticUsers(trace.position)
        self.t = 0
        self.prev_host: IntArray = np.full(cfg.users, -1, dtype=np.int64)
        self.prev_samples = (
            self._draw_samples()
            if trace is None
            else trace.samples[(start - 1) % len(trace.samples)].astype(float)
        )
        self.last_terms: SlotTerms | None = None
        self.ctx = self._context()

    def _draw_samples(self) -> Array:
        c = self.cfg
        if self.trace is not None:
            return self.trace.samples[(self.start + self.t) % len(self.trace.samples)].astype(float)
        return self.rng.integers(c.min_samples, c.max_samples + 1, c.users).astype(float)

    def _context(self) -> SlotContext:
        pos = self.mobility.position
        dist = np.sqrt(((pos[:, None, :] - self.servers.position[None, :, :]) ** 2).sum(axis=2))
        return SlotContext(
            t=self.t,
            position=pos.copy(),
            distance=dist,
            samples=self._draw_samples(),
            prev_samples=self.prev_samples,
            prev_host=self.prev_host.copy(),
            twin_size=self.twin_size,
            phi=self.cfg.phi,
        )

    def step(self, host: IntArray, gamma: Array) -> SlotTerms:
        terms = evaluate(self.servers, self.ctx, host, gamma, self.cfg.params)
        self.last_terms = terms
        self.prev_host = np.asarray(host, dtype=np.int64).copy()
        self.prev_samples = self.ctx.samples
        self.t += 1
        self.mobility.step()
        self.ctx = self._context()
        return terms


def move_gains(servers: Servers, ctx: SlotContext, host: IntArray, gamma: Array, p: DitenParams) -> Array:
    """(users, servers): how much eq. 22 of this slot changes if twin u alone moved to server s.

    gamma stays as chosen, so the utility does not change; only the two servers' Norm and barrier terms
    do. Zero on each twin's own server. The learned policies use it as a per-twin counterfactual.
    """
    n = servers.count
    users = np.arange(len(host))
    pairs = pair_coefficients(servers, ctx, p)
    g = gamma[:, None]
    cost = pairs.c0 + pairs.a * g
    comp = pairs.b0 + pairs.b * g
    sync = pairs.sync
    own_cost, own_comp, own_sync = cost[users, host], comp[users, host], sync[users, host]
    c_s = np.bincount(host, own_cost, minlength=n).astype(float)
    q_s = np.bincount(host, own_comp, minlength=n).astype(float)
    y_s = np.bincount(host, own_sync, minlength=n).astype(float)

    def server_value(c: Array, q: Array, y: Array, qcap: Array, ycap: Array) -> Array:
        return (
            -p.beta2 * norm(c, p.f0)
            + p.barrier_weight
            * (barrier(1 - q / qcap, p.barrier_knee) + barrier(1 - y / ycap, p.barrier_knee))
        ) / n

    before = server_value(c_s, q_s, y_s, servers.compute_cap, servers.sync_cap)
    h = host
    leave = (
        server_value(
            c_s[h] - own_cost,
            q_s[h] - own_comp,
            y_s[h] - own_sync,
            servers.compute_cap[h],
            servers.sync_cap[h],
        )
        - before[h]
    )
    arrive = (
        server_value(
            c_s[None, :] + cost,
            q_s[None, :] + comp,
            y_s[None, :] + sync,
            servers.compute_cap,
            servers.sync_cap,
        )
        - before[None, :]
    )
    gain = leave[:, None] + arrive
    gain[users, host] = 0.0
    return gain
