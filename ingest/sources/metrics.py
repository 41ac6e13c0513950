"""Per-source counters of an attach process, rendered in the Prometheus text format (``GET /metrics``)."""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

# seconds from a source accepting a record to Kafka acknowledging it
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class SourceMetrics:
    source: str
    type: str
    accepted: int = 0
    refused: int = 0
    messages: int = 0
    in_flight: int = 0
    reconnects: int = 0
    kafka_errors: int = 0
    connected: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, seconds: float, records: int) -> None:
        with self.lock:
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += records
            self.latency_sum += seconds * records

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, d in deltas.items():
                setattr(self, name, getattr(self, name) + d)


_COUNTERS = (
    ("accepted", "counter", "records acknowledged by Kafka"),
    ("refused", "counter", "records and payloads sent to the dead-letter topic"),
    ("messages", "counter", "payloads received (MQTT messages, HTTP requests, files, lines)"),
    ("reconnects", "counter", "reconnections to the upstream broker or endpoint"),
    ("kafka_errors", "counter", "failed Kafka writes (retried; nothing acknowledged upstream meanwhile)"),
    ("in_flight", "gauge", "records accepted and not yet acknowledged by Kafka"),
    ("connected", "gauge", "1 while connected upstream (MQTT, Kafka consumer)"),
)


def render(all_metrics: list[SourceMetrics]) -> str:
    lines: list[str] = []
    for name, kind, doc in _COUNTERS:
        metric = f"nettwin_source_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {metric} {doc}", f"# TYPE {metric} {kind}"]
        for m in all_metrics:
            lines.append(f'{metric}{{source="{m.source}",type="{m.type}"}} {getattr(m, name)}')
    metric = "nettwin_source_ack_latency_seconds"
    lines += [
        f"# HELP {metric} seconds from accepting a record to Kafka acknowledging it",
        f"# TYPE {metric} histogram",
    ]
    for m in all_metrics:
        labels = f'source="{m.source}",type="{m.type}"'
        with m.lock:
            counts = list(m.latency_counts)
            total = m.latency_sum
        cum = 0
        for le, c in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
            cum += c
            le_text = "+Inf" if le == float("inf") else repr(le)
            lines.append(f'{metric}_bucket{{{labels},le="{le_text}"}} {cum}')
        lines.append(f"{metric}_sum{{{labels}}} {total}")
        lines.append(f"{metric}_count{{{labels}}} {cum}")
    return "\n".join(lines) + "\n"
