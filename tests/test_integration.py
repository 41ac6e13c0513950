"""Integration tier on the real broker and InfluxDB: delivery guarantees and failure handling."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from kafka import TopicPartition

from ingest.kafka import make_consumer, make_producer
from ingest.readers.milan import read_raw
from ingest.schema import N_INTERVALS, RecordBatch
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from nettwin.cli.query import read_deadletters
from producers.replay import Replayer
from tests.conftest import SHARED_MILAN, Pipeline, wait_until
from twin_store.adapters.influx import InfluxClient, InfluxRefused
from twin_store.services.store import TwinStore, wait_for_run

pytestmark = pytest.mark.integration

DAY = SHARED_MILAN / "raw_2013-11-01_26squares.txt"
T0 = 1_383_260_400_000


def features(n_squares: int, start_ms: int) -> RecordBatch:
    sq = np.arange(1, n_squares + 1, dtype=np.uint32)
    vals = np.column_stack([np.full((n_squares, 5), 1.5), np.ones(n_squares)])
    return RecordBatch(
        "features",
        ("sms_in", "sms_out", "call_in", "call_out", "internet", N_INTERVALS),
        600,
        sq,
        np.full(n_squares, start_ms, np.int64),
        vals,
        closed_ms=int(time.time() * 1000),
    )


def committed_total(settings: NettwinSettings) -> int:
    topic = Topics.from_settings(settings).features_traffic
    probe = make_consumer(settings, group_id=f"{settings.kafka.topic_prefix}nettwin-store")
    try:
        return sum(probe.committed(TopicPartition(topic, p)) or 0 for p in range(settings.kafka.partitions))
    finally:
        probe.close()


def count(influx: InfluxClient, measurement: str) -> int:
    """Rows of a measurement; an empty one has no series (0). Any error fails the test: the database exists."""
    series = influx.query(f'SELECT count("internet") FROM "{measurement}"')
    return int(series[0].values[0][1]) if series else 0


def test_store_stops_on_a_missing_database_having_committed_nothing(isolated: NettwinSettings) -> None:
    """HTTP 404 cannot heal by retrying: the store stops with one clear error instead of retrying forever, and
    commits nothing. (Retrying a real outage until InfluxDB is back: tests/test_faults_store.py.)"""
    topics = Topics.from_settings(isolated)
    store = TwinStore(isolated)
    influx = InfluxClient(isolated.influx)
    influx.drop_database(isolated.influx.database)  # the database disappears under the running store
    producer = make_producer(isolated)
    for i in range(3):
        producer.send(topics.features_traffic, features(10, T0 + i * 600_000).encode(), partition=i)
    producer.flush()
    producer.close()
    try:
        with pytest.raises(InfluxRefused, match=r"HTTP 404.*database not found"):
            store.run(max_seconds=60)
        assert committed_total(isolated) == 0
        assert store.counters.records == 0 and store.counters.write_retries == 0
    finally:
        influx.create_database()  # for the fixture's clean-up
        influx.close()


@pytest.mark.slow
@pytest.mark.skipif(not DAY.exists(), reason=f"real data not found at {DAY}")
def test_worker_killed_mid_hour_rebuilds_the_open_hour(pipeline: Pipeline) -> None:
    """Input of still-open windows is not acknowledged, so a restarted worker re-reads it: no partial hour."""
    settings = pipeline.settings
    table = read_raw(DAY)
    first = table.starts_ms < T0 + 21 * 600_000  # 3.5 hours: the fourth hour is half done
    producer = make_producer(settings)
    # a speed high enough not to wait, but with per-interval messages (as at --speed), not packed ones
    replayer = Replayer.for_settings(settings, producer, 1e9, run="restart")

    def part(mask: np.ndarray) -> object:
        return type(table)(
            table.source,
            table.columns,
            table.step_s,
            table.squares[mask],
            table.starts_ms[mask],
            table.values[mask],
        )

    replayer.publish_table(part(first))  # type: ignore[arg-type]
    producer.flush()
    with InfluxClient(settings.influx) as influx:
        wait_until(lambda: count(influx, "traffic") == int(first.sum()), 60, "the first 21 intervals")
        assert count(influx, "traffic_hourly") > 0
        time.sleep(2.5)  # let the worker commit what it acknowledged
        pipeline.stop("worker", kill=True)
        pipeline.start("worker")
        replayer.publish_table(part(~first))  # type: ignore[arg-type]
        replayer.finish()
        producer.close()
        # `received` counts what the restarted worker read: the re-read open hour plus the rest
        rows = wait_for_run(influx, "restart", settings.kafka.partitions, timeout_s=90)
        assert len(table) - int(first.sum()) < sum(int(r["received"]) for r in rows) < len(table)
        hourly = [
            r
            for s in influx.query('SELECT * FROM "traffic_hourly" WHERE time = 1383271200000ms')
            for r in s.rows()
        ]
    fourth_hour = table.starts_ms // 3_600_000 * 3_600_000 == T0 + 3 * 3_600_000
    expected = {int(s): 0 for s in table.squares[fourth_hour]}
    for s in table.squares[fourth_hour].tolist():
        expected[s] += 1
    assert {int(r["entity"]): int(r[N_INTERVALS]) for r in hourly} == expected
    got_internet = {int(r["entity"]): r["internet"] for r in hourly}
    for s in expected:
        mask = fourth_hour & (table.squares == s)
        np.testing.assert_allclose(got_internet[s], table.values[mask, 4].sum(), rtol=1e-12)


def test_worker_deadletters_a_malformed_message_and_keeps_going(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    topics = Topics.from_settings(settings)
    producer = make_producer(settings)
    producer.send(topics.telemetry_milan, b"definitely not a record batch", partition=2)
    good = RecordBatch(
        "traffic",
        ("sms_in", "sms_out", "call_in", "call_out", "internet"),
        600,
        np.array([2, 6], np.uint32),
        np.full(2, T0, np.int64),
        np.ones((2, 5)),
        watermark_ms=T0 + 600_000,
    )
    producer.send(topics.telemetry_milan, good.encode(), partition=2)
    producer.flush()
    producer.close()
    with InfluxClient(settings.influx) as influx:
        wait_until(lambda: count(influx, "traffic") == 2, 60, "the good message to arrive")
    letters = wait_until(lambda: read_deadletters(settings, 10, timeout_s=1), 30, "the dead letter")
    assert len(letters) == 1
    assert letters[0].original == b"definitely not a record batch"
    assert letters[0].stage == "worker" and "bad magic" in letters[0].reason
    assert letters[0].position.startswith(f"{topics.telemetry_milan}[2]@")
    pipeline.assert_running()


def test_store_restart_does_not_duplicate_first_twin_rows(isolated: NettwinSettings) -> None:
    topics = Topics.from_settings(isolated)
    producer = make_producer(isolated)
    producer.send(topics.features_traffic, features(5, T0).encode(), partition=0)
    producer.flush()
    TwinStore(isolated).run(idle_exit_s=3, max_seconds=30)
    producer.send(topics.features_traffic, features(8, T0 + 600_000).encode(), partition=0)
    producer.flush()
    producer.close()
    TwinStore(isolated).run(idle_exit_s=3, max_seconds=30)
    with InfluxClient(isolated.influx) as influx:
        rows = [r for s in influx.query('SELECT * FROM "twin"') for r in s.rows()]
    assert sorted(int(r["twin_id"]) for r in rows) == list(range(1, 9))


def test_replayed_bad_file_keeps_every_line(isolated: NettwinSettings, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(b"hello\nworld\x00\xff\n")
    res = run_cli(isolated, "replay", "milan", str(garbage), "--max")
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert "no valid raw records in 2 line(s)" in res.stderr
    letters = read_deadletters(isolated, 10, timeout_s=2)
    assert [d.original for d in letters] == [b"hello", b"world\x00\xff"]
