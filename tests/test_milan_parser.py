"""ingest.readers.milan: the official daily files and the hourly CSV, bad lines kept as dead letters."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ingest.errors import InputError
from ingest.readers import milan
from ingest.readers.milan import HOURLY_START_MS, RAW_FIELDS, TrafficTable, read_hourly, read_raw
from ingest.schema import ACTIVITY_COLUMNS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan"
RAW_DAY = DATA / "raw_2013-11-01_26squares.txt"
HOURLY = DATA / "hourly_150squares_62days.csv"
T0 = 1_383_260_400_000
STEP_MS = 600_000
HOUR_MS = 3_600_000


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real Milan data not found at {path} (see shared/data/milan)")
    return path


def _tsv(*fields: object) -> bytes:
    return "\t".join(str(f) for f in fields).encode()


def _assert_tables_equal(a: TrafficTable, b: TrafficTable) -> None:
    assert a.columns == b.columns and a.step_s == b.step_s
    assert_array_equal(a.squares, b.squares)
    assert_array_equal(a.starts_ms, b.starts_ms)
    assert_array_equal(a.values, b.values)
    assert a.lines == b.lines
    assert [(d.reason, d.position, d.original) for d in a.bad] == [
        (d.reason, d.position, d.original) for d in b.bad
    ]


# --- the real daily file ----------------------------------------------------------------------------


def test_real_day_equals_a_direct_pandas_groupby() -> None:
    path = _need(RAW_DAY)
    table = read_raw(path)
    df = pd.read_csv(path, sep="\t", header=None, names=list(RAW_FIELDS))
    df[list(ACTIVITY_COLUMNS)] = df[list(ACTIVITY_COLUMNS)].fillna(0.0)
    expected = df.groupby(["time_interval", "square_id"], sort=True)[list(ACTIVITY_COLUMNS)].sum()

    assert len(table) == len(expected) == 3683
    assert table.lines == len(df) == 10_000
    assert table.bad == []
    assert table.columns == ACTIVITY_COLUMNS
    assert table.step_s == 600
    assert table.source == str(path)
    assert table.squares.dtype == np.uint32 and table.starts_ms.dtype == np.int64
    assert_array_equal(table.squares, expected.index.get_level_values("square_id"))
    assert_array_equal(table.starts_ms, expected.index.get_level_values("time_interval"))
    assert_allclose(table.values, expected.to_numpy(), rtol=1e-13, atol=0)
    assert np.all(np.diff(table.starts_ms) >= 0), "sorted by interval start"
    assert np.unique(table.squares).shape[0] == 26
    assert table.starts_ms[0] == T0 and table.starts_ms[-1] == T0 + 143 * STEP_MS


def test_small_chunks_give_the_same_table(monkeypatch: pytest.MonkeyPatch) -> None:
    path = _need(RAW_DAY)
    whole = read_raw(path)
    monkeypatch.setattr(milan, "CHUNK_BYTES", 4099)  # cuts lines mid-way, ~170 chunks
    _assert_tables_equal(read_raw(path), whole)


def test_gzip_gives_the_same_table_as_plain(tmp_path: Path) -> None:
    path = _need(RAW_DAY)
    gz = tmp_path / "day.txt.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    _assert_tables_equal(read_raw(gz), read_raw(path))


def test_truncated_gzip_is_an_input_error(tmp_path: Path) -> None:
    gz = tmp_path / "day.txt.gz"
    gz.write_bytes(gzip.compress(b"1\t1383260400000\t39\t1\t2\t3\t4\t5\n" * 500)[:-30])
    with pytest.raises(InputError, match=r"day\.txt\.gz: cannot read"):
        read_raw(gz)


# --- malformed lines --------------------------------------------------------------------------------

GOOD_1 = _tsv(1, T0, 39, 1, 2, 3, 4, 5)
GOOD_CRLF_1 = _tsv(1, T0, 0, 0.5, "", "", "", 0.25)  # same square and interval as GOOD_1: summed
GOOD_CRLF_2 = _tsv(2, T0 + STEP_MS, 39, 1, 1, 1, 1, 1)
GOOD_LAST = _tsv(3, T0, 39, "", "", "", "", 7)
BAD = {
    "seven fields": (_tsv(1, T0, 39, 1, 2, 3, 4), "expected 8 tab-separated fields, got 7"),
    "non-numeric": (_tsv(2, T0, 39, 1, "abc", 3, 4, 5), "not a number"),
    "negative": (_tsv(2, T0, 0, 1, -2, 3, 4, 5), "negative"),
    "empty square": (_tsv("", T0, 39, 1, 1, 1, 1, 1), "empty"),
    "misaligned": (_tsv(3, T0 + 1, 39, 1, 1, 1, 1, 1), "10-minute boundary"),
    "nine fields": (_tsv(1, T0, 39, 1, 2, 3, 4, 5, 6), "got 9"),
    "square 0": (_tsv(0, T0, 39, 1, 1, 1, 1, 1), "square_id must be a positive integer"),
    "fractional square": (_tsv(1.5, T0, 39, 1, 1, 1, 1, 1), "square_id must be a positive integer"),
    "infinite": (_tsv(4, T0, 39, "inf", 1, 1, 1, 1), "not finite"),
    "NaN text": (_tsv(4, T0, 39, 1, "NaN", 1, 1, 1), "sms_out is not a number: 'NaN'"),
    "nan in the square": (_tsv("nan", T0, 39, 1, 1, 1, 1, 1), "square_id is not a number"),
    "1970": (_tsv(4, STEP_MS, 39, 1, 1, 1, 1, 1), "outside 2000-01-01..2100-01-01"),
    "2286": (_tsv(4, 9_999_999_600_000, 39, 1, 1, 1, 1, 1), "outside 2000-01-01..2100-01-01"),
}


def _mixed_file(tmp_path: Path, include_non_numeric: bool) -> tuple[Path, dict[int, tuple[bytes, str]]]:
    """Good, bad and blank lines, CRLF endings in the middle and no newline at the end."""
    bad = dict(BAD)
    if not include_non_numeric:
        del bad["non-numeric"]
    body: list[bytes] = [GOOD_1 + b"\n"]
    expected: dict[int, tuple[bytes, str]] = {}
    for i, (line, reason) in enumerate(bad.values()):
        body.append(line + b"\n")
        expected[len(body)] = (line, reason)
        if i % 3 == 0:
            body.append(b"\n")  # blank lines are skipped but still numbered
    body += [b"\r\n", GOOD_CRLF_1 + b"\r\n", GOOD_CRLF_2 + b"\r\n", b"\n", GOOD_LAST]
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"".join(body))
    return path, expected


@pytest.mark.parametrize("chunk_bytes", [milan.CHUNK_BYTES, 64, 7])
@pytest.mark.parametrize("include_non_numeric", [True, False], ids=["slow-path", "fast-path"])
def test_bad_lines_are_dead_letters_and_good_lines_still_aggregate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int, include_non_numeric: bool
) -> None:
    monkeypatch.setattr(milan, "CHUNK_BYTES", chunk_bytes)
    path, expected = _mixed_file(tmp_path, include_non_numeric)
    table = read_raw(path)

    assert [d.position for d in table.bad] == [f"line {n}" for n in expected]
    for letter, (line, reason) in zip(table.bad, expected.values(), strict=True):
        assert letter.original == line
        assert reason in letter.reason, (letter.position, letter.reason)
        assert letter.source == str(path)
        assert letter.stage == "producer"
    assert table.lines == 4 + len(expected), "data lines (good + bad); blank lines are not counted"

    assert_array_equal(table.squares, [1, 3, 2])
    assert_array_equal(table.starts_ms, [T0, T0, T0 + STEP_MS])
    assert_array_equal(table.values, [[1.5, 2, 3, 4, 5.25], [0, 0, 0, 0, 7], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("chunk_bytes", [milan.CHUNK_BYTES, 50])
def test_a_sum_that_overflows_costs_that_record_and_its_lines_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    monkeypatch.setattr(milan, "CHUNK_BYTES", chunk_bytes)
    # each line is finite; their sum over country codes (square 7, first interval) is inf
    huge_a, huge_b = _tsv(7, T0, 39, 1.5e308, 1, 1, 1, 1), _tsv(7, T0, 40, 1.5e308, "", "", "", "")
    other = _tsv(7, T0 + STEP_MS, 39, 1, 1, 1, 1, 1)  # the same square, another interval: kept
    path = tmp_path / "overflow.txt"
    path.write_bytes(b"\n".join([GOOD_1, huge_a, other, huge_b, GOOD_LAST]) + b"\n")
    table = read_raw(path)
    assert [(d.position, d.original) for d in table.bad] == [("line 2", huge_a), ("line 4", huge_b)]
    assert all("square 7" in d.reason and "not finite" in d.reason for d in table.bad)
    assert np.isfinite(table.values).all()
    assert sorted(zip(table.squares.tolist(), table.starts_ms.tolist(), strict=True)) == [
        (1, T0),
        (3, T0),
        (7, T0 + STEP_MS),
    ]
    assert table.lines == 5


def test_empty_activity_is_zero_but_nan_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nan.txt"
    path.write_bytes(
        _tsv(1, T0, 39, "", "", "", "", 2) + b"\n" + _tsv(2, T0, 39, "nan", "", "", "", 2) + b"\n"
    )
    table = read_raw(path)
    assert_array_equal(table.squares, [1])
    assert_array_equal(table.values, [[0, 0, 0, 0, 2]])
    assert [d.position for d in table.bad] == ["line 2"] and "sms_in is not a number" in table.bad[0].reason


def test_several_blank_lines_in_a_row(tmp_path: Path) -> None:
    path = tmp_path / "blanks.txt"
    path.write_bytes(b"\n\n" + GOOD_1 + b"\n\n \n\r\n\n" + GOOD_LAST + b"\n\n")
    table = read_raw(path)
    assert table.bad == []
    assert table.lines == 2
    assert_array_equal(table.squares, [1, 3])


def test_bad_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "tail.txt"
    line = _tsv(5, T0 + 7, 39, 1, 1, 1, 1, 1)
    path.write_bytes(GOOD_1 + b"\n" + GOOD_LAST + b"\n" + line)
    table = read_raw(path)
    assert [(d.position, d.original) for d in table.bad] == [("line 3", line)]
    assert len(table) == 2


def test_bad_crlf_line_keeps_its_content(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    line = _tsv(5, T0, 39, 1, -1, 1, 1, 1)
    path.write_bytes(GOOD_1 + b"\r\n" + line + b"\r\n" + GOOD_LAST + b"\r\n")
    table = read_raw(path)
    assert [d.position for d in table.bad] == ["line 2"]
    assert table.bad[0].original.rstrip(b"\r") == line
    assert_array_equal(table.values[:, 4], [5, 7])


def test_empty_file_and_all_bad_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    table = read_raw(empty)
    assert (len(table), table.lines, table.bad) == (0, 0, [])
    assert table.values.shape == (0, len(ACTIVITY_COLUMNS))

    all_bad = tmp_path / "bad.txt"
    all_bad.write_bytes(b"hello\nworld\n")
    table = read_raw(all_bad)
    assert len(table) == 0
    assert [d.position for d in table.bad] == ["line 1", "line 2"]
    assert [d.original for d in table.bad] == [b"hello", b"world"]


def test_gzip_with_bad_lines_gives_the_same_dead_letters(tmp_path: Path) -> None:
    path, _ = _mixed_file(tmp_path, include_non_numeric=True)
    gz = tmp_path / "mixed.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    plain, packed = read_raw(path), read_raw(gz)
    assert len(plain.bad) == len(BAD)
    _assert_tables_equal(packed, plain)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match=r"nope\.txt"):
        read_raw(missing)
    with pytest.raises(InputError, match=r"nope\.txt"):
        read_hourly(missing)


# --- the hourly CSV ---------------------------------------------------------------------------------


def test_real_hourly_file_is_hour_major() -> None:
    path = _need(HOURLY)
    table = read_hourly(path)
    df = pd.read_csv(path).set_index("square_id").sort_index()
    assert df.shape == (150, 1488)
    assert len(table) == 150 * 1488 == 223_200
    assert table.lines == 150 and table.bad == []
    assert table.columns == ("activity",) and table.step_s == 3600
    assert table.starts_ms[0] == HOURLY_START_MS == 1_383_260_400_000
    assert_array_equal(table.starts_ms, np.repeat(HOURLY_START_MS + HOUR_MS * np.arange(1488), 150))
    assert_array_equal(table.squares, np.tile(df.index.to_numpy(), 1488))
    assert_array_equal(table.values[:, 0], df.to_numpy(np.float64).T.reshape(-1))
    assert table.values.shape == (223_200, 1)


def test_hourly_malformed_rows_are_dead_letters(tmp_path: Path) -> None:
    lines = [
        b"square_id,h0,h1,h2",
        b"5,1,2,3",
        b"2,1,2",  # 3: wrong field count
        b"x,1,2,3",  # 4: square not a number
        b"3,1,-2,3",  # 5: negative
        b"",  # 6: blank
        b"4,,1.5,2\r",  # 7: CRLF, empty field = 0
        b"7,1,2,abc",  # 8: value not a number
        b"0,1,1,1",  # 9: square 0
        b"6,1,inf,1",  # 10: not finite
        b"8,1,2,3,4",  # 11: one field too many
        b"9,1,NaN,3",  # 12: the text NaN is not a number of events
        b"5,9,9,9",  # 13: square 5 again
        b"4294967296,1,1,1",  # 14: square beyond uint32
    ]
    path = tmp_path / "hourly.csv"
    path.write_bytes(b"\n".join(lines))
    table = read_hourly(path, start_ms=T0)
    bad_lines = (3, 4, 5, 8, 9, 10, 11, 12, 13, 14)
    assert [d.position for d in table.bad] == [f"line {n}" for n in bad_lines]
    assert [d.original for d in table.bad] == [lines[n - 1] for n in bad_lines]
    assert "expected 4 comma-separated fields, got 3" in table.bad[0].reason
    assert "got 5" in table.bad[6].reason
    assert "not finite" in table.bad[7].reason and "repeats line 2" in table.bad[8].reason
    assert "below 2**32" in table.bad[9].reason
    assert table.lines == 12
    assert_array_equal(table.squares, [4, 5, 4, 5, 4, 5])
    assert_array_equal(table.starts_ms - T0, [0, 0, HOUR_MS, HOUR_MS, 2 * HOUR_MS, 2 * HOUR_MS])
    assert_array_equal(table.values[:, 0], [0, 1, 1.5, 2, 2, 3])


@pytest.mark.parametrize(
    "content",
    [b"a,b,c\n1,2,3\n", b"square_id,x0,x1\n1,2,3\n", b"1\t1383260400000\t39\t1\t2\t3\t4\t5\n", b""],
)
def test_non_hourly_header_is_an_input_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not-hourly.csv"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"not-hourly\.csv:1: not an hourly file"):
        read_hourly(path)


@pytest.mark.parametrize("start_ms", [0, 4_102_444_800_000 - HOUR_MS])
def test_hourly_hours_outside_the_plausible_range_are_an_input_error(tmp_path: Path, start_ms: int) -> None:
    path = tmp_path / "h.csv"
    path.write_bytes(b"square_id,h0,h1\n9,1,2\n")
    with pytest.raises(InputError, match=r"outside 2000-01-01\.\.2100-01-01"):
        read_hourly(path, start_ms=start_ms)


def test_hourly_gzip_equals_plain(tmp_path: Path) -> None:
    plain = tmp_path / "h.csv"
    plain.write_bytes(b"square_id,h0,h1\n9,1,2\n3,4,5\n")
    gz = tmp_path / "h.csv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    _assert_tables_equal(read_hourly(gz), read_hourly(plain))
    assert_array_equal(read_hourly(plain).squares, [3, 9, 3, 9])
