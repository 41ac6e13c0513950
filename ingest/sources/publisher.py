"""The batching publisher every source of an attach process shares.

Sources hand it *submissions* (records and refusals of one payload, with a ``done`` callback). A single
flusher thread takes everything pending every ``linger_s`` (or as soon as ``batch_records`` are waiting),
resolves entity keys in the registry, writes one batch message per (source, partition) chunk to the records
topic and every refusal to the dead-letter topic, waits for Kafka to acknowledge all of it, and only then
calls each submission's ``done(None)``: that is when an MQTT message is acknowledged, an HTTP request
answered 2xx, a file marked done or a Kafka offset committed.

If Kafka fails, the same submissions are retried with back-off (never dropped, never acknowledged). When
stopping while Kafka still fails, ``done(exc)`` tells each source it was *not* written.
Pending records are bounded (``max_pending``): sources check ``has_room()`` and push back upstream (HTTP 429,
MQTT flow control) when it is full.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ingest.deadletter import DeadLetter
from ingest.sources.metrics import SourceMetrics
from ingest.sources.record import Record, Refusal
from ingest.sources.wire import encode_records

log = logging.getLogger("nettwin.attach")

MAX_RECORDS_PER_MESSAGE = 10_000


@dataclass
class Submission:
    source: str
    records: list[Record]
    refusals: list[Refusal]
    done: Callable[[BaseException | None], None]
    metrics: SourceMetrics | None = None
    registered_only: bool = False
    accepted_at: float = field(default_factory=time.monotonic)


class Publisher:
    def __init__(
        self,
        producer_factory: Callable[[], Any],
        registry: Any,
        records_topic: str,
        deadletter_topic: str,
        partitions: int,
        linger_s: float = 0.01,
        batch_records: int = 20_000,
        max_pending: int = 200_000,
        ack_timeout_s: float = 15.0,
    ) -> None:
        self.producer_factory = producer_factory
        self.producer: Any = producer_factory()
        self.registry = registry
        self.records_topic = records_topic
        self.deadletter_topic = deadletter_topic
        self.partitions = partitions
        self.linger_s = linger_s
        self.batch_records = batch_records
        self.max_pending = max_pending
        self.ack_timeout_s = ack_timeout_s
        self.cond = threading.Condition()
        self.pending: list[Submission] = []
        self.pending_records = 0
        self.stopping = False
        self.healthy = True
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._loop, name="publisher", daemon=True)
        self.thread.start()

    def has_room(self, n: int = 1) -> bool:
        return self.pending_records + n <= self.max_pending or self.pending_records == 0

    def submit(self, sub: Submission) -> None:
        n = len(sub.records) + len(sub.refusals)
        if sub.metrics is not None:
            sub.metrics.add(in_flight=len(sub.records))
        with self.cond:
            if self.stopping:
                raise RuntimeError("publisher is stopping")
            self.pending.append(sub)
            self.pending_records += n
            if self.pending_records >= self.batch_records:
                self.cond.notify()

    def close(self, timeout_s: float = 8.0) -> None:
        """Flush what is pending (bounded by ``timeout_s``), then stop the flusher."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            with self.cond:
                if not self.pending and not self.stopping:
                    self.cond.wait(self.linger_s)
                if not self.pending:
                    if self.stopping:
                        return
                    continue
                if self.pending_records < self.batch_records and not self.stopping:
                    self.cond.wait(self.linger_s)
                subs, self.pending, self.pending_records = self.pending, [], 0
            self._publish_until_done(subs)

    def _publish_until_done(self, subs: list[Submission]) -> None:
        delay = 0.5
        while True:
            try:
                self._publish(subs)
            except Exception as exc:
                self.healthy = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                for m in {id(s.metrics): s.metrics for s in subs if s.metrics}.values():
                    m.add(kafka_errors=1)
                if self.stopping:
                    log.error("Kafka write failed while stopping (%s); not acknowledged upstream", exc)
                    self._finish(subs, exc)
                    return
                log.warning("Kafka write failed (%s); retrying in %.1f s, acknowledging nothing", exc, delay)
                self._drop_clients()
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self.healthy = True
            self._finish(subs, None)
            return

    def _drop_clients(self) -> None:
        """Forget the producer (a kafka-python producer can stay failed after its broker came back, e.g. a
        fatal InitProducerId error): the next attempt connects afresh. The registry does the same."""
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                producer.close(timeout=0)
            except Exception as exc:
                log.debug("closing the failed producer: %s", exc)
        reset = getattr(self.registry, "reset", None)
        if reset is not None:
            reset()

    def _finish(self, subs: list[Submission], exc: BaseException | None) -> None:
        now = time.monotonic()
        for s in subs:
            if s.metrics is not None:
                s.metrics.add(in_flight=-len(s.records))
                if exc is None:
                    s.metrics.add(accepted=len(s.records), refused=len(s.refusals))
                    s.metrics.observe(now - s.accepted_at, len(s.records))
            try:
                s.done(exc)
            except Exception:
                log.exception("source callback failed")

    def _publish(self, subs: list[Submission]) -> None:
        if self.producer is None:
            self.producer = self.producer_factory()
        self._refuse_unregistered(subs)
        names: dict[str, str | None] = {}
        for s in subs:
            for r in s.records:
                names.setdefault(r.entity, r.kind)
        keys = self.registry.resolve(names) if names else {}
        groups: dict[tuple[str, int], list[Record]] = defaultdict(list)
        for s in subs:
            for r in s.records:
                groups[(s.source, keys[r.entity] % self.partitions)].append(r)
        futures = []
        for (source, partition), records in groups.items():
            for i in range(0, len(records), MAX_RECORDS_PER_MESSAGE):
                chunk = records[i : i + MAX_RECORDS_PER_MESSAGE]
                value = encode_records(chunk, keys, source).encode()
                futures.append(
                    self.producer.send(
                        self.records_topic, value=value, key=source.encode(), partition=partition
                    )
                )
        for s in subs:
            for ref in s.refusals:
                letter = DeadLetter(ref.reason, s.source, ref.position, ref.original, "source")
                futures.append(
                    self.producer.send(
                        self.deadletter_topic,
                        value=letter.original,
                        key=letter.source.encode(),
                        headers=letter.headers(),
                    )
                )
        self.producer.flush(timeout=self.ack_timeout_s)
        for f in futures:
            f.get(timeout=self.ack_timeout_s)  # raises the send's error, if any

    def _refuse_unregistered(self, subs: list[Submission]) -> None:
        for s in subs:
            if not s.registered_only:
                continue
            keep = []
            for r in s.records:
                if self.registry.known(r.entity):
                    keep.append(r)
                else:
                    s.refusals.append(
                        Refusal(
                            f"unknown entity {r.entity!r} (this source accepts registered entities only)",
                            "record",
                            json.dumps(r.as_json()).encode(),
                        )
                    )
            if s.metrics is not None:
                s.metrics.add(in_flight=len(keep) - len(s.records))
            s.records = keep
