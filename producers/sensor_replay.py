"""Replay sensor readings into ``telemetry.sensors``, batched per source.

Each Kafka message holds readings of one source (key = the source name; partition = ``source_id % P``, so a
source always lands on one partition and the worker sees its readings in order) as a ``sensor`` record
batch (``ingest/schema.py``): ``squares`` = source ids, ``starts_ms`` = event times, one ``value`` column,
``extra.sources`` = id -> name.

All files are merged into one stream in event-time order (stable: a file's own order breaks ties). With
``--speed`` the replay clock releases readings as event time passes, in ticks of at most 50 ms wall time
(one message per source and tick); as fast as possible, each source's readings go in messages of up to
``MAX_RECORDS_PER_MESSAGE``. At the end every partition gets a final marker with the run id and the number
of readings sent there, as for Milan traffic.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from ingest.deadletter import DeadLetterSink
from ingest.kafka import MAX_RECORDS_PER_MESSAGE
from ingest.schema import RecordBatch
from ingest.sensors import SensorTable, source_id
from ingest.topics import Topics
from nettwin.errors import InputError, ServiceError
from nettwin.settings import NettwinSettings
from producers.replay import ReplayClock, ReplaySummary

SENSOR_COLUMNS = ("value",)
TICK_WALL_S = 0.05


def _nominal_step_s(times_ms: np.ndarray) -> int:
    """Median spacing of a source's readings in whole seconds (at least 1): header ``step_s``."""
    if times_ms.shape[0] < 2:
        return 1
    return max(1, int(np.median(np.diff(times_ms)) // 1000))


class SensorReplayer:
    """``publish(tables)`` once with every file's readings, then ``finish()``."""

    def __init__(
        self,
        producer: Any,
        topic: str,
        partitions: int,
        deadletters: DeadLetterSink,
        clock: ReplayClock,
        limit: int | None = None,
        on_records: Callable[[int], None] | None = None,
        run: str | None = None,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.partitions = partitions
        self.deadletters = deadletters
        self.clock = clock
        self.limit = limit
        self.on_records = on_records or (lambda n: None)
        self.summary = ReplaySummary(run=run or uuid.uuid4().hex[:12])
        self.sent = np.zeros(partitions, np.int64)
        self.futures: list[Any] = []
        self.started = time.monotonic()
        self.names: list[str] = []
        self.wire = np.empty(0, np.int64)
        self.steps: dict[int, int] = {}

    @classmethod
    def for_settings(
        cls, settings: NettwinSettings, producer: Any, speed: float | None, **kwargs: Any
    ) -> SensorReplayer:
        topics = Topics.from_settings(settings)
        return cls(
            producer,
            topics.telemetry_sensors,
            settings.kafka.partitions,
            DeadLetterSink(producer, topics.deadletter),
            ReplayClock(speed),
            **kwargs,
        )

    def publish(self, tables: list[SensorTable]) -> None:
        s = self.summary
        names: list[str] = []
        index: dict[str, int] = {}
        ids, times, values = [], [], []
        for table in tables:
            s.files += 1
            s.lines += table.lines
            for letter in table.bad:
                self.deadletters.send(letter)
            s.malformed += len(table.bad)
            local = []
            for name in table.sources:
                if name in index:
                    raise InputError(f"{table.path}: source {name!r} also comes from an earlier file")
                index[name] = len(names)
                names.append(name)
                local.append(index[name])
            ids.append(np.array(local, np.int64)[table.source_idx] if len(table) else np.empty(0, np.int64))
            times.append(table.times_ms)
            values.append(table.values)
        wire = np.array([source_id(n) for n in names], np.int64)
        if len(set(wire.tolist())) != len(names):
            raise InputError("two source names share a wire id (CRC-32); rename one with --source")
        src = np.concatenate(ids) if ids else np.empty(0, np.int64)
        t = np.concatenate(times) if times else np.empty(0, np.int64)
        v = np.concatenate(values) if values else np.empty(0)
        order = np.argsort(t, kind="stable")
        n = order.shape[0] if self.limit is None else min(order.shape[0], self.limit)
        order = order[:n]
        src, t, v = src[order], t[order], v[order]
        self.names, self.wire = names, wire
        if n == 0:
            return
        # each source's readings, in time order: positions grouped by source
        by_source = np.argsort(src, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(src[by_source]) != 0])
        groups = np.split(by_source, starts[1:])
        self.steps = {int(src[g[0]]): _nominal_step_s(t[g]) for g in groups}
        if self.clock.speed is None:
            for g in groups:
                for a in range(0, g.shape[0], MAX_RECORDS_PER_MESSAGE):
                    self._send_source(int(src[g[0]]), g[a : a + MAX_RECORDS_PER_MESSAGE], t, v)
        else:
            tick_ms = max(1, int(self.clock.speed * TICK_WALL_S * 1000))
            ticks = (t - t[0]) // tick_ms
            cuts = np.flatnonzero(np.diff(ticks)) + 1
            bounds = np.concatenate([[0], cuts, [n]]).tolist()
            for a, b in itertools.pairwise(bounds):
                self.clock.wait_until(int(t[b - 1]))
                part = src[a:b]
                for i in np.unique(part).tolist():
                    self._send_source(i, a + np.flatnonzero(part == i), t, v)
        s.records += n
        s.first_ms = int(t.min())
        s.last_ms = int(t.max())

    def _send_source(self, i: int, sel: np.ndarray, t: np.ndarray, v: np.ndarray) -> None:
        wire_id = int(self.wire[i])
        batch = RecordBatch(
            kind="sensor",
            columns=SENSOR_COLUMNS,
            step_s=self.steps[i],
            squares=np.full(sel.shape[0], wire_id, np.uint32),
            starts_ms=t[sel],
            values=v[sel].reshape(-1, 1),
            run=self.summary.run,
            extra={"sources": {str(wire_id): self.names[i]}},
        )
        p = wire_id % self.partitions
        self._send(p, batch, self.names[i].encode())
        self.sent[p] += sel.shape[0]
        self.summary.per_partition[p] = int(self.sent[p])
        self.on_records(int(sel.shape[0]))

    def _send(self, partition: int, batch: RecordBatch, key: bytes | None) -> None:
        future = self.producer.send(self.topic, value=batch.encode(), key=key, partition=partition)
        self.futures.append(future)
        self.summary.messages += 1
        if len(self.futures) >= 1000:
            self._settle()

    def _settle(self) -> None:
        self.producer.flush()
        for f in self.futures:
            exc = f.exception if f.is_done else None
            if exc is not None:
                raise ServiceError(f"publishing to {self.topic} failed: {exc}") from exc
        self.futures = []

    def finish(self) -> ReplaySummary:
        """Send each partition its final marker (run id + readings sent there), flush, return the summary."""
        for p in range(self.partitions):
            marker = RecordBatch.empty(
                "sensor",
                SENSOR_COLUMNS,
                1,
                run=self.summary.run,
                final=True,
                sent=int(self.sent[p]),
                closed_ms=int(time.time() * 1000),
                extra={"sources": {}},
            )
            self._send(p, marker, None)
        self._settle()
        self.summary.seconds = time.monotonic() - self.started
        return self.summary
