"""What every source of an attach process shares: its settings, the publisher, metrics, limits, state."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.settings import NettwinSettings, SourceSettings
from ingest.sources.metrics import SourceMetrics
from ingest.sources.publisher import Publisher, Submission
from ingest.sources.record import Limits, Mapping, Parsed


@dataclass
class SourceContext:
    publisher: Publisher
    state_dir: Path
    all_metrics: list[SourceMetrics] = field(default_factory=list)
    kafka_settings: NettwinSettings | None = None  # for sources that consume Kafka themselves


class Source:
    """A running source. ``start()`` returns at once. Stopping is two steps so that what was accepted is
    acknowledged upstream before connections close: ``stop_accepting()``, then (after the publisher flushed)
    ``close()``."""

    def __init__(self, cfg: SourceSettings, ctx: SourceContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.name: str = cfg.name
        self.metrics = SourceMetrics(cfg.name, cfg.type)
        ctx.all_metrics.append(self.metrics)
        self.limits = Limits(max_future_s=cfg.max_future_s)
        self.mapping = Mapping.from_config(cfg.mapping)
        self.stopping = threading.Event()

    def start(self) -> None:
        raise NotImplementedError

    def stop_accepting(self) -> None:
        self.stopping.set()

    def close(self, timeout_s: float) -> None:
        self.stopping.set()

    def submission(self, parsed: Parsed, done: Any) -> Submission:
        return Submission(
            self.name,
            parsed.records,
            parsed.refusals,
            done,
            self.metrics,
            self.cfg.registered_only,
        )

    def publish_and_wait(self, parsed: Parsed, timeout_s: float | None = None) -> BaseException | None:
        """Submit and block until Kafka acknowledged it (None) or the publisher gave up (the error)."""
        done = threading.Event()
        result: list[BaseException | None] = []

        def finished(exc: BaseException | None) -> None:
            result.append(exc)
            done.set()

        self.wait_for_room(len(parsed.records))
        try:
            self.ctx.publisher.submit(self.submission(parsed, finished))
        except RuntimeError as exc:  # the publisher is stopping: not written, not acknowledged
            return exc
        if not done.wait(timeout_s):
            return TimeoutError("Kafka did not acknowledge in time")
        return result[0]

    def wait_for_room(self, n: int) -> None:
        while not self.ctx.publisher.has_room(n) and not self.ctx.publisher.stopping:
            time.sleep(0.005)


def now_ms() -> int:
    return int(time.time() * 1000)
