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
from typing import Any

import numpy as np

from ingest.errors import InputError
from ingest.kafka import MAX_RECORDS_PER_MESSAGE
from ingest.readers.sensors import SensorTable, source_id
from ingest.schema import RecordBatch
from producers.replay import Publisher, ReplaySummary

SENSOR_COLUMNS = ("value",)
TICK_WALL_S = 0.05


def _nominal_step_s(times_ms: np.ndarray) -> int:
    """Median spacing of a source's readings in whole seconds (at least 1): header ``step_s``."""
    if times_ms.shape[0] < 2:
        return 1
    return max(1, int(np.median(np.diff(times_ms)) // 1000))


class SensorReplayer(Publisher):
    """``publish(tables)`` once with every file's readings, then ``finish()``."""

    topic_name = "telemetry_sensors"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names: list[str] = []
        self.wire = np.empty(0, np.int64)
        self.steps: dict[int, int] = {}

    def publish(self, tables: list[SensorTable]) -> None:
        s = self.summary
        names: list[str] = []
        index: dict[str, int] = {}
        ids, times, values = [], [], []
        for table in tables:
            self._read_file(table.lines, table.bad)
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
        self._count_sent(p, int(sel.shape[0]))
        self.on_records(int(sel.shape[0]))

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
            self._send(p, marker)
        return self._finished()
