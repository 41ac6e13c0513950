"""stream_processors.processor.PartitionProcessor: the worker logic on real data, without Kafka."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ingest.readers.milan import TrafficTable, read_hourly, read_raw
from ingest.schema import ACTIVITY_COLUMNS, N_INTERVALS, RecordBatch, decode
from ingest.settings import WorkerSettings
from stream_processors.processor import Output, PartitionProcessor, counters_total

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan"
RAW_DAY = DATA / "raw_2013-11-01_26squares.txt"
HOURLY = DATA / "hourly_150squares_62days.csv"
TOPIC = "telemetry.milan"
T0 = 1_383_260_400_000
STEP_MS = 600_000
HOUR_MS = 3_600_000
RUN = "run-1"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real Milan data not found at {path} (see shared/data/milan)")
    return path


@pytest.fixture(scope="module")
def raw_day() -> TrafficTable:
    return read_raw(_need(RAW_DAY))


@pytest.fixture(scope="module")
def hourly_two_days() -> TrafficTable:
    table = read_hourly(_need(HOURLY))
    n = 48 * 150  # hour-major: the first 48 hours
    return TrafficTable(
        table.source, table.columns, table.step_s, table.squares[:n], table.starts_ms[:n], table.values[:n]
    )


@dataclass
class Message:
    value: bytes
    start_ms: int | None  # interval the message carries, None for the final marker
    records: int


def _replay_messages(table: TrafficTable, partitions: int, run: str = RUN) -> dict[int, list[Message]]:
    """What producers/replay.py sends: per interval, one batch per partition (empty where a partition has no
    square), watermark = interval end; then one final message per partition with the count it was sent."""
    out: dict[int, list[Message]] = {p: [] for p in range(partitions)}
    sent = dict.fromkeys(range(partitions), 0)
    step_ms = table.step_s * 1000
    for start in np.unique(table.starts_ms).tolist():
        rows = np.flatnonzero(table.starts_ms == start)
        for p in range(partitions):
            idx = rows[table.squares[rows] % partitions == p]
            batch = RecordBatch(
                "traffic", table.columns, table.step_s, table.squares[idx], table.starts_ms[idx],
                table.values[idx], watermark_ms=start + step_ms, closed_ms=1_700_000_000_000, run=run,
            )  # fmt: skip
            out[p].append(Message(batch.encode(), start, len(idx)))
            sent[p] += len(idx)
    last = int(table.starts_ms.max()) + step_ms
    for p in range(partitions):
        marker = RecordBatch.empty(
            "traffic", table.columns, table.step_s, watermark_ms=last, run=run, final=True, sent=sent[p]
        )
        out[p].append(Message(marker.encode(), None, 0))
    return out


def _run(messages: list[Message], proc: PartitionProcessor) -> list[Output]:
    return [proc.on_message(m.value, offset) for offset, m in enumerate(messages)]


def _features(outputs: list[Output], step_s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batches = [b for o in outputs for b in o.features if not b.final and b.step_s == step_s]
    if not batches:
        return np.empty(0, np.uint32), np.empty(0, np.int64), np.empty((0, 0))
    sq = np.concatenate([b.squares for b in batches])
    st = np.concatenate([b.starts_ms for b in batches])
    va = np.concatenate([b.values for b in batches])
    order = np.lexsort((sq, st))
    return sq[order], st[order], va[order]


def _batch(squares, starts, values=None, **meta) -> bytes:
    squares = np.asarray(squares, np.uint32)
    values = (
        np.ones((len(squares), 1))
        if values is None
        else np.asarray(values, np.float64).reshape(len(squares), 1)
    )
    return RecordBatch(
        "traffic", ("internet",), 600, squares, np.asarray(starts, np.int64), values, **meta
    ).encode()


def _proc(**worker) -> PartitionProcessor:
    return PartitionProcessor(TOPIC, 2, WorkerSettings(**worker))


# --- a full real day --------------------------------------------------------------------------------


def test_real_day_features_equal_input_and_hourly_sums(raw_day: TrafficTable) -> None:
    assert len(raw_day) == 3683
    partitions = 4
    streams = _replay_messages(raw_day, partitions)
    procs = [PartitionProcessor(TOPIC, p, WorkerSettings()) for p in range(partitions)]
    outputs = [o for p in range(partitions) for o in _run(streams[p], procs[p])]
    assert not [d for o in outputs for d in o.deadletters]

    sq, st, va = _features(outputs, 600)
    assert_array_equal(sq, raw_day.squares)
    assert_array_equal(st, raw_day.starts_ms)
    assert_array_equal(va[:, :-1], raw_day.values)  # one record per 10-minute window: no arithmetic
    assert_array_equal(va[:, -1], np.ones(len(raw_day)))

    df = pd.DataFrame(raw_day.values, columns=list(ACTIVITY_COLUMNS))
    df["square"] = raw_day.squares.astype(np.int64)
    df["hour"] = raw_day.starts_ms - raw_day.starts_ms % HOUR_MS
    hourly = df.groupby(["hour", "square"], sort=True)
    sums, counts = hourly[list(ACTIVITY_COLUMNS)].sum(), hourly.size()
    hsq, hst, hva = _features(outputs, 3600)
    assert hst.shape[0] == len(sums)
    assert_array_equal(hsq, sums.index.get_level_values("square"))
    assert_array_equal(hst, sums.index.get_level_values("hour"))
    assert_allclose(hva[:, :-1], sums.to_numpy(), rtol=1e-12, atol=0)
    assert_array_equal(hva[:, -1], counts.to_numpy())
    assert counts.to_numpy().min() < 6, "the day has gaps: n_intervals must count records, not slots"

    for b in (b for o in outputs for b in o.features if not b.final):
        assert b.kind == "features"
        assert b.columns == (*ACTIVITY_COLUMNS, N_INTERVALS)
        assert b.run == RUN
        assert decode(b.encode()).values.shape == b.values.shape  # emitted batches are valid wire batches

    totals = counters_total(procs)
    assert totals["records"] == len(raw_day)
    assert totals["features"] == len(raw_day) + len(sums)
    assert totals["messages"] == 145 * partitions
    assert totals["deadletters"] == totals["late"] == 0
    assert all(p.windows[600].open == {} and p.windows[3600].open == {} for p in procs)


def test_real_day_final_markers_report_sent_and_received(raw_day: TrafficTable) -> None:
    partitions = 3
    streams = _replay_messages(raw_day, partitions)
    total_received = 0
    for p in range(partitions):
        out = _run(streams[p], PartitionProcessor(TOPIC, p, WorkerSettings()))
        last = out[-1].features[-1]
        assert last.final and len(last) == 0
        sent = sum(m.records for m in streams[p])
        assert sent > 0
        assert last.sent == sent
        assert last.extra == {"received": sent}
        assert last.run == RUN
        assert last.watermark_ms == T0 + 144 * STEP_MS
        assert [b for o in out[:-1] for b in o.features if b.final] == []
        back = decode(last.encode())
        assert (back.final, back.sent, back.extra) == (True, sent, {"received": sent})
        total_received += last.extra["received"]
    assert total_received == len(raw_day)


def test_safe_offset_never_passes_an_open_window(raw_day: TrafficTable) -> None:
    messages = _replay_messages(raw_day, 1)[0]
    proc = PartitionProcessor(TOPIC, 0, WorkerSettings())
    first_offset_of_hour: dict[int, int] = {}
    previous = 0
    for offset, m in enumerate(messages):
        out = proc.on_message(m.value, offset)
        assert out.safe_offset is not None
        assert out.safe_offset >= previous, "safe offset never goes back"
        previous = out.safe_offset
        if m.start_ms is None:
            assert out.safe_offset == offset + 1
            continue
        hour = m.start_ms - m.start_ms % HOUR_MS
        first_offset_of_hour.setdefault(hour, offset)
        hour_closed = m.start_ms + STEP_MS == hour + HOUR_MS
        if hour_closed:
            assert out.safe_offset == offset + 1, "everything is emitted at the end of the hour"
        else:
            assert out.safe_offset <= first_offset_of_hour[hour]
            assert out.safe_offset == first_offset_of_hour[hour]  # and no more conservative than needed


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"garbage", "bad magic"),
        (None, "empty message value"),
        (_batch([1], [T0], [-1.0]), "negative value"),
        (_batch([0], [T0]), "square id 0"),
        (
            RecordBatch(
                "features", ("internet",), 600, np.array([1], np.uint32), np.array([T0]), np.ones((1, 1))
            ).encode(),
            "expected kind 'traffic'",
        ),
        # wrong header types once crashed the windows agent in a loop (issue 9, finding 5)
        (_batch([1], [T0], watermark_ms="abc"), "header.watermark_ms must be an integer"),
        (_batch([1], [T0], run={"id": 1}), "header.run must be a string"),
        (_batch([1], [T0], closed_ms=1.5), "header.closed_ms must be an integer"),
        (
            RecordBatch(
                "traffic", ("internet",), 10**30, np.array([1], np.uint32), np.array([T0]), np.ones((1, 1))
            ).encode(),
            "header.step_s must be a positive integer",
        ),
    ],
)
def test_malformed_message_becomes_a_dead_letter_and_processing_continues(
    bad: bytes | None, reason: str
) -> None:
    proc = _proc()
    good = [
        _batch([1, 2], [T0, T0], [1.0, 2.0], watermark_ms=T0 + STEP_MS),
        _batch([1], [T0 + STEP_MS], [3.0]),
        bad,
        _batch([1, 2], [T0 + 2 * STEP_MS] * 2, [4.0, 5.0], watermark_ms=T0 + HOUR_MS),
    ]
    outs = [proc.on_message(v, 40 + i) for i, v in enumerate(good)]
    assert [len(o.deadletters) for o in outs] == [0, 0, 1, 0]
    letter = outs[2].deadletters[0]
    assert reason in letter.reason
    assert letter.position == f"{TOPIC}[2]@42"
    assert letter.source == TOPIC
    assert letter.stage == "worker"
    assert letter.original == (bad or b"")
    assert outs[2].features == []
    # the hour opened at offset 40 is still open when the bad message arrives
    assert outs[2].safe_offset == 40
    hsq, hst, hva = _features(outs, 3600)
    assert_array_equal(hsq, [1, 2])
    assert_array_equal(hst, [T0, T0])
    assert_array_equal(hva, [[8.0, 3.0], [7.0, 2.0]])
    assert outs[3].safe_offset == 44
    assert proc.counters == {
        "messages": 4,
        "records": 5,
        "features": 2 + 1 + 2 + 2,
        "deadletters": 1,
        "late": 0,
    }


def test_dead_letter_with_nothing_open_acknowledges_it() -> None:
    proc = _proc()
    out = proc.on_message(b"NTB1 nonsense", 7)
    assert out.safe_offset == 8
    assert out.deadletters[0].position == f"{TOPIC}[2]@7"


def test_changed_columns_while_windows_are_open_is_a_dead_letter() -> None:
    proc = _proc()
    proc.on_message(_batch([1], [T0]), 0)
    other = RecordBatch(
        "traffic", ("sms_in", "sms_out"), 600, np.array([1], np.uint32), np.array([T0]), np.ones((1, 2))
    ).encode()
    out = proc.on_message(other, 1)
    assert "columns/step changed" in out.deadletters[0].reason
    assert out.deadletters[0].original == other
    # the open windows are untouched: the first record is still emitted
    out = proc.on_message(_batch([1], [T0 + STEP_MS], [2.0], watermark_ms=T0 + HOUR_MS), 2)
    _, _, hva = _features([out], 3600)
    assert_array_equal(hva, [[3.0, 2.0]])


def test_late_records_become_a_dead_letter_carrying_them() -> None:
    proc = _proc()
    proc.on_message(_batch([1], [T0], [1.0], watermark_ms=T0 + STEP_MS), 0)
    out = proc.on_message(_batch([5, 6], [T0, T0 + STEP_MS], [7.0, 8.0], watermark_ms=T0 + 2 * STEP_MS), 1)
    late = [d for d in out.deadletters if d.reason.startswith("late")]
    assert len(late) == 1, "only the 10-minute window of T0 is closed; the hour is still open"
    assert late[0].position == f"{TOPIC}[2]@1"
    back = decode(late[0].original)
    assert_array_equal(back.squares, [5])
    assert_array_equal(back.values, [[7.0]])
    assert proc.counters["late"] == 1
    sq, st, _ = _features([out], 600)
    assert_array_equal(sq, [6])
    assert_array_equal(st, [T0 + STEP_MS])
    # the hourly window still counts the record that was late only for the 10-minute window
    out = proc.on_message(_batch([], [], watermark_ms=T0 + HOUR_MS), 2)
    hsq, _, hva = _features([out], 3600)
    assert_array_equal(hsq, [1, 5, 6])
    assert_array_equal(hva, [[1.0, 1.0], [7.0, 1.0], [8.0, 1.0]])


# --- runs and markers -------------------------------------------------------------------------------


def test_final_message_reports_sent_and_received_for_its_run() -> None:
    proc = _proc()
    proc.on_message(_batch([1, 2, 3], [T0] * 3, run="a"), 0)
    proc.on_message(_batch([1, 2], [T0 + STEP_MS] * 2, run="b"), 1)
    proc.on_message(_batch([4], [T0 + STEP_MS], run="b"), 2)
    final = RecordBatch.empty(
        "traffic", ("internet",), 600, run="b", final=True, sent=4, watermark_ms=T0 + HOUR_MS
    )
    out = proc.on_message(final.encode(), 3)
    markers = [b for b in out.features if b.final]
    assert len(markers) == 1
    marker = markers[0]
    assert out.features[-1] is marker, "the marker follows the features the final watermark closed"
    assert (marker.run, marker.sent, marker.extra) == ("b", 4, {"received": 3})
    assert marker.watermark_ms == T0 + HOUR_MS
    assert len(marker) == 0
    assert sum(len(b) for b in out.features if b.step_s == 3600) == 4  # squares 1..4 in the closed hour
    assert out.safe_offset == 4


# --- hourly input and watermark-less streams ---------------------------------------------------------


def test_hourly_step_input_produces_only_hourly_windows(hourly_two_days: TrafficTable) -> None:
    proc = PartitionProcessor(TOPIC, 0, WorkerSettings())
    outs = _run(_replay_messages(hourly_two_days, 1)[0], proc)
    assert set(proc.windows) == {3600}
    assert {b.step_s for o in outs for b in o.features if not b.final} == {3600}
    sq, st, va = _features(outs, 3600)
    assert_array_equal(st, hourly_two_days.starts_ms)
    assert_array_equal(sq, hourly_two_days.squares)
    assert_array_equal(va, np.column_stack([hourly_two_days.values, np.ones(len(hourly_two_days))]))
    assert outs[-1].features[-1].extra == {"received": 48 * 150}


def test_hourly_input_with_a_daily_window_skips_the_shorter_ones() -> None:
    proc = _proc(windows_s=(600, 1800, 3600, 7200))
    hourly = RecordBatch(
        "traffic", ("activity",), 3600, np.array([1, 1], np.uint32), np.array([T0 + HOUR_MS, T0 + 2 * HOUR_MS]),
        np.array([[2.0], [3.0]]), watermark_ms=T0 + 3 * HOUR_MS,
    )  # fmt: skip
    out = proc.on_message(hourly.encode(), 0)
    assert set(proc.windows) == {3600, 7200}
    assert sorted((b.step_s, len(b)) for b in out.features) == [(3600, 2), (7200, 1)]
    assert_array_equal(next(b for b in out.features if b.step_s == 7200).values, [[5.0, 2.0]])


def test_without_watermarks_a_window_closes_when_a_later_interval_arrives() -> None:
    proc = _proc()
    out = proc.on_message(_batch([1, 2], [T0, T0], [1.0, 2.0]), 0)
    assert out.features == []
    assert out.safe_offset == 0
    out = proc.on_message(_batch([1], [T0], [4.0]), 1)  # same interval again: nothing closes
    assert out.features == []
    out = proc.on_message(_batch([2], [T0 + STEP_MS], [8.0]), 2)
    assert [b.step_s for b in out.features] == [600]
    sq, st, va = _features([out], 600)
    assert_array_equal(sq, [1, 2])
    assert_array_equal(st, [T0, T0])
    assert_array_equal(va, [[5.0, 2.0], [2.0, 1.0]])
    assert out.safe_offset == 0, "the hour opened at offset 0 is still open"
    for i in range(2, 6):
        out = proc.on_message(_batch([1], [T0 + i * STEP_MS]), 1 + i)
        assert all(b.step_s == 600 for b in out.features)
    out = proc.on_message(_batch([3], [T0 + HOUR_MS], [1.0]), 7)  # the next hour starts: the first closes
    hsq, _, hva = _features([out], 3600)
    assert_array_equal(hsq, [1, 2])
    assert_array_equal(hva, [[9.0, 6.0], [10.0, 2.0]])
    assert out.safe_offset == 7, "only the window opened at offset 7 is still open"


def test_allowed_lateness_keeps_windows_open_longer() -> None:
    proc = _proc(allowed_lateness_s=600)
    proc.on_message(_batch([1], [T0]), 0)
    assert proc.on_message(_batch([1], [T0 + STEP_MS]), 1).features == []
    out = proc.on_message(_batch([1], [T0 + 2 * STEP_MS]), 2)
    _, st, _ = _features([out], 600)
    assert_array_equal(st, [T0])
    # a record for the interval just behind the newest is still on time
    assert proc.on_message(_batch([2], [T0 + STEP_MS]), 3).deadletters == []


def test_explicit_watermark_never_regresses() -> None:
    proc = _proc()
    proc.on_message(_batch([1], [T0], watermark_ms=T0 + HOUR_MS), 0)
    proc.on_message(_batch([], [], watermark_ms=T0), 1)
    assert proc.watermark_ms == T0 + HOUR_MS
    out = proc.on_message(_batch([2], [T0 + STEP_MS]), 2)
    # late for both window lengths, one dead letter each
    assert [d.reason.split(":")[0] for d in out.deadletters] == ["late", "late"]
    assert out.features == []
