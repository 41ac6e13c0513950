"""Canonical records -> one regular series per entity at a cadence: what every twin of any network learns from.

Pure numpy; no Kafka, no InfluxDB. The live worker and ``nettwin bench twins`` apply the same rule, so a twin
bootstrapped from the stream and one evaluated offline see the same numbers.

**The rule** (for records ``(entity: str, time_ms: int, value: float)`` of one metric):

- **Steps.** The cadence ``step_ms`` divides a day (1m .. 1d, see :func:`parse_cadence`). Steps are tumbling and
  aligned to the epoch: a record at ``t`` belongs to the step that starts at ``t - t % step_ms`` and covers
  ``[start, start + step_ms)``. Step 0 of a :class:`RegularSeries` is the step of its earliest record (or the
  ``start_ms`` asked for); every entity shares that grid.
- **Duplicates.** Records of one entity with the same ``time_ms`` are one measurement: the last one in input
  order wins (as InfluxDB overwrites a point with the same series and time), then steps are aggregated.
- **Aggregate** of the raw values inside a step: ``sum``, ``mean`` (of the values, not time-weighted:
  irregular sampling weighs each record once), ``last`` (the latest time; see duplicates) or ``max``.
- **Gaps.** A step without a record is ``NaN`` for every aggregate (``sum`` too: no report is not zero
  traffic), and so are the steps of an entity before its first record (clocks that start at different times)
  and after its last one. Nothing here fills a gap; :func:`fill_forward` is the only filler and it carries a
  *past* value forward, never a later one back.
- **No future.** A step's value depends only on the records inside it. Built ``until_ms``, only steps that have
  closed by then (``end <= until_ms``) exist and records of later steps are ignored, so a series
  built from a prefix of a stream equals the full build cut at the same step (``tests/test_series.py``
  checks this as a property).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
AGGREGATES = ("sum", "mean", "last", "max")
_CADENCE = re.compile(r"^\s*(\d+)\s*(m|min|h|d)\s*$")
_UNIT_MS = {"m": MINUTE_MS, "min": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS}


def parse_cadence(text: str) -> int:
    """``"10m"``, ``"30min"``, ``"1h"``, ``"1d"`` -> step in ms. From 1 minute to 1 day, and the step must divide a
    day (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30 min, 1, 2, 3, 4, 6, 8, 12 h, 1 d), so steps align with days and
    the same step of earlier days is a whole number of steps back. Raises ``ValueError`` with the reason."""
    m = _CADENCE.match(str(text))
    if not m:
        raise ValueError(f"cadence {text!r}: expected a number and a unit m, min, h or d (e.g. 10m, 1h, 1d)")
    step = int(m.group(1)) * _UNIT_MS[m.group(2)]
    if not MINUTE_MS <= step <= DAY_MS:
        raise ValueError(f"cadence {text!r}: must be from 1m to 1d")
    if DAY_MS % step:
        raise ValueError(f"cadence {text!r}: must divide a day (e.g. 7m does not; 5m, 10m, 15m do)")
    return step


def cadence_text(step_ms: int) -> str:
    """The shortest of ``"1d"``, ``"2h"``, ``"10m"`` for a step in ms."""
    for unit, ms in (("d", DAY_MS), ("h", HOUR_MS), ("m", MINUTE_MS)):
        if step_ms % ms == 0:
            return f"{step_ms // ms}{unit}"
    return f"{step_ms}ms"


def step_start(time_ms: int | np.ndarray, step_ms: int) -> Any:
    """The start of the epoch-aligned step holding ``time_ms`` (works on ints and int64 arrays)."""
    return time_ms - time_ms % step_ms


@dataclass(frozen=True, eq=False)
class RegularSeries:
    """One row per entity on a shared regular grid.

    ``values[e, k]`` is the aggregate of entity ``entities[e]``'s records in step ``k``, which starts at
    ``start_ms + k * step_ms``; NaN where it had none. ``counts[e, k]`` is how many distinct measurements fed
    it (duplicates counted once).
    """

    entities: tuple[str, ...]
    start_ms: int
    step_ms: int
    values: np.ndarray  # [E, T] float64
    counts: np.ndarray  # [E, T] int64

    @property
    def steps(self) -> int:
        return int(self.values.shape[1])

    def index(self, entity: str) -> int:
        return self.entities.index(entity)

    def time_of(self, step: int | np.ndarray) -> Any:
        """Epoch ms of the start of step(s) ``step``."""
        return self.start_ms + np.asarray(step, dtype=np.int64) * self.step_ms

    def step_of(self, time_ms: int) -> int:
        """The step holding ``time_ms`` (negative before step 0)."""
        return int((step_start(int(time_ms), self.step_ms) - self.start_ms) // self.step_ms)

    def first_steps(self) -> np.ndarray:
        """Per entity, the first step with a value (``steps`` if it has none): when its clock started."""
        ok = np.isfinite(self.values)
        return np.where(ok.any(axis=1), ok.argmax(axis=1), self.steps)

    def subset(self, entities: Sequence[str]) -> RegularSeries:
        rows = [self.index(e) for e in entities]
        return RegularSeries(
            tuple(entities), self.start_ms, self.step_ms, self.values[rows], self.counts[rows]
        )

    def upto(self, stop: int) -> RegularSeries:
        """Steps ``[0, stop)`` only."""
        return RegularSeries(
            self.entities, self.start_ms, self.step_ms, self.values[:, :stop], self.counts[:, :stop]
        )


def build_series(
    entities: Sequence[str],
    times_ms: Sequence[int] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    step_ms: int,
    aggregate: str = "mean",
    *,
    start_ms: int | None = None,
    until_ms: int | None = None,
    entity_order: Sequence[str] | None = None,
) -> RegularSeries:
    """Regular series from raw points (three aligned sequences, input order = arrival order).

    ``start_ms``: step 0 starts at the step holding it (default: the earliest record's step); earlier records
    are ignored. ``until_ms``: only steps that have closed by then are built and later records ignored
    and records of steps still open are ignored (default: up to the step of the latest record, included). ``entity_order``: the rows, in this order (default:
    every entity seen, sorted); entities of it without a record get an all-NaN row, records of others are
    ignored. Non-finite values are ignored (the canonical record refuses them anyway). See the module docstring
    for the rule.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    if step_ms <= 0:
        raise ValueError(f"step_ms must be > 0, got {step_ms}")
    ent = np.asarray(entities, dtype=object)
    t = np.asarray(times_ms, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    if not (len(ent) == len(t) == len(v)):
        raise ValueError(f"entities, times and values differ in length: {len(ent)}, {len(t)}, {len(v)}")
    order = list(entity_order) if entity_order is not None else sorted(set(ent.tolist()))
    if len(set(order)) != len(order):
        raise ValueError("entity_order names an entity twice")
    row_of = {e: i for i, e in enumerate(order)}
    rows = np.array([row_of.get(e, -1) for e in ent.tolist()], dtype=np.int64)
    keep = (rows >= 0) & np.isfinite(v)
    if until_ms is not None:
        keep &= t < step_start(int(until_ms), step_ms)  # the open step's records wait for it to close
    if start_ms is not None:
        keep &= t >= step_start(int(start_ms), step_ms)
    arrival = np.flatnonzero(keep)
    rows, t, v = rows[arrival], t[arrival], v[arrival]

    if start_ms is not None:
        origin = int(step_start(int(start_ms), step_ms))
    elif t.size:
        origin = int(step_start(int(t.min()), step_ms))
    else:
        origin = 0 if until_ms is None else int(step_start(int(until_ms), step_ms))
    if until_ms is not None:
        n_steps = max(0, (int(step_start(int(until_ms), step_ms)) - origin) // step_ms)
    else:
        n_steps = int((step_start(int(t.max()), step_ms) - origin) // step_ms + 1) if t.size else 0

    out = np.full((len(order), n_steps), np.nan)
    counts = np.zeros((len(order), n_steps), dtype=np.int64)
    if t.size == 0 or n_steps == 0:
        return RegularSeries(tuple(order), origin, step_ms, out, counts)

    # duplicates: sort by (row, time, arrival) and keep the last of each (row, time)
    by = np.lexsort((np.arange(t.size), t, rows))
    rows, t, v = rows[by], t[by], v[by]
    last = np.ones(t.size, dtype=bool)
    last[:-1] = (rows[1:] != rows[:-1]) | (t[1:] != t[:-1])
    rows, t, v = rows[last], t[last], v[last]

    cols = (t - origin) // step_ms
    np.add.at(counts, (rows, cols), 1)
    filled = counts > 0
    if aggregate in ("sum", "mean"):
        sums = np.zeros_like(out)
        np.add.at(sums, (rows, cols), v)
        out[filled] = sums[filled] / (counts[filled] if aggregate == "mean" else 1)
    elif aggregate == "max":
        peak = np.full_like(out, -np.inf)
        np.maximum.at(peak, (rows, cols), v)
        out[filled] = peak[filled]
    else:  # last: sorted by time inside each (row, step), so the final write per cell is the latest
        out[rows, cols] = v
    return RegularSeries(tuple(order), origin, step_ms, out, counts)


def aggregate_step(times_ms: Sequence[int], values: Sequence[float], aggregate: str) -> float:
    """One entity's value for one step from its raw points there, in arrival order: the same rule as
    :func:`build_series` (duplicate times: the later arrival wins; ``last`` = the latest time; NaN if empty), for a
    live window that closes one step at a time."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate {aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    latest: dict[int, float] = {}
    for t, v in zip(times_ms, values, strict=True):
        if np.isfinite(v):
            latest[int(t)] = float(v)  # a later arrival with the same time replaces the earlier one
    if not latest:
        return float("nan")
    if aggregate == "last":
        return latest[max(latest)]
    vals = list(latest.values())
    if aggregate == "max":
        return max(vals)
    total = float(np.sum(vals))
    return total if aggregate == "sum" else total / len(vals)


def series_from_records(
    records: Iterable[Any],
    metric: str,
    step_ms: int,
    aggregate: str = "mean",
    **kwargs: Any,
) -> tuple[RegularSeries, int]:
    """:func:`build_series` from canonical records (``ingest.sources.record.Record`` or anything with
    ``entity``, ``time_ms`` and a ``metrics`` dict). Returns the series and how many records lacked ``metric``
    (left out, counted)."""
    ents: list[str] = []
    times: list[int] = []
    vals: list[float] = []
    missing = 0
    for rec in records:
        x = rec.metrics.get(metric)
        if x is None:
            missing += 1
            continue
        ents.append(str(rec.entity))
        times.append(int(rec.time_ms))
        vals.append(float(x))
    return build_series(ents, times, vals, step_ms, aggregate, **kwargs), missing


def fill_forward(values: np.ndarray, limit: int) -> np.ndarray:
    """Each NaN of ``values [..., T]`` takes the latest finite value at most ``limit`` steps *before* it; NaN
    when there is none. Never looks forward, so a filled step depends only on earlier steps. Model *inputs*
    are filled this way; targets and scores never are."""
    a = np.asarray(values, dtype=np.float64)
    if limit <= 0 or a.size == 0:
        return a.copy()
    steps = a.shape[-1]
    idx = np.where(np.isfinite(a), np.arange(steps), -1)
    latest = np.maximum.accumulate(idx, axis=-1)
    age = np.arange(steps) - latest
    picked = np.take_along_axis(a, np.maximum(latest, 0), axis=-1)
    return np.where((latest >= 0) & (age <= limit), picked, np.nan)
