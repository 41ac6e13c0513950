"""Norm clipping: every member's change of the cluster twin is clipped to the median change's norm."""

from __future__ import annotations

import torch

from twin_store.federation.screening.base import Defense
from twin_store.federation.twinning import fedavg


class NormClip(Defense):
    name = "clip"

    def aggregate(self, stack: torch.Tensor, weights: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        deltas = stack - reference
        norms = deltas.norm(dim=1)
        bound = norms.median()
        scale = torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)
        return reference + fedavg(deltas * scale.unsqueeze(1), torch.ones(len(stack)))


DEFENSE = NormClip
