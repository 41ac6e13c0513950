"""The interface every defense implements.

A defense sees each local update once, when it arrives (asynchronously: no rounds, no known attacker
count), and decides whether it may enter its cluster twin (``screen``). A cluster twin is then the
defense's ``aggregate`` of the latest accepted update of each member. FedAvg accepts everything and
averages; statistical screeners quarantine; robust aggregators accept everything and bound each update's
influence instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from twin_store.federation.twinning import fedavg


@dataclass(frozen=True)
class Candidate:
    """One arriving local update and what the store knows around it."""

    square: int
    cluster: int
    params: torch.Tensor  # [P]
    reference: torch.Tensor  # [P] the cluster twin now
    members: tuple[int, ...]  # the cluster's other members
    n_samples: int
    loss: float
    hour: int


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    score: float  # larger = more suspicious; 0 for defenses that do not score
    reason: str  # why quarantined ("" when accepted)
    norm: float  # |params - reference|


class Defense:
    """FedAvg: accept every update, sample-weighted mean. Subclasses override one or both methods."""

    name = "mean"
    remembers = False  # True: its decisions depend on what it saw before (the store keeps its state)

    def screen(self, update: Candidate) -> Verdict:
        return Verdict(True, 0.0, "", delta_norm(update))

    def aggregate(self, stack: torch.Tensor, weights: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``stack [k, P]`` of the members' latest accepted updates with their sample counts."""
        return fedavg(stack, weights)

    def state(self) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
        """What a defense that ``remembers`` keeps across restarts: JSON-able numbers and tensors by square."""
        return {}, {}

    @classmethod
    def from_state(cls, doc: dict[str, Any], tensors: dict[int, torch.Tensor]) -> Defense:
        """The inverse of ``state``; raises ValueError, TypeError or KeyError on a document it did not write."""
        return cls()


def cluster_aggregator(
    defense: Defense,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """What ``ClusterTwins.aggregator`` takes: None for a defense that averages (FedAvg), so the cluster
    twins keep running sums; the defense's own ``aggregate`` for a robust one."""
    return None if type(defense).aggregate is Defense.aggregate else defense.aggregate


def delta_norm(update: Candidate) -> float:
    return float((update.params - update.reference).norm())


# name -> module under twin_store.federation.screening; each module defines one Defense subclass called ``DEFENSE``
DEFENSES = {
    "mean": "mean",
    "median": "median",
    "trimmed": "trimmed_mean",
    "krum": "krum",
    "clip": "norm_clip",
    "tid": "tid",
    "temporal": "temporal",
}


def make_defense(name: str, **params: float) -> Defense:
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose from {', '.join(DEFENSES)}")
    module = importlib.import_module(f"twin_store.federation.screening.{DEFENSES[name]}")
    defense: Defense = module.DEFENSE(**params)
    return defense
