"""Plain Kafka consumers beside the Faust agents: topic followers and partition history readers.

``TopicFollower`` reads a compacted topic (``twin.models``, ``sites.ftm``) from the start with no consumer
group (every worker needs all of it) into an inbox that the event loop drains; while the topic has never had a
message it is polled once a second only (an idle agent costs nothing). It is ``caught_up`` once
it has read to the end offsets the topic had when it started, so a reader can wait for the whole state
instead of guessing from a quiet period. It never dies: an error is logged and counted, and it starts over
after a back-off (0.5 s doubling to 10 s), re-reading from the start (messages are keyed and idempotent).

``read_partition`` reads one partition from its beginning up to an offset: the history an agent rebuilds
its state from when it is given a partition whose earlier messages it acknowledged in another life.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator

from kafka import TopicPartition

from ingest.deadletter import DeadLetter
from ingest.kafka import make_consumer
from ingest.readers.ftm import SiteGeometry, site_from_message
from ingest.schema import MalformedMessage
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from stream_processors.bs_agents import TwinVersions
from twin_store.federation.models_topic import TwinMessage, decode_twin

log = logging.getLogger("nettwin.worker")

FETCH_MAX_WAIT_MS = 20  # followers carry twins between hours: low latency over batching
BACKOFF_S = (0.5, 10.0)
IDLE_POLL_S = 1.0  # between polls of a topic that has never had a message


class TopicFollower(threading.Thread):
    def __init__(self, settings: NettwinSettings, topic: str, without_it: str) -> None:
        super().__init__(name=f"{topic}-follower", daemon=True)
        self.settings = settings
        self.topic = topic
        self.without_it = without_it  # what goes missing while the follower is down
        # (key, value, position "topic[partition]@offset") of every message received
        self.inbox: queue.SimpleQueue[tuple[bytes | None, bytes | None, str]] = queue.SimpleQueue()
        self.caught_up = threading.Event()
        self.stopping = threading.Event()
        self.counters = {"messages": 0, "errors": 0, "unreadable": 0}

    def run(self) -> None:
        delay = BACKOFF_S[0]
        while not self.stopping.is_set():
            try:
                self._follow()
                return
            except Exception:
                self.counters["errors"] += 1
                log.exception(
                    "the %s follower failed (%d errors so far); %s until it is back, retrying in %.1f s",
                    self.topic,
                    self.counters["errors"],
                    self.without_it,
                    delay,
                )
                self.stopping.wait(delay)
                delay = min(2 * delay, BACKOFF_S[1])

    def _follow(self) -> None:
        consumer = make_consumer(self.settings, group_id=None, fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
        try:
            parts = consumer.partitions_for_topic(self.topic) or set()
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps) if tps else {}
            while not self.stopping.is_set():
                got = 0
                for records in consumer.poll(timeout_ms=200, max_records=10_000).values():
                    for m in records:
                        self._deliver(m.key, m.value, f"{m.topic}[{m.partition}]@{m.offset}")
                    got += len(records)
                self.counters["messages"] += got
                if not self.caught_up.is_set() and all(consumer.position(tp) >= end[tp] for tp in tps):
                    self.caught_up.set()
                if self.caught_up.is_set() and not self.counters["messages"]:
                    # an empty topic (no twins published, no sites): follow it at a walk, not a run
                    self.stopping.wait(IDLE_POLL_S)
        finally:
            consumer.close()

    def _deliver(self, key: bytes | None, value: bytes | None, where: str) -> None:
        """One message received (in the follower's thread): into the inbox."""
        self.inbox.put((key, value, where))

    def pending(self) -> Iterator[tuple[bytes | None, bytes | None, str]]:
        """The (key, value, position) of the messages received since the last call."""
        while True:
            try:
                yield self.inbox.get_nowait()
            except queue.Empty:
                return


class TwinFollower(TopicFollower):
    """Every twin on ``twin.models``, for the BS agents (one ``TwinVersions`` shared by all partitions).

    Decoded in the follower's thread, not in the event loop that drains them; a per-BS twin keeps its header
    only: the agents read the store's decision on the BS (``seq``) from it, never its parameters (V-twinning
    publishes one per entity, 175 MB at 10,000 entities, all arriving with the first twins)."""

    def __init__(self, settings: NettwinSettings) -> None:
        super().__init__(settings, Topics.from_settings(settings).twin_models, "BS agents get no new twins")
        self.decoded: queue.SimpleQueue[TwinMessage] = queue.SimpleQueue()

    def _deliver(self, key: bytes | None, value: bytes | None, where: str) -> None:
        if value is None:
            return  # a tombstone: nothing the agents act on
        try:
            self.decoded.put(decode_twin(value, skip_params=("bs",)))
        except MalformedMessage as exc:
            self.counters["unreadable"] += 1
            log.warning("ignoring an unreadable twin on twin.models (%s): %s", where, exc)

    def drain_into(self, twins: TwinVersions) -> None:
        while True:
            try:
                twins.add(self.decoded.get_nowait())
            except queue.Empty:
                return


class SiteFollower(TopicFollower):
    """Every scene's AP positions on ``sites.ftm``, for the multimodal windows' least-squares fix."""

    def __init__(self, settings: NettwinSettings) -> None:
        super().__init__(
            settings, Topics.from_settings(settings).sites_ftm, "live windows get no new AP positions"
        )

    def drain_into(self, sites: dict[str, SiteGeometry]) -> list[DeadLetter]:
        """Apply the sites received since the last call; returns a dead letter for each unusable one (the
        worker is the only reader of ``sites.ftm``, so nobody else would report it)."""
        letters = []
        for key, value, where in self.pending():
            if value is None:  # a tombstone: the scene's site is withdrawn
                sites.pop((key or b"").decode(errors="replace"), None)
                continue
            try:
                geo = site_from_message(json.loads(value))
            except Exception as exc:  # any defect (deep nesting: RecursionError) costs that message only
                self.counters["unreadable"] += 1
                letters.append(
                    DeadLetter(f"unreadable site: {exc!r}"[:300], self.topic, where, value, "worker")
                )
                continue
            sites[geo.scene] = geo
        return letters


def read_partition(
    settings: NettwinSettings, topic: str, partition: int, until: int, stopping: threading.Event
) -> Iterator[tuple[int, bytes | None, bytes | None]]:
    """(offset, key, value) of every message of ``topic[partition]`` before offset ``until``."""
    tp = TopicPartition(topic, partition)
    consumer = make_consumer(settings, group_id=None)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        idle_since = time.monotonic()
        while consumer.position(tp) < until and not stopping.is_set():
            batch = consumer.poll(timeout_ms=200).get(tp, [])
            if batch:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 30:
                raise TimeoutError(f"{topic}[{partition}]: no message before offset {until} for 30 s")
            for m in batch:
                if m.offset >= until:
                    return
                yield m.offset, m.key, m.value
    finally:
        consumer.close()
