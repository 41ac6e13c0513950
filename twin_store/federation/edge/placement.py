"""Which edge site hosts which cluster twin: the deployment's policy over the sites that are alive.

A cluster twin and the training of its BSs' twins live on one site (``nettwin edge --site NAME``). A cluster
stands where its BSs are (the centroid of their positions) and weighs what its BSs train per slot. Every
site computes this placement itself from the same inputs (the declared sites, the clusters, and which sites
are alive), so they agree without a coordinator; the placement must therefore be a pure function of those
inputs (no memory of the previous slot, unlike the ledger's per-BS association).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from twin_store.federation.edge.ledger import POLICIES, Chooser, Site, project
from twin_store.federation.edge.policies import balanced


def place_clusters(
    sites: Sequence[Site],
    live: Collection[str],
    centroids: Mapping[int, tuple[float, float]],
    weights: Mapping[int, float],
    policy: str = "nearest",
    learned: Chooser | None = None,
) -> dict[int, str]:
    """cluster id -> the name of the live site that hosts it (empty when no declared site is alive).

    ``centroids`` are (lat, lon) per cluster, ``weights`` its samples per slot (``balanced`` fills the
    declared capacities with them). ``learned`` chooses among every declared site (the model was trained
    for all of them); a cluster it puts on a dead site goes to the nearest live one.
    """
    if policy not in POLICIES:
        raise ValueError(f"edge policy {policy!r}: choose {', '.join(POLICIES)}")
    alive = [i for i, s in enumerate(sites) if s.name in live]
    cids = sorted(centroids)
    if not alive or not cids:
        return {}
    lat0 = float(np.mean([s.lat for s in sites]))
    lon0 = float(np.mean([s.lon for s in sites]))
    site_xy = project(np.array([s.lat for s in sites]), np.array([s.lon for s in sites]), lat0, lon0)
    xy = project(
        np.array([centroids[c][0] for c in cids]), np.array([centroids[c][1] for c in cids]), lat0, lon0
    ).reshape(len(cids), 2)
    distance = np.sqrt(((xy[:, None, :] - site_xy[None, :, :]) ** 2).sum(axis=2))
    weight = np.array([float(weights.get(c, 1.0)) for c in cids])
    near_live = np.asarray(alive)[np.argmin(distance[:, alive], axis=1)]
    if policy == "nearest":
        host = near_live
    elif policy == "balanced":
        capacity = np.array([sites[i].capacity for i in alive])
        host = np.asarray(alive)[balanced(distance[:, alive], weight, capacity)]
    else:
        if learned is None:
            raise ValueError("edge policy 'learned' needs a trained association model")
        chosen = learned(distance, weight, np.full(len(cids), -1, np.int64))
        host = np.where(np.isin(chosen, alive), chosen, near_live)
    return {c: sites[int(h)].name for c, h in zip(cids, host, strict=True)}
