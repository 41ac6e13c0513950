"""Dimension-wise trimming and reweighting (the idea of the seed project's TID defence).

Per coordinate, values further than ``cut`` robust deviations (MAD) from the coordinate's median are
trimmed. Each update is then weighted by the share of its coordinates that survived, so an update that is
an outlier in many dimensions loses its say everywhere, and the kept values are averaged with those
weights.
"""

from __future__ import annotations

import torch

from twin_store.federation.screening.base import Defense


class TrimReweight(Defense):
    name = "tid"

    def __init__(self, cut: float = 3.0) -> None:
        self.cut = cut

    def aggregate(self, stack: torch.Tensor, weights: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if len(stack) < 3:
            return stack.mean(dim=0)
        median = stack.median(dim=0).values
        mad = (stack - median).abs().median(dim=0).values * 1.4826 + 1e-12
        kept = ((stack - median).abs() <= self.cut * mad).float()  # [k, P]
        trust = kept.mean(dim=1, keepdim=True)  # share of the update's coordinates inside the band
        w = kept * trust
        total = w.sum(dim=0)
        mean = (stack * w).sum(dim=0) / total.clamp_min(1e-12)
        return torch.where(total > 0, mean, median)


DEFENSE = TrimReweight
