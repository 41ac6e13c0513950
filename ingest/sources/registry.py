"""Entity registry: stable numeric keys for entity names, kept on a compacted single-partition topic.

Every process resolves the same key for a name, and names survive restarts, without a coordinator: the
topic's order decides. A process that meets a new name appends a *claim* ``name -> key`` (key = one above
the largest it has seen) and reads the topic up to its own claim. Reading the log in order, a claim is
accepted iff its name has no key yet and its key is not taken; everyone reading the same log agrees. A
process whose claim lost because the name already had a key appends a *confirmation* of the winning key, so
compaction (which keeps the last value per name) never leaves a losing claim as a name's last word; one
whose key was taken claims again with a higher key.

``RegistryState`` is the pure rule; ``EntityRegistry`` reads and writes the topic.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("nettwin.registry")


@dataclass
class RegistryState:
    by_name: dict[str, int] = field(default_factory=dict)
    by_key: dict[int, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def apply(self, name: str, key: int, kind: str | None = None) -> bool:
        """Apply one log entry in order; True when it assigned (or re-confirmed) ``name -> key``."""
        if name in self.by_name:
            return self.by_name[name] == key
        if key in self.by_key or key <= 0:
            return False
        self.by_name[name] = key
        self.by_key[key] = name
        if kind:
            self.kinds[name] = kind
        return True

    def next_key(self) -> int:
        return max(self.by_key, default=0) + 1


class EntityRegistry:
    """Thread-safe name -> key resolution over the registry topic (kafka-python clients)."""

    def __init__(self, settings: Any, topic: str, timeout_s: float = 30.0) -> None:
        from kafka import TopicPartition

        self.settings = settings
        self.topic = topic
        self.timeout_s = timeout_s
        self.state = RegistryState()
        self.lock = threading.Lock()
        self.tp = TopicPartition(topic, 0)
        self.producer: Any = None
        self.consumer: Any = None
        self._connect()

    def _connect(self) -> None:
        """Clients, and the topic read from its start (entries already known re-apply as no-ops)."""
        from ingest.kafka import make_consumer, make_producer

        self.producer = make_producer(self.settings, linger_ms=0)
        self.consumer = make_consumer(self.settings, group_id=None)
        self.consumer.assign([self.tp])
        self.consumer.seek_to_beginning(self.tp)
        self._catch_up()

    def reset(self) -> None:
        """Drop the clients after a Kafka failure; the next registration connects afresh."""
        with self.lock:
            self.close(timeout_s=0)
            self.producer = self.consumer = None

    def close(self, timeout_s: float = 5.0) -> None:
        """Close the clients, bounded: a producer whose broker is gone would otherwise wait for it forever
        (what it could not write was never acknowledged to anyone)."""
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False, timeout_ms=int(timeout_s * 1000))
            except Exception as exc:
                log.debug("closing the registry consumer: %s", exc)
        if self.producer is not None:
            try:
                self.producer.close(timeout=timeout_s)
            except Exception as exc:
                log.debug("closing the registry producer: %s", exc)

    def _read(self, timeout_ms: int) -> int:
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=10_000)
        n = 0
        for messages in polled.values():
            for m in messages:
                n += 1
                if m.key is None or m.value is None:
                    continue
                try:
                    doc = json.loads(m.value)
                    self.state.apply(m.key.decode(), int(doc["key"]), doc.get("kind"))
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                    log.warning("registry entry at offset %d is not {key, kind} JSON; ignored", m.offset)
        return n

    def _catch_up(self) -> None:
        end = self.consumer.end_offsets([self.tp])[self.tp]
        deadline = time.monotonic() + self.timeout_s
        while self.consumer.position(self.tp) < end and time.monotonic() < deadline:
            self._read(200)
        self._read(0)

    def _read_past(self, offset: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while self.consumer.position(self.tp) <= offset:
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry topic {self.topic}: offset {offset} not readable")
            self._read(200)

    def known(self, name: str) -> bool:
        with self.lock:
            if name not in self.state.by_name:
                if self.consumer is None:
                    self._connect()
                self._read(0)
            return name in self.state.by_name

    def resolve(self, names: Mapping[str, str | None]) -> dict[str, int]:
        """Keys for every name (name -> kind or None), registering the new ones. Raises on Kafka errors."""
        with self.lock:
            missing = [n for n in names if n not in self.state.by_name]
            if missing:
                if self.consumer is None:
                    self._connect()
                self._read(0)
            for _attempt in range(100):
                missing = [n for n in names if n not in self.state.by_name]
                if not missing:
                    break
                self._claim(missing, names)
            else:
                raise RuntimeError(f"registry {self.topic}: could not register {missing[:3]}")
            return {n: self.state.by_name[n] for n in names}

    def _claim(self, missing: list[str], kinds: Mapping[str, str | None]) -> None:
        start = self.state.next_key()
        futures = []
        claims = {}
        for i, name in enumerate(missing):
            claims[name] = start + i
            value = {"key": start + i} | ({"kind": kinds[name]} if kinds.get(name) else {})
            futures.append(
                self.producer.send(self.topic, key=name.encode(), value=json.dumps(value).encode())
            )
        self.producer.flush(timeout=self.timeout_s)
        last = max(f.get(timeout=self.timeout_s).offset for f in futures)
        self._read_past(last)
        confirms = [n for n, k in claims.items() if n in self.state.by_name and self.state.by_name[n] != k]
        for name in confirms:
            value = {"key": self.state.by_name[name]} | (
                {"kind": self.state.kinds[name]} if name in self.state.kinds else {}
            )
            self.producer.send(self.topic, key=name.encode(), value=json.dumps(value).encode())
        if confirms:
            self.producer.flush(timeout=self.timeout_s)
