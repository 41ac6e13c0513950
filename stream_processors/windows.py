"""Event-time tumbling windows per square: pure state, no Kafka.

``TumblingWindows.add`` folds a record batch into open windows; ``advance`` closes every window whose end
is at or before the watermark and returns the closed windows as one feature batch. Each open window
remembers the smallest source offset that fed it, so the adapter knows which input messages are fully
reflected in emitted output (and may be acknowledged) and which must be re-read after a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from ingest.schema import N_INTERVALS, RecordBatch


@dataclass
class _OpenWindow:
    squares: np.ndarray  # uint32 [m], unique, sorted
    sums: np.ndarray  # float64 [m, k]
    counts: np.ndarray  # int64 [m], source records summed
    min_offset: int  # smallest source offset that contributed
    closed_ms: int | None  # newest source close time (wall clock), for lag


def _reduce(squares: np.ndarray, values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows summed per square, sorted by square: one stable sort, then sums over runs of equal squares."""
    order = np.argsort(squares, kind="stable")
    sq, vals, cnt = squares[order], values[order], counts[order]
    if sq.shape[0] < 2:
        return sq, vals, cnt
    new_run = sq[1:] != sq[:-1]
    if new_run.all():  # no square twice: nothing to sum
        return sq, vals, cnt
    starts = np.flatnonzero(np.concatenate(([True], new_run)))
    return sq[starts], np.add.reduceat(vals, starts, axis=0), np.add.reduceat(cnt, starts)


def _max_opt(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


class TumblingWindows:
    """Sums of each column per (square, window) for one window length."""

    def __init__(self, window_s: int, columns: tuple[str, ...], step_s: int) -> None:
        if window_s % step_s:
            raise ValueError(f"window {window_s} s is not a multiple of the record step {step_s} s")
        self.window_s = window_s
        self.window_ms = window_s * 1000
        self.columns = columns
        self.step_s = step_s
        self.open: dict[int, _OpenWindow] = {}
        # every window ending at or before this has been emitted; records for them are late
        self.closed_until_ms: int | None = None

    def add(self, batch: RecordBatch, offset: int) -> RecordBatch | None:
        """Fold a batch in; return the records that arrived after their window closed (or None)."""
        if len(batch) == 0:
            return None
        starts = batch.starts_ms - batch.starts_ms % self.window_ms
        late_mask = (
            starts + self.window_ms <= self.closed_until_ms
            if self.closed_until_ms is not None
            else np.zeros(len(batch), bool)
        )
        late = None
        if late_mask.any():
            late = RecordBatch(
                batch.kind,
                batch.columns,
                batch.step_s,
                batch.squares[late_mask],
                batch.starts_ms[late_mask],
                batch.values[late_mask],
            )
            keep = ~late_mask
            starts, squares, values = starts[keep], batch.squares[keep], batch.values[keep]
        else:
            squares, values = batch.squares, batch.values
        if starts.shape[0] == 0:
            return late
        # one window start after another: sort by start once (replays already are) and slice
        if starts.shape[0] > 1 and (starts[1:] < starts[:-1]).any():
            order = np.argsort(starts, kind="stable")
            starts, squares, values = starts[order], squares[order], values[order]
        firsts = np.flatnonzero(np.concatenate(([True], starts[1:] != starts[:-1])))
        bounds = [*firsts.tolist(), starts.shape[0]]
        for a, b in pairwise(bounds):
            start = int(starts[a])
            new_sq, new_val = squares[a:b], values[a:b]
            new_cnt = np.ones(new_sq.shape[0], np.int64)
            win = self.open.get(start)
            if win is None:
                sq, sums, cnt = _reduce(new_sq, new_val, new_cnt)
                self.open[start] = _OpenWindow(sq, sums, cnt, offset, batch.closed_ms)
                continue
            sq, sums, cnt = _reduce(
                np.concatenate([win.squares, new_sq]),
                np.concatenate([win.sums, new_val]),
                np.concatenate([win.counts, new_cnt]),
            )
            win.squares, win.sums, win.counts = sq, sums, cnt
            win.min_offset = min(win.min_offset, offset)
            win.closed_ms = _max_opt(win.closed_ms, batch.closed_ms)
        return late

    def advance(self, watermark_ms: int) -> RecordBatch | None:
        """Close and emit windows ending at or before the watermark, as one feature batch."""
        due = sorted(s for s in self.open if s + self.window_ms <= watermark_ms)
        self.closed_until_ms = max(self.closed_until_ms or watermark_ms, watermark_ms)
        if not due:
            return None
        wins = [self.open.pop(s) for s in due]
        closed_ms = None
        for w in wins:
            closed_ms = _max_opt(closed_ms, w.closed_ms)
        values = np.concatenate([np.column_stack([w.sums, w.counts.astype(np.float64)]) for w in wins])
        return RecordBatch(
            kind="features",
            columns=(*self.columns, N_INTERVALS),
            step_s=self.window_s,
            squares=np.concatenate([w.squares for w in wins]),
            starts_ms=np.concatenate(
                [np.full(w.squares.shape[0], s, np.int64) for s, w in zip(due, wins, strict=True)]
            ),
            values=values,
            closed_ms=closed_ms,
        )

    def min_open_offset(self) -> int | None:
        return min((w.min_offset for w in self.open.values()), default=None)
