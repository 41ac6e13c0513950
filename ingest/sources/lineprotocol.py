"""InfluxDB line protocol -> canonical records (``POST /v1/write`` and Telegraf's Kafka output). Pure.

``measurement[,tag=value...] field=value[,field=value...] [timestamp]``: one record per line, entity = the
value of the configured tag (``entity_tag``, default ``host``), metrics = the numeric fields named
``<measurement>_<field>`` (Telegraf's Prometheus naming; ``metric_names = "field"`` keeps the bare field
name). Integer (``1i``, ``1u``) and float fields are metrics; boolean and string fields are not numbers and
are left out; a line with no numeric field is refused. Timestamps are in ``precision`` (ns by default, as
InfluxDB and Telegraf write them); a line without one takes the receive time.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.sources.record import Limits, Parsed, Record, RecordError, Refusal, check_record, metric_value

PRECISION_TO_MS = {"ns": 1e-6, "n": 1e-6, "us": 1e-3, "u": 1e-3, "ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class LineOptions:
    entity_tag: str = "host"
    metric_names: str = "measurement_field"  # or "field"
    precision: str = "ns"
    kind_tag: str | None = None


def _split_unescaped(text: str, sep: str, quotes: bool = False) -> list[str]:
    """Split at ``sep`` not preceded by a backslash (and, with ``quotes``, not inside double quotes)."""
    parts: list[str] = []
    buf: list[str] = []
    i, n, in_q = 0, len(text), False
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            buf.append(text[i : i + 2])
            i += 2
            continue
        if quotes and c == '"':
            in_q = not in_q
        elif c == sep and not in_q:
            parts.append("".join(buf))
            buf = []
            i += 1
            continue
        buf.append(c)
        i += 1
    if in_q:
        raise RecordError("unterminated string field")
    parts.append("".join(buf))
    return parts


def _unescape(text: str, specials: str = ", =") -> str:
    """InfluxDB 1.x's rule: a backslash escapes only the separators (``,``, ``=`` and space in tag keys, tag
    values and field keys; ``,`` and space in measurements); any other backslash is kept as written."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in specials:
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _field_value(name: str, raw: str) -> float | None:
    """A numeric field as float; None for strings and booleans (not metrics); RecordError when invalid."""
    if not raw:
        raise RecordError(f"field {name!r} has no value")
    if raw[0] == '"':
        return None
    if raw in ("t", "T", "true", "True", "TRUE", "f", "F", "false", "False", "FALSE"):
        return None
    text = raw[:-1] if raw[-1] in "iu" else raw
    try:
        x = float(text) if raw[-1] not in "iu" else float(int(text))
    except ValueError as exc:
        raise RecordError(f"field {name!r} value {raw!r} is not a number") from exc
    return metric_value(name, x)


def parse_line(line: str, opts: LineOptions, now_ms: int) -> Record:
    # quotes delimit string field values only: a tag value may hold a bare '"'
    head_and_rest = _split_unescaped(line.strip(), " ")
    rest = " ".join(head_and_rest[1:])
    sections = [head_and_rest[0], *(s for s in _split_unescaped(rest, " ", quotes=True) if s != "")]
    if len(sections) not in (2, 3):
        raise RecordError(f"expected 'measurement[,tags] fields [timestamp]', got {len(sections)} parts")
    head = _split_unescaped(sections[0], ",")
    measurement = _unescape(head[0], ", ")
    if not measurement:
        raise RecordError("missing measurement")
    tags: dict[str, str] = {}
    for item in head[1:]:
        kv = _split_unescaped(item, "=")
        if len(kv) != 2 or not kv[0] or not kv[1]:
            raise RecordError(f"tag {item!r} is not key=value")
        tags[_unescape(kv[0])] = _unescape(kv[1])
    metrics: dict[str, float] = {}
    for item in _split_unescaped(sections[1], ",", quotes=True):
        kv = _split_unescaped(item, "=", quotes=True)
        if len(kv) != 2 or not kv[0]:
            raise RecordError(f"field {item!r} is not key=value")
        name = _unescape(kv[0])
        x = _field_value(name, kv[1])
        if x is not None:
            metrics[name if opts.metric_names == "field" else f"{measurement}_{name}"] = x
    if not metrics:
        raise RecordError("no numeric field")
    entity = tags.get(opts.entity_tag)
    if not entity:
        raise RecordError(f"missing entity (tag {opts.entity_tag!r})")
    if len(sections) == 3:
        try:
            ts = int(sections[2])
        except ValueError as exc:
            raise RecordError(f"timestamp {sections[2]!r} is not an integer") from exc
        time_ms = round(ts * PRECISION_TO_MS[opts.precision])
    else:
        time_ms = now_ms
    kind = tags.get(opts.kind_tag) if opts.kind_tag else None
    return Record(entity, time_ms, metrics, kind)


def parse_lines(
    data: bytes, where: str, now_ms: int, opts: LineOptions = LineOptions(), limits: Limits = Limits()
) -> Parsed:
    """Every line of a body (``#`` comments and blank lines skipped); a bad line is refused on its own."""
    out = Parsed()
    for n, raw in enumerate(data.split(b"\n"), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        pos = f"{where} line {n}"
        try:
            line = stripped.decode("utf-8")
            out.records.append(check_record(parse_line(line, opts, now_ms), now_ms, limits))
        except UnicodeDecodeError as exc:
            out.refusals.append(Refusal(f"not UTF-8: {exc}", pos, raw))
        except RecordError as exc:
            out.refusals.append(Refusal(str(exc), pos, raw))
    return out
