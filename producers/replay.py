"""Replay traffic files into Kafka as a live stream, batched: one message per (partition, interval).

Square ``s`` always goes to partition ``s % partitions`` so the worker's per-square windows stay in one
place. After each interval every partition gets a message whose ``watermark_ms`` says the partition is
complete up to the interval's end (an empty batch where a partition had no squares), so windows close as
soon as their data is in rather than when the next interval happens to arrive. A final message per
partition carries the run id and how many records the run sent there, for end-to-end completeness checks.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from ingest.deadletter import DeadLetter, DeadLetterSink
from ingest.errors import InputError, ServiceError
from ingest.kafka import MAX_RECORDS_PER_MESSAGE
from ingest.readers.milan import TrafficTable, check_file, read_hourly, read_raw
from ingest.schema import PLAUSIBLE_MS, RecordBatch, validate
from ingest.settings import NettwinSettings
from ingest.topics import Topics


def _opt_min(a: int | None, b: int) -> int:
    return b if a is None else min(a, b)


def _opt_max(a: int | None, b: int) -> int:
    return b if a is None else max(a, b)


class ReplayClock:
    """Maps event time to wall time: event time runs ``speed`` x real time; ``speed=None`` means no waiting."""

    def __init__(self, speed: float | None, sleep: Callable[[float], None] = time.sleep) -> None:
        if speed is not None and speed <= 0:
            raise InputError(f"--speed must be positive, got {speed}")
        self.speed = speed
        self.sleep = sleep
        self.event0: int | None = None
        self.wall0 = 0.0

    def wait_until(self, event_ms: int) -> None:
        if self.speed is None:
            return
        if self.event0 is None:
            self.event0, self.wall0 = event_ms, time.monotonic()
            return
        due = self.wall0 + (event_ms - self.event0) / 1000.0 / self.speed
        delay = due - time.monotonic()
        if delay > 0:
            self.sleep(delay)


@dataclass
class ReplaySummary:
    run: str
    files: int = 0
    lines: int = 0
    records: int = 0
    malformed: int = 0
    messages: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    seconds: float = 0.0
    per_partition: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        rate = self.records / self.seconds if self.seconds > 0 else None
        return {
            "run": self.run,
            "files": self.files,
            "lines": self.lines,
            "records": self.records,
            "malformed": self.malformed,
            "messages": self.messages,
            "first_ms": self.first_ms,
            "last_ms": self.last_ms,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(rate, 1) if rate else None,
        }


def load_table(path: Path, fmt: str) -> TrafficTable:
    check_file(path)
    if fmt == "raw":
        return read_raw(path)
    if fmt == "hourly":
        return read_hourly(path)
    raise InputError(f"unknown format {fmt!r} (raw or hourly)")


class Publisher:
    """What every replay shares: the producer and its topic, dead letters, the clock, the limit, the summary,
    per-partition counts, and sends whose futures are settled every 1000 messages (an error raises)."""

    topic_name: str  # the ``Topics`` field ``for_settings`` publishes to, set by each kind of replay

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

    @classmethod
    def for_settings(
        cls, settings: NettwinSettings, producer: Any, speed: float | None, **kwargs: Any
    ) -> Self:
        """Replay into the settings' topic for this kind of data, dead letters to its dead-letter topic."""
        topics = Topics.from_settings(settings)
        return cls(
            producer,
            getattr(topics, cls.topic_name),
            settings.kafka.partitions,
            DeadLetterSink(producer, topics.deadletter),
            ReplayClock(speed),
            **kwargs,
        )

    def _read_file(self, lines: int, bad: list[DeadLetter]) -> None:
        """Count one input file and dead-letter its malformed lines."""
        s = self.summary
        s.files += 1
        s.lines += lines
        for letter in bad:
            self.deadletters.send(letter)
        s.malformed += len(bad)

    def _count_sent(self, partition: int, n: int) -> None:
        self.sent[partition] += n
        self.summary.per_partition[partition] = int(self.sent[partition])

    def _send(self, partition: int, batch: RecordBatch, key: bytes | None = None) -> None:
        self.futures.append(
            self.producer.send(self.topic, value=batch.encode(), key=key, partition=partition)
        )
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

    def _finished(self) -> ReplaySummary:
        self._settle()
        self.summary.seconds = time.monotonic() - self.started
        return self.summary


class Replayer(Publisher):
    """Publishes Milan traffic tables; ``publish_table`` per file, ``finish`` at the end."""

    topic_name = "telemetry_milan"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.columns: tuple[str, ...] | None = None
        self.step_s: int | None = None

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.summary.records >= self.limit

    def publish_table(self, table: TrafficTable) -> None:
        s = self.summary
        table = self._without_invalid_records(table)
        self._read_file(table.lines, table.bad)
        if self.columns is None:
            self.columns, self.step_s = table.columns, table.step_s
        elif (self.columns, self.step_s) != (table.columns, table.step_s):
            raise InputError(f"{table.source}: layout differs from the earlier files of this replay")
        n = len(table)
        if self.limit is not None:
            n = min(n, self.limit - s.records)
        if n <= 0:
            return
        if self.clock.speed is None:
            self._publish_packed(table, n)
        else:
            starts = table.starts_ms[:n]
            # table rows are sorted by start: split points of each interval
            cuts = np.flatnonzero(np.diff(starts)) + 1
            bounds = np.concatenate([[0], cuts, [n]])
            step_ms = table.step_s * 1000
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                start = int(starts[a])
                self.clock.wait_until(start + step_ms)
                self._publish_interval(table, a, b, start + step_ms)
        s.first_ms = _opt_min(s.first_ms, int(table.starts_ms[0]))
        s.last_ms = _opt_max(s.last_ms, int(table.starts_ms[n - 1]))
        s.records += n

    @staticmethod
    def _without_invalid_records(table: TrafficTable) -> TrafficTable:
        """Drop the records the worker would refuse, each a dead letter of its own: one bad record packed into
        a message would cost the message's every record."""
        bad_letters = list(table.bad)
        keep = np.ones(len(table), bool)
        suspect = (
            ~np.isfinite(table.values).all(axis=1)
            | (table.values < 0).any(axis=1)
            | (table.squares == 0)
            | (table.starts_ms % (table.step_s * 1000) != 0)
            | (table.starts_ms < PLAUSIBLE_MS[0])
            | (table.starts_ms >= PLAUSIBLE_MS[1])
        )
        if not suspect.any():
            return table
        for i in np.flatnonzero(suspect).tolist():
            one = RecordBatch(
                "traffic",
                table.columns,
                table.step_s,
                table.squares[i : i + 1],
                table.starts_ms[i : i + 1],
                table.values[i : i + 1],
            )
            reason = validate(one) or "interval start outside 2000-01-01..2100-01-01 UTC"
            keep[i] = False
            where = f"record square {table.squares[i]} start_ms {table.starts_ms[i]}"
            bad_letters.append(DeadLetter(reason, table.source, where, one.encode(), "producer"))
        return TrafficTable(
            table.source,
            table.columns,
            table.step_s,
            table.squares[keep],
            table.starts_ms[keep],
            table.values[keep],
            table.lines,
            bad_letters,
        )

    def _publish_packed(self, table: TrafficTable, n: int) -> None:
        """As fast as possible: fill each message up to MAX_RECORDS_PER_MESSAGE across intervals.

        Per-message costs (broker, Faust event loop) dominate at full speed, so fewer, larger messages
        raise throughput several-fold. Each message's watermark is the start of the first interval it
        does not hold completely, which keeps window closing exact.
        """
        part_of = table.squares[:n] % self.partitions
        step_ms = table.step_s * 1000
        for p in range(self.partitions):
            idx = np.flatnonzero(part_of == p)
            for i in range(0, len(idx), MAX_RECORDS_PER_MESSAGE):
                chunk = idx[i : i + MAX_RECORDS_PER_MESSAGE]
                last = i + MAX_RECORDS_PER_MESSAGE >= len(idx)
                watermark = (
                    int(table.starts_ms[chunk[-1]]) + step_ms
                    if last
                    else int(table.starts_ms[idx[i + len(chunk)]])
                )
                batch = RecordBatch(
                    kind="traffic",
                    columns=table.columns,
                    step_s=table.step_s,
                    squares=table.squares[chunk],
                    starts_ms=table.starts_ms[chunk],
                    values=table.values[chunk],
                    watermark_ms=watermark,
                    closed_ms=int(time.time() * 1000),
                    run=self.summary.run,
                )
                self._send(p, batch)
                self.on_records(len(chunk))
            self._count_sent(p, len(idx))

    def _publish_interval(self, table: TrafficTable, a: int, b: int, watermark_ms: int) -> None:
        squares = table.squares[a:b]
        part_of = squares % self.partitions
        closed_ms = int(time.time() * 1000)
        for p in range(self.partitions):
            sel = np.flatnonzero(part_of == p)
            pieces = [
                sel[i : i + MAX_RECORDS_PER_MESSAGE] for i in range(0, len(sel), MAX_RECORDS_PER_MESSAGE)
            ]
            pieces = pieces or [sel]
            for i, idx in enumerate(pieces):
                batch = RecordBatch(
                    kind="traffic",
                    columns=table.columns,
                    step_s=table.step_s,
                    squares=squares[idx],
                    starts_ms=table.starts_ms[a:b][idx],
                    values=table.values[a:b][idx],
                    # only the last piece of a partition completes it up to the interval's end
                    watermark_ms=watermark_ms if i == len(pieces) - 1 else None,
                    closed_ms=closed_ms,
                    run=self.summary.run,
                )
                self._send(p, batch)
            self._count_sent(p, len(sel))
        self.on_records(b - a)

    def finish(self) -> ReplaySummary:
        """Send each partition its final message (run id + count), flush, and return the summary."""
        columns = self.columns or ("activity",)
        watermark = (self.summary.last_ms or 0) + (self.step_s or 0) * 1000 if self.summary.last_ms else None
        for p in range(self.partitions):
            marker = RecordBatch.empty(
                "traffic",
                columns,
                self.step_s or 600,
                watermark_ms=watermark,
                run=self.summary.run,
                final=True,
                sent=int(self.sent[p]),
                closed_ms=int(time.time() * 1000),
            )
            self._send(p, marker)
        return self._finished()
