"""Multi-Krum: average the updates closest to their neighbours.

Krum needs an assumed attacker count f; with asynchronous arrival there is none, so f is a share of the
members present (``assumed_share``), and the ``k - f`` updates with the lowest Krum scores are averaged.
"""

from __future__ import annotations

import torch

from twin_store.federation.screening.base import Defense
from twin_store.federation.twinning import fedavg


class MultiKrum(Defense):
    name = "krum"

    def __init__(self, assumed_share: float = 0.25) -> None:
        self.assumed_share = assumed_share

    def aggregate(self, stack: torch.Tensor, weights: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        k = len(stack)
        f = int(k * self.assumed_share)
        neighbours = k - f - 2  # Krum's score: distance to the n - f - 2 nearest others
        if neighbours < 1:
            return fedavg(stack, weights)
        d = torch.cdist(stack, stack) ** 2
        scores = d.sort(dim=1).values[:, 1 : neighbours + 1].sum(dim=1)  # column 0 is the self-distance
        keep = scores.argsort()[: k - f]
        return stack[keep].mean(dim=0)


DEFENSE = MultiKrum
