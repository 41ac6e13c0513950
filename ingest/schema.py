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
from typing import Any

import numpy as np

MAGIC = b"NTB1"
KINDS = ("traffic", "features", "forecast", "sensor", "screened")
# sensor telemetry (``sensor``: raw readings; ``screened``: readings marked by the worker's screening). The
# ``squares`` column holds source ids; ``extra["sources"]`` maps every id in the batch (as a string) to the
# source's name, and ``starts_ms`` is the reading's event time (not aligned to ``step_s``, the nominal step).
SENSOR_KINDS = ("sensor", "screened")
SCREENED_COLUMNS = ("value", "score", "flagged")
ACTIVITY_COLUMNS = ("sms_in", "sms_out", "call_in", "call_out", "internet")
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"header is not JSON: {exc}") from exc
    if not isinstance(h, dict) or h.get("kind") not in KINDS:
        raise MalformedMessage(f"unknown kind {h.get('kind') if isinstance(h, dict) else h!r}")
    columns = h.get("columns")
    step_s = h.get("step_s")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise MalformedMessage("header.columns must be a non-empty list of names")
    if not isinstance(step_s, int) or isinstance(step_s, bool) or step_s <= 0:
        raise MalformedMessage("header.step_s must be a positive integer")
    problem = _header_types(h)
    if problem:
        raise MalformedMessage(problem)
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
    try:
        problem = validate(batch)
    except OverflowError as exc:  # e.g. step_s = 10**30: no int64 arithmetic holds it
        raise MalformedMessage(f"header value out of range: {exc}") from exc
    if problem:
        raise MalformedMessage(problem)
    return batch


def _header_types(h: dict[str, Any]) -> str | None:
    """Why the optional header fields have the wrong types, or None (they steer windows and counts)."""
    for key in ("watermark_ms", "closed_ms", "sent"):
        value = h.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return f"header.{key} must be an integer, got {value!r}"[:200]
    if h.get("run") is not None and not isinstance(h["run"], str):
        return f"header.run must be a string, got {h['run']!r}"[:200]
    if not isinstance(h.get("final", False), bool):
        return "header.final must be true or false"
    if h.get("extra") is not None and not isinstance(h["extra"], dict):
        return "header.extra must be an object"
    return None


def validate(batch: RecordBatch) -> str | None:
    """Return why a batch is invalid, or None. Vectorised: one pass per check over the whole batch."""
    if batch.kind in SENSOR_KINDS:
        return _validate_sensor(batch)
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
    if batch.kind == "screened":
        if batch.columns != SCREENED_COLUMNS:
            return f"screened batch columns must be {list(SCREENED_COLUMNS)}"
        flagged = batch.values[:, 2]
        if ((flagged != 0) & (flagged != 1)).any():
            return "flagged must be 0 or 1"
    return None
