"""Twins for any deployment from the history its stream has built: the ``[twins]`` steps read back from
InfluxDB -> the regular series of ``series.py`` -> the input plan of ``inputs.py`` -> V-twinning. Pure: no I/O.

Rules (docs/twins.md):

- **Grid.** Step ``k`` is ``[start_ms + k * step_ms, ...)`` with ``start_ms`` the UTC midnight before the first
  step of any entity, so every entity shares the wall-clock grid.
- **Who is twinned.** The entities with at least ``need`` reported steps. The others (and any entity seen later)
  join live: first-stretch scaler, nearest cluster, then forecasts and updates (``stream_processors/bs_agents``).
- **Held out.** The newest ``max(VALIDATION_MIN, history // 5)`` steps (history: from the first report on): scalers, inputs and V-twinning use the
  steps before; the global twin's MSE on them is reported beside persistence's.
- **Start.** V-twinning runs from a random start and from the persistence twin; the held-out steps pick the
  better, and it is kept only if it beats persistence there by more than 1% (as ``bench twins``); otherwise the
  twins are persistence (one day of 30-minute Milan data overfits).
- **Samples.** ``InputPlan.samples`` (inputs carried forward over short gaps, samples with a missing input or
  target masked); each entity's valid samples are packed first and counted, so V-twinning draws only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from twin_store.federation.inputs import CLOSE, EntityScaler, InputPlan, plan_inputs
from twin_store.federation.series import DAY_MS
from twin_store.models.forecaster import TwinModel

VALIDATION_MIN = 10  # steps held out of V-twinning's training for the scaler and the check
TRAIN_MIN = 30  # targets V-twinning needs at least


def default_need(horizon: int) -> int:
    """Steps of history an entity needs before the default bootstrap: the close inputs, then enough targets
    to train on and a validation slice."""
    return horizon + CLOSE - 1 + TRAIN_MIN + VALIDATION_MIN


@dataclass(frozen=True)
class Grid:
    keys: np.ndarray  # int64 [S], the entities' registry keys (Milan: square numbers), sorted
    names: list[str]  # [S]
    start_ms: int  # time of step 0 (a UTC midnight)
    step_ms: int
    values: np.ndarray  # float64 [S, T], NaN = missing

    @property
    def steps(self) -> int:
        return int(self.values.shape[1])

    def reported(self) -> np.ndarray:
        return np.isfinite(self.values).sum(axis=1)

    def rows(self, mask: np.ndarray) -> Grid:
        return Grid(self.keys[mask], [n for n, m in zip(self.names, mask, strict=True) if m], self.start_ms,
                    self.step_ms, self.values[mask])  # fmt: skip


def build_grid(rows: list[tuple[int, str, int, float]], step_ms: int) -> Grid:
    """(key, name, step start ms, value) rows -> the grid up to the newest step. A step given twice keeps the
    last row; a key named twice, its last name."""
    names = {r[0]: r[1] for r in rows}
    return grid_of(
        np.array([r[0] for r in rows], dtype=np.int64),
        np.array([r[2] for r in rows], dtype=np.int64),
        np.array([r[3] for r in rows], dtype=np.float64),
        names,
        step_ms,
    )


def grid_of(
    keys: np.ndarray, times_ms: np.ndarray, values: np.ndarray, names: dict[int, str], step_ms: int
) -> Grid:
    """:func:`build_grid` from columns (row ``i``: ``keys[i]``, step start ``times_ms[i]``, ``values[i]``) and
    each key's name: the history of 10,000 entities is 500,000 rows, ~24 bytes each here instead of a Python
    tuple of four objects (~150 bytes)."""
    if not len(keys):
        return Grid(np.zeros(0, np.int64), [], 0, step_ms, np.zeros((0, 0)))
    uniq, row = np.unique(keys, return_inverse=True)
    first = int(times_ms.min())
    start = first - first % DAY_MS
    steps = int((int(times_ms.max()) - start) // step_ms) + 1
    cell = row.astype(np.int64) * steps + (times_ms - start) // step_ms
    # the last row of a cell wins: the first occurrence in the reversed rows
    cells, last = np.unique(cell[::-1], return_index=True)
    grid = np.full((len(uniq), steps), np.nan)
    grid.flat[cells] = values[::-1][last]
    keys_out = uniq.astype(np.int64)
    return Grid(keys_out, [names[int(k)] for k in keys_out.tolist()], int(start), step_ms, grid)


def ready(grid: Grid, need_steps: int, need_entities: int) -> bool:
    """Enough history: at least ``need_entities`` entities with ``need_steps`` reported steps each."""
    return grid.values.size > 0 and int((grid.reported() >= need_steps).sum()) >= need_entities


@dataclass(frozen=True)
class Prepared:
    grid: Grid  # the twinned entities
    train: int  # steps [0, train) train; [train, steps) validate
    plan: InputPlan
    scaler: EntityScaler
    z: np.ndarray  # [S, T] z-scores, NaN where missing
    x: np.ndarray  # [S, N, L] training inputs, valid ones first per entity
    y: np.ndarray  # [S, N]
    counts: np.ndarray  # [S] valid training samples


def prepare(grid: Grid, need_steps: int, horizon: int) -> Prepared:
    """The twinned entities' scalers, input plan and packed training samples (see the module docstring)."""
    grid = grid.rows(grid.reported() >= need_steps)
    total = grid.steps
    ok_steps = np.isfinite(grid.values)
    first = int(ok_steps.any(axis=0).argmax())  # the grid starts at midnight: the history at the first report
    train = total - max(VALIDATION_MIN, (total - first) // 5)
    plan = plan_inputs(grid.step_ms, train - first, horizon)
    scaler = EntityScaler.fit(grid.values, train)
    z = scaler.transform(grid.values)
    x, y, ok = plan.samples(z[:, :train], 0, train)
    counts = ok.sum(axis=1)
    if (counts == 0).any():  # nothing to train on (gaps everywhere): it joins live like a late entity
        keep = counts > 0
        grid, scaler = grid.rows(keep), EntityScaler(scaler.mean[keep], scaler.std[keep])
        z, x, y, ok, counts = z[keep], x[keep], y[keep], ok[keep], counts[keep]
    order = np.argsort(~ok, axis=1, kind="stable")  # valid samples first, in time order
    x = np.take_along_axis(x, order[:, :, None], axis=1)
    y = np.take_along_axis(y, order, axis=1)
    x = np.where(np.isfinite(x), x, 0.0)  # masked rows are never drawn (counts); keep them finite
    y = np.where(np.isfinite(y), y, 0.0)
    return Prepared(grid, train, plan, scaler, z, x, y, counts)


def hourly_bins(profiles: np.ndarray) -> np.ndarray:
    """Daily profiles of sub-hour steps ``[E, slots]`` averaged to 24 hour-of-day bins (coarser ones as they
    are): what late joiners are matched on, small enough to travel in the global twin's header."""
    p = np.asarray(profiles, dtype=float)
    slots = p.shape[1]
    if slots <= 24 or slots % 24:
        return p
    return p.reshape(p.shape[0], 24, slots // 24).mean(axis=2)


def cluster_profiles(profiles: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Each cluster's mean hour-of-day profile, by cluster id."""
    binned = hourly_bins(profiles)
    return {str(int(c)): binned[labels == c].mean(axis=0).round(6).tolist() for c in np.unique(labels)}


def persistence_start(model: TwinModel, init: torch.Tensor) -> torch.Tensor:
    """``init`` with the nonlinear head silent and the linear path on the latest input: exactly persistence.
    V-twinning starts there, and its twins are kept only if they beat it on the held-out steps (with little
    history training can lose to the naive forecast: one day of 30-minute Milan data does)."""
    out = init.clone()
    p = model.unflatten(out.unsqueeze(0))
    p["w_out"].zero_()
    p["b_out"].zero_()
    p["w_ar"].zero_()
    p["w_ar"][0, -1] = 1.0  # the latest input: close lag = horizon
    return out
