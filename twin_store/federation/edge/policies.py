"""Association policies that need no training, and the gamma rules the baselines use.

A policy maps the slot's context (and the previous slot's loads) to a host per twin. ``nearest`` is
B2/B3's association; ``balanced`` is the capacity-aware greedy the running system offers beside it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from twin_store.federation.edge.costs import Array, DitenParams
from twin_store.federation.edge.simulator import (
    IntArray,
    Servers,
    SlotContext,
    coefficients,
)


class Association(Protocol):
    """Chooses the hosting server of every twin for one slot."""

    def associate(self, servers: Servers, ctx: SlotContext, p: DitenParams) -> IntArray: ...


def nearest(distance: Array) -> IntArray:
    """Each twin on the server closest to its user."""
    return np.argmin(distance, axis=1).astype(np.int64)


def balanced(
    distance: Array,
    weight: Array,
    capacity: Array,
    previous: IntArray | None = None,
    keep_ratio: float = 1.5,
) -> IntArray:
    """Capacity-aware greedy: heaviest twins first, each to the nearest server with room left.

    ``weight`` is each twin's load (e.g. its energy per slot), ``capacity`` each server's. With
    ``previous`` a twin stays where it was while that server has room and is at most ``keep_ratio`` times
    farther than the nearest one with room (migrations cost energy, eq. 13). When no server has room
    the twin goes to the server with the most room left, never dropped.
    """
    room = np.asarray(capacity, dtype=float).copy()
    host = np.empty(len(weight), dtype=np.int64)
    for u in np.argsort(-np.asarray(weight), kind="stable"):
        fits = room >= weight[u]
        if fits.any():
            s = int(np.flatnonzero(fits)[np.argmin(distance[u, fits])])
            prev = -1 if previous is None else int(previous[u])
            if prev >= 0 and prev != s and fits[prev] and distance[u, prev] <= keep_ratio * distance[u, s]:
                s = prev
        else:
            s = int(np.argmax(room))
        host[u] = s
        room[s] -= weight[u]
    return host


class Nearest:
    def associate(self, servers: Servers, ctx: SlotContext, p: DitenParams) -> IntArray:
        return nearest(ctx.distance)


class Balanced:
    """Greedy on the compute caps q_s (a twin weighs its compute energy on its nearest server), or, with
    ``capacity``, on declared capacities in samples (a twin weighs its samples: the running ledger's rule).
    A twin stays on its previous server while that one has room and is not much farther."""

    def __init__(self, capacity: Array | None = None) -> None:
        self.capacity = capacity

    def associate(self, servers: Servers, ctx: SlotContext, p: DitenParams) -> IntArray:
        if self.capacity is not None:
            return balanced(ctx.distance, ctx.samples, self.capacity, previous=ctx.prev_host)
        co = coefficients(servers, ctx, nearest(ctx.distance), p)
        return balanced(ctx.distance, co.b0, servers.compute_cap, previous=ctx.prev_host)


def random_gamma(users: int, rng: np.random.Generator) -> Array:
    """B3's reuse shares: uniform in [0, 1], independent of the costs."""
    return rng.uniform(0.0, 1.0, users)
