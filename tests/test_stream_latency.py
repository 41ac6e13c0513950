"""Latency of the streaming path (issue 16): what each stage waits for before it hands data on.

No timing assertions: these check the settings and the time stamps that decide the lag, which are facts on a
loaded machine too. The lag itself is measured by ``bench/ingest.py`` (``speed600``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from ingest.kafka import STREAM_FETCH_MAX_WAIT_MS, make_producer
from ingest.schema import N_INTERVALS, RecordBatch
from ingest.settings import NettwinSettings, load_settings
from ingest.topics import Topics
from stream_processors.worker import build_app
from twin_store.adapters.influx import InfluxClient
from twin_store.services.store import TwinStore

T0 = 1_383_260_400_000


def test_the_worker_consumer_waits_at_most_the_stream_fetch_wait(tmp_path: Path) -> None:
    """Faust fixes 1,500 ms, and Tansu holds a waiting fetch late: that was up to 0.75 s of every window's lag."""
    app = build_app(load_settings({"state_dir": str(tmp_path)}))

    async def created_wait() -> int:
        consumer = app.consumer._thread._create_worker_consumer(app.transport)  # what the worker starts
        try:
            return int(consumer._fetch_max_wait_ms)
        finally:
            await consumer.stop()

    assert asyncio.run(created_wait()) == STREAM_FETCH_MAX_WAIT_MS <= 200


@pytest.mark.integration
def test_the_store_consumer_waits_at_most_the_stream_fetch_wait(isolated: NettwinSettings) -> None:
    store = TwinStore(isolated)
    try:
        assert store.consumer.config["fetch_max_wait_ms"] == STREAM_FETCH_MAX_WAIT_MS
    finally:
        store.close()


@pytest.mark.integration
def test_the_lag_ends_when_influxdb_acknowledged_the_data_not_when_the_store_commits(
    isolated: NettwinSettings,
) -> None:
    """The store settles a poll (progress rows, commit) whenever its loop gets to it, up to a poll timeout after
    the write; the ``pipeline`` row's lag must stop at the write's acknowledgement."""
    closed_ms = int(time.time() * 1000)
    batch = RecordBatch(
        "features",
        ("sms_in", "sms_out", "call_in", "call_out", "internet", N_INTERVALS),
        600,
        np.arange(1, 6, dtype=np.uint32),
        np.full(5, T0, np.int64),
        np.column_stack([np.full((5, 5), 1.5), np.ones(5)]),
        closed_ms=closed_ms,
        run="lag",
    )
    producer = make_producer(isolated)
    producer.send(Topics.from_settings(isolated).features_traffic, batch.encode(), partition=0)
    producer.flush()
    producer.close()
    store = TwinStore(isolated)
    try:
        deadline = time.monotonic() + 60
        polled: dict[object, list[object]] = {}
        while not polled and time.monotonic() < deadline:
            polled = store.consumer.poll(timeout_ms=500)
        assert polled, "the feature message did not arrive"
        store.process(polled)
        for f in store.inflight[0].futures:
            f.result()
        written_ms = int(time.time() * 1000)
        time.sleep(2.0)  # the loop reaches the settling late
        store._settle(block=True)
    finally:
        store.close()
    with InfluxClient(isolated.influx) as influx:
        rows = [r for s in influx.query('SELECT lag_ms FROM "pipeline"') for r in s.rows()]
    assert len(rows) == 1
    assert rows[0]["lag_ms"] <= written_ms - closed_ms
