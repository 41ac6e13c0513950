"""Periodic DCS re-clustering of a running deployment (the store's H-twinning and the offline benchmarks).

Apart from the local-update protocol (``local_updates``) so that what the BS agents import does not pull in
DCS (networkx, scipy, pandas: ~40 MB resident in the worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from twin_store.federation import dcs
from twin_store.federation.twinning import ClusterTwins


class Grouping(Protocol):
    """What re-clustering needs to know about the BSs besides their profiles: which of them it can place,
    and DCS labels for them. Milan's grid attributes (:class:`MilanGrouping`) and a ``[twins]`` deployment's
    sites file or profiles alone (``sites.EntityGrouping``) are the two kinds."""

    def placeable(self, squares: list[int]) -> list[int]: ...

    def labels(
        self, squares: list[int], profiles: np.ndarray, n_clusters: int | None, seed: int
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class MilanGrouping:
    """DCS on Milan's grid squares: positions, backhaul and coverage from the grid and OpenCellID files."""

    attrs: dcs.SquareAttributes

    def placeable(self, squares: list[int]) -> list[int]:
        known = set(self.attrs.squares.tolist())
        return [s for s in squares if s in known]

    def labels(
        self, squares: list[int], profiles: np.ndarray, n_clusters: int | None, seed: int
    ) -> np.ndarray:
        affinity = dcs.relationship_matrix(self.attrs.subset(squares), profiles, dcs.DcsWeights())
        return dcs.cluster(affinity, n_clusters, seed=seed)


@dataclass
class Reclusterer:
    """Periodic DCS re-clustering of a running deployment.

    After every ``plan.recluster_every`` accepted updates, the first update of a later hour triggers a
    re-clustering before it is applied. So the new clusters depend only on updates of earlier hours, in
    the live store and in the benchmark alike. The traffic attribute is each BS's latest reported
    profile. A BS that has not reported yet, or that ``grouping`` cannot place, keeps its cluster. Members
    move with their latest update (``ClusterTwins.move``).
    """

    grouping: Grouping
    n_clusters: int | None
    seed: int
    every: int
    membership: dcs.Membership
    profiles: dict[int, list[float]] = field(default_factory=dict)
    since: int = 0
    last_hour: int = -1

    def due(self, hour: int) -> bool:
        return self.every > 0 and self.since >= self.every and hour > self.last_hour

    def accepted(self, square: int, hour: int, profile: list[float] | None) -> None:
        self.since += 1
        self.last_hour = max(self.last_hour, hour)
        if profile is not None:
            self.profiles[square] = profile

    def joined(self, square: int, cluster: int) -> None:
        """A BS admitted after the last clustering: a member of ``cluster`` in the current epoch."""
        self.membership.labels[square] = cluster

    def run(self, clusters: ClusterTwins, fallback: torch.Tensor) -> list[tuple[int, int | None, int]]:
        """Re-cluster the reporting BSs and move them; return the moves (square, old, new)."""
        self.since = 0
        squares = self.grouping.placeable(sorted(s for s in self.profiles if s in clusters.labels))
        if len(squares) < 2:
            return []
        profiles = np.array([self.profiles[s] for s in squares])
        k = None if self.n_clusters is None else min(self.n_clusters, len(squares))
        labels = self.grouping.labels(squares, profiles, k, self.seed)
        epoch, moves = dcs.recluster(self.membership, squares, labels)
        # squares left out of this clustering keep their cluster
        self.membership = dcs.Membership(self.membership.labels | epoch.labels, epoch.epoch)
        for square, old, new in moves:
            clusters.move(square, new, fallback=clusters.twins[old] if old is not None else fallback)
        return moves
