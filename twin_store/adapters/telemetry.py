"""Records of attached sources -> ``telemetry`` points (tags ``entity``, ``source``; one field per metric;
time = the record's event time, ms precision). Pure: no I/O."""

from __future__ import annotations

from ingest.schema import RecordBatch
from twin_store.adapters.lineproto import escape_tag

MEASUREMENT = "telemetry"


def telemetry_lines(batch: RecordBatch) -> list[str]:
    names = batch.extra["entities"]
    source = escape_tag(batch.extra["source"])
    prefix_by_key = {k: f"{MEASUREMENT},entity={escape_tag(v)},source={source} " for k, v in names.items()}
    fields = [escape_tag(c) + "=" for c in batch.columns]
    lines = []
    for key, t, row in zip(
        batch.squares.tolist(), batch.starts_ms.tolist(), batch.values.tolist(), strict=True
    ):
        body = ",".join(f + repr(x) for f, x in zip(fields, row, strict=True) if x == x)  # x == x: not NaN
        lines.append(f"{prefix_by_key[str(key)]}{body} {t}")
    return lines
