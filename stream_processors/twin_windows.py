"""The twins' steps from raw records: one metric of the ``telemetry`` stream, windowed per entity to the
``[twins]`` cadence (tumbling, aligned to the epoch) with the configured aggregate. Pure: no Kafka.

Rules (docs/twins.md):

The same rule as the offline series builder (``twin_store/federation/series.py``), so twins bootstrapped from
the stream and ``nettwin bench twins`` see the same numbers:

- A record belongs to the step ``[k * cadence, (k + 1) * cadence)`` holding its event time.
- Records of one entity with the same time are one measurement: the last to arrive wins. Then ``sum``,
  ``mean`` and ``max`` fold the step's values, ``last`` takes the latest time's. Records without the metric
  are not counted.
- A step closes when the partition has seen a record at or past its end plus the allowed lateness (the
  partition's watermark). A record for a step that already closed is late: a dead letter, never folded
  into a step already emitted.
- A step an entity sent nothing in is a gap: nothing is emitted for it (the twins treat it as missing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ingest.deadletter import DeadLetter
from ingest.schema import TELEMETRY_KIND, MalformedMessage, RecordBatch
from stream_processors.processor import Output, decode_batch, late_deadletter
from twin_store.federation.series import aggregate_step

N_VALUES = "n_values"  # raw values folded into the step


@dataclass
class _Step:
    cells: dict[int, dict[int, float]] = field(default_factory=dict)  # entity key -> time -> value
    min_offset: int = 0


class TwinWindows:
    """Open steps of one input partition, the entity names seen, and the partition's watermark."""

    def __init__(
        self, topic: str, partition: int, metric: str, step_s: int, aggregate: str, lateness_s: int = 0
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.metric = metric
        self.step_ms = step_s * 1000
        self.aggregate = aggregate
        self.lateness_ms = lateness_s * 1000
        self.open: dict[int, _Step] = {}
        self.names: dict[int, str] = {}
        self.watermark_ms: int | None = None
        self.closed_until_ms: int | None = None  # every step ending at or before this was emitted
        self.counters = {
            "messages": 0,
            "records": 0,
            "steps": 0,
            "late": 0,
            "deadletters": 0,
            "without_metric": 0,
        }

    def on_message(self, value: bytes | None, offset: int) -> Output:
        out = Output()
        self.counters["messages"] += 1
        where = f"{self.topic}[{self.partition}]@{offset}"
        try:
            batch = decode_batch(value, TELEMETRY_KIND)
        except MalformedMessage as exc:
            out.deadletters.append(DeadLetter(str(exc), self.topic, where, value or b"", "worker"))
            self.counters["deadletters"] += 1
            out.safe_offset = self._safe_offset(offset + 1)
            return out
        self.counters["records"] += len(batch)
        if self.metric in batch.columns and len(batch):
            late = self._fold(batch, offset)
            if late is not None:
                self.counters["late"] += len(late)
                out.deadletters.append(
                    late_deadletter(
                        late, f"{self.step_ms // 1000} s steps", self.watermark_ms, self.topic, where
                    )
                )
        else:
            self.counters["without_metric"] += len(batch)
        closed = self._close()
        if closed is not None:
            out.features.append(closed)
            self.counters["steps"] += len(closed)
        out.safe_offset = self._safe_offset(offset + 1)
        return out

    def _fold(self, batch: RecordBatch, offset: int) -> RecordBatch | None:
        j = batch.columns.index(self.metric)
        values = batch.values[:, j]
        has = np.isfinite(values)
        self.counters["without_metric"] += int((~has).sum())
        times = batch.starts_ms
        starts = times - times % self.step_ms
        late_mask = has & (
            starts + self.step_ms <= self.closed_until_ms
            if self.closed_until_ms is not None
            else np.zeros(len(batch), bool)
        )
        names = batch.extra.get("entities", {})
        for key, start, t, v in zip(
            batch.squares[has & ~late_mask].tolist(),
            starts[has & ~late_mask].tolist(),
            times[has & ~late_mask].tolist(),
            values[has & ~late_mask].tolist(),
            strict=True,
        ):
            step = self.open.get(start)
            if step is None:
                step = self.open[start] = _Step(min_offset=offset)
            step.min_offset = min(step.min_offset, offset)
            cell = step.cells.get(key)
            if cell is None:
                cell = step.cells[key] = {}
                if key not in self.names:
                    self.names[key] = names.get(str(key), str(key))
            cell[t] = v  # the same time again: the later arrival wins
        if has.any():
            newest = int(times[has].max()) - self.lateness_ms
            self.watermark_ms = newest if self.watermark_ms is None else max(self.watermark_ms, newest)
        if not late_mask.any():
            return None
        return RecordBatch(
            batch.kind,
            batch.columns,
            batch.step_s,
            batch.squares[late_mask],
            batch.starts_ms[late_mask],
            batch.values[late_mask],
            extra={
                "entities": {str(k): names[str(k)] for k in set(batch.squares[late_mask].tolist())},
                "source": batch.extra.get("source", ""),
            },
        )

    def _close(self) -> RecordBatch | None:
        if self.watermark_ms is None:
            return None
        due = sorted(s for s in self.open if s + self.step_ms <= self.watermark_ms)
        self.closed_until_ms = max(self.closed_until_ms or self.watermark_ms, self.watermark_ms)
        if not due:
            return None
        keys: list[int] = []
        starts: list[int] = []
        rows: list[tuple[float, float]] = []
        for s in due:
            step = self.open.pop(s)
            for key in sorted(step.cells):
                cell = step.cells[key]
                keys.append(key)
                starts.append(s)
                rows.append(
                    (aggregate_step(list(cell), list(cell.values()), self.aggregate), float(len(cell)))
                )
        return step_batch(self.metric, self.aggregate, self.step_ms // 1000, keys, starts, rows, self.names)

    def _safe_offset(self, next_offset: int) -> int:
        return min([next_offset, *(s.min_offset for s in self.open.values())])


def step_batch(
    metric: str,
    aggregate: str,
    step_s: int,
    keys: list[int],
    starts: list[int],
    rows: list[tuple[float, float]],
    names: dict[int, str],
) -> RecordBatch:
    """Closed steps as a ``features`` batch: columns (metric, n_values), ``extra`` = the metric, the
    aggregate and the entity names (so the store and the BS agents need no registry lookup)."""
    return RecordBatch(
        "features",
        (metric, N_VALUES),
        step_s,
        np.asarray(keys, np.uint32),
        np.asarray(starts, np.int64),
        np.asarray(rows, np.float64).reshape(len(rows), 2),
        extra={
            "twins": {"metric": metric, "aggregate": aggregate},
            "entities": {str(k): names[k] for k in sorted(set(keys))},
        },
    )
