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
from twin_store.federation.edge.simulator import FeatureScale, Servers, SlotContext

FEATURES = 16


def pair_features(
    servers: Servers,
    ctx: SlotContext,
    p: DitenParams,
    last: SlotTerms | None,
    scale: FeatureScale = FeatureScale(),
) -> NDArray[np.float32]:
    """(users, servers, FEATURES) float32 array, every column roughly in [0, 1].

    Columns 14 and 15 are the server's caps (q_s, p_s) in the units of columns 3 and 4, so a policy can
    add up its twins' loads against them.
    """
    area_m = scale.distance
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
    f[..., 3] = per_sample * ctx.samples[:, None] / scale.compute
    f[..., 4] = sync_cost(ctx.samples[:, None], d, p) / scale.sync
    f[..., 5] = p.n_mig * mig_dist * (ctx.samples + ctx.twin_size)[:, None] / scale.migration
    if last is not None:
        f[..., 6] = (last.per_server / scale.server_cost)[None, :]
        f[..., 7] = (last.sync / servers.sync_cap)[None, :]
        f[..., 8] = (last.compute / servers.compute_cap)[None, :]
    near = np.argmin(d, axis=1)
    f[np.arange(users), near, 9] = 1.0
    f[..., 10] = (ctx.samples / scale.samples)[:, None]
    f[..., 11] = ctx.phi
    f[..., 12] = (np.bincount(near, minlength=n) / users)[None, :]
    f[..., 13] = (servers.energy / scale.energy)[None, :]
    f[..., 14] = (servers.compute_cap / scale.compute)[None, :]
    f[..., 15] = (servers.sync_cap / scale.sync)[None, :]
    return f
