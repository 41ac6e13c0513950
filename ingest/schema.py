"""Wire format of batched record messages, shared by producers, the worker and the twin store.

One Kafka message carries many records of one partition (e.g. all squares of a partition for one
10-minute interval) as contiguous numpy columns behind a small JSON header::

    b"NTB1" | u32 header_len | header JSON (space-padded to 8-byte alignment) | u32 n | pad to 8
            | square u4[n] | pad to 8 | start_ms i8[n] | value f8[n, k] (row-major, k = len(columns))

Decoding is zero-copy (``np.frombuffer``). The header also carries stream-control facts:
``watermark_ms`` (after this message the partition is complete for event times before it), ``closed_ms``
(wall-clock time the source closed the newest interval, for lag measurement), ``run`` (replay id),
``final`` and ``sent`` (records the run sent to this partition, on its final message).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

MAGIC = b"NTB1"
KINDS = ("traffic", "features", "forecast", "sensor", "screened", "telemetry")
# sensor telemetry (``sensor``: raw readings; ``screened``: readings marked by the worker's screening). The
# ``squares`` column holds source ids; ``extra["sources"]`` maps every id in the batch (as a string) to the
# source's name, and ``starts_ms`` is the reading's event time (not aligned to ``step_s``, the nominal step).
SENSOR_KINDS = ("sensor", "screened")
SCREENED_COLUMNS = ("value", "score", "flagged")
# records of attached sources (ingest/sources): ``squares`` holds the entities' registry keys,
# ``extra["entities"]`` maps every key in the batch (as a string) to the entity name, ``extra["source"]``
# names the source, ``starts_ms`` is the event time, ``columns`` the union of the batch's metric names and a
# NaN value means "this record has no such metric"
TELEMETRY_KIND = "telemetry"
ACTIVITY_COLUMNS = ("sms_in", "sms_out", "call_in", "call_out", "internet")
# event times outside [2000-01-01, 2100-01-01) UTC are refused by the readers and producers as implausible
# (epoch ms); the wire format itself carries any time
PLAUSIBLE_MS = (946_684_800_000, 4_102_444_800_000)
# counts how many source intervals a window summed; present on feature records
N_INTERVALS = "n_intervals"
_U32 = struct.Struct("<I")


class MalformedMessage(ValueError):
    """A message is not a valid record batch; the reason says what is wrong."""


def _pad8(n: int) -> int:
    return (-n) % 8


@dataclass
class RecordBatch:
    kind: str
    columns: tuple[str, ...]
    step_s: int
    squares: np.ndarray  # uint32 [n]
    starts_ms: np.ndarray  # int64 [n], interval/window start, epoch ms UTC
    values: np.ndarray  # float64 [n, k]
    watermark_ms: int | None = None
    closed_ms: int | None = None
    run: str | None = None
    final: bool = False
    sent: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.squares.shape[0])

    @classmethod
    def empty(cls, kind: str, columns: tuple[str, ...], step_s: int, **meta: Any) -> RecordBatch:
        return cls(
            kind,
            columns,
            step_s,
            np.empty(0, np.uint32),
            np.empty(0, np.int64),
            np.empty((0, len(columns)), np.float64),
            **meta,
        )

    def header(self) -> dict[str, Any]:
        h: dict[str, Any] = {"kind": self.kind, "columns": list(self.columns), "step_s": self.step_s}
        for key in ("watermark_ms", "closed_ms", "run", "sent"):
            value = getattr(self, key)
            if value is not None:
                h[key] = value
        if self.final:
            h["final"] = True
        if self.extra:
            h["extra"] = self.extra
        return h

    def encode(self) -> bytes:
        n = len(self)
        raw_header = json.dumps(self.header(), separators=(",", ":")).encode()
        raw_header += b" " * _pad8(8 + len(raw_header))
        squares = np.ascontiguousarray(self.squares, dtype="<u4")
        parts = [
            MAGIC,
            _U32.pack(len(raw_header)),
            raw_header,
            _U32.pack(n),
            b"\0" * 4,
            squares.tobytes(),
            b"\0" * _pad8(4 * n),
            np.ascontiguousarray(self.starts_ms, dtype="<i8").tobytes(),
            np.ascontiguousarray(self.values, dtype="<f8").tobytes(),
        ]
        return b"".join(parts)


def decode(data: bytes) -> RecordBatch:
    """Parse and validate a message; raise MalformedMessage with the reason if it is not a valid batch."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise MalformedMessage("not a nettwin record batch (bad magic)")
    (hlen,) = _U32.unpack_from(data, 4)
    body = 8 + hlen
    if body + 8 > len(data):
        raise MalformedMessage(f"truncated header ({len(data)} bytes, header says {hlen})")
    try:
        h = json.loads(data[8:body])
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, a 5000-digit integer, deep nesting
        raise MalformedMessage(f"header is not JSON: {str(exc)[:200]}") from exc
    problem = _header_problem(h)
    if problem:
        raise MalformedMessage(problem)
    columns, step_s = h["columns"], h["step_s"]
    (n,) = _U32.unpack_from(data, body)
    k = len(columns)
    off_sq = body + 8
    off_st = off_sq + 4 * n + _pad8(4 * n)
    off_val = off_st + 8 * n
    if off_val + 8 * n * k != len(data):
        raise MalformedMessage(f"body length {len(data) - body} does not match {n} records x {k} columns")
    squares = np.frombuffer(data, "<u4", n, off_sq)
    starts = np.frombuffer(data, "<i8", n, off_st)
    values = np.frombuffer(data, "<f8", n * k, off_val).reshape(n, k)
    batch = RecordBatch(
        kind=h["kind"],
        columns=tuple(columns),
        step_s=step_s,
        squares=squares,
        starts_ms=starts,
        values=values,
        watermark_ms=h.get("watermark_ms"),
        closed_ms=h.get("closed_ms"),
        run=h.get("run"),
        final=bool(h.get("final", False)),
        sent=h.get("sent"),
        extra=h.get("extra") or {},
    )
    problem = validate(batch)
    if problem:
        raise MalformedMessage(problem)
    return batch


# header integers are epoch ms or counts: anything beyond int64 (or a step beyond a century) is not a value
# this pipeline produces, and would overflow numpy arithmetic downstream
_INT_LIMIT = 2**62
MAX_STEP_S = 100 * 366 * 86_400


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _header_problem(h: Any) -> str | None:
    """Why a decoded header cannot describe a batch (type and range of every field), or None."""
    if not isinstance(h, dict) or h.get("kind") not in KINDS:
        kind = h.get("kind") if isinstance(h, dict) else h
        return f"unknown kind {repr(kind)[:60]}"
    columns = h.get("columns")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        return "header.columns must be a non-empty list of names"
    step_s = h.get("step_s")
    if not _is_int(step_s) or not 0 < step_s <= MAX_STEP_S:
        return f"header.step_s must be a positive integer up to {MAX_STEP_S}"
    for key in ("watermark_ms", "closed_ms"):
        value = h.get(key)
        if value is not None and (not _is_int(value) or abs(value) >= _INT_LIMIT):
            return f"header.{key} must be an integer (epoch ms) or absent"
    sent = h.get("sent")
    if sent is not None and (not _is_int(sent) or not 0 <= sent < _INT_LIMIT):
        return "header.sent must be a non-negative integer or absent"
    if h.get("run") is not None and not isinstance(h["run"], str):
        return "header.run must be a string or absent"
    if h.get("final") is not None and not isinstance(h["final"], bool):
        return "header.final must be true or false"
    if h.get("extra") is not None and not isinstance(h["extra"], dict):
        return "header.extra must be an object or absent"
    return None


def validate(batch: RecordBatch) -> str | None:
    """Return why a batch is invalid, or None. Vectorised: one pass per check over the whole batch."""
    if batch.kind in SENSOR_KINDS:
        return _validate_sensor(batch)
    if batch.kind == TELEMETRY_KIND:
        return _validate_telemetry(batch)
    if len(batch) == 0:
        return None
    if not np.isfinite(batch.values).all():
        return "non-finite value"
    if (batch.values < 0).any():
        return "negative value"
    if (batch.squares == 0).any():
        return "square id 0 (ids start at 1)"
    if (batch.starts_ms % (batch.step_s * 1000) != 0).any():
        return f"interval start not aligned to step {batch.step_s} s"
    return None


def _validate_sensor(batch: RecordBatch) -> str | None:
    sources = batch.extra.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) and v for v in sources.values()):
        return "extra.sources must map source ids to non-empty names"
    if len(batch) == 0:
        return None
    missing = [i for i in np.unique(batch.squares).tolist() if str(i) not in sources]
    if missing:
        return f"source id(s) {missing[:5]} missing from extra.sources"
    if not np.isfinite(batch.values).all():
        return "non-finite value"
    counts = batch.extra.get("counts", {})
    if not isinstance(counts, dict) or not all(
        isinstance(v, list) and len(v) == 2 and all(_is_int(x) and 0 <= x < _INT_LIMIT for x in v)
        for v in counts.values()
    ):
        return "extra.counts must map source names to [points, flagged] pairs of counts"
    if batch.kind == "screened":
        if batch.columns != SCREENED_COLUMNS:
            return f"screened batch columns must be {list(SCREENED_COLUMNS)}"
        flagged = batch.values[:, 2]
        if ((flagged != 0) & (flagged != 1)).any():
            return "flagged must be 0 or 1"
    return None


def _validate_telemetry(batch: RecordBatch) -> str | None:
    entities = batch.extra.get("entities", {})
    if not isinstance(entities, dict) or not all(isinstance(v, str) and v for v in entities.values()):
        return "extra.entities must map entity keys to non-empty names"
    source = batch.extra.get("source")
    if not isinstance(source, str) or not source:
        return "extra.source must name the source"
    if len(batch) == 0:
        return None
    missing = [i for i in np.unique(batch.squares).tolist() if str(i) not in entities]
    if missing:
        return f"entity key(s) {missing[:5]} missing from extra.entities"
    if np.isinf(batch.values).any():
        return "infinite value"
    if np.isnan(batch.values).all(axis=1).any():
        return "a record without any metric"
    return None
