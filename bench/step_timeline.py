"""Where a step's time goes on the twins' path, from the Kafka produce times of a kept run's topics.

For each step of a ``[twins]`` run (``python -m bench.twins_live --keep`` names its topic prefix): when the
attach process published the next step's records (the step closes with them), and, after that moment, when
the worker sent the step's windows (``features.twins``) and each partition's forecasts (``forecasts``). With
the bench's close-to-queryable times beside it, this separates the attach process, the worker's windows, its
agents and the store. Prints one JSON line.

Usage: .venv/bin/python -m bench.step_timeline --prefix bench1234abcd. [--step-s 60] [--last 8]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

from kafka import TopicPartition

from ingest.kafka import make_consumer
from ingest.schema import MalformedMessage, decode
from ingest.settings import NettwinSettings, load_settings


def produce_times(settings: NettwinSettings, prefix: str, topic: str) -> list[tuple[int, int, bytes]]:
    """(partition, produce time ms, value) of every message of ``prefix + topic``, read to its end offsets."""
    consumer = make_consumer(settings, group_id=None)
    try:
        name = prefix + topic
        parts = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        out: list[tuple[int, int, bytes]] = []
        while any(consumer.position(p) < end[p] for p in parts):
            for tp, messages in consumer.poll(timeout_ms=1000, max_records=5000).items():
                out += [(tp.partition, m.timestamp, m.value or b"") for m in messages]
        return out
    finally:
        consumer.close()


def step_starts(value: bytes, step_ms: int) -> set[int]:
    try:
        batch = decode(value)
    except MalformedMessage:
        return set()
    return set(((batch.starts_ms // step_ms) * step_ms).tolist()) if len(batch) else set()


def timeline(settings: NettwinSettings, prefix: str, step_ms: int, last: int) -> list[dict[str, Any]]:
    closes: dict[int, int] = {}  # step -> first publish of the next step's records
    for _, ts, value in produce_times(settings, prefix, "telemetry.records"):
        for start in step_starts(value, step_ms):
            closes[start - step_ms] = min(ts, closes.get(start - step_ms, ts))
    windows: dict[int, list[int]] = defaultdict(list)
    for _, ts, value in produce_times(settings, prefix, "features.twins"):
        for start in step_starts(value, step_ms):
            windows[start].append(ts)
    forecasts: dict[int, list[int]] = defaultdict(list)
    for _, ts, value in produce_times(settings, prefix, "forecasts"):
        try:
            batch = decode(value)
        except MalformedMessage:
            continue
        if batch.kind == "forecast" and "actual" not in batch.columns and len(batch):
            forecasts[int(batch.starts_ms.min()) - step_ms].append(ts)  # horizon 1: the step that closed
    rows = []
    for step in sorted(s for s in windows if s in closes)[-last:]:
        t0 = closes[step]
        sent = sorted(t - t0 for t in forecasts.get(step, []))
        rows.append(
            {
                "step_ms": step,
                "windows_ms": [min(windows[step]) - t0, max(windows[step]) - t0],
                "forecasts_sent_ms": sent,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", required=True, help="the run's topic prefix, e.g. bench1234abcd.")
    ap.add_argument("--step-s", type=float, default=60.0)
    ap.add_argument("--last", type=int, default=10, help="report the last N steps")
    args = ap.parse_args()
    steps = timeline(load_settings(), args.prefix, int(args.step_s * 1000), args.last)
    print(json.dumps({"steps": steps}))


if __name__ == "__main__":
    main()
