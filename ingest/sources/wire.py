"""Canonical records <-> the batched wire format (``ingest.schema`` kind ``telemetry``). Pure.

Records travel like replays: one Kafka message carries many records of one source and partition as numpy
columns. ``squares`` holds the entities' registry keys, ``extra["entities"]`` their names (so a batch is
readable on its own), ``columns`` the union of the batch's metric names; NaN marks a metric a record lacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ingest.schema import TELEMETRY_KIND, RecordBatch
from ingest.sources.record import Record


def encode_records(records: Sequence[Record], keys: Mapping[str, int], source: str) -> RecordBatch:
    columns: dict[str, int] = {}
    for r in records:
        for name in r.metrics:
            if name not in columns:
                columns[name] = len(columns)
    n = len(records)
    values = np.full((n, len(columns)), np.nan)
    for i, r in enumerate(records):
        row = values[i]
        for name, x in r.metrics.items():
            row[columns[name]] = x
    squares = np.fromiter((keys[r.entity] for r in records), np.uint32, n)
    starts = np.fromiter((r.time_ms for r in records), np.int64, n)
    entities = {str(keys[r.entity]): r.entity for r in records}
    return RecordBatch(
        TELEMETRY_KIND,
        tuple(columns),
        1,
        squares,
        starts,
        values,
        extra={"entities": entities, "source": source},
    )


def decode_records(batch: RecordBatch) -> list[Record]:
    names = batch.extra["entities"]
    source = batch.extra["source"]
    cols = batch.columns
    out = []
    for key, t, row in zip(
        batch.squares.tolist(), batch.starts_ms.tolist(), batch.values.tolist(), strict=True
    ):
        metrics = {c: x for c, x in zip(cols, row, strict=True) if x == x}  # x == x: not NaN
        out.append(Record(names[str(key)], int(t), metrics, source=source))
    return out
