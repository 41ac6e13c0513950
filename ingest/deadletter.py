"""Dead letters: invalid input kept with its reason, never dropped.

The Kafka message value is the original bytes exactly as received (a file line, a message value); the
reason and where it came from travel in headers, the convention Kafka Connect's DLQs use, so any Kafka
tool can inspect them and a fixed record can be re-published byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HEADER_PREFIX = "nettwin."


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    source: str  # file path or topic name
    position: str  # "line 17" or "topic[partition]@offset"
    original: bytes
    stage: str  # producer | source (attached sources) | worker | store

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (HEADER_PREFIX + "reason", self.reason.encode()),
            (HEADER_PREFIX + "source", self.source.encode()),
            (HEADER_PREFIX + "position", self.position.encode()),
            (HEADER_PREFIX + "stage", self.stage.encode()),
        ]

    @classmethod
    def for_message(cls, message: Any, reason: str, stage: str) -> DeadLetter:
        """A consumed Kafka message that cannot be used, located as ``topic[partition]@offset``."""
        where = f"{message.topic}[{message.partition}]@{message.offset}"
        return cls(reason, message.topic, where, message.value or b"", stage)

    @classmethod
    def from_kafka(cls, value: bytes | None, headers: list[tuple[str, bytes]] | None) -> DeadLetter:
        h = {
            k[len(HEADER_PREFIX) :]: v.decode(errors="replace")
            for k, v in headers or []
            if k.startswith(HEADER_PREFIX)
        }
        return cls(
            h.get("reason", "?"),
            h.get("source", "?"),
            h.get("position", "?"),
            value or b"",
            h.get("stage", "?"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "source": self.source,
            "position": self.position,
            "stage": self.stage,
            "original": self.original.decode(errors="backslashreplace")[:500],
        }


class DeadLetterSink:
    """Sends dead letters through a kafka-python producer and counts them by stage."""

    def __init__(self, producer: Any, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.count = 0

    def send(self, letter: DeadLetter) -> None:
        self.producer.send(
            self.topic, value=letter.original, key=letter.source.encode(), headers=letter.headers()
        )
        self.count += 1
