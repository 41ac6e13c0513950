"""Poisoning attacks on the twins, as functions of what an attacker can see. Used by ``nettwin bench
poisoning`` and by ``nettwin attack`` against a live deployment.

Fake BSs (no key; they exist only if the store admits unknown BSs):
- ``mpaf``: MPAF-style random fake updates. Each fake BS holds a random model ``w`` of its own and sends
  ``reference + lam * (w - reference)``: a large step towards a meaningless twin.
- ``tpi``: a stealthy update crafted from the current global twin (the seed project's TPI idea). The
  attacker watches how far the global twin moves in a day, ``|global_now - global_before|``, and sends
  its cluster twin moved that far (times ``kappa``) towards its own meaningless model: an update of an
  ordinary size that pulls, every time it is sent, in the same harmful direction.

Compromised BSs (genuine keys, honest training, then tampering):
- ``signflip``: ``reference - boost * (honest - reference)``;
- ``scale``: ``reference + factor * (honest - reference)``;
- ``telemetry``: honest training on poisoned traffic. ``poison_series`` injects spikes into some hours and
  shifts the level of the rest of the series from a random hour on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ATTACKS = ("none", "mpaf", "tpi", "signflip", "scale", "telemetry")
FAKE_BS_ATTACKS = frozenset({"mpaf", "tpi"})


@dataclass(frozen=True)
class AttackConfig:
    mpaf_lambda: float = 5.0
    tpi_kappa: float = 1.0
    flip_boost: float = 3.0
    scale_factor: float = 10.0
    spike_share: float = 0.05  # share of hours with an injected spike
    spike_z: float = 8.0  # spike height in training standard deviations
    shift_z: float = 2.0  # level shift after a random hour, in training standard deviations


def signflip(honest: torch.Tensor, reference: torch.Tensor, boost: float) -> torch.Tensor:
    return reference - boost * (honest - reference)


def scale(honest: torch.Tensor, reference: torch.Tensor, factor: float) -> torch.Tensor:
    return reference + factor * (honest - reference)


def mpaf(reference: torch.Tensor, own_model: torch.Tensor, lam: float) -> torch.Tensor:
    return reference + lam * (own_model - reference)


def tpi(
    reference: torch.Tensor,
    global_now: torch.Tensor,
    global_before: torch.Tensor,
    own_model: torch.Tensor,
    kappa: float,
) -> torch.Tensor:
    direction = own_model - global_now
    step = float((global_now - global_before).norm())
    return reference + kappa * step * direction / direction.norm().clamp_min(1e-12)


def poison_series(z: np.ndarray, first_hour: int, cfg: AttackConfig, rng: np.random.Generator) -> np.ndarray:
    """A copy of a z-scored series ``z [H]`` with spikes and a level shift in hours ``first_hour`` on."""
    out = z.copy()
    hours = np.arange(first_hour, z.size)
    if hours.size == 0:
        return out
    spikes = hours[rng.random(hours.size) < cfg.spike_share]
    out[spikes] += cfg.spike_z * rng.choice([-1.0, 1.0], spikes.size)
    shift_from = int(rng.integers(first_hour, z.size))
    out[shift_from:] += cfg.shift_z
    return out
