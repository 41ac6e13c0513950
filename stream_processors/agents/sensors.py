"""``sensor-screen``: sensor readings (``telemetry.sensors``) -> the same readings marked (score, flagged) on
``features.sensors``, per source (``stream_processors/sensor_screening.py``, robust z-score with ADWIN
re-baselining), one screening state per input partition.

Never commits: the state is every reading so far, so a worker given the partition (after a restart or a
rebalance) re-reads it from the start and, the detectors being deterministic, re-emits identical marks and
counts (same points in InfluxDB).
"""

from __future__ import annotations

import logging
from typing import Any

from ingest.deadletter import DeadLetter
from stream_processors.agents.context import WorkerContext

log = logging.getLogger("nettwin.worker")


def register(ctx: WorkerContext) -> Any:
    source = ctx.topic(ctx.topics.telemetry_sensors)
    sink = ctx.topic(ctx.topics.features_sensors)
    states = ctx.partition_states()

    def report() -> dict[str, int]:
        total: dict[str, int] = {}
        for screening in states.states():
            for k, v in screening.counters.items():
                total[k] = total.get(k, 0) + v
        return total

    ctx.reports["sensor counters"] = report

    @ctx.app.agent(source, name="sensor-screen")
    async def sensor_screen(stream: Any) -> None:
        async for event in stream.noack().events():
            msg = event.message
            screening = states.get(msg.topic, msg.partition, msg.offset)
            if screening is None:
                # imported with the first reading: a worker without sensors does not load river
                from stream_processors.sensor_screening import SensorScreening

                screening = SensorScreening("robust")
                states.put(msg.topic, msg.partition, screening, msg.offset)
            try:
                out = screening.on_message(event.value, msg.topic, msg.partition, msg.offset)
            except Exception as exc:  # a bug on some input must not stop the agent
                log.exception("sensor-screen: cannot process %s[%d]@%d", msg.topic, msg.partition, msg.offset)
                where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
                letter = DeadLetter(f"unprocessable: {exc!r}", msg.topic, where, event.value or b"", "worker")
                await ctx.dead_letter(letter)
                states.advance(msg.topic, msg.partition, msg.offset)
                continue
            states.advance(msg.topic, msg.partition, msg.offset)
            for batch in out.batches:
                sink.send_soon(key=msg.key, value=batch.encode(), partition=msg.partition)  # as windows.py
            for letter in out.deadletters:
                await ctx.dead_letter(letter)

    return sensor_screen
