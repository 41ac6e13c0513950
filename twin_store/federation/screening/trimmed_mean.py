"""Coordinate-wise trimmed mean: drop the ``trim`` share of largest and smallest values per coordinate."""

from __future__ import annotations

import torch

from twin_store.federation.screening.base import Defense


class TrimmedMean(Defense):
    name = "trimmed"

    def __init__(self, trim: float = 0.2) -> None:
        self.trim = trim

    def aggregate(self, stack: torch.Tensor, weights: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        k = len(stack)
        cut = int(k * self.trim)
        if k - 2 * cut < 1:
            return stack.median(dim=0).values
        ordered = stack.sort(dim=0).values
        return ordered[cut : k - cut].mean(dim=0)


DEFENSE = TrimmedMean
