"""ingest.schema: the batched record wire format (encode/decode round trip and every rejection path)."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from ingest.schema import (
    ACTIVITY_COLUMNS,
    MAGIC,
    SCREENED_COLUMNS,
    MalformedMessage,
    RecordBatch,
    decode,
    validate,
)

STEP_MS = 600_000
T0 = 1_383_260_400_000  # 2013-11-01 00:00 Milan time, a 10-minute (and hourly) boundary


def _batch(n: int = 5, k: int = len(ACTIVITY_COLUMNS), seed: int = 0, **meta: Any) -> RecordBatch:
    rng = np.random.default_rng(seed)
    columns = ACTIVITY_COLUMNS[:k] if k <= len(ACTIVITY_COLUMNS) else tuple(f"c{i}" for i in range(k))
    return RecordBatch(
        kind="traffic",
        columns=columns,
        step_s=600,
        squares=rng.integers(1, 10_001, n).astype(np.uint32),
        starts_ms=T0 + STEP_MS * rng.integers(0, 144, n).astype(np.int64),
        values=rng.gamma(2.0, 3.0, (n, k)),
        **meta,
    )


def _message(
    header: dict[str, Any] | bytes,
    squares: Any = (),
    starts: Any = (),
    values: Any = None,
    k: int = 1,
    *,
    align: bool = True,
) -> bytes:
    """The documented layout, built independently of RecordBatch.encode."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if align:
        raw += b" " * ((-(8 + len(raw))) % 8)
    sq = np.asarray(squares, "<u4")
    n = sq.shape[0]
    vals = np.zeros((n, k)) if values is None else np.asarray(values, "<f8")
    return b"".join(
        [
            MAGIC,
            struct.pack("<I", len(raw)),
            raw,
            struct.pack("<I", n),
            b"\0" * 4,
            sq.tobytes(),
            b"\0" * ((-4 * n) % 8),
            np.asarray(starts, "<i8").tobytes(),
            vals.tobytes(),
        ]
    )


def _good_header(**changes: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"kind": "traffic", "columns": ["internet"], "step_s": 600}
    h.update(changes)
    return {k: v for k, v in h.items() if v is not _DROP}


_DROP = object()


def _assert_same(a: RecordBatch, b: RecordBatch) -> None:
    assert (a.kind, a.columns, a.step_s) == (b.kind, b.columns, b.step_s)
    assert_array_equal(a.squares, b.squares)
    assert_array_equal(a.starts_ms, b.starts_ms)
    assert_array_equal(a.values, b.values)
    assert (a.watermark_ms, a.closed_ms, a.run, a.final, a.sent, a.extra) == (
        b.watermark_ms,
        b.closed_ms,
        b.run,
        b.final,
        b.sent,
        b.extra,
    )


# --- round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [
        {},
        {"watermark_ms": T0 + STEP_MS},
        {"watermark_ms": T0, "closed_ms": 1_700_000_000_123, "run": "r-1"},
        {"run": "abc", "final": True, "sent": 12345, "extra": {"received": 7, "note": "x y"}},
        {"watermark_ms": 0, "closed_ms": 0, "sent": 0},  # zeros are values, not "absent"
    ],
)
def test_round_trip_keeps_records_and_header_meta(meta: dict[str, Any]) -> None:
    batch = _batch(n=17, seed=3, **meta)
    back = decode(batch.encode())
    _assert_same(back, batch)
    for key, value in meta.items():
        assert getattr(back, key) == value


def test_round_trip_values_are_bit_exact() -> None:
    values = np.array([[0.0, 5e-324, 1e-300, 0.1, 1 / 3], [1e300, 2.0**53 + 1, 123456.789, 7.0, 1e-9]])
    batch = RecordBatch(
        "traffic",
        ACTIVITY_COLUMNS,
        600,
        np.array([1, 2**32 - 1], np.uint32),
        np.array([T0, 0], np.int64),
        values,
    )
    back = decode(batch.encode())
    assert back.values.tobytes() == values.tobytes()
    assert_array_equal(back.squares, [1, 2**32 - 1])


def test_decoded_columns_have_wire_dtypes_and_shape() -> None:
    back = decode(_batch(n=4, k=3).encode())
    assert back.squares.dtype == np.uint32
    assert back.starts_ms.dtype == np.int64
    assert back.values.dtype == np.float64
    assert back.values.shape == (4, 3)
    assert len(back) == 4


def test_absent_meta_is_not_written_to_the_header() -> None:
    header = _batch().header()
    assert set(header) == {"kind", "columns", "step_s"}
    back = decode(_batch().encode())
    assert (back.watermark_ms, back.closed_ms, back.run, back.final, back.sent, back.extra) == (
        None,
        None,
        None,
        False,
        None,
        {},
    )


@pytest.mark.parametrize("n", [0, 1, 2, 3, 8, 9])
def test_encode_follows_the_documented_layout(n: int) -> None:
    batch = _batch(n=n, k=2, run="r", watermark_ms=T0)
    compact = json.dumps(batch.header(), separators=(",", ":")).encode()
    assert batch.encode() == _message(compact, batch.squares, batch.starts_ms, batch.values, k=2)


@pytest.mark.parametrize("run_len", range(16))
def test_any_header_length_round_trips(run_len: int) -> None:
    batch = _batch(n=3, run="x" * run_len)
    data = batch.encode()
    head_len = struct.unpack_from("<I", data, 4)[0]
    assert (8 + head_len) % 8 == 0, "encode pads the header so the columns start 8-byte aligned"
    _assert_same(decode(data), batch)


@pytest.mark.parametrize("extra_spaces", range(8))
@pytest.mark.parametrize("n", [1, 2, 5])
def test_unaligned_header_from_another_producer_still_decodes(extra_spaces: int, n: int) -> None:
    rng = np.random.default_rng(n)
    squares = rng.integers(1, 100, n)
    starts = T0 + STEP_MS * rng.integers(0, 10, n)
    values = rng.random((n, 1))
    header = json.dumps(_good_header()).encode() + b" " * extra_spaces
    back = decode(_message(header, squares, starts, values, align=False))
    assert_array_equal(back.squares, squares)
    assert_array_equal(back.starts_ms, starts)
    assert_array_equal(back.values, values)


def test_zero_length_batch_round_trips() -> None:
    empty = RecordBatch.empty("traffic", ACTIVITY_COLUMNS, 600, watermark_ms=T0, run="r", final=True, sent=0)
    back = decode(empty.encode())
    assert len(back) == 0
    assert back.values.shape == (0, len(ACTIVITY_COLUMNS))
    assert back.columns == ACTIVITY_COLUMNS
    assert (back.watermark_ms, back.run, back.final, back.sent) == (T0, "r", True, 0)
    assert validate(back) is None


def test_hourly_features_batch_round_trips() -> None:
    batch = RecordBatch(
        "features", ("activity", "n_intervals"), 3600, np.array([4, 9], np.uint32),
        np.array([T0, T0 + 3_600_000], np.int64), np.array([[1.5, 6.0], [2.0, 6.0]]),
    )  # fmt: skip
    _assert_same(decode(batch.encode()), batch)


# --- rejections -------------------------------------------------------------------------------------


def _reject(data: bytes, match: str) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode(data)


@pytest.mark.parametrize("data", [b"", b"NTB", b"NTB1abc", b"XXXX\0\0\0\0{}      ", b"ntb1" + b"\0" * 20])
def test_bad_magic_or_too_short(data: bytes) -> None:
    _reject(data, "bad magic")


def test_malformed_message_is_a_value_error() -> None:
    assert issubclass(MalformedMessage, ValueError)


def test_truncated_header() -> None:
    data = _batch().encode()
    head_len = struct.unpack_from("<I", data, 4)[0]
    _reject(data[: 8 + head_len], "truncated header")  # no record count
    _reject(data[:20], "truncated header")
    _reject(MAGIC + struct.pack("<I", 10**6) + b"{}", "truncated header")


@pytest.mark.parametrize("cut", [1, 8, 9, 100])
def test_truncated_body(cut: int) -> None:
    data = _batch(n=10).encode()
    _reject(data[:-cut], "body length")


def test_trailing_bytes_are_rejected() -> None:
    _reject(_batch(n=3).encode() + b"\0" * 8, "body length")


def test_record_count_larger_than_the_body() -> None:
    data = bytearray(_batch(n=3).encode())
    head_len = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<I", data, 8 + head_len, 4)
    _reject(bytes(data), r"does not match 4 records x 5 columns")


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe\xfd", b"", b'{"kind": "traffic"'])
def test_header_not_json(header: bytes) -> None:
    _reject(_message(header), "header is not JSON")


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"[1, 2]", "unknown kind"),
        (b'"traffic"', "unknown kind"),
        (json.dumps(_good_header(kind="telemetry.raw")).encode(), "unknown kind .telemetry.raw."),
        (json.dumps(_good_header(kind=_DROP)).encode(), "unknown kind None"),
    ],
)
def test_unknown_kind(header: bytes, match: str) -> None:
    _reject(_message(header), match)


@pytest.mark.parametrize("columns", [[], "internet", ["a", 1], None, _DROP, [["a"]]])
def test_bad_columns(columns: Any) -> None:
    _reject(_message(_good_header(columns=columns)), "columns must be a non-empty list")


@pytest.mark.parametrize("step", [0, -600, 600.0, 600.5, "600", None, _DROP, True, 10**30, 2**63])
def test_bad_step(step: Any) -> None:
    # 10**30 raised OverflowError in validate (issue 9, finding 7)
    _reject(_message(_good_header(step_s=step)), "step_s must be a positive integer")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("watermark_ms", "abc", "watermark_ms must be an integer"),
        ("watermark_ms", 1.5, "watermark_ms must be an integer"),
        ("watermark_ms", True, "watermark_ms must be an integer"),
        ("watermark_ms", 10**30, "watermark_ms must be an integer"),
        ("closed_ms", [1], "closed_ms must be an integer"),
        ("closed_ms", -(2**63), "closed_ms must be an integer"),
        ("sent", -1, "sent must be a non-negative integer"),
        ("sent", "12", "sent must be a non-negative integer"),
        ("sent", 10**20, "sent must be a non-negative integer"),
        ("run", {"id": 1}, "run must be a string"),
        ("run", 7, "run must be a string"),
        ("final", "yes", "final must be true or false"),
        ("final", 1, "final must be true or false"),
        ("extra", [1, 2], "extra must be an object"),
        ("extra", "x", "extra must be an object"),
    ],
)
def test_every_header_field_is_checked(field: str, value: Any, match: str) -> None:
    _reject(_message(_good_header(**{field: value})), match)


@pytest.mark.parametrize(
    "header",
    [b'{"kind": "traffic", "step_s": 1' + b"0" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000, b"NaN"],
)
def test_pathological_json_is_malformed_not_a_crash(header: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode(_message(header))


def _one(value: float = 1.0, square: int = 7, start: int = T0, step_s: int = 600) -> bytes:
    return _message(_good_header(step_s=step_s), [square], [start], [[value]])


def test_single_good_record_decodes() -> None:
    back = decode(_one())
    assert_array_equal(back.values, [[1.0]])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_value(value: float) -> None:
    _reject(_one(value), "non-finite value")


@pytest.mark.parametrize("value", [-1.0, -1e-12])
def test_negative_value(value: float) -> None:
    _reject(_one(value), "negative value")


def test_negative_zero_is_not_negative() -> None:
    assert decode(_one(-0.0)).values[0, 0] == 0.0


def test_square_zero() -> None:
    _reject(_one(square=0), "square id 0")


@pytest.mark.parametrize(("start", "step_s"), [(T0 + 1, 600), (T0 + 60_000, 600), (T0 + STEP_MS, 3600)])
def test_misaligned_start(start: int, step_s: int) -> None:
    _reject(_one(start=start, step_s=step_s), f"not aligned to step {step_s} s")


def test_one_bad_record_rejects_the_whole_batch() -> None:
    batch = _batch(n=50, seed=9)
    assert validate(batch) is None
    values = batch.values.copy()
    values[37, 2] = -5.0
    bad = RecordBatch(batch.kind, batch.columns, batch.step_s, batch.squares, batch.starts_ms, values)
    assert validate(bad) == "negative value"
    _reject(bad.encode(), "negative value")


@pytest.mark.parametrize("counts", [5, {"a": 3}, {"a": [1]}, {"a": [1, "x"]}, {"a": [-1, 0]}])
def test_screened_counts_must_be_pairs_of_counts(counts: object) -> None:
    batch = RecordBatch(
        "screened",
        SCREENED_COLUMNS,
        1,
        np.array([1], np.uint32),
        np.array([1_383_264_000_000], np.int64),
        np.array([[1.0, 0.5, 0.0]]),
        extra={"sources": {"1": "a"}, "counts": counts},
    )
    with pytest.raises(MalformedMessage, match=r"extra\.counts"):
        decode(batch.encode())
