"""twin_store.adapters.lineproto: InfluxDB line protocol built in bulk."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_array_equal

from ingest.schema import RecordBatch
from ingest.settings import NettwinSettings
from twin_store.adapters.lineproto import (
    columns_to_lines,
    escape_measurement,
    escape_tag,
    format_field,
    point,
)
from twin_store.adapters.traffic import forecast_lines

# --- escaping ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        ("a b", r"a\ b"),
        ("a,b", r"a\,b"),
        ("a=b", r"a\=b"),
        ("a\\b", "a\\b"),  # InfluxDB 1.x keeps a lone backslash as written: doubling it would store two
        ("x =,\\", "x\\ \\=\\,\\\\"),  # a trailing one is doubled, or it would escape the separator
        ("", ""),
        ("città", "città"),
    ],
)
def test_escape_tag(raw: str, escaped: str) -> None:
    assert escape_tag(raw) == escaped


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [("traffic", "traffic"), ("a b", r"a\ b"), ("a,b", r"a\,b"), ("a=b", "a=b"), ("a\\b", "a\\b")],
)
def test_escape_measurement_leaves_equals_alone(raw: str, escaped: str) -> None:
    assert escape_measurement(raw) == escaped


def _influx_unescape(text: str) -> str:
    # what InfluxDB 1.x does to a tag value: exactly these pairs are unescaped
    return text.replace("\\,", ",").replace("\\=", "=").replace("\\ ", " ")


@pytest.mark.parametrize("raw", ["a b,c=d\\e", " , = ", "c:\\temp\\x"])
def test_escaping_is_reversible(raw: str) -> None:
    assert _influx_unescape(escape_tag(raw)) == raw


@pytest.mark.parametrize("raw", ["a b,c=d\\e", "\\", "\\,", " , = ", "x\\ y"])
def test_no_separator_is_left_unescaped(raw: str) -> None:
    assert not set(re.sub(r"\\.", "", escape_tag(raw))) & {" ", ",", "="}


# --- fields -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (0, "0i"),
        (-7, "-7i"),
        (2**53 + 1, "9007199254740993i"),
        (np.int64(12), "12i"),
        (np.uint32(4_000_000_000), "4000000000i"),
        (1.5, "1.5"),
        (3.0, "3.0"),  # stays a float, never the integer "3"
        (-0.0, "-0.0"),
        (np.float64(0.1), "0.1"),
        (np.float32(0.5), "0.5"),
        (1e300, "1e+300"),
        ("text", '"text"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("a b,c=d", '"a b,c=d"'),  # separators need no escaping inside a quoted string
        ("", '""'),
    ],
)
def test_format_field(value: object, text: str) -> None:
    assert format_field(value) == text


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf"), np.float64("nan"), np.float32("inf")]
)
def test_non_finite_floats_are_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="cannot carry"):
        format_field(value)


@pytest.mark.parametrize("value", [None, [1], {"a": 1}, b"bytes", 1 + 2j])
def test_unsupported_field_types_are_rejected(value: object) -> None:
    with pytest.raises(TypeError, match="unsupported field type"):
        format_field(value)


@pytest.mark.parametrize(
    "value", [0.1, 1 / 3, 5e-324, 1.7976931348623157e308, 123456789.123456789, 2.0**-1074]
)
def test_float_fields_round_trip_exactly(value: float) -> None:
    assert float(format_field(value)) == value


# --- point ------------------------------------------------------------------------------------------


def test_point_sorts_tags_and_drops_empty_ones() -> None:
    line = point(
        "bs twin", {"z": "1", "a": "x y", "empty": ""}, {"load": 0.5, "n": 3, "ok": True}, 1700000000
    )
    assert line == r"bs\ twin,a=x\ y,z=1 load=0.5,n=3i,ok=true 1700000000"


def test_point_without_time_and_with_none_fields() -> None:
    line = point("m", {}, {"a": 1.0, "skip": None, "s": 'q"'}, None)
    assert line == 'm a=1.0,s="q\\""'


def test_point_escapes_field_keys_and_tag_keys() -> None:
    assert point("m", {"k ey": "v"}, {"f=1": 2}, 5) == r"m,k\ ey=v f\=1=2i 5"


def test_point_rejects_nan() -> None:
    with pytest.raises(ValueError, match="cannot carry nan"):
        point("m", {"a": "b"}, {"x": float("nan")}, 1)


# --- columns_to_lines -------------------------------------------------------------------------------


def _parse(line: str) -> tuple[str, dict[str, str], dict[str, str], int]:
    head, fields, ts = line.split(" ")
    measurement, *tags = head.split(",")
    return (
        measurement,
        dict(t.split("=") for t in tags),
        dict(f.split("=") for f in fields.split(",")),
        int(ts),
    )


def test_columns_to_lines_floats_round_trip_exactly() -> None:
    rng = np.random.default_rng(7)
    n = 500
    floats = np.column_stack(
        [
            rng.gamma(2.0, 5.0, n),
            rng.random(n) * 10.0 ** rng.integers(-300, 300, n),
            rng.integers(0, 10**6, n).astype(np.float64),  # integer-valued floats stay floats
        ]
    )
    floats[0] = [0.0, 5e-324, 1.7976931348623157e308]
    squares = rng.integers(1, 10_001, n).astype(np.uint32)
    times = 1_383_260_400 + 600 * np.arange(n, dtype=np.int64)
    lines = columns_to_lines("traffic", "square", squares, times, ("sms_in", "x", "internet"), floats)
    assert len(lines) == n
    back = np.empty_like(floats)
    for i, line in enumerate(lines):
        measurement, tags, fields, ts = _parse(line)
        assert measurement == "traffic"
        assert tags == {"square": str(squares[i])}
        assert ts == times[i]
        assert list(fields) == ["sms_in", "x", "internet"]
        assert not any(v.endswith("i") for v in fields.values())
        back[i] = [float(fields[k]) for k in ("sms_in", "x", "internet")]
    assert back.tobytes() == floats.tobytes(), "float(text) == value, bit for bit"


def test_columns_to_lines_int_fields_get_the_i_suffix() -> None:
    floats = np.array([[1.25], [2.0]])
    counts = np.array([6, 0], np.int64)
    lines = columns_to_lines(
        "features", "square", np.array([3, 4], np.uint32), np.array([10, 20]), ("internet",), floats,
        {"n_intervals": counts},
    )  # fmt: skip
    assert lines == [
        "features,square=3 internet=1.25,n_intervals=6i 10",
        "features,square=4 internet=2.0,n_intervals=0i 20",
    ]
    assert_array_equal([int(_parse(x)[2]["n_intervals"][:-1]) for x in lines], counts)


def test_columns_to_lines_escapes_names() -> None:
    lines = columns_to_lines(
        "my m", "sq id", np.array([1]), np.array([5]), ("a b", "c=d"), np.array([[1.0, 2.0]])
    )
    assert lines == [r"my\ m,sq\ id=1 a\ b=1.0,c\=d=2.0 5"]


def test_columns_to_lines_matches_point_for_the_same_data() -> None:
    floats = np.array([[0.1, 7.0], [1e-7, 123.456]])
    lines = columns_to_lines(
        "m", "square", np.array([9, 10]), np.array([100, 200]), ("a", "b"), floats, {"n": np.array([1, 2])}
    )
    expected = [
        point("m", {"square": str(sq)}, {"a": float(row[0]), "b": float(row[1]), "n": int(n)}, int(t))
        for sq, row, n, t in zip([9, 10], floats, [1, 2], [100, 200], strict=True)
    ]
    assert lines == expected


def test_columns_to_lines_with_no_rows() -> None:
    empty = columns_to_lines(
        "m", "s", np.empty(0, np.uint32), np.empty(0, np.int64), ("a",), np.empty((0, 1))
    )
    assert empty == []


@pytest.mark.integration
def test_columns_to_lines_read_back_from_influxdb_bit_for_bit(isolated: NettwinSettings) -> None:
    """The orjson float texts (``1e-7``, ``1e+22``, ``0.000025``) parse in InfluxDB to the very same doubles."""
    from twin_store.adapters.influx import InfluxClient

    values = np.array([[1e-7, 1e22, 5e-324, 1.7976931348623157e308, 2.5e-5, 1.2345678901234568e17, 0.1, 3.0]])
    names = [f"f{i}" for i in range(values.shape[1])]
    lines = columns_to_lines("m", "square", np.array([1], np.uint32), np.array([100]), names, values)
    with InfluxClient(isolated.influx) as influx:
        influx.write("\n".join(lines).encode(), "s")
        row = influx.query('SELECT * FROM "m"')[0].rows()[0]
    assert np.array([row[n] for n in names], np.float64).tobytes() == values.tobytes()


@pytest.mark.integration
def test_tag_values_read_back_from_influxdb_as_written(isolated: NettwinSettings) -> None:
    from twin_store.adapters.influx import InfluxClient

    values = ["a\\b", "x y,z=w", "c:\\temp\\x", "città"]
    lines = "\n".join(point("m", {"t": v}, {"v": float(i)}, i + 1) for i, v in enumerate(values))
    with InfluxClient(isolated.influx) as influx:
        influx.write(lines.encode())
        got = {r["t"]: r["v"] for s in influx.query('SELECT "v", "t" FROM "m"') for r in s.rows()}
    assert got == {v: float(i) for i, v in enumerate(values)}


def _forecast_lines_by_point(batch: RecordBatch) -> list[str]:
    """``forecast_lines`` written the plain way: one ``point`` per row (what the column-wise one must equal)."""
    cols = list(batch.columns)
    j = cols.index("cluster")
    fields = [c for c in cols if c != "cluster"]
    idx = [cols.index(c) for c in fields]
    names = batch.extra.get("entities", {})
    metric = str(batch.extra.get("metric", ""))
    return [
        point(
            "forecast",
            {"entity": names.get(str(sq), str(sq)), "metric": metric, "cluster": str(int(row[j]))},
            {f: float(row[i]) for f, i in zip(fields, idx, strict=True)},
            t,
        )
        for sq, t, row in zip(
            batch.squares.tolist(), (batch.starts_ms // 1000).tolist(), batch.values.tolist(), strict=True
        )
    ]


_NAMES = st.text(alphabet=st.sampled_from('ab ,=\\"é1'), max_size=6)


@settings(max_examples=80, deadline=None)
@given(
    outcome=st.booleans(),
    rows=st.lists(
        st.tuples(
            st.integers(1, 6),
            st.floats(allow_nan=False, allow_infinity=False, width=64),
            st.floats(-1e12, 1e12),
            st.integers(-1, 40),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=12,
    ),
    names=st.dictionaries(st.integers(1, 6).map(str), _NAMES, max_size=6),
    metric=_NAMES,
)
def test_forecast_lines_are_the_lines_point_writes(
    outcome: bool,
    rows: list[tuple[int, float, float, int, int]],
    names: dict[str, str],
    metric: str,
) -> None:
    """Forecasts and outcomes, named and unnamed entities, names and metrics that need escaping or are empty,
    clusters from -1, several step times: the column-wise lines equal one ``point`` per row."""
    columns = (
        ("predicted", "actual", "abs_error", "flagged", "cluster") if outcome else ("predicted", "cluster")
    )
    values = [[p, a, abs(a - p), 0.0, float(c)] if outcome else [p, float(c)] for _, p, a, c, _ in rows]
    batch = RecordBatch(
        "forecast",
        columns,
        60,
        np.array([k for k, *_ in rows], np.uint32),
        np.array([1_700_000_000_000 + 60_000 * step for *_, step in rows], np.int64),
        np.array(values, np.float64),
        extra={"metric": metric, "entities": names},
    )
    assert forecast_lines(batch) == _forecast_lines_by_point(batch)


def test_forecast_lines_refuse_a_non_finite_value() -> None:
    batch = RecordBatch(
        "forecast",
        ("predicted", "cluster"),
        60,
        np.array([1], np.uint32),
        np.array([0], np.int64),
        np.array([[float("nan"), 0.0]]),
    )
    with pytest.raises(ValueError, match="non-finite"):
        forecast_lines(batch)
