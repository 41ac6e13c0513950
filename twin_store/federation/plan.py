"""The VH-Twin experiment protocol shared by ``nettwin vtwin``, the live demo and the benchmarks.

Split by time: the last 240 hours are test, the 240 before validation, the rest training. Scaling
statistics, V-twinning and the clustering inputs use training hours only. The evaluation that replays
validation and test hours as a stream is ``bench/vhtwin.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ingest.errors import InputError
from ingest.readers.milan import HOURLY_START_MS, read_hourly
from twin_store.federation import dcs
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.samples import FIRST_TARGET
from twin_store.models.forecaster import FitConfig

TEST_HOURS = 240
VAL_HOURS = 240
# psi candidates: these quantiles of the divergences eps observed in validation hours, plus 0 (synchronous)
# and multiples of the largest, where the global twin barely moves: the whole trade-off curve
PSI_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
PSI_BEYOND = (2.0, 5.0)


@dataclass(frozen=True)
class VhTwinConfig:
    squares: int = 50
    seed: int = 1
    clusters: int | None = 4  # None: Louvain decides
    hidden: int = 32
    v_rounds: int = 10
    participation: float = 1.0  # share of BSs in each V-twinning round
    local: FitConfig = field(
        default_factory=lambda: FitConfig(steps=20, lr=1e-2, batch=64)
    )  # V-twinning rounds
    # the stream protocol's defaults are StreamPlan's, so `nettwin vtwin` + live agents run the same
    stream: FitConfig = field(default_factory=lambda: StreamPlan(0, 0, 0).fit)  # local updates
    update_every: int = StreamPlan.update_every  # hours between a BS's local updates in the stream
    window: int = StreamPlan.window  # hours of recent samples a local update trains on
    recluster_every: int = StreamPlan.recluster_every  # accepted updates between re-clusterings (0: never)
    psi: float | None = None  # None: the psi with the lowest validation MSE (ties: the larger psi)
    central_steps: int = 1500
    milan_dir: Path | None = None  # grid + base stations for DCS; default: the data file's folder


def load_matrix(path: Path, n_squares: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hourly matrix ``[S, H]`` and its square ids: ``n_squares`` drawn with ``seed`` (sorted), or all."""
    table = read_hourly(path)
    if table.bad:
        first = table.bad[0]
        raise InputError(
            f"{path}: {len(table.bad)} malformed line(s), first {first.position}: {first.reason}"
        )
    all_squares = np.unique(table.squares)
    if len(all_squares) == 0:
        raise InputError(f"{path}: no squares")
    hours = len(table) // len(all_squares)
    matrix = table.values[:, 0].reshape(hours, len(all_squares)).T  # hour-major -> [S, H]
    if n_squares is None:
        return matrix, all_squares.astype(np.int64)
    if n_squares > len(all_squares):
        raise InputError(f"--squares {n_squares}: the file has {len(all_squares)} squares")
    pick = np.sort(np.random.default_rng(seed).choice(len(all_squares), n_squares, replace=False))
    return matrix[pick], all_squares[pick].astype(np.int64)


class PlanSource(Protocol):
    """What a stream plan is made of: ``VhTwinConfig`` and ``VTwinJob`` both carry it."""

    @property
    def seed(self) -> int: ...
    @property
    def update_every(self) -> int: ...
    @property
    def window(self) -> int: ...
    @property
    def stream(self) -> FitConfig: ...
    @property
    def recluster_every(self) -> int: ...


def stream_plan(cfg: PlanSource, start_hour: int) -> StreamPlan:
    return StreamPlan(
        seed=cfg.seed,
        start_hour=start_hour,
        start_ms=HOURLY_START_MS,
        update_every=cfg.update_every,
        window=cfg.window,
        fit=cfg.stream,
        recluster_every=cfg.recluster_every,
    )


def split_hours(hours: int) -> tuple[int, int]:
    """(validation start, test start) of the temporal split; an error if the series is too short."""
    if hours < FIRST_TARGET + TEST_HOURS + VAL_HOURS + 24:
        raise InputError(f"{hours} hours is too short for a {VAL_HOURS}+{TEST_HOURS} hour split after 5 days")
    return hours - TEST_HOURS - VAL_HOURS, hours - TEST_HOURS


def dcs_labels(
    milan_dir: Path, squares: np.ndarray, z: np.ndarray, upto: int, n_clusters: int | None, seed: int
) -> np.ndarray:
    """DCS labels from square attributes and mean daily profiles of hours [0, upto) (never test hours)."""
    attrs = dcs.SquareAttributes.load(milan_dir, squares.tolist())
    days = upto // 24
    profiles = z[:, : days * 24].reshape(len(squares), days, 24).mean(axis=1)
    return dcs.cluster(dcs.relationship_matrix(attrs, profiles, dcs.DcsWeights()), n_clusters, seed=seed)
