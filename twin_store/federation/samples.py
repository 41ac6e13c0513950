"""Per-BS samples from an hourly series: inputs = same hour on the previous 5 days ("period") and the last
5 hours ("close"), target = the hour itself; per-square z-scores with training-period statistics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLOSE = 5
PERIOD_DAYS = 5
DAY = 24
FIRST_TARGET = PERIOD_DAYS * DAY  # earliest hour with a full "period" history
LAGS = np.array([DAY * d for d in range(PERIOD_DAYS, 0, -1)] + list(range(CLOSE, 0, -1)))  # oldest first


@dataclass(frozen=True)
class Scaler:
    """Per-square mean and std of the training hours; kept with the twin so the stream scales the same."""

    mean: np.ndarray  # [S]
    std: np.ndarray  # [S]

    @classmethod
    def fit(cls, series: np.ndarray, train_hours: int) -> Scaler:
        train = series[:, :train_hours]
        std = train.std(axis=1)
        return cls(train.mean(axis=1), np.where(std > 0, std, 1.0))

    def transform(self, series: np.ndarray) -> np.ndarray:
        return (series - self.mean[:, None]) / self.std[:, None]

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Original units of ``z [S, ...]`` (one row per square, in the order the scaler was fitted)."""
        shape = (-1,) + (1,) * (z.ndim - 1)
        return z * self.std.reshape(shape) + self.mean.reshape(shape)


def inputs_at(z: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Inputs for the given target hours: ``z [S, H]`` -> ``[S, len(targets), 10]``. Uses only hours < target."""
    if targets.size and targets.min() < FIRST_TARGET:
        raise ValueError(f"target hours start at {FIRST_TARGET} (5 days of history)")
    return z[:, targets[:, None] - LAGS[None, :]]


def samples(z: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """All samples whose target hour lies in [start, stop): inputs ``[S, N, 10]``, targets ``[S, N]``."""
    targets = np.arange(max(start, FIRST_TARGET), stop)
    return inputs_at(z, targets), z[:, targets]
