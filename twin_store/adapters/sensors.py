"""Turn screened sensor batches into InfluxDB points. Pure: no I/O.

- every reading -> ``sensor`` (tag ``source``; fields ``value``, ``score``, ``flagged`` bool), time = the
  reading's event time (ms precision).
- every source in a batch -> ``sensor_screen`` (tag ``source``; fields ``points``, ``flagged``: cumulative
  ints from the worker), time = the source's newest reading in the batch; the last row is the total.
- a run's final marker -> a ``replay`` row (as for traffic), via ``Points.progress_lines``.
"""

from __future__ import annotations

import numpy as np

from ingest.schema import RecordBatch
from twin_store.adapters.lineproto import escape_tag, point
from twin_store.adapters.traffic import Points


def sensor_lines(batch: RecordBatch) -> list[str]:
    names: dict[str, str] = batch.extra["sources"]
    tags = {sid: escape_tag(name) for sid, name in names.items()}
    values = batch.values
    flags = np.where(values[:, 2] > 0, "true", "false").tolist()
    return [
        f"sensor,source={tags[str(sid)]} value={v!r},score={s!r},flagged={f} {t}"
        for sid, v, s, f, t in zip(
            batch.squares.tolist(),
            values[:, 0].tolist(),
            values[:, 1].tolist(),
            flags,
            batch.starts_ms.tolist(),
            strict=True,
        )
    ]


def screen_count_lines(batch: RecordBatch) -> list[str]:
    names: dict[str, str] = batch.extra["sources"]
    counts: dict[str, list[int]] = batch.extra.get("counts", {})
    out = []
    for sid in np.unique(batch.squares).tolist():
        name = names[str(sid)]
        if name not in counts:
            continue
        last_ms = int(batch.starts_ms[batch.squares == sid].max())
        points, flagged = counts[name]
        out.append(
            point(
                "sensor_screen", {"source": name}, {"points": int(points), "flagged": int(flagged)}, last_ms
            )
        )
    return out


def sensor_points(batch: RecordBatch, partition: int) -> Points:
    out = Points(partition=partition, run=batch.run, final=batch.final, precision="ms")
    if len(batch):
        out.lines = sensor_lines(batch) + screen_count_lines(batch)
        out.records = len(batch)
    if batch.final:
        out.sent = int(batch.sent or 0)
        out.received = int(batch.extra.get("received", 0))
    return out
