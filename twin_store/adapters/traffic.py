"""Turn feature batches into InfluxDB points (the data model in DESIGN.md). Pure: no I/O.

- 10-minute windows -> ``traffic`` (tag ``square``; fields the activity sums), time = interval start.
- 1-hour windows -> ``traffic_hourly`` (same fields + ``n_intervals``), time = hour start.
- the first time a square is seen -> a ``twin`` row (level=bs, twin_id=square, version 0) and its
  ``twin_current`` point (``twin_rows``).
- each feature message -> a ``pipeline`` row: lag from the source closing the interval to the write
  being acknowledged.
- the ``[twins]`` metric per entity and closed step -> ``twin_input`` (``twin_step_lines``).
- BS agents' forecast batches -> ``forecast`` rows (``forecast_lines``).
- a run's final marker -> a ``replay`` row per partition: records sent by the producer and received by
  the worker, written after everything before it on that partition is acknowledged, so completeness is
  checkable end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ingest.schema import N_INTERVALS, RecordBatch
from twin_store.adapters.lineproto import columns_to_text, escape_measurement, escape_tag, point, texts
from twin_store.adapters.twin_rows import twin_state_lines

MEASUREMENT_BY_WINDOW = {600: "traffic", 3600: "traffic_hourly"}
TWIN_INPUT = "twin_input"  # the [twins] metric per entity and step, as the twins learn it


def measurement_for(window_s: int) -> str:
    return MEASUREMENT_BY_WINDOW.get(window_s, f"traffic_{window_s}s")


@dataclass
class Points:
    """What one feature message becomes: data lines now, progress rows once the data is acknowledged."""

    lines: list[str] = field(default_factory=list)  # in ``precision`` (s unless said otherwise); an item
    # may be a block of several lines joined by newlines (``feature_lines``): count points with n_points
    lines_in_blocks: int = 0  # lines beyond the first of each block
    precision: str = "s"
    records: int = 0
    partition: int = 0
    run: str | None = None
    window_s: int = 0
    closed_ms: int | None = None  # the source closed the newest interval at this wall time
    final: bool = False
    sent: int = 0
    received: int = 0

    @property
    def n_points(self) -> int:
        return len(self.lines) + self.lines_in_blocks

    def progress_lines(self, acked_ms: int) -> list[str]:
        """``pipeline`` (lag) and ``replay`` (completion) rows, stamped with the write acknowledgement time.

        Written only after this message's data lines were acknowledged, so "visible" means visible.
        """
        tags = {"run": self.run or "", "partition": str(self.partition)}
        out = []
        if self.records and self.closed_ms is not None:
            fields = {
                "lag_ms": max(0, acked_ms - self.closed_ms),
                "records": self.records,
                "window_s": self.window_s,
            }
            # keyed by the source's close time: unique per interval, window and partition
            out.append(
                point("pipeline", tags | {"window": str(self.window_s)}, fields, None) + f" {self.closed_ms}"
            )
        if self.final:
            # complete only if the worker took in every record sent (nothing it dead-lettered)
            fields = {
                "sent": self.sent,
                "received": self.received,
                "final": True,
                "complete": self.received >= self.sent,
            }
            out.append(point("replay", tags, fields, None) + f" {acked_ms}")
        return out


def feature_lines(batch: RecordBatch) -> list[str]:
    """The batch's rows as one block of lines (one list item: the store sends it as it is)."""
    cols = list(batch.columns)
    ints: dict[str, np.ndarray] = {}
    values = batch.values
    if N_INTERVALS in cols:
        j = cols.index(N_INTERVALS)
        counts = values[:, j].astype(np.int64)
        values = np.delete(values, j, axis=1)
        cols.pop(j)
        if batch.step_s != 600:  # a 10-minute window of 10-minute data always sums one interval
            ints[N_INTERVALS] = counts
    text = columns_to_text(
        measurement_for(batch.step_s), "entity", batch.squares, batch.starts_ms // 1000, cols, values, ints
    )
    return [text] if text else []


class TwinRegistry:
    """Which BS twins already have their first state row (recoverable from InfluxDB at start)."""

    def __init__(self, known: set[int] | None = None) -> None:
        self.known: set[int] = set(known or ())

    def first_rows(self, squares: np.ndarray, now_s: int) -> list[str]:
        new = sorted(set(squares.tolist()) - self.known)  # a set difference: no per-batch sort of all squares
        self.known.update(new)
        fields = {"version": 0, "epsilon": 0.0, "n_updates": 0, "n_members": 1}
        return [line for s in new for line in twin_state_lines("bs", str(s), fields, now_s, "s", str(s))]


def forecast_lines(batch: RecordBatch) -> list[str]:
    """BS agents' forecasts (``predicted``) and outcomes (+ ``actual``, ``abs_error``) -> ``forecast`` rows.

    Tags ``entity`` (the batch's entity names, else the key: a Milan square's number), ``metric`` (when the
    batch names it) and ``cluster`` (the BS's cluster when the forecast was made), time = the start of the
    forecast step. An outcome rewrites its forecast's point with the actual value added (same series and time).

    The lines ``point`` would write, built column by column: a step of 10,000 entities brings 20,000 of these
    rows, and ``point`` per row was the store's busiest work in a step (~1 s of its main thread at 10,000
    entities beside the other parts; ``tests/test_lineproto.py`` holds both equal).
    """
    cols = list(batch.columns)
    j = cols.index("cluster")
    fields = [c for c in cols if c != "cluster"]
    n = len(batch)
    if n == 0:
        return []
    values = batch.values[:, [cols.index(c) for c in fields]]
    if not np.isfinite(values).all():
        raise ValueError("line protocol cannot carry a non-finite forecast value")
    numbers = texts(values)
    k = len(fields)
    names = [escape_tag(f) for f in fields]
    bodies = [
        ",".join(parts)
        for parts in zip(*[[f"{names[q]}={v}" for v in numbers[q::k]] for q in range(k)], strict=True)
    ]
    known = batch.extra.get("entities", {})
    entity_tags = {}  # key -> ",entity=<escaped name>" ("" for an empty name: point leaves empty tags out)
    for key in set(batch.squares.tolist()):
        name = str(known.get(str(key), str(key)))
        entity_tags[key] = f",entity={escape_tag(name)}" if name else ""
    metric = str(batch.extra.get("metric", ""))  # empty: no tag
    metric_tag = f",metric={escape_tag(metric)}" if metric else ""
    clusters = [str(int(c)) for c in batch.values[:, j].tolist()]
    times = (batch.starts_ms // 1000).tolist()
    head = escape_measurement("forecast")
    return [
        f"{head},cluster={c}{entity_tags[key]}{metric_tag} {body} {t}"
        for key, c, body, t in zip(batch.squares.tolist(), clusters, bodies, times, strict=True)
    ]


def twin_step_lines(batch: RecordBatch) -> list[str]:
    """The ``[twins]`` metric per entity and closed step -> ``twin_input`` rows (tags ``entity``, ``metric``;
    fields ``value``, ``n_values`` (raw values folded in) and ``key`` (the entity's registry key)), time =
    the step's start."""
    if not len(batch):
        return []
    names = batch.extra["entities"]
    metric = escape_tag(str(batch.extra["twins"]["metric"]))
    prefix = {k: f"{TWIN_INPUT},entity={escape_tag(v)},metric={metric} value=" for k, v in names.items()}
    values = texts(batch.values[:, 0])
    counts = batch.values[:, 1].astype(np.int64).tolist()
    times = (batch.starts_ms // 1000).tolist()
    # key: the entity's registry key, so twins built from these rows name the entity as the stream does
    return [
        f"{prefix[str(k)]}{v},n_values={n}i,key={k}i {t}"
        for k, v, n, t in zip(batch.squares.tolist(), values, counts, times, strict=True)
    ]


def batch_points(batch: RecordBatch, partition: int, twins: TwinRegistry, now_ms: int) -> Points:
    if batch.kind == "features" and "twins" in batch.extra:
        lines = twin_step_lines(batch)
        return Points(lines=lines, records=len(lines), partition=partition, window_s=batch.step_s)
    if batch.kind == "forecast":
        return Points(lines=forecast_lines(batch), partition=partition, window_s=batch.step_s)
    out = Points(
        partition=partition,
        run=batch.run,
        window_s=batch.step_s,
        closed_ms=batch.closed_ms,
        final=batch.final,
    )
    if len(batch):
        out.lines = feature_lines(batch) + twins.first_rows(batch.squares, now_ms // 1000)
        out.lines_in_blocks = len(batch) - 1  # feature_lines is one block of len(batch) lines
        out.records = len(batch)
    if batch.final:
        out.sent = int(batch.sent or 0)
        out.received = int(batch.extra.get("received", 0))
    return out
