"""``type = "kafka-lineprotocol"``: consume InfluxDB line protocol from Kafka topics, as Telegraf's Kafka
output writes it (``data_format = "influx"``), and republish it as canonical records.

The entity is the ``entity_tag`` tag. Offsets are committed (consumer group ``group_id``, default
``nettwin-attach-<name>``) only after the republished records and dead letters of a poll are acknowledged.
``url`` names the bootstrap servers of the cluster Telegraf writes to (default: nettwin's own).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ingest.settings import SourceSettings
from ingest.sources.base import Source, SourceContext, now_ms
from ingest.sources.lineprotocol import LineOptions, parse_lines
from ingest.sources.record import Parsed

log = logging.getLogger("nettwin.attach.kafka")


class KafkaLineProtocolSource(Source):
    def __init__(self, cfg: SourceSettings, ctx: SourceContext) -> None:
        super().__init__(cfg, ctx)
        if not cfg.topics:
            raise ValueError(f"source {cfg.name}: type kafka-lineprotocol needs topics")
        self.opts = LineOptions(cfg.entity_tag, cfg.metric_names, cfg.precision)
        self.thread = threading.Thread(target=self._loop, name=f"kafka-{cfg.name}", daemon=True)
        self.consumer: Any = None

    def start(self) -> None:
        from ingest.kafka import make_consumer

        settings = self.ctx.kafka_settings
        if settings is None:
            raise ValueError(f"source {self.name}: kafka-lineprotocol needs the process settings")
        if self.cfg.url:
            settings = settings.model_copy(
                update={"kafka": settings.kafka.model_copy(update={"bootstrap_servers": self.cfg.url})}
            )
        self.consumer = make_consumer(
            settings,
            *self.cfg.topics,
            group_id=self.cfg.group_id or f"{settings.kafka.topic_prefix}nettwin-attach-{self.name}",
            max_poll_records=5000,
        )
        self.thread.start()
        log.info("source %s: consuming line protocol from %s", self.name, list(self.cfg.topics))

    def close(self, timeout_s: float) -> None:
        super().close(timeout_s)
        self.thread.join(timeout_s)
        if self.consumer is not None:
            self.consumer.close(autocommit=False)

    def _loop(self) -> None:
        from kafka.structs import OffsetAndMetadata

        while not self.stopping.is_set():
            polled = self.consumer.poll(timeout_ms=300)
            if not polled:
                self.metrics.connected = 1 if self.consumer.assignment() else 0
                continue
            self.metrics.connected = 1
            parsed = Parsed()
            for tp, messages in polled.items():
                for m in messages:
                    self.metrics.add(messages=1)
                    where = f"{tp.topic}[{tp.partition}]@{m.offset}"
                    parsed.extend(parse_lines(m.value or b"", where, now_ms(), self.opts, self.limits))
            while True:
                exc = self.publish_and_wait(parsed, timeout_s=60)
                if exc is None:
                    break
                if self.stopping.is_set():
                    return  # uncommitted: re-read after a restart
                log.warning("source %s: poll not acknowledged (%s); retrying", self.name, exc)
            offsets = {tp: OffsetAndMetadata(ms[-1].offset + 1, "", -1) for tp, ms in polled.items() if ms}
            try:
                self.consumer.commit(offsets)
            except Exception as exc:  # a rebalance moved partitions: their new owner re-reads (at least once)
                log.warning("source %s: commit refused (%s)", self.name, exc)
