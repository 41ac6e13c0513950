"""What the web view reads from Kafka: the latest header per key on ``twin.models`` and dead letters by reason.

One background thread with one consumer (no group: it reads every partition from the start), so the page
never waits on Kafka. If the broker is unreachable or a topic is missing, it says so (``error``) and tries
again; it recovers on its own when the broker returns.
"""

from __future__ import annotations

import json
import re
import struct
import threading
import time
from collections import Counter
from typing import Any

from ingest.deadletter import HEADER_PREFIX
from ingest.errors import NettwinError
from ingest.settings import NettwinSettings
from ingest.topics import Topics

MAGIC = b"NTM1"
_U32 = struct.Struct("<I")
_DIGITS = re.compile(r"\d+")


def twin_header(value: bytes) -> dict[str, Any] | None:
    """The JSON header of a ``twin.models`` value (parameters skipped); None if it is not one."""
    if len(value) < 8 or value[:4] != MAGIC:
        return None
    (n,) = _U32.unpack_from(value, 4)
    try:
        header = json.loads(value[8 : 8 + n])
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def reason_class(reason: str) -> str:
    """A dead letter's reason with numbers blanked, so reasons group (``line 12: ...`` and ``line 40: ...``)."""
    return _DIGITS.sub("#", reason)[:120]


class KafkaView:
    """Latest twin headers and dead-letter counts, kept current by a daemon thread."""

    def __init__(self, settings: NettwinSettings, poll_s: float = 1.0) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.poll_s = poll_s
        self.lock = threading.Lock()
        self.twins: dict[str, dict[str, Any]] = {}  # key -> header (level, twin_id, version, meta)
        self.deadletters: Counter[tuple[str, str]] = Counter()  # (stage, reason class) -> count
        self.error: str | None = "connecting to Kafka"
        self.messages = 0
        self.reads = 0  # how many times the topics were read from the start (1 + reconnections)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-view", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "ok": self.error is None,
                "error": self.error,
                "messages": self.messages,
                "reads": self.reads,
                "twins": {k: dict(v) for k, v in self.twins.items() if not k.startswith("bs:")},
                "bs_twins": sum(1 for k in self.twins if k.startswith("bs:")),
                "deadletters": [
                    {"stage": stage, "reason": reason, "count": n}
                    for (stage, reason), n in self.deadletters.most_common(50)
                ],
                "deadletter_total": sum(self.deadletters.values()),
            }

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                self._consume()
                delay = 1.0
            except (NettwinError, Exception) as exc:  # any broker trouble: say so, retry with back-off
                with self.lock:
                    self.error = f"Kafka: {exc}"[:300]
                self._stop.wait(delay)
                delay = min(delay * 2, 15.0)

    def _consume(self) -> None:
        from kafka import TopicPartition

        from ingest.kafka import make_consumer

        # a reader must never create a topic (a deleted one would come back with the broker's default
        # partition count, and `nettwin infra init` would then refuse it)
        consumer = make_consumer(
            self.settings, group_id=None, consumer_timeout_ms=1000, allow_auto_create_topics=False
        )
        try:
            wanted = [self.topics.twin_models, self.topics.deadletter]
            parts = []
            for topic in wanted:
                ids = consumer.partitions_for_topic(topic)
                if not ids:
                    raise NettwinError(f"topic {topic} does not exist yet (run `nettwin infra init`)")
                parts += [TopicPartition(topic, p) for p in sorted(ids)]
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            with self.lock:  # a fresh read from the start: forget what an earlier connection counted
                self.twins.clear()
                self.deadletters.clear()
                self.messages = 0
                self.reads += 1
                self.error = None
            last_check = time.monotonic()
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=int(self.poll_s * 1000))
                self._absorb(polled)
                if time.monotonic() - last_check > 10:  # topics deleted and re-created (a fresh demo)?
                    last_check = time.monotonic()
                    for topic in wanted:
                        if not consumer.partitions_for_topic(topic):
                            raise NettwinError(f"topic {topic} disappeared")
                    # our position beyond a partition's end: it was re-created. One offset of slack: Tansu
                    # answers ListOffsets(latest) with the last offset rather than the next one
                    ends = consumer.end_offsets(parts)
                    if any(consumer.position(tp) > ends[tp] + 1 for tp in parts):
                        raise NettwinError("a topic was re-created: reading it again from the start")
        finally:
            consumer.close()

    def _absorb(self, polled: dict[Any, list[Any]]) -> None:
        with self.lock:
            for tp, records in polled.items():
                for m in records:
                    self.messages += 1
                    if tp.topic == self.topics.twin_models:
                        if m.key is None:
                            continue
                        key = m.key.decode(errors="replace")
                        header = twin_header(m.value) if m.value is not None else None
                        if header is None:
                            self.twins.pop(key, None)  # a tombstone or foreign value
                        else:
                            meta = header.get("meta") or {}
                            self.twins[key] = {
                                "level": header.get("level"),
                                "twin_id": header.get("twin_id"),
                                "version": header.get("version"),
                                "as_of": meta.get("as_of"),
                                "members": len(meta.get("members") or []),
                                "epoch": meta.get("epoch"),
                            }
                    else:
                        headers = {
                            k[len(HEADER_PREFIX) :]: v.decode(errors="replace")
                            for k, v in (m.headers or [])
                            if k.startswith(HEADER_PREFIX)
                        }
                        self.deadletters[
                            (headers.get("stage", "?"), reason_class(headers.get("reason", "?")))
                        ] += 1
