"""stream_processors.windows.TumblingWindows: event-time sums per (square, window), pure state."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ingest.schema import N_INTERVALS, RecordBatch
from stream_processors.windows import TumblingWindows

T0 = 1_383_260_400_000  # an hour boundary
STEP_MS = 600_000
HOUR_MS = 3_600_000
COLS = ("a", "b", "c")


def _batch(squares, starts, values, closed_ms: int | None = None) -> RecordBatch:
    values = np.asarray(values, np.float64).reshape(len(squares), -1)
    cols = COLS[: values.shape[1]]
    return RecordBatch(
        "traffic", cols, 600, np.asarray(squares, np.uint32), np.asarray(starts, np.int64), values,
        closed_ms=closed_ms,
    )  # fmt: skip


def _random_records(seed: int, n: int, n_squares: int = 20, n_intervals: int = 48, integer: bool = False):
    rng = np.random.default_rng(seed)
    squares = rng.integers(1, n_squares + 1, n).astype(np.uint32)
    starts = T0 + STEP_MS * rng.integers(0, n_intervals, n).astype(np.int64)
    values = (
        rng.integers(0, 1000, (n, len(COLS))).astype(np.float64)
        if integer
        else rng.gamma(2, 5, (n, len(COLS)))
    )
    return squares, starts, values


def _expected(squares, starts, values, window_ms: int) -> pd.DataFrame:
    df = pd.DataFrame(values, columns=list(COLS))
    df["square"] = squares.astype(np.int64)
    df["start"] = starts - starts % window_ms
    df[N_INTERVALS] = 1.0
    return df.groupby(["start", "square"], sort=True)[[*COLS, N_INTERVALS]].sum().reset_index()


def _collect(batches: list[RecordBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batches = [b for b in batches if b is not None]
    squares = np.concatenate([b.squares for b in batches])
    starts = np.concatenate([b.starts_ms for b in batches])
    values = np.concatenate([b.values for b in batches])
    return squares, starts, values


def _sorted(squares, starts, values):
    order = np.lexsort((squares, starts))
    return squares[order], starts[order], values[order]


def _split(n: int, rng: np.random.Generator, pieces: int) -> list[np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(1, n), pieces - 1, replace=False))
    return np.split(np.arange(n), cuts)


# --- sums against a direct groupby ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("window_s", [600, 1800, 3600])
def test_sums_equal_groupby_for_shuffled_batches(seed: int, window_s: int) -> None:
    rng = np.random.default_rng(100 + seed)
    squares, starts, values = _random_records(seed, n=int(rng.integers(50, 2000)))
    perm = rng.permutation(squares.shape[0])
    win = TumblingWindows(window_s, COLS, 600)
    for offset, idx in enumerate(_split(perm.shape[0], rng, pieces=int(rng.integers(2, 40)))):
        sel = perm[idx]
        assert win.add(_batch(squares[sel], starts[sel], values[sel]), offset) is None
    out = win.advance(T0 + 100 * HOUR_MS)
    assert out is not None
    assert win.open == {}
    exp = _expected(squares, starts, values, window_s * 1000)
    assert out.kind == "features"
    assert out.columns == (*COLS, N_INTERVALS)
    assert out.step_s == window_s
    assert_array_equal(out.starts_ms, exp["start"].to_numpy())
    assert_array_equal(out.squares, exp["square"].to_numpy())
    assert_allclose(out.values[:, :-1], exp[list(COLS)].to_numpy(), rtol=1e-12)
    assert_array_equal(out.values[:, -1], exp[N_INTERVALS].to_numpy())


@pytest.mark.parametrize("seed", range(6))
def test_merged_equals_sequential(seed: int) -> None:
    """One big batch closed at the end == time-ordered small batches closed by per-interval watermarks."""
    rng = np.random.default_rng(seed)
    squares, starts, values = _random_records(seed, n=1500, integer=seed % 2 == 0)
    merged = TumblingWindows(3600, COLS, 600)
    merged.add(_batch(squares, starts, values), 0)
    one = merged.advance(T0 + 48 * STEP_MS)

    seq = TumblingWindows(3600, COLS, 600)
    emitted = []
    for i, interval in enumerate(np.unique(starts).tolist()):
        sel = np.flatnonzero(starts == interval)
        for j, part in enumerate(
            _split(sel.shape[0], rng, pieces=min(3, sel.shape[0])) if sel.shape[0] > 1 else [[0]]
        ):
            idx = sel[np.asarray(part, np.int64)]
            assert seq.add(_batch(squares[idx], starts[idx], values[idx]), 10 * i + j) is None
        emitted.append(seq.advance(interval + STEP_MS))
    assert seq.open == {}
    sq, st, va = _collect(emitted)
    assert_array_equal(sq, one.squares)
    assert_array_equal(st, one.starts_ms)
    if seed % 2 == 0:  # integer-valued: sums are exact whatever the order of addition
        assert_array_equal(va, one.values)
    else:
        assert_allclose(va, one.values, rtol=1e-12)


def test_two_window_lengths_agree_on_totals() -> None:
    squares, starts, values = _random_records(42, n=800, integer=True)
    ten = TumblingWindows(600, COLS, 600)
    hour = TumblingWindows(3600, COLS, 600)
    for w in (ten, hour):
        w.add(_batch(squares, starts, values), 0)
    a, b = ten.advance(T0 + 48 * STEP_MS), hour.advance(T0 + 48 * STEP_MS)
    assert_array_equal(a.values.sum(axis=0), b.values.sum(axis=0))
    assert a.values[:, -1].sum() == squares.shape[0] == b.values[:, -1].sum()
    # every 10-minute row folds into exactly one hourly row
    ten_df = pd.DataFrame({"sq": a.squares, "h": a.starts_ms - a.starts_ms % HOUR_MS, "v": a.values[:, 0]})
    folded = ten_df.groupby(["h", "sq"], sort=True)["v"].sum()
    assert_array_equal(folded.to_numpy(), b.values[:, 0])


# --- closing ----------------------------------------------------------------------------------------


def test_window_closes_only_when_the_watermark_reaches_its_end() -> None:
    win = TumblingWindows(3600, COLS, 600)
    win.add(_batch([1, 2], [T0, T0 + 5 * STEP_MS], np.ones((2, 3))), 0)
    for wm in (T0, T0 + STEP_MS, T0 + HOUR_MS - 1):
        assert win.advance(wm) is None
        assert list(win.open) == [T0]
    out = win.advance(T0 + HOUR_MS)
    assert out is not None
    assert_array_equal(out.squares, [1, 2])
    assert_array_equal(out.starts_ms, [T0, T0])
    assert win.open == {}
    assert win.advance(T0 + 10 * HOUR_MS) is None, "a closed window is emitted once"


def test_advance_emits_every_due_window_in_time_order_and_keeps_the_rest() -> None:
    win = TumblingWindows(600, COLS, 600)
    starts = [T0 + 3 * STEP_MS, T0, T0 + STEP_MS, T0 + 5 * STEP_MS]
    win.add(_batch([9, 8, 7, 6], starts, np.arange(12.0).reshape(4, 3)), 0)
    out = win.advance(T0 + 4 * STEP_MS)
    assert_array_equal(out.starts_ms, [T0, T0 + STEP_MS, T0 + 3 * STEP_MS])
    assert_array_equal(out.squares, [8, 7, 9])
    assert_array_equal(out.values[:, :3], [[3, 4, 5], [6, 7, 8], [0, 1, 2]])
    assert sorted(win.open) == [T0 + 5 * STEP_MS]


def test_closed_ms_is_the_newest_of_the_contributing_batches() -> None:
    win = TumblingWindows(3600, COLS, 600)
    win.add(_batch([1], [T0], [[1, 1, 1]], closed_ms=500), 0)
    win.add(_batch([1], [T0 + STEP_MS], [[1, 1, 1]], closed_ms=900), 1)
    win.add(_batch([2], [T0 + 2 * STEP_MS], [[1, 1, 1]], closed_ms=None), 2)
    assert win.advance(T0 + HOUR_MS).closed_ms == 900


# --- late records -----------------------------------------------------------------------------------


def test_late_records_are_returned_not_dropped() -> None:
    win = TumblingWindows(3600, COLS, 600)
    win.add(_batch([1], [T0], [[1, 2, 3]]), 0)
    first = win.advance(T0 + HOUR_MS)
    assert_array_equal(first.values, [[1, 2, 3, 1]])

    squares = [5, 1, 6, 2]
    starts = [T0 + 2 * STEP_MS, T0 + HOUR_MS, T0 + 5 * STEP_MS, T0 + HOUR_MS + STEP_MS]
    values = np.arange(12.0).reshape(4, 3)
    late = win.add(_batch(squares, starts, values), 1)
    assert late is not None
    assert_array_equal(late.squares, [5, 6])
    assert_array_equal(late.starts_ms, [T0 + 2 * STEP_MS, T0 + 5 * STEP_MS])
    assert_array_equal(late.values, values[[0, 2]])
    assert late.columns == COLS
    assert list(win.open) == [T0 + HOUR_MS], "the closed hour is not reopened"

    second = win.advance(T0 + 2 * HOUR_MS)
    assert_array_equal(second.squares, [1, 2])
    assert_array_equal(second.values, np.column_stack([values[[1, 3]], [1.0, 1.0]]))


def test_records_of_a_window_still_open_are_not_late() -> None:
    win = TumblingWindows(3600, COLS, 600)
    win.add(_batch([1], [T0], [[1, 1, 1]]), 0)
    assert win.advance(T0 + HOUR_MS - STEP_MS) is None
    assert win.add(_batch([1], [T0 + 5 * STEP_MS], [[2, 2, 2]]), 1) is None
    assert_array_equal(win.advance(T0 + HOUR_MS).values, [[3, 3, 3, 2]])


def test_a_batch_entirely_late_leaves_the_state_alone() -> None:
    win = TumblingWindows(600, COLS, 600)
    win.add(_batch([1], [T0 + 3 * STEP_MS], [[1, 1, 1]]), 4)
    win.advance(T0 + STEP_MS)
    late = win.add(_batch([2, 3], [T0, T0], np.ones((2, 3))), 5)
    assert_array_equal(late.squares, [2, 3])
    assert list(win.open) == [T0 + 3 * STEP_MS]
    assert win.min_open_offset() == 4, "late records do not pin offsets"


def test_watermark_never_moves_back() -> None:
    win = TumblingWindows(600, COLS, 600)
    win.advance(T0 + 2 * STEP_MS)
    win.advance(T0)  # an older watermark must not reopen closed windows
    late = win.add(_batch([1], [T0 + STEP_MS], [[1, 1, 1]]), 0)
    assert late is not None and len(late) == 1
    assert win.open == {}


# --- offsets and counts -----------------------------------------------------------------------------


def test_min_open_offset_tracks_the_smallest_contributing_offset() -> None:
    win = TumblingWindows(3600, COLS, 600)
    assert win.min_open_offset() is None
    win.add(_batch([1], [T0 + HOUR_MS], [[1, 1, 1]]), 7)  # hour 1
    assert win.min_open_offset() == 7
    win.add(_batch([1], [T0], [[1, 1, 1]]), 9)  # hour 0
    assert win.min_open_offset() == 7
    win.add(_batch([2], [T0 + HOUR_MS + STEP_MS], [[1, 1, 1]]), 3)  # hour 1 again, smaller offset
    assert win.min_open_offset() == 3
    win.add(RecordBatch.empty("traffic", COLS, 600), 1)  # empty: contributes nothing
    assert win.min_open_offset() == 3
    win.advance(T0 + HOUR_MS)  # closes hour 0 (offset 9); hour 1 still holds 3
    assert win.min_open_offset() == 3
    win.add(_batch([3], [T0 + 2 * HOUR_MS], [[1, 1, 1]]), 11)
    win.advance(T0 + 2 * HOUR_MS)
    assert win.min_open_offset() == 11
    win.advance(T0 + 3 * HOUR_MS)
    assert win.min_open_offset() is None


def test_n_intervals_counts_records_per_square_and_window() -> None:
    win = TumblingWindows(3600, COLS, 600)
    squares = [1] * 6 + [2] * 3 + [2]  # square 2 has a duplicate record for one interval
    starts = [T0 + i * STEP_MS for i in range(6)] + [T0, T0 + STEP_MS, T0 + 2 * STEP_MS, T0]
    win.add(_batch(squares[:4], starts[:4], np.ones((4, 3))), 0)
    win.add(_batch(squares[4:], starts[4:], np.ones((6, 3))), 1)
    out = win.advance(T0 + HOUR_MS)
    assert_array_equal(out.squares, [1, 2])
    assert_array_equal(out.values, [[6, 6, 6, 6], [4, 4, 4, 4]])


def test_state_does_not_alias_the_input_arrays() -> None:
    win = TumblingWindows(600, COLS, 600)
    batch = _batch([3, 1, 2], [T0] * 3, np.ones((3, 3)))
    win.add(batch, 0)
    batch.values[:] = 99.0
    batch.squares[:] = 42
    out = win.advance(T0 + STEP_MS)
    assert_array_equal(out.squares, [1, 2, 3])
    assert_array_equal(out.values[:, :3], np.ones((3, 3)))


def test_read_only_input_is_accepted() -> None:
    batch = _batch([2, 2, 1], [T0, T0, T0], np.arange(9.0).reshape(3, 3))
    for arr in (batch.squares, batch.starts_ms, batch.values):
        arr.flags.writeable = False
    win = TumblingWindows(600, COLS, 600)
    win.add(batch, 0)
    assert_array_equal(win.advance(T0 + STEP_MS).values, [[6, 7, 8, 1], [3, 5, 7, 2]])


@pytest.mark.parametrize(("window_s", "step_s"), [(1000, 600), (900, 600), (5400, 3600), (600, 3600)])
def test_window_not_a_multiple_of_the_step_raises(window_s: int, step_s: int) -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        TumblingWindows(window_s, COLS, step_s)


@pytest.mark.parametrize(("window_s", "step_s"), [(600, 600), (3600, 600), (3600, 3600), (86_400, 3600)])
def test_window_multiple_of_the_step_is_accepted(window_s: int, step_s: int) -> None:
    assert TumblingWindows(window_s, COLS, step_s).window_ms == window_s * 1000
