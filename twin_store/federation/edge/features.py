"""The state the learned policies see: one feature vector per (twin, server) pair.

The paper's state holds the servers' twins, the users' positions and distances. We give it per pair,
together with each pair's closed-form costs at gamma = 0 and the servers' loads of the previous slot,
so one network scores every pair and the same weights serve 9 or 21 servers.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from twin_store.federation.edge.costs import (
    DitenParams,
    SlotTerms,
    compute_energy_per_sample,
    sync_cost,
)
from twin_store.federation.edge.simulator import Servers, SlotContext

FEATURES = 14


def pair_features(
    servers: Servers, ctx: SlotContext, area_m: float, p: DitenParams, last: SlotTerms | None
) -> NDArray[np.float32]:
    """(users, servers, FEATURES) float32 array, every column roughly in [0, 1]."""
    users, n = ctx.distance.shape
    d = ctx.distance
    f = np.zeros((users, n, FEATURES), dtype=np.float32)
    f[..., 0] = d / area_m
    has_prev = ctx.prev_host >= 0
    prev = np.maximum(ctx.prev_host, 0)
    if has_prev.any():
        f[has_prev, prev[has_prev], 1] = 1.0
    mig_dist = np.where(has_prev[:, None], servers.manhattan[prev], 0.0)
    mig_dist = np.where(f[..., 1] > 0, 0.0, mig_dist)
    f[..., 2] = mig_dist / (2 * area_m)
    per_sample = compute_energy_per_sample(servers.eps[None, :], servers.energy[None, :], d, p)
    f[..., 3] = per_sample * ctx.samples[:, None] / 100.0
    f[..., 4] = sync_cost(ctx.samples[:, None], d, p) / 20.0
    f[..., 5] = p.n_mig * mig_dist * (ctx.samples + ctx.twin_size)[:, None] / 50.0
    if last is not None:
        f[..., 6] = (last.per_server / 800.0)[None, :]
        f[..., 7] = (last.sync / servers.sync_cap)[None, :]
        f[..., 8] = (last.compute / servers.compute_cap)[None, :]
    near = np.argmin(d, axis=1)
    f[np.arange(users), near, 9] = 1.0
    f[..., 10] = (ctx.samples / 2000.0)[:, None]
    f[..., 11] = ctx.phi
    f[..., 12] = (np.bincount(near, minlength=n) / users)[None, :]
    f[..., 13] = (servers.energy / 1e4)[None, :]
    return f
