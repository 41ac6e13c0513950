"""``windows``: raw telemetry (``telemetry.milan``) -> closed windows on ``features.traffic``
(``stream_processors/processor.py`` per input partition; acknowledgement in ``acked_windows.py``)."""

from __future__ import annotations

from typing import Any

from stream_processors.agents.acked_windows import acked_windows_agent
from stream_processors.agents.context import WorkerContext
from stream_processors.processor import PartitionProcessor, counters_total


def register(ctx: WorkerContext) -> Any:
    source = ctx.topic(ctx.topics.telemetry_milan)
    sink = ctx.topic(ctx.topics.features_traffic)
    states = ctx.partition_states()
    ctx.reports["worker counters"] = lambda: counters_total([s.processor for s in states.states()])

    def make(topic: str, partition: int) -> PartitionProcessor:
        return PartitionProcessor(topic, partition, ctx.settings.worker)

    return acked_windows_agent(ctx, "windows", source, sink, states, make)
