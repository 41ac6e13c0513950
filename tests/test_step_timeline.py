"""``bench.step_timeline`` reads a run's produce times back from the real broker."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bench.step_timeline import timeline
from ingest.kafka import make_producer
from ingest.schema import RecordBatch
from ingest.settings import NettwinSettings
from ingest.sources.record import Record
from ingest.sources.wire import encode_records
from ingest.topics import Topics

pytestmark = pytest.mark.integration

STEP_MS = 60_000
T = 1_700_000_040_000 - 1_700_000_040_000 % STEP_MS


def _rows(kind: str, columns: tuple[str, ...], start_ms: int, values: list[float]) -> bytes:
    return RecordBatch(
        kind, columns, 60, np.array([1], np.uint32), np.array([start_ms], np.int64), np.array([values])
    ).encode()


def test_a_step_is_timed_from_the_next_steps_records_to_its_forecasts(isolated: NettwinSettings) -> None:
    topics = Topics.from_settings(isolated)
    producer = make_producer(isolated)

    def send(topic: str, value: bytes) -> None:
        producer.send(topic, value=value, partition=0).get(timeout=30)
        time.sleep(0.05)  # distinct produce times, in this order

    record = Record("e1", T + STEP_MS + 5_000, {"v": 1.0}, source="s")
    send(topics.telemetry_records, encode_records([record], {"e1": 1}, "s").encode())  # step T closes
    send(topics.features_twins, _rows("features", ("v", "n_values"), T, [1.0, 1.0]))
    send(topics.forecasts, _rows("forecast", ("predicted", "cluster"), T + STEP_MS, [2.0, 0.0]))
    # an outcome (the same kind, with the actual value) completes an older step: not this step's forecast
    outcome = ("predicted", "actual", "abs_error", "flagged", "cluster")
    send(topics.forecasts, _rows("forecast", outcome, T + STEP_MS, [2.0, 2.5, 0.5, 0.0, 0.0]))
    producer.flush()
    [step] = timeline(isolated, isolated.kafka.topic_prefix, STEP_MS, 10)
    assert step["step_ms"] == T
    first, last = step["windows_ms"]
    assert 0 < first == last < step["forecasts_sent_ms"][0]
    assert len(step["forecasts_sent_ms"]) == 1
