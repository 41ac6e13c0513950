"""Property-based tests (Hypothesis) of every parser and decoder at the pipeline's edges (issue 9, "Fuzz").

Each property says what any input may do: a reader turns every line into a record or a dead letter and never
raises anything but ``InputError``; a decoder returns a valid message or raises ``MalformedMessage``; an
encoder's output reads back as what went in. Examples are few (``max_examples`` modest) so this stays in the
unit tier; a failure prints the smallest input Hypothesis found.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from ingest.errors import InputError
from ingest.readers import milan
from ingest.readers.ftm import read_walk, site_from_message
from ingest.readers.milan import read_hourly, read_raw
from ingest.readers.sensors import read_csv_layout
from ingest.schema import (
    KINDS,
    MAX_STEP_S,
    PLAUSIBLE_MS,
    SENSOR_KINDS,
    TELEMETRY_KIND,
    MalformedMessage,
    RecordBatch,
    decode,
)
from twin_store.adapters.lineproto import point
from twin_store.federation.models_topic import MAGIC as TWIN_MAGIC
from twin_store.federation.models_topic import TwinMessage, decode_twin

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_383_260_400_000
STEP_MS = 600_000


@contextmanager
def file_with(content: bytes, name: str = "f.txt") -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(content)
        yield path


# --- the batch wire format (ingest/schema.py) --------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
int62 = st.integers(-(2**62) + 1, 2**62 - 1)


@st.composite
def record_batches(draw: st.DrawFn) -> RecordBatch:
    kind = draw(st.sampled_from([k for k in KINDS if k not in (*SENSOR_KINDS, TELEMETRY_KIND)]))
    columns = tuple(draw(st.lists(st.text(max_size=12), min_size=1, max_size=5)))
    step_s = draw(st.integers(1, MAX_STEP_S))
    n = draw(st.integers(0, 30))
    step_ms = step_s * 1000
    steps = draw(st.lists(st.integers(-(2**62) // step_ms, 2**62 // step_ms), min_size=n, max_size=n))
    squares = draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n))
    finite = st.floats(0, 1e300, allow_nan=False, allow_infinity=False)
    values = draw(st.lists(finite, min_size=n * len(columns), max_size=n * len(columns)))
    return RecordBatch(
        kind,
        columns,
        step_s,
        np.array(squares, np.uint32),
        np.array(steps, np.int64) * step_ms,
        np.array(values, np.float64).reshape(n, len(columns)),
        watermark_ms=draw(st.none() | int62),
        closed_ms=draw(st.none() | int62),
        run=draw(st.none() | st.text(max_size=20)),
        final=draw(st.booleans()),
        sent=draw(st.none() | st.integers(0, 2**62 - 1)),
        extra=draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
    )


@st.composite
def telemetry_batches(draw: st.DrawFn) -> RecordBatch:
    """Attached-source records: every entity key named in ``extra.entities``, the source in ``extra.source``."""
    batch = draw(record_batches())
    names = {str(k): draw(st.text(min_size=1, max_size=16)) for k in np.unique(batch.squares).tolist()}
    extra = {"source": draw(st.text(min_size=1, max_size=12)), "entities": names}
    return dataclasses.replace(batch, kind=TELEMETRY_KIND, extra=extra)


@FUZZ
@given(record_batches() | telemetry_batches())
def test_schema_round_trip(batch: RecordBatch) -> None:
    back = decode(batch.encode())
    assert (back.kind, back.columns, back.step_s) == (batch.kind, batch.columns, batch.step_s)
    assert_array_equal(back.squares, batch.squares)
    assert_array_equal(back.starts_ms, batch.starts_ms)
    assert back.values.tobytes() == batch.values.tobytes()
    assert (back.watermark_ms, back.closed_ms, back.run, back.final, back.sent) == (
        batch.watermark_ms,
        batch.closed_ms,
        batch.run,
        batch.final,
        batch.sent,
    )
    assert json.dumps(back.extra, sort_keys=True) == json.dumps(batch.extra, sort_keys=True)


def _framed(header: bytes, body: bytes) -> bytes:
    return b"NTB1" + struct.pack("<I", len(header)) + header + body


def _decodes_or_is_malformed(data: bytes) -> None:
    try:
        batch = decode(data)
    except MalformedMessage:
        return
    assert isinstance(batch, RecordBatch) and len(batch) >= 0


@FUZZ
@given(st.binary(max_size=300))
def test_schema_arbitrary_bytes_are_only_ever_malformed(data: bytes) -> None:
    _decodes_or_is_malformed(data)
    _decodes_or_is_malformed(b"NTB1" + data)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["kind", "columns", "step_s", "watermark_ms", "closed_ms", "run", "final", "sent", "extra"]
        ),
        json_values,
    ),
    st.binary(max_size=200),
)
def test_schema_any_json_header_is_a_batch_or_malformed(header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header).encode()
    _decodes_or_is_malformed(_framed(raw, body))
    _decodes_or_is_malformed(_framed(raw + b" " * (-(8 + len(raw)) % 8), struct.pack("<II", 1, 0) + body))


@FUZZ
@given(record_batches(), st.data())
def test_schema_truncated_and_mutated_messages_are_malformed_or_valid(
    batch: RecordBatch, data: st.DataObject
) -> None:
    raw = bytearray(batch.encode())
    cut = data.draw(st.integers(0, len(raw)))
    _decodes_or_is_malformed(bytes(raw[:cut]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    _decodes_or_is_malformed(bytes(raw))


# --- Milan raw daily files -----------------------------------------------------------------------------------

number_text = st.one_of(
    st.integers(0, 500).map(str),
    st.floats(0, 1e6, allow_nan=False).map(repr),
    st.just(""),
)
odd_text = st.sampled_from(["NaN", "nan", "inf", "-inf", "-1", "1.5e308", "1e999", "abc", " ", "0x10", "1_0"])


@st.composite
def raw_lines(draw: st.DrawFn) -> bytes:
    square = draw(st.integers(1, 5).map(str) | st.sampled_from(["0", "-3", "2.5", "", "x", "4294967296"]))
    start = draw(
        st.integers(0, 5).map(lambda k: str(T0 + k * STEP_MS))
        | st.sampled_from([str(T0 + 1), "600000", "9999999600000", "", "t"])
    )
    country = draw(st.sampled_from(["39", "0", "", "-1", "1.5"]))
    activity = draw(st.lists(number_text | odd_text, min_size=5, max_size=5))
    fields = [square, start, country, *activity]
    if draw(st.integers(0, 9)) == 0:  # a field too many or too few
        fields = fields[:-1] if draw(st.booleans()) else [*fields, "1"]
    return "\t".join(fields).encode()


def _reference(lines: list[bytes], good: set[int]) -> dict[tuple[int, int], np.ndarray]:
    """Per-(start, square) sums of the good lines, parsed independently of ingest.readers.milan."""
    out: dict[tuple[int, int], np.ndarray] = defaultdict(lambda: np.zeros(5))
    for no, line in enumerate(lines, start=1):
        if no in good:
            f = line.split(b"\t")
            out[(int(float(f[1])), int(float(f[0])))] += [float(x) if x.strip() else 0.0 for x in f[3:]]
    return out


@FUZZ
@given(st.lists(raw_lines(), max_size=25), st.sampled_from([milan.CHUNK_BYTES, 64, 7]))
def test_milan_raw_every_line_is_a_record_or_a_dead_letter(lines: list[bytes], chunk: int) -> None:
    with file_with(b"\n".join(lines) + b"\n") as path, patch.object(milan, "CHUNK_BYTES", chunk):
        table = read_raw(path)
    data_lines = {no for no, line in enumerate(lines, start=1) if line.strip()}
    bad = {int(d.position.split()[1]) for d in table.bad}
    assert bad <= data_lines and table.lines == len(data_lines)
    for d in table.bad:
        assert d.original == lines[int(d.position.split()[1]) - 1] and d.reason and d.stage == "producer"
    # what is left is plausible, and it is exactly the sum of the lines that were not refused
    assert np.isfinite(table.values).all() and (table.values >= 0).all()
    assert (table.squares >= 1).all() and (table.starts_ms % STEP_MS == 0).all()
    assert ((table.starts_ms >= PLAUSIBLE_MS[0]) & (table.starts_ms < PLAUSIBLE_MS[1])).all()
    expected = _reference(lines, data_lines - bad)
    got = {(int(t), int(s)): v for t, s, v in zip(table.starts_ms, table.squares, table.values, strict=True)}
    assert set(got) == set(expected)
    for key, values in got.items():
        assert_allclose(values, expected[key], rtol=1e-12)


# --- Milan hourly CSV ----------------------------------------------------------------------------------------


@FUZZ
@given(
    st.integers(1, 6),
    st.lists(
        st.lists(number_text | odd_text | st.integers(-5, 9).map(str), min_size=1, max_size=8), max_size=12
    ),
)
def test_milan_hourly_every_row_is_kept_or_a_dead_letter(hours: int, rows: list[list[str]]) -> None:
    header = "square_id," + ",".join(f"h{i}" for i in range(hours))
    with file_with(("\n".join([header, *(",".join(r) for r in rows)]) + "\n").encode()) as path:
        table = read_hourly(path)
    kept = len(table) // hours if hours else 0
    assert kept + len(table.bad) == table.lines == sum(1 for r in rows if ",".join(r).strip())
    assert np.isfinite(table.values).all() and (table.values >= 0).all()
    assert len(set(table.squares.tolist())) == kept, "a square is never repeated"


# --- sensor CSVs ---------------------------------------------------------------------------------------------

time_text = st.one_of(
    st.integers(1_000_000_000, 4_000_000_000).map(str),  # epoch s
    st.sampled_from(
        ["2020-01-01T00:00:00Z", "2020-01-01 00:30:00", "1970-01-01T00:00:00Z", "not-a-time", ""]
    ),
    st.sampled_from(["0", "1e30", "-5", "NaN", "9999999999999999"]),
)


@FUZZ
@given(st.lists(st.tuples(time_text, number_text | odd_text), max_size=15))
def test_sensor_csv_rows_are_readings_or_dead_letters(rows: list[tuple[str, str]]) -> None:
    content = "ts,value\n" + "".join(f"{t},{v}\n" for t, v in rows)
    with file_with(content.encode(), "plant.csv") as path:
        try:
            table = read_csv_layout(path, time_column="ts")
        except InputError as exc:
            assert "value" in str(exc) or "ts" in str(exc)  # e.g. no numeric value column at all
            return
    non_blank = sum(1 for t, v in rows if f"{t},{v}".strip())  # "," is a row, with empty cells
    assert len(table) + len(table.bad) == table.lines == non_blank
    assert np.isfinite(table.values).all()
    assert ((table.times_ms >= PLAUSIBLE_MS[0]) & (table.times_ms < PLAUSIBLE_MS[1])).all()


# --- FTM walks -----------------------------------------------------------------------------------------------

IMU = "AccX,AccY,AccZ,GyroX,GyroY,GyroZ,MagX,MagY,MagZ,Azimuth,Pitch,Roll"
PER_AP = (
    "M1 Time Stamp (ms),"
    + ",".join(
        f"AP{k} True Distance (m),AP{k} RTT Distance (m),AP{k} RTT std (m),AP{k} RSS (dBm)" for k in (1, 2)
    )
    + f",{IMU},M1 Ground Truth_x,M1 Ground Truth_y,user,circle"
)
PHONE = "Number,RTT_TIMESTAMP,RTT_RESULT,IMU_TIMESTAMP," + IMU.replace("X", "x").replace("Y", "y").replace(
    "Z", "z"
)
cell = number_text | odd_text | st.floats(-50, 50, allow_nan=False).map(repr)


@FUZZ
@given(st.lists(st.lists(cell, min_size=20, max_size=26), max_size=10))
def test_per_ap_walk_rows_are_read_or_kept_as_bad_rows(rows: list[list[str]]) -> None:
    content = PER_AP + "\n" + "".join(",".join(r) + "\n" for r in rows)
    with file_with(content.encode(), "Lab__1__113.csv") as path:
        try:
            walk = read_walk(path)
        except InputError as exc:
            assert "no readable row" in str(exc)
            return
    assert len(walk) + len(walk.bad_rows) == sum(1 for r in rows if ",".join(r).strip(", "))
    assert np.isfinite(walk.rtt).all() and np.isfinite(walk.t_ms).all() and (np.diff(walk.t_ms) >= 0).all()
    assert walk.gt is not None and walk.gt.shape == (len(walk), 2)


rtt_result = st.lists(
    st.sampled_from(["14:22:3b:2a:86:f5", "B0:E4:D5:39:26:89", "zz", ""]) | number_text | odd_text, max_size=9
).map(lambda xs: '"[' + ", ".join(xs) + ']"')


@FUZZ
@given(st.lists(st.tuples(number_text, rtt_result, st.lists(cell, min_size=13, max_size=13)), max_size=8))
def test_phone_log_rows_are_read_or_kept_as_bad_rows(rows: list[tuple[str, str, list[str]]]) -> None:
    lines = [f"{i},{t},{res},{','.join(rest)}" for i, (t, res, rest) in enumerate(rows)]
    with file_with((PHONE + "\n" + "\n".join(lines) + "\n").encode(), "Lab__1__ranging_13.csv") as path:
        try:
            walk = read_walk(path)
        except InputError as exc:
            assert "no readable row" in str(exc)
            return
    assert len(walk) + len(walk.bad_rows) == len(rows)
    assert np.isfinite(walk.rtt).all() and (walk.rtt >= 0).all() and len(walk.ap_ids) == walk.rtt.shape[1]


# --- twin and update messages (twin_store/federation/models_topic.py) ----------------------------------------


@st.composite
def twin_like_messages(draw: st.DrawFn) -> bytes:
    """A well-framed message whose header fields are dropped or replaced by any JSON value."""
    n = draw(st.integers(0, 4))
    header: dict[str, Any] = {"level": draw(st.sampled_from(["bs", "cluster", "global"])), "twin_id": "7"}
    header |= {"version": 1, "hidden": 8, "n_params": n, "meta": {}}
    for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=3, unique=True)):
        if draw(st.booleans()):
            del header[key]
        else:
            header[key] = draw(json_values)
    raw = json.dumps(header).encode()
    return TWIN_MAGIC + struct.pack("<I", len(raw)) + raw + draw(st.binary(min_size=4 * n, max_size=4 * n))


@FUZZ
@given(st.binary(max_size=200) | twin_like_messages())
def test_twin_messages_decode_or_are_malformed(data: bytes) -> None:
    try:
        msg = decode_twin(data)
    except MalformedMessage:
        # a reader of headers only (the worker's per-BS twins) refuses what every reader refuses
        with pytest.raises(MalformedMessage):
            decode_twin(data, skip_params=("bs", "cluster", "global"))
        return
    assert isinstance(msg, TwinMessage) and isinstance(msg.meta, dict)
    header_only = decode_twin(data, skip_params=(msg.level,))
    assert header_only.params.size == 0 and header_only.meta == msg.meta and header_only.key == msg.key


@FUZZ
@given(
    st.sampled_from(["bs", "cluster", "global"]),
    st.from_regex(r"[0-9A-Za-z_.-]{1,64}", fullmatch=True),
    st.integers(0, 2**31),
    st.integers(1, 256),
    st.lists(st.floats(width=32, allow_nan=False), max_size=20),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
def test_twin_message_round_trip(
    level: str, twin_id: str, version: int, hidden: int, params: list[float], meta: dict[str, Any]
) -> None:
    msg = TwinMessage(level, twin_id, version, hidden, np.array(params, np.float32), meta)
    back = decode_twin(msg.encode())
    assert (back.level, back.twin_id, back.version, back.hidden) == (level, twin_id, version, hidden)
    assert back.params.tobytes() == msg.params.tobytes()
    assert json.dumps(back.meta, sort_keys=True) == json.dumps(meta, sort_keys=True)


# --- line protocol out (twin_store/adapters/lineproto.py) ----------------------------------------------------


def _scan(line: str, i: int, stops: str) -> tuple[str, int]:
    """Up to the first unescaped character of ``stops``; a backslash escapes the next character."""
    start = i
    while i < len(line) and line[i] not in stops:
        i += 2 if line[i] == "\\" else 1
    return line[start:i], i


def _unescape(text: str, chars: str) -> str:
    # InfluxDB 1.x (models/points.go) replaces exactly these two-character sequences, nothing else
    for c in chars:
        text = text.replace("\\" + c, c)
    return text


def parse_point(line: str) -> tuple[str, dict[str, str], dict[str, object], int | None]:
    """A line-protocol parser with InfluxDB 1.x's escaping rules: measurement ``\\,`` ``\\ ``; tag keys, tag
    values and field keys ``\\,`` ``\\=`` ``\\ ``; string fields ``\\"`` and ``\\\\``."""
    raw, i = _scan(line, 0, ", ")
    measurement = _unescape(raw, ", ")
    tags: dict[str, str] = {}
    while line[i] == ",":
        key, i = _scan(line, i + 1, "=")
        value, i = _scan(line, i + 1, ", ")
        tags[_unescape(key, ",= ")] = _unescape(value, ",= ")
    assert line[i] == " ", line
    fields: dict[str, object] = {}
    while True:
        key, i = _scan(line, i + 1, "=")
        i += 1
        value: object
        if line[i] == '"':
            out, i = [], i + 1
            while line[i] != '"':
                if line[i] == "\\" and line[i + 1] in '"\\':
                    out.append(line[i + 1])
                    i += 2
                else:
                    out.append(line[i])
                    i += 1
            value, i = "".join(out), i + 1
        else:
            text, i = _scan(line, i, ", ")
            value = int(text[:-1]) if text.endswith("i") else {"true": True, "false": False}.get(text)
            value = float(text) if value is None else value
        fields[_unescape(key, ",= ")] = value
        if i >= len(line) or line[i] != ",":
            break
    time = int(line[i + 1 :]) if i < len(line) else None
    return measurement, tags, fields, time


# names and values without a newline (a line ends there) and without a backslash (tested on its own below)
plain = st.text(
    st.characters(exclude_characters="\n\r\\", exclude_categories=["Cs"]), min_size=1, max_size=12
)
field_values = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
)


def _round_trips(
    measurement: str, tags: dict[str, str], fields: dict[str, object], time_s: int | None
) -> None:
    got = parse_point(point(measurement, tags, fields, time_s))
    assert got == (measurement, {k: v for k, v in tags.items() if v != ""}, fields, time_s)


@FUZZ
@given(
    plain.filter(lambda m: not m.startswith("#")),  # a line starting with '#' is a comment
    st.dictionaries(plain, plain | st.just(""), max_size=4),
    st.dictionaries(plain, field_values, min_size=1, max_size=4),
    st.none() | st.integers(0, 2**62),
)
def test_line_protocol_escaping_round_trips(
    measurement: str, tags: dict[str, str], fields: dict[str, object], time_s: int | None
) -> None:
    _round_trips(measurement, tags, fields, time_s)


@FUZZ
@given(st.text(st.characters(exclude_characters="\n\r", exclude_categories=["Cs"]), min_size=1, max_size=12))
def test_line_protocol_tag_values_with_a_backslash_round_trip(value: str) -> None:
    # a backslash right before a comma, '=' or space has no representation in InfluxDB 1.x (lineproto.py)
    assume(re.search(r"\\(?=[,= ])", value) is None)
    _round_trips("m", {"t": value + "\\x"}, {"v": 1.0}, 1)


def test_a_trailing_backslash_cannot_swallow_the_separator() -> None:
    # InfluxDB 1.x would read 'a\,' as an escaped comma: the next tag would become part of this value
    got = parse_point(point("m", {"t": "a\\", "u": "b"}, {"v": 1.0}, 1))
    assert got[1] == {"t": "a\\\\", "u": "b"}


def test_the_test_parser_reads_what_influxdb_reads() -> None:
    # the parser models InfluxDB 1.x; these lines and values were checked against a running influxd 1.6.7
    assert parse_point(r"m,t=x\,y v=3 3") == ("m", {"t": "x,y"}, {"v": 3.0}, 3)
    assert parse_point(r"m,t=a\\b v=1i 1") == ("m", {"t": r"a\\b"}, {"v": 1}, 1)
    assert parse_point('m s="p\\\\q\\"r" 4') == ("m", {}, {"s": 'p\\q"r'}, 4)
    assert math.isclose(float(parse_point("m v=0.1")[2]["v"]), 0.1)  # type: ignore[arg-type]


# --- site records on sites.ftm (ingest/readers/ftm.py, followed by the worker) --------------------------------

# what the worker's sites.ftm follower catches and logs; anything else would end its thread
SITE_ERRORS = (ValueError, KeyError, TypeError, AttributeError)


@st.composite
def site_like_records(draw: st.DrawFn) -> Any:
    record: dict[str, Any] = {"scene": "Lab", "ap_ids": ["AP1", "AP2"], "positions": [[0.0, 1.0], [2.0, 3.0]]}
    record |= {"residual_m": {"AP1": 0.1}, "n_obs": {"AP1": 4}, "source": "recovered", "ambiguous": []}
    record |= {"mirror_resolved": [], "site_file_diff_m": {}, "left_out": {"AP3": "never ranged"}}
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=3, unique=True)):
        if draw(st.booleans()):
            del record[key]
        else:
            # numbers beyond a float (a JSON integer may be any size) besides any JSON value
            record[key] = draw(json_values | st.sampled_from([10**400, {"AP1": 10**400}, [[10**400, 0]]]))
    return draw(st.just(record) | json_values)


@FUZZ
@given(site_like_records())
def test_site_records_are_read_or_refused_with_a_caught_error(record: Any) -> None:
    try:
        geo = site_from_message(record)
    except SITE_ERRORS:
        return
    assert geo.positions.shape == (len(geo.ap_ids), 2) and np.isfinite(geo.positions).all()
