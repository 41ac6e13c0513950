"""``twin-windows``: attached sources' records (``telemetry.records``) -> the ``[twins]`` metric per entity
and step on ``features.twins`` (``stream_processors/twin_windows.py``). Registered only when the deployment
config has a ``[twins]`` table with a ``target``.

Acknowledgement as in the ``windows`` agent (``acked_windows.py``): an input message is acknowledged once
every step it fed has been emitted, so a successor re-reads exactly the input of still-open steps.
"""

from __future__ import annotations

from typing import Any

from stream_processors.agents.acked_windows import acked_windows_agent
from stream_processors.agents.context import WorkerContext
from stream_processors.twin_windows import TwinWindows


def register(ctx: WorkerContext) -> Any:
    twins = ctx.settings.twins
    if twins.target is None:
        return None
    source = ctx.topic(ctx.topics.telemetry_records)
    sink = ctx.topic(ctx.topics.features_twins)
    states = ctx.partition_states()

    def report() -> dict[str, int]:
        total: dict[str, int] = {}
        for s in states.states():
            for k, v in s.processor.counters.items():
                total[k] = total.get(k, 0) + v
        return total

    ctx.reports["twin windows"] = report
    target, step_s = twins.target, twins.cadence_s
    lateness = ctx.settings.worker.allowed_lateness_s

    def make(topic: str, partition: int) -> TwinWindows:
        return TwinWindows(topic, partition, target, step_s, twins.aggregate, lateness)

    return acked_windows_agent(ctx, "twin-windows", source, sink, states, make)
