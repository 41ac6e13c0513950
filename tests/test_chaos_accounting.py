"""The bookkeeping of bench/chaos.py without services: row comparison, fuzz plans, dead-letter accounting."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from bench.chaos import (
    FuzzPlan,
    FuzzTopic,
    compare_rows,
    expected_hourly,
    mutate_message,
    plan_fuzz,
    worker_windows_refuses,
)
from bench.chaos import judge_deadletters as judge
from ingest.schema import ACTIVITY_COLUMNS, RecordBatch, decode


def frame(rows: dict[tuple[int, int], float]) -> pd.DataFrame:
    index = pd.MultiIndex.from_tuples(list(rows), names=["square", "start"])
    return pd.DataFrame({"internet": list(rows.values())}, index=index)


def test_compare_rows_tells_missing_extra_wrong_and_duplicated_apart() -> None:
    expected = frame({(1, 0): 1.0, (1, 600_000): 2.0, (2, 0): 3.0, (2, 600_000): 4.0})
    got = frame({(1, 0): 1.0, (1, 600_000): 4.0, (2, 0): 2.5, (3, 0): 9.0})  # doubled, short, extra
    assert compare_rows(expected, got) == {
        "expected": 4,
        "found": 1,
        "missing": 1,
        "extra": 1,
        "wrong": 2,
        "duplicated": 1,
    }
    assert compare_rows(expected, expected.copy())["found"] == 4


def test_expected_hourly_sums_and_counts_the_intervals_of_each_hour() -> None:
    idx = pd.MultiIndex.from_tuples([(1, 0), (1, 600_000), (1, 3_600_000)], names=["square", "start"])
    traffic = pd.DataFrame({c: [1.0, 2.0, 5.0] for c in ACTIVITY_COLUMNS}, index=idx)
    hourly = expected_hourly(traffic)
    assert hourly["internet"].tolist() == [3.0, 5.0] and hourly["n_intervals"].tolist() == [2, 1]


def test_a_fuzz_plan_holds_only_messages_the_consumer_refuses() -> None:
    valid = RecordBatch(
        "traffic",
        ACTIVITY_COLUMNS,
        600,
        np.array([7, 8], np.uint32),
        np.array([0, 600_000], np.int64),
        np.ones((2, 5)),
        watermark_ms=600_000,
        run="r",
    ).encode()
    assert not worker_windows_refuses(valid)
    spec = FuzzTopic("t", [(None, valid)], worker_windows_refuses, known=("kind", "step_s"))
    plan = plan_fuzz(spec, 300, np.random.default_rng(3))
    assert len(plan.messages) == 300 and plan.skipped_valid > 0  # some mutants stay valid: left out
    assert all(worker_windows_refuses(v) for _, v in plan.messages)
    # every kind of damage is there: nulls, truncations, random bytes and headers still framed as batches
    values = [v for _, v in plan.messages]
    assert None in values and any(v is not None and len(v) < 8 for v in values)
    assert sum(v is not None and v[:4] == b"NTB1" for v in values) > 100


def test_a_header_mutation_keeps_the_frame_so_decode_reads_the_header() -> None:
    valid = RecordBatch.empty("traffic", ACTIVITY_COLUMNS, 600, run="r").encode()
    rng = np.random.default_rng(0)
    framed = 0
    for _ in range(200):
        out = mutate_message(valid, rng, json_record=False, known=("step_s",))
        if out is None or out[:4] != b"NTB1" or len(out) < 8:
            continue
        hlen = int.from_bytes(out[4:8], "little")
        try:
            header = json.loads(out[8 : 8 + hlen])
        except ValueError:
            continue
        if isinstance(header, dict):
            framed += 1
            assert (8 + hlen) % 8 == 0  # the body stays aligned as encode() writes it
    assert framed > 50
    decode(valid)


def test_dead_letters_are_matched_by_topic_partition_and_offset() -> None:
    plans = [
        FuzzPlan("a", [(None, b"x")] * 3, 0, [(0, 1), (0, 2), (1, 5)]),
        FuzzPlan("snap", [(None, b"x")] * 2, 0, [(0, 0), (0, 1)]),
    ]
    specs = [FuzzTopic("a", [], bool), FuzzTopic("snap", [], bool, snapshot=True)]
    letters = [
        ("worker", "a", 0, 1),
        ("worker", "a", 0, 1),  # the same stage twice: a repeat
        ("store", "a", 0, 2),  # another stage reading the same topic may dead-letter it too
        ("store", "a", 0, 3),  # not a bad message: good input lost
        ("twins", "snap", 0, 0),
        ("twins", "snap", 0, 0),  # re-read at a restart: allowed on a snapshot topic
        ("twins", "snap", 0, 1),
    ]
    out = judge(plans, specs, letters)
    assert out["a"]["deadlettered"] == 2 and out["a"]["missed"] == 1 and out["a"]["extra"] == 1
    assert out["a"]["repeated"] == 1 and not out["a"]["ok"]
    assert out["a"]["missed_examples"] == ["[1]@5: b'x'"]
    assert out["snap"]["ok"] and out["snap"]["repeated"] == 1
