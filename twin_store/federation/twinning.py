"""Twin aggregation, pure: FedAvg, cluster twins (C-NDT) with member moves, and the H-twinning global (G-NDT).

Nothing here knows about Kafka or InfluxDB: the live store and the offline benchmark drive the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ingest.errors import Stopped
from twin_store.models.forecaster import FitConfig, TwinModel


def fedavg(params: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sample-weighted mean of ``[k, P]`` parameter vectors."""
    w = weights.to(params.dtype)
    return (w / w.sum()) @ params  # one BLAS pass: clusters of thousands of members re-aggregate per update


def epsilon(a_cluster: torch.Tensor, a_global: torch.Tensor) -> float:
    """H-twinning's divergence: mean squared parameter difference."""
    return float(((a_cluster - a_global) ** 2).mean())


class Labels(dict[int, int]):
    """square -> cluster id, counting its changes so that each cluster's member list is sorted once per
    change of the membership instead of by a scan of every square at every update (10,000 squares: ~20 ms of
    the store's time per update)."""

    changes = 0

    def _changed(self) -> None:
        self.changes += 1

    def __setitem__(self, key: int, value: int) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: int) -> None:
        super().__delitem__(key)
        self._changed()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args: Any) -> Any:
        self._changed()
        return super().pop(*args)

    def popitem(self) -> tuple[int, int]:
        self._changed()
        return super().popitem()

    def setdefault(self, key: int, default: int = 0) -> int:
        self._changed()
        return super().setdefault(key, default)

    def clear(self) -> None:
        super().clear()
        self._changed()

    def __ior__(self, other: Any) -> Labels:  # type: ignore[override,misc]
        self.update(other)
        return self


class Latest(dict[int, tuple[torch.Tensor, int]]):
    """square -> (params, samples) of its latest accepted update, noting which squares were written since the
    cluster sums last looked, so that a FedAvg cluster twin follows a write in O(params) instead of averaging
    every member again (a cluster of 2,000 members: ~3 ms of the store's time per update)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.touched: set[int] = set(self)

    def __setitem__(self, key: int, value: tuple[torch.Tensor, int]) -> None:
        super().__setitem__(key, value)
        self.touched.add(key)

    def __delitem__(self, key: int) -> None:
        super().__delitem__(key)
        self.touched.add(key)

    def pop(self, key: int, *default: Any) -> Any:
        self.touched.add(key)
        return super().pop(key, *default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        other = dict(*args, **kwargs)
        super().update(other)
        self.touched.update(other)

    def setdefault(self, key: int, default: Any = None) -> Any:
        self.touched.add(key)
        return super().setdefault(key, default)

    def popitem(self) -> tuple[int, tuple[torch.Tensor, int]]:
        item = super().popitem()
        self.touched.add(item[0])
        return item

    def clear(self) -> None:
        self.touched.update(self)
        super().clear()


@dataclass
class _ClusterSum:
    """A cluster's running FedAvg: the sample-weighted sum (float64) of the entries it holds."""

    total: torch.Tensor  # [P] float64
    weight: float
    rows: dict[int, tuple[torch.Tensor, int]]  # square -> the entry of ``latest`` in the sum

    def put(self, square: int, entry: tuple[torch.Tensor, int] | None) -> None:
        old = self.rows.pop(square, None)
        if old is not None:
            self.total -= old[0].to(torch.float64) * old[1]
            self.weight -= old[1]
        if entry is not None:
            self.total += entry[0].to(torch.float64) * entry[1]
            self.weight += entry[1]
            self.rows[square] = entry


@dataclass
class ClusterTwins:
    """Cluster twins = sample-weighted FedAvg of the latest accepted local update of each member.

    A member without an accepted update yet does not count. When a BS moves cluster its latest update
    moves with it and both clusters are re-aggregated (the reference code left it behind).

    FedAvg (``aggregator`` None) keeps each cluster's weighted sum and follows every write of ``latest`` by
    subtracting the member's old entry and adding its new one, in float64: one accepted update costs
    O(params) at any cluster size. A membership change rebuilds the sums. A robust ``aggregator`` needs
    every member's update at once and stacks them.
    """

    labels: dict[int, int]  # square -> cluster id
    twins: dict[int, torch.Tensor]  # cluster id -> parameter vector
    latest: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)  # square -> (params, samples)
    versions: dict[int, int] = field(default_factory=dict)
    # (members' updates [k, P], their sample counts [k], the cluster twin now) -> the new cluster twin;
    # None: FedAvg. A robust aggregator of twin_store/federation/screening plugs in here.
    aggregator: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # cid -> (members with an update, their entries of ``latest``, stacked params, weights): an accept in a
    # cluster of k members rewrites one row instead of stacking k vectors again (same rows, same floats)
    _stacks: dict[int, tuple[list[int], list[Any], torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # cid -> sorted members, as of ``labels`` at (its identity, its change count)
    _members: tuple[Labels | None, int, dict[int, list[int]]] = field(
        default=(None, -1, {}), repr=False, compare=False
    )
    # FedAvg's running sums, valid for (``labels``, its change count, ``latest``) as they were when built
    _sums: tuple[Labels | None, int, Latest | None, dict[int, _ClusterSum]] = field(
        default=(None, -1, None, {}), repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.labels, Labels):
            self.labels = Labels(self.labels)
        if not isinstance(self.latest, Latest):
            self.latest = Latest(self.latest)

    def members(self, cid: int) -> list[int]:
        labels = self.labels
        if not isinstance(labels, Labels):  # replaced by a plain dict: no change count to trust
            return sorted(s for s, c in labels.items() if c == cid)
        seen, changes, index = self._members
        if seen is not labels or changes != labels.changes:
            index = {}
            for s, c in labels.items():
                index.setdefault(c, []).append(s)
            for group in index.values():
                group.sort()
            self._members = (labels, labels.changes, index)
        return list(index.get(cid, ()))

    def samples(self, cid: int) -> int:
        return sum(self.latest[s][1] for s in self.members(cid) if s in self.latest)

    def accept(self, square: int, params: torch.Tensor, n_samples: int) -> int:
        """Record a local update and re-aggregate its cluster; return the cluster id."""
        self.latest[square] = (params, n_samples)
        cid = self.labels[square]
        self.aggregate(cid)
        return cid

    def evict(self, square: int, fallback: torch.Tensor) -> int | None:
        """Drop a member's latest update from its cluster twin (a BS caught attacking: what it sent before
        it was caught is suspect too); return the re-aggregated cluster, or None if there was nothing.
        A cluster left without updates falls back to ``fallback`` (the global twin)."""
        if self.latest.pop(square, None) is None:
            return None
        cid = self.labels[square]
        if any(s in self.latest for s in self.members(cid)):
            self.aggregate(cid)
        else:
            self.twins[cid] = fallback.clone()
            self.versions[cid] = self.versions.get(cid, 0) + 1
        return cid

    def aggregate(self, cid: int) -> None:
        if self.aggregator is None:
            total = self._sum(cid)
            if total is None:
                return
            self.twins[cid] = (total.total / total.weight).to(torch.float32)
        else:
            have = [s for s in self.members(cid) if s in self.latest]
            if not have:
                return
            stack, weights = self._stack(cid, have)
            if cid not in self.twins:
                self.twins[cid] = fedavg(stack, weights)
            else:
                self.twins[cid] = self.aggregator(stack, weights, self.twins[cid])
        self.versions[cid] = self.versions.get(cid, 0) + 1

    def _sum(self, cid: int) -> _ClusterSum | None:
        """The cluster's running sum brought up to date with ``latest``; None if no member has an update."""
        labels, latest = self.labels, self.latest
        if not isinstance(latest, Latest):  # replaced by a plain dict: track it from now on
            latest = self.latest = Latest(latest)
        seen, changes, seen_latest, sums = self._sums
        if (
            not isinstance(labels, Labels)
            or seen is not labels
            or changes != labels.changes
            or seen_latest is not latest
        ):
            sums = {}
            if isinstance(labels, Labels):  # a plain dict has no change count: rebuilt every time
                self._sums = (labels, labels.changes, latest, sums)
            latest.touched.clear()
        for square in latest.touched:  # writes since the sums last looked, in whichever cluster
            held = sums.get(labels.get(square, -1))
            if held is not None:
                held.put(square, latest.get(square))
        latest.touched.clear()
        held = sums.get(cid)
        if held is None:
            have = [s for s in self.members(cid) if s in latest]
            if not have:
                return None
            first = latest[have[0]][0]
            held = sums[cid] = _ClusterSum(torch.zeros(first.shape, dtype=torch.float64), 0.0, {})
            for s in have:
                held.put(s, latest[s])
        if not held.rows or held.weight <= 0:
            return None
        return held

    def _stack(self, cid: int, have: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' latest params ``[k, P]`` and sample counts ``[k]``, rows in ``have``'s order."""
        entries = [self.latest[s] for s in have]
        cached = self._stacks.get(cid)
        first = entries[0][0]
        if (
            cached is None
            or cached[0] != have
            or cached[2].shape[1:] != first.shape
            or cached[2].dtype != first.dtype
        ):
            stack = torch.stack([params for params, _ in entries])
            weights = torch.tensor([n for _, n in entries], dtype=torch.float32)
        else:
            _, before, stack, weights = cached
            for row, (entry, old) in enumerate(zip(entries, before, strict=True)):
                if entry is not old:  # ``latest`` holds a new (params, samples) for this member
                    stack[row] = entry[0]
                    weights[row] = float(entry[1])
        self._stacks[cid] = (have, entries, stack, weights)
        return stack, weights

    def move(self, square: int, new_cid: int, fallback: torch.Tensor) -> None:
        """Move a member; a brand-new cluster starts from ``fallback`` (e.g. the global twin)."""
        old = self.labels.get(square)
        if old == new_cid:
            return
        self.labels[square] = new_cid
        if new_cid not in self.twins:
            self.twins[new_cid] = fallback.clone()
        for cid in (old, new_cid):
            if cid is not None:
                self.aggregate(cid)


@dataclass
class GlobalTwin:
    """The G-NDT, kept current asynchronously: a cluster change is merged only if it diverged enough.

    After a cluster twin changes: ``eps = mean((a_c - a_G)^2)``; if ``eps > psi`` then
    ``a_G <- a_G + gamma_c (a_c - a_G)`` and the version is bumped (one synchronisation).
    ``psi = 0`` merges every change: synchronous updating.
    """

    params: torch.Tensor
    psi: float
    version: int = 0
    syncs: int = 0
    offers: int = 0
    last_epsilon: float = 0.0  # eps of the latest offer

    def offer(self, cluster_params: torch.Tensor, gamma: float) -> bool:
        self.offers += 1
        eps = self.last_epsilon = epsilon(cluster_params, self.params)
        if eps <= self.psi:
            return False
        self.params = self.params + gamma * (cluster_params - self.params)
        self.version += 1
        self.syncs += 1
        return True


@dataclass
class VTwinResult:
    global_params: torch.Tensor
    clusters: ClusterTwins
    rounds: int
    uploads: int
    downloads: int
    losses: list[float]  # mean local training loss per round


def v_twinning(
    model: TwinModel,
    squares: np.ndarray,
    labels: np.ndarray,
    x: torch.Tensor,
    y: torch.Tensor,
    init: torch.Tensor,
    rounds: int,
    participation: float,
    fit: FitConfig,
    gen: torch.Generator,
    rng: np.random.Generator,
    counts: np.ndarray | None = None,
    after_round: Callable[[VTwinResult], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> VTwinResult:
    """Synchronous V-twinning: rounds with a barrier over the participating BSs.

    Each round the participants train from their cluster twin on their own samples (``x [S, N, 10]``,
    ``y [S, N]``), every cluster twin becomes the FedAvg of its members' latest updates, and the global twin
    the FedAvg of the cluster twins weighted by their samples.

    ``counts [S]`` (optional): BS s has only its first ``counts[s]`` samples (series with gaps or late clocks,
    compacted to the front); it draws minibatches from those and weighs its update by them. A BS with 0 samples
    never takes part. None: every BS has all ``N`` samples. ``after_round`` (optional) sees the result after
    every round (e.g. to keep the round with the lowest validation error; copy what it keeps). ``stop``
    (optional) is asked before every round and every minibatch step of it: True raises ``ingest.errors.Stopped``
    and nothing of the unfinished V-twinning is returned.
    """
    cluster_ids = sorted(set(labels.tolist()))
    ctwins = ClusterTwins(
        labels={int(s): int(c) for s, c in zip(squares, labels, strict=True)},
        twins={c: init.clone() for c in cluster_ids},
    )
    result = VTwinResult(init.clone(), ctwins, 0, 0, 0, [])
    n_samples = int(x.shape[1])
    have = np.full(len(squares), n_samples) if counts is None else np.asarray(counts, dtype=np.int64)
    for _ in range(rounds):
        if stop is not None and stop():
            raise Stopped("V-twinning stopped")
        part = np.flatnonzero(rng.random(len(squares)) < participation)
        if counts is not None:
            part = part[have[part] > 0]
        if part.size == 0:
            continue
        start = torch.stack([ctwins.twins[ctwins.labels[int(squares[i])]] for i in part])
        limit = None if counts is None else torch.as_tensor(have[part])
        new, loss = model.fit(start, x[part], y[part], fit, gen, counts=limit, stop=stop)
        for k, i in enumerate(part):
            ctwins.latest[int(squares[i])] = (new[k], int(have[i]))
        for c in cluster_ids:  # the barrier: every cluster aggregates, then the global
            ctwins.aggregate(c)
        weights = torch.tensor([max(ctwins.samples(c), 1) for c in cluster_ids], dtype=torch.float32)
        result.global_params = fedavg(torch.stack([ctwins.twins[c] for c in cluster_ids]), weights)
        result.rounds += 1
        result.uploads += int(part.size)
        result.downloads += int(part.size)
        result.losses.append(float(loss.mean()))
        if after_round is not None:
            after_round(result)
    return result
