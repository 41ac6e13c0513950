"""``twin-windows``: attached sources' records (``telemetry.records``) -> the ``[twins]`` metric per entity
and step on ``features.twins`` (``stream_processors/twin_windows.py``). Registered only when the deployment
config has a ``[twins]`` table with a ``target``.

Acknowledgement as in the ``windows`` agent: an input message is acknowledged once every step it fed has
been emitted, so a successor re-reads exactly the input of still-open steps.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ingest.deadletter import DeadLetter
from stream_processors.agents.context import WorkerContext
from stream_processors.twin_windows import TwinWindows

log = logging.getLogger("nettwin.worker")


@dataclass
class StepsState:
    windows: TwinWindows
    unacked: deque[Any] = field(default_factory=deque)


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
            for k, v in s.windows.counters.items():
                total[k] = total.get(k, 0) + v
        return total

    ctx.reports["twin windows"] = report
    target, step_s = twins.target, twins.cadence_s
    lateness = ctx.settings.worker.allowed_lateness_s

    @ctx.app.agent(source, name="twin-windows")
    async def twin_windows(stream: Any) -> None:
        async for event in stream.noack().events():
            msg = event.message
            state = states.get(msg.topic, msg.partition, msg.offset)
            if state is None:
                windows = TwinWindows(msg.topic, msg.partition, target, step_s, twins.aggregate, lateness)
                state = StepsState(windows)
                states.put(msg.topic, msg.partition, state, msg.offset)
            try:
                out = state.windows.on_message(event.value, msg.offset)
            except Exception as exc:  # a bug on some input must not stop every partition
                log.exception("twin-windows: cannot process %s[%d]@%d", msg.topic, msg.partition, msg.offset)
                where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
                await ctx.dead_letter(
                    DeadLetter(f"unprocessable: {exc!r}", msg.topic, where, event.value or b"", "worker")
                )
                state.unacked.append(event)
                states.advance(msg.topic, msg.partition, msg.offset)
                continue
            for batch in out.features:
                sink.send_soon(value=batch.encode(), partition=msg.partition)
            for letter in out.deadletters:
                await ctx.dead_letter(letter)
            states.advance(msg.topic, msg.partition, msg.offset)
            state.unacked.append(event)
            queue = state.unacked
            while queue and out.safe_offset is not None and queue[0].message.offset < out.safe_offset:
                await stream.ack(queue.popleft())

    return twin_windows
