"""The canonical record of an attached source, and the pure parsers that turn payloads into records.

A record is one measurement of one entity at one event time::

    {"entity": "cell-17", "time": "2018-03-28T15:56:00Z", "metrics": {"down": 1.7e8, "up": 1.9e6}}

optionally with ``kind`` (cell, sensor, device...) and ``source``. ``time`` is ISO 8601 (no offset = UTC) or
epoch seconds or milliseconds, told apart by magnitude. Payloads that are not canonical records are read
through a :class:`Mapping` (entity from a topic level or a field, a time field and format, which fields are
metrics, renames and scales).

Nothing here touches Kafka: parsers return ``Parsed`` (records plus refusals, each refusal with the original
bytes, where it was and why), so they are tested without services.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

# epoch values at or above this are milliseconds (1e11 s is the year 5138; 1e11 ms is March 1973)
_MS_THRESHOLD = 1e11
DEFAULT_MAX_FUTURE_S = 86_400.0
_TOPIC_LEVEL = re.compile(r"^topic\[(-?\d+)\]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME = 256


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 us a record on the hot path
class Record:
    entity: str
    time_ms: int
    metrics: dict[str, float]
    kind: str | None = None
    source: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"entity": self.entity, "time": self.time_ms, "metrics": self.metrics}
        if self.kind:
            out["kind"] = self.kind
        return out


@dataclass(frozen=True, slots=True)
class Refusal:
    """Input that cannot become a record: the bytes as received, where they were, and why."""

    reason: str
    position: str
    original: bytes


@dataclass
class Parsed:
    records: list[Record] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)

    def extend(self, other: Parsed) -> None:
        self.records += other.records
        self.refusals += other.refusals


class RecordError(ValueError):
    """One item is not a valid record; the message is the reason stored with the dead letter."""


@dataclass(frozen=True)
class Mapping:
    """How a non-canonical payload becomes a record (``[source.mapping]`` of a source).

    ``entity``: ``"topic[i]"`` (an MQTT topic level, negative from the end) or a field name.
    ``time``: a field name (absent: the receive time); ``time_format`` a ``strptime`` format, else ISO 8601 or
    epoch s/ms. ``metrics``: ``"*"`` (every numeric field that is not the entity, time or kind) or names.
    ``rename``: field -> metric name; ``scale``: metric -> factor applied after renaming.
    """

    entity: str = "entity"
    time: str | None = "time"
    time_format: str | None = None
    metrics: str | tuple[str, ...] = "*"
    kind: str | None = None
    rename: dict[str, str] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, raw: dict[str, Any] | None) -> Mapping | None:
        if raw is None:
            return None
        metrics = raw.get("metrics", "*")
        return cls(
            entity=str(raw.get("entity", "entity")),
            time=raw.get("time", "time"),
            time_format=raw.get("time_format"),
            metrics=metrics if isinstance(metrics, str) else tuple(metrics),
            kind=raw.get("kind"),
            rename=dict(raw.get("rename") or {}),
            scale={k: float(v) for k, v in (raw.get("scale") or {}).items()},
        )


@dataclass(frozen=True)
class Limits:
    """What a source accepts: event times at most ``max_future_s`` ahead of the receive time."""

    max_future_s: float = DEFAULT_MAX_FUTURE_S


def parse_time(value: Any, time_format: str | None = None) -> int:
    """Event time in epoch milliseconds from ISO 8601 (no offset = UTC), epoch s/ms, or ``time_format``."""
    if isinstance(value, bool) or value is None:
        raise RecordError(f"time {value!r} is not a time")
    if isinstance(value, int | float):
        return _epoch_ms(float(value))
    if not isinstance(value, str):
        raise RecordError(f"time {value!r} is not a time")
    text = value.strip()
    if time_format:
        try:
            dt = datetime.strptime(text, time_format)
        except ValueError as exc:
            raise RecordError(f"time {text!r} does not match format {time_format!r}") from exc
        return _dt_ms(dt)
    try:
        return _epoch_ms(float(text))
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError as exc:
        raise RecordError(f"time {text!r} is neither ISO 8601 nor epoch seconds/milliseconds") from exc
    return _dt_ms(dt)


def _dt_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return round(dt.timestamp() * 1000)


def _epoch_ms(x: float) -> int:
    if not math.isfinite(x) or x < 0:
        raise RecordError(f"time {x!r} is not a valid epoch time")
    return round(x) if abs(x) >= _MS_THRESHOLD else round(x * 1000)


def metric_value(name: str, value: Any) -> float:
    """A metric as a finite float; booleans, strings and NaN/infinity are refused."""
    if type(value) is float and value - value == 0.0:  # the common case: a finite float
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(f"metric {name!r} is not a number ({value!r})")
    x = float(value)
    if not math.isfinite(x):
        raise RecordError(f"metric {name!r} is {x} (NaN and infinity are refused)")
    return x


@functools.lru_cache(maxsize=65_536)
def _valid_name(name: str) -> bool:
    """Non-empty, at most MAX_NAME characters, no control characters (names repeat: cached)."""
    return bool(name) and len(name) <= MAX_NAME and not _CONTROL.search(name)


@functools.lru_cache(maxsize=4096)
def _valid_names(names: tuple[str, ...]) -> bool:
    """All metric names of a record valid (records of a source repeat the same name set: cached)."""
    return all(_valid_name(n) for n in names)


def check_record(record: Record, now_ms: int, limits: Limits) -> Record:
    if not record.entity:
        raise RecordError("missing entity")
    if not record.metrics:
        raise RecordError("no metrics")
    if not _valid_name(record.entity):
        raise RecordError(f"entity {record.entity[:80]!r} has control characters or is too long")
    if not _valid_names(tuple(record.metrics)):
        bad = next(n for n in record.metrics if not _valid_name(n))
        raise RecordError(f"metric name {bad[:80]!r} is empty, too long or has control characters")
    if record.time_ms > now_ms + limits.max_future_s * 1000:
        raise RecordError(
            f"time {record.time_ms} ms is more than {limits.max_future_s:.0f} s in the future "
            f"(received at {now_ms} ms)"
        )
    return record


def canonical_record(obj: Any, now_ms: int) -> Record:
    """A record written as documented (``entity``, ``time``, ``metrics``, optional ``kind``)."""
    if type(obj) is not dict:
        raise RecordError(f"a record is a JSON object, got {type(obj).__name__}")
    entity = obj.get("entity")
    if type(entity) is not str or not entity:
        if entity is None or entity == "":
            raise RecordError("missing entity")
        if type(entity) is not int:
            raise RecordError(f"entity {entity!r} is not a string")
        entity = str(entity)
    raw_metrics = obj.get("metrics")
    if type(raw_metrics) is not dict or not raw_metrics:
        raise RecordError("metrics must be a non-empty object of name -> number")
    metrics: dict[str, float] = {}
    for k, v in raw_metrics.items():
        # the common case inline: a finite float (JSON object keys are always strings)
        metrics[k] = v if type(v) is float and v - v == 0.0 else metric_value(k, v)
    t = obj.get("time")
    if type(t) is int and t >= _MS_THRESHOLD:
        time_ms = t  # epoch milliseconds, the common case inline
    elif t is None or t == "":
        raise RecordError("missing time")
    else:
        time_ms = parse_time(t)
    kind = obj.get("kind")
    return Record(entity, time_ms, metrics, str(kind) if kind else None)


def mapped_record(obj: Any, mapping: Mapping, topic: str | None, now_ms: int) -> Record:
    """A record read through a mapping from a flat object (a JSON object or a CSV row)."""
    if not isinstance(obj, dict):
        raise RecordError(f"a mapped payload is a JSON object, got {type(obj).__name__}")
    level = _TOPIC_LEVEL.match(mapping.entity)
    used = {mapping.entity, mapping.time, mapping.kind}
    if level:
        if topic is None:
            raise RecordError(f"mapping entity {mapping.entity!r} needs a topic")
        parts = topic.split("/")
        i = int(level.group(1))
        if not -len(parts) <= i < len(parts):
            raise RecordError(f"topic {topic!r} has no level {i}")
        entity: Any = parts[i]
    else:
        entity = obj.get(mapping.entity)
    if entity is None or entity == "":
        raise RecordError(f"missing entity (field {mapping.entity!r})")
    if mapping.time is None:
        time_ms = now_ms
    elif mapping.time not in obj or obj[mapping.time] in (None, ""):
        raise RecordError(f"missing time (field {mapping.time!r})")
    else:
        time_ms = parse_time(obj[mapping.time], mapping.time_format)
    metrics: dict[str, float] = {}
    if mapping.metrics == "*":
        for k, v in obj.items():
            if k in used:
                continue
            x = _numeric_or_none(v)
            if x is not None:
                metrics[mapping.rename.get(str(k), str(k))] = x
    else:
        for k in tuple(mapping.metrics):
            if k not in obj or obj[k] in (None, ""):
                raise RecordError(f"missing metric {k!r}")
            metrics[mapping.rename.get(k, k)] = metric_value(k, _number(obj[k]))
    for name, factor in mapping.scale.items():
        if name in metrics:
            metrics[name] *= factor
    for name, x in metrics.items():
        metric_value(name, x)  # "*" skipped non-numbers but never lets NaN/inf through
    kind = obj.get(mapping.kind) if mapping.kind else None
    return Record(str(entity), time_ms, metrics, str(kind) if kind else None)


def _number(v: Any) -> Any:
    """CSV cells arrive as strings: numbers in them are numbers (anything else stays for the refusal)."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _numeric_or_none(v: Any) -> float | None:
    v = _number(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def to_record(obj: Any, mapping: Mapping | None, topic: str | None, now_ms: int, limits: Limits) -> Record:
    rec = canonical_record(obj, now_ms) if mapping is None else mapped_record(obj, mapping, topic, now_ms)
    return check_record(rec, now_ms, limits)


def parse_json_payload(
    data: bytes,
    where: str,
    now_ms: int,
    mapping: Mapping | None = None,
    topic: str | None = None,
    limits: Limits = Limits(),
) -> Parsed:
    """One JSON record, an array of records, or JSON lines. Each bad item is refused on its own."""
    out = Parsed()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.refusals.append(Refusal(f"not UTF-8: {exc}", where, data))
        return out
    stripped = text.strip()
    if not stripped:
        out.refusals.append(Refusal("empty payload", where, data))
        return out
    doc = _loads(data, stripped)
    items: Iterable[tuple[str, Any, bytes | None]]
    if doc is _NOT_JSON:
        items = _json_lines(text, where)
    elif isinstance(doc, list):
        items = ((f"{where} item {i}", item, None) for i, item in enumerate(doc, 1))
    else:
        items = [(where, doc, data)]
    for pos, item, raw in items:
        if isinstance(item, _Bad):
            out.refusals.append(Refusal(item.reason, pos, raw or b""))
            continue
        try:
            out.records.append(to_record(item, mapping, topic, now_ms, limits))
        except RecordError as exc:
            # an array item's bytes: re-encoded only when refused
            original = raw if raw is not None else json.dumps(item).encode()
            out.refusals.append(Refusal(str(exc), pos, original))
    return out


_NOT_JSON = object()


def _loads(data: bytes, text: str) -> Any:
    """orjson (C, ~3x faster) for the common case; what it refuses (NaN tokens, integers beyond 64 bits) goes
    to the standard library; ``_NOT_JSON`` when neither reads it (then it may be JSON lines)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _NOT_JSON


@dataclass(frozen=True)
class _Bad:
    reason: str


def _json_lines(text: str, where: str) -> Iterable[tuple[str, Any, bytes]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        raw = line.encode()
        try:
            yield f"{where} line {n}", json.loads(line), raw
        except json.JSONDecodeError as exc:
            yield f"{where} line {n}", _Bad(f"not JSON: {exc.msg} at column {exc.colno}"), raw


def parse_csv_payload(
    data: bytes,
    where: str,
    now_ms: int,
    mapping: Mapping | None,
    topic: str | None = None,
    limits: Limits = Limits(),
    header: list[str] | None = None,
) -> Parsed:
    """CSV with a header line (or ``header`` given) read through the mapping (default: entity, time, *)."""
    out = Parsed()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.refusals.append(Refusal(f"not UTF-8: {exc}", where, data))
        return out
    lines = text.splitlines()
    first = 0
    if header is None:
        if not lines:
            out.refusals.append(Refusal("empty payload", where, data))
            return out
        header = next(csv.reader([lines[0]]))
        first = 1
    m = mapping or Mapping()
    for n in range(first, len(lines)):
        line = lines[n]
        if not line.strip():
            continue
        pos = f"{where} line {n + 1}"
        cells = next(csv.reader([line]))
        if len(cells) != len(header):
            out.refusals.append(Refusal(f"{len(cells)} cells, header has {len(header)}", pos, line.encode()))
            continue
        try:
            obj = dict(zip(header, cells, strict=True))
            out.records.append(check_record(mapped_record(obj, m, topic, now_ms), now_ms, limits))
        except RecordError as exc:
            out.refusals.append(Refusal(str(exc), pos, line.encode()))
    return out


def parse_payload(
    data: bytes,
    fmt: str,
    where: str,
    now_ms: int,
    mapping: Mapping | None = None,
    topic: str | None = None,
    limits: Limits = Limits(),
) -> Parsed:
    if fmt == "csv":
        return parse_csv_payload(data, where, now_ms, mapping, topic, limits)
    return parse_json_payload(data, where, now_ms, mapping, topic, limits)
