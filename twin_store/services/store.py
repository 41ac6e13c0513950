"""``nettwin store``: consume feature, forecast, screened sensor and attached-source (telemetry) batches and the
live multimodal windows' positions (``features.multimodal`` -> ``position``), write them to InfluxDB, then
commit offsets.

Offsets are committed only after InfluxDB acknowledged the write, so a crash re-delivers and rewrites
(idempotent: same series and timestamps). If InfluxDB is unavailable the loop retries with back-off
without committing; if it rejects points (HTTP 400), the offending messages go to the dead-letter topic
one by one and the rest are written.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata

from ingest.deadletter import DeadLetter, DeadLetterSink
from ingest.errors import InputError, ServiceError
from ingest.kafka import STREAM_FETCH_MAX_WAIT_MS, make_consumer, make_producer
from ingest.schema import MalformedMessage, decode
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.positions import position_lines
from twin_store.adapters.sensors import sensor_points
from twin_store.adapters.telemetry import telemetry_lines
from twin_store.adapters.traffic import Points, TwinRegistry, batch_points

log = logging.getLogger("nettwin.store")

# polls whose writes may be outstanding at once; one writer: concurrent writes cost InfluxDB more CPU
# per point (measured: 99k points/s with one writer vs 88k with two on 2 cores)
MAX_INFLIGHT = 2
WRITERS = 1


@dataclass
class _InFlight:
    futures: list[Future[float]]  # each gives the wall time (s) InfluxDB acknowledged its write
    items: list[tuple[Any, Points]]
    offsets: dict[Any, OffsetAndMetadata]


@dataclass
class StoreCounters:
    messages: int = 0
    records: int = 0
    points: int = 0
    deadletters: int = 0
    write_retries: int = 0
    finals: list[dict[str, Any]] = field(default_factory=list)


def known_bs_twins(influx: InfluxClient) -> set[int]:
    """BS twins that already have a state row, so a restarted store does not write a second first row."""
    series = influx.query('SHOW TAG VALUES FROM "twin" WITH KEY = "twin_id" WHERE "level" = \'bs\'')
    return {int(row["value"]) for s in series for row in s.rows() if str(row["value"]).isdigit()}


class TwinStore:
    def __init__(self, settings: NettwinSettings) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.influx = InfluxClient(settings.influx)
        self.influx.ping()
        self.twins = TwinRegistry(known_bs_twins(self.influx))
        self.producer = make_producer(settings)
        self.deadletters = DeadLetterSink(self.producer, self.topics.deadletter)
        self.consumer = make_consumer(
            settings,
            self.topics.features_traffic,
            self.topics.forecasts,
            self.topics.features_sensors,
            self.topics.telemetry_records,
            self.topics.features_twins,
            self.topics.features_multimodal,
            group_id=f"{settings.kafka.topic_prefix}nettwin-store",
            max_poll_records=2000,
            fetch_max_wait_ms=STREAM_FETCH_MAX_WAIT_MS,
        )
        self.counters = StoreCounters()
        # writer threads: building the next payload overlaps InfluxDB parsing the previous ones
        self.writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="influx-writer")
        self.inflight: deque[_InFlight] = deque()
        self.stopping = False

    def close(self) -> None:
        try:
            self._settle(block=True)
        finally:
            self.writer.shutdown(wait=True)
            self.consumer.close(autocommit=False)
            self.producer.flush()
            self.producer.close()
            self.influx.close()

    def run(self, idle_exit_s: float | None = None, max_seconds: float | None = None) -> StoreCounters:
        started = last_data = time.monotonic()
        try:
            while not self.stopping:
                polled = self.consumer.poll(timeout_ms=200)
                now = time.monotonic()
                if polled:
                    self.process(polled)
                self._settle(block=not polled)
                if polled or not self.consumer.assignment():
                    # idle time counts only once partitions are assigned (joining a group takes seconds)
                    last_data = now
                elif idle_exit_s is not None and now - last_data >= idle_exit_s:
                    break
                if max_seconds is not None and now - started >= max_seconds:
                    break
        finally:
            self.close()
        return self.counters

    def process(self, polled: dict[Any, list[Any]]) -> None:
        """Build and submit the writes for one poll; its offsets are committed by ``_settle`` once written.

        Payloads go to the writer threads as soon as they fill, so building overlaps InfluxDB parsing
        (the HTTP wait releases the GIL), and the next poll is built while this one's writes finish.
        """
        items: list[tuple[Any, Points]] = []
        pending: dict[str, list[str]] = {"s": [], "ms": []}  # lines (or blocks of lines) by time precision
        pending_points = {"s": 0, "ms": 0}
        futures: list[Future[float]] = []
        step = self.settings.influx.batch_points
        now_ms = int(time.time() * 1000)

        def add(m: Any, points: Points) -> None:
            """Queue a message's lines; submit its precision's payload once it holds a batch of points."""
            items.append((m, points))
            lines = pending[points.precision]
            lines += points.lines
            pending_points[points.precision] += points.n_points
            if pending_points[points.precision] >= step:
                futures.append(self.writer.submit(self._write, lines, points.precision))
                pending[points.precision], pending_points[points.precision] = [], 0

        for tp, messages in polled.items():
            for m in messages:
                self.counters.messages += 1
                if m.topic == self.topics.features_multimodal:
                    try:
                        lines = position_lines(m.value or b"")
                    except Exception as exc:  # a bad window (or a defect it reveals) costs this message only
                        self._deadletter(m, f"multimodal window cannot be written: {exc}"[:300])
                        continue
                    add(m, Points(lines=lines, precision="ms", records=len(lines), partition=tp.partition))
                    continue
                try:
                    batch = decode(m.value or b"")
                    if batch.kind not in ("features", "forecast", "screened", "telemetry"):
                        raise MalformedMessage(
                            "expected kind 'features', 'forecast', 'screened' or 'telemetry', "
                            f"got {batch.kind!r}"
                        )
                    if batch.kind == "forecast" and "cluster" not in batch.columns:
                        raise MalformedMessage("forecast batch without a 'cluster' column")
                except MalformedMessage as exc:
                    self._deadletter(m, str(exc))
                    continue
                try:
                    if batch.kind == "screened":
                        points = sensor_points(batch, tp.partition)
                    elif batch.kind == "telemetry":
                        lines = telemetry_lines(batch)
                        points = Points(
                            lines=lines, precision="ms", records=len(lines), partition=tp.partition
                        )
                    else:
                        points = batch_points(batch, tp.partition, self.twins, now_ms)
                except Exception as exc:  # a defect the decoder let through costs this message only
                    self._deadletter(m, f"cannot be written: {exc!r}"[:300])
                    continue
                add(m, points)
                if batch.final:
                    self.counters.finals.append(
                        {
                            "run": batch.run,
                            "partition": tp.partition,
                            "sent": batch.sent,
                            "received": batch.extra.get("received"),
                        }
                    )
        for precision, lines in pending.items():
            if lines:
                futures.append(self.writer.submit(self._write, lines, precision))
        offsets = {tp: OffsetAndMetadata(msgs[-1].offset + 1, "", -1) for tp, msgs in polled.items() if msgs}
        self.inflight.append(_InFlight(futures, items, offsets))

    def _settle(self, block: bool) -> None:
        """Commit, oldest first, every poll whose writes are acknowledged (all of them when ``block``).

        At most MAX_INFLIGHT polls wait: beyond that we block rather than buffer without bound.
        """
        while self.inflight:
            head = self.inflight[0]
            must = block or len(self.inflight) > MAX_INFLIGHT
            if not must and not all(f.done() for f in head.futures):
                return
            self.inflight.popleft()
            try:
                # the data is in InfluxDB from its last acknowledgement on: the lag ends there, not here
                acked_s = max((f.result() for f in head.futures), default=time.time())
            except InputError:
                # some point was refused (e.g. a field type conflict in a shared database): isolate it.
                # Rewriting the accepted ones is harmless: same series and timestamps overwrite.
                for f in head.futures:
                    f.exception()  # all settled before we rewrite
                for m, p in head.items:
                    try:
                        self._write(p.lines, p.precision)
                    except InputError as exc:
                        self._deadletter(m, f"InfluxDB rejected points: {exc}")
                acked_s = time.time()
            acked_ms = int(acked_s * 1000)
            progress = [line for _, p in head.items for line in p.progress_lines(acked_ms)]
            self._write(progress, "ms")
            self.counters.records += sum(p.records for _, p in head.items)
            self.counters.points += sum(p.n_points for _, p in head.items) + len(progress)
            self.producer.flush()  # dead letters are durable before their offsets are committed
            try:
                self.consumer.commit(head.offsets)
            except CommitFailedError as exc:
                # partitions moved to another store during a rebalance: it re-writes them (idempotent)
                log.warning("commit after rebalance refused (%s); the new owner re-processes", exc)

    def _write(self, lines: list[str], precision: str) -> float:
        """Write; return the wall time of the acknowledgement."""
        self.influx.write_lines(lines, precision, lambda: self.stopping, self._on_retry)
        return time.time()

    def _on_retry(self, exc: ServiceError, delay: float) -> None:
        self.counters.write_retries += 1
        log.warning("InfluxDB write failed (%s); retrying in %.1f s without committing", exc, delay)

    def _deadletter(self, m: Any, reason: str) -> None:
        self.deadletters.send(DeadLetter.for_message(m, reason, "store"))
        self.counters.deadletters += 1


def wait_for_run(influx: InfluxClient, run: str, partitions: int, timeout_s: float) -> list[dict[str, Any]]:
    """Poll InfluxDB until the store reported the run's final marker on every partition."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for s in influx.query(f'SELECT * FROM "replay" WHERE "run" = \'{run}\'') for r in s.rows()]
        if len({r["partition"] for r in rows}) >= partitions:
            return rows
        if time.monotonic() > deadline:
            raise ServiceError(
                f"run {run}: only {len(rows)} of {partitions} partitions completed within {timeout_s:.0f} s; "
                "see the worker and store logs"
            )
        time.sleep(0.25)
