"""The gamma sub-problem: given the association, the share of last slot's data each twin reuses.

For a fixed association eq. 22 separates by server: a twin's gamma moves its own utility, and its
server's cost ``C_s`` and compute load (both affine in gamma). rho is concave in Dbar, the C2 barrier is
concave, but ``-Norm`` is convex in ``C_s`` (Norm is a tanh), so the problem is not concave in general:
a concave solver could stop at a saddle. We therefore solve it globally per coordinate: best
responses: every twin's gamma is set to the exact maximiser of eq. 22 with the others held (a coarse grid
over [0, 1], then a fine grid around the best point, resolution 1e-3), all twins at once, until no gamma
moves (twins interact only through their server's ``C_s`` and load, weakly, so this settles in 2-3 sweeps). Tests compare it with a brute-force grid over the joint problem.
"""

from __future__ import annotations

import numpy as np

from twin_store.federation.edge.costs import Array, DitenParams, barrier, norm, utility
from twin_store.federation.edge.simulator import Coefficients, SlotContext

COARSE = np.linspace(0.0, 1.0, 51)
FINE = np.linspace(-0.02, 0.02, 41)


def solve_gamma(
    compute_cap: Array,
    ctx: SlotContext,
    co: Coefficients,
    p: DitenParams,
    sweeps: int = 8,
) -> Array:
    """gamma in [0, 1] per twin maximising eq. 22 for the association in ``co``."""
    n_servers = len(compute_cap)
    users = len(co.host)
    gamma = np.zeros(users)
    w_u, w_c, w_b = p.beta1 / users, p.beta2 / n_servers, p.barrier_weight / n_servers
    s = co.host
    cap = compute_cap[s, None]
    for _ in range(sweeps):
        cost = np.bincount(s, co.c0 + co.a * gamma, minlength=n_servers)
        comp = np.bincount(s, co.b0 + co.b * gamma, minlength=n_servers)
        rest_cost = (cost[s] - co.a * gamma)[:, None]
        rest_comp = (comp[s] - co.b * gamma)[:, None]

        def value(g: Array, rest_cost: Array = rest_cost, rest_comp: Array = rest_comp) -> Array:
            dbar = ctx.samples[:, None] + g * ctx.prev_samples[:, None]
            return (
                w_u * utility(dbar, ctx.phi)
                - w_c * norm(rest_cost + co.a[:, None] * g, p.f0)
                + w_b * barrier(1.0 - (rest_comp + co.b[:, None] * g) / cap, p.barrier_knee)
            )

        best = COARSE[np.argmax(value(COARSE[None, :]), axis=1)]
        fine = np.clip(best[:, None] + FINE[None, :], 0.0, 1.0)
        new = fine[np.arange(users), np.argmax(value(fine), axis=1)]
        # best responses of twins sharing a server can overshoot together: damp when they do not settle
        step = new - gamma
        if np.max(np.abs(step)) < 1e-4:
            break
        gamma = gamma + step if _ < 3 else gamma + 0.5 * step
    return gamma
