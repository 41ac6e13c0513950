"""One attach process: the ``[[source]]`` tables of the config, one shared publisher and entity registry.

Stopping (SIGTERM) is ordered so that nothing acknowledged is lost and little is redelivered: every source
stops accepting, the publisher flushes what was accepted (its acknowledgements go upstream while the
connections are still open), then the sources close. The whole sequence is bounded to ``stop_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ingest.kafka import make_producer
from ingest.sources.base import Source, SourceContext
from ingest.sources.publisher import Publisher
from ingest.sources.registry import EntityRegistry
from ingest.topics import Topics

log = logging.getLogger("nettwin.attach")


def source_class(kind: str) -> type[Source]:
    """The source implementation of a ``type``, imported only when a config uses it."""
    if kind == "http":
        from ingest.sources.http import HttpSource

        return HttpSource
    if kind == "mqtt":
        from ingest.sources.mqtt import MqttSource

        return MqttSource
    if kind == "pm-files":
        from ingest.sources.pm_files import PmFilesSource

        return PmFilesSource
    if kind == "kafka-lineprotocol":
        from ingest.sources.kafka_lineprotocol import KafkaLineProtocolSource

        return KafkaLineProtocolSource
    if kind == "file":
        from ingest.sources.file_follow import FileSource

        return FileSource
    raise ValueError(f"unknown source type {kind!r}")


class Attachment:
    def __init__(self, settings: Any, linger_s: float = 0.01) -> None:
        if not settings.source:
            raise ValueError("the config declares no [[source]] tables")
        topics = Topics.from_settings(settings)
        self.registry = EntityRegistry(settings, topics.entities)
        self.publisher = Publisher(
            lambda: make_producer(settings, linger_ms=2),
            self.registry,
            topics.telemetry_records,
            topics.deadletter,
            settings.kafka.partitions,
            linger_s=linger_s,
            max_pending=settings.attach.max_pending_records,
        )
        self.ctx = SourceContext(self.publisher, settings.state_dir, kafka_settings=settings)
        self.sources: list[Source] = [source_class(cfg.type)(cfg, self.ctx) for cfg in settings.source]

    def start(self) -> None:
        for s in self.sources:
            s.start()

    def stop(self, stop_timeout_s: float = 9.0) -> None:
        deadline = time.monotonic() + stop_timeout_s
        for s in self.sources:
            s.stop_accepting()
        self.publisher.close(max(0.5, (deadline - time.monotonic()) * 0.6))
        for s in self.sources:
            s.close(max(0.1, (deadline - time.monotonic()) / max(1, len(self.sources))))
        try:
            if self.publisher.producer is not None:
                self.publisher.producer.close(timeout=max(0.1, deadline - time.monotonic()))
            self.registry.close(max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            log.warning("closing Kafka clients: %s", exc)
