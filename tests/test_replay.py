"""producers.replay: a record the worker would refuse never shares a message with good records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from ingest.readers.milan import TrafficTable, read_raw
from ingest.schema import ACTIVITY_COLUMNS, PLAUSIBLE_MS, MalformedMessage, decode
from producers.replay import Replayer
from twin_store.adapters.traffic import Points

T0 = 1_383_260_400_000
STEP_MS = 600_000


def _table(squares: list[int], starts: list[int], values: list[list[float]]) -> TrafficTable:
    return TrafficTable(
        "mem",
        ACTIVITY_COLUMNS,
        600,
        np.array(squares, np.uint32),
        np.array(starts, np.int64),
        np.array(values, np.float64),
        lines=len(squares),
    )


def test_records_the_worker_would_refuse_become_dead_letters_of_their_own() -> None:
    ok = [1.0, 2, 3, 4, 5]
    table = _table(
        [1, 2, 3, 0, 5, 6, 7],
        [T0, T0, T0, T0, T0 + 1, 0, PLAUSIBLE_MS[1]],
        [ok, [np.inf, 0, 0, 0, 0], ok, ok, ok, ok, ok],
    )
    kept = Replayer._without_invalid_records(table)
    assert_array_equal(kept.squares, [1, 3])
    reasons = {d.position: d.reason for d in kept.bad}
    assert list(reasons) == [
        "record square 2 start_ms 1383260400000",
        "record square 0 start_ms 1383260400000",
        "record square 5 start_ms 1383260400001",
        "record square 6 start_ms 0",
        f"record square 7 start_ms {PLAUSIBLE_MS[1]}",
    ]
    assert "non-finite" in reasons["record square 2 start_ms 1383260400000"]
    assert "2000-01-01..2100-01-01" in reasons["record square 6 start_ms 0"]
    # the original bytes are the one-record message that would have been sent, which the worker refuses
    with pytest.raises(MalformedMessage, match="non-finite"):
        decode(kept.bad[0].original)
    assert kept.lines == table.lines


def test_a_good_table_is_published_unchanged() -> None:
    table = _table([1, 2], [T0, T0 + STEP_MS], [[1.0] * 5, [2.0] * 5])
    assert Replayer._without_invalid_records(table) is table


def test_the_overflowing_file_of_the_finding_loses_only_its_record(tmp_path: Path) -> None:
    lines = [f"{sq}\t{T0}\t39\t1\t1\t1\t1\t1" for sq in range(1, 9)]
    lines += [f"4\t{T0}\t{cc}\t1.5e308\t\t\t\t" for cc in (40, 41)]
    path = tmp_path / "day.txt"
    path.write_text("\n".join(lines) + "\n")
    kept = Replayer._without_invalid_records(read_raw(path))
    assert_array_equal(kept.squares, [1, 2, 3, 5, 6, 7, 8])
    assert [d.position for d in kept.bad] == ["line 4", "line 9", "line 10"]


def test_the_replay_row_says_complete_only_when_every_record_arrived() -> None:
    whole = Points(final=True, sent=948, received=948, run="r").progress_lines(1)
    lossy = Points(final=True, sent=948, received=0, run="r").progress_lines(1)
    assert "complete=true" in whole[0] and "complete=false" in lossy[0]
