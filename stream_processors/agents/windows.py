"""``windows``: raw telemetry (``telemetry.milan``) -> closed windows on ``features.traffic``.

Acks are manual: an input message is acknowledged (and so its offset committed) only once every window it
fed has been emitted and sent, so a worker that crashed or lost the partition leaves its successor exactly
the input of its still-open windows to re-read. Re-emitted windows overwrite identical points in InfluxDB
(same series and timestamp). Faust flushes its producer before each (non-transactional) offset commit, so
acknowledged input never has unsent output.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ingest.deadletter import DeadLetter
from stream_processors.agents.context import WorkerContext
from stream_processors.processor import PartitionProcessor, counters_total

log = logging.getLogger("nettwin.worker")


@dataclass
class WindowsState:
    processor: PartitionProcessor
    unacked: deque[Any] = field(default_factory=deque)  # events fed into still-open windows, in order


def register(ctx: WorkerContext) -> Any:
    source = ctx.topic(ctx.topics.telemetry_milan)
    sink = ctx.topic(ctx.topics.features_traffic)
    states = ctx.partition_states()
    ctx.reports["worker counters"] = lambda: counters_total([s.processor for s in states.states()])

    @ctx.app.agent(source, name="windows")
    async def windows(stream: Any) -> None:
        async for event in stream.noack().events():
            msg = event.message
            state = states.get(msg.topic, msg.partition, msg.offset)
            if state is None:  # first message of this partition here, or re-read from its committed offset
                state = WindowsState(PartitionProcessor(msg.topic, msg.partition, ctx.settings.worker))
                states.put(msg.topic, msg.partition, state, msg.offset)
            try:
                out = state.processor.on_message(event.value, msg.offset)
            except Exception as exc:  # a bug on some input must not stop every partition: keep it
                log.exception("windows: cannot process %s[%d]@%d", msg.topic, msg.partition, msg.offset)
                where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
                await ctx.dead_letter(
                    DeadLetter(f"unprocessable: {exc!r}", msg.topic, where, event.value or b"", "worker")
                )
                state.unacked.append(event)
                states.advance(msg.topic, msg.partition, msg.offset)
                continue
            for batch in out.features:
                # buffered: the producer sends while the next input is windowed (an awaited send waits for
                # the partition's previous batch to reach the broker); Faust flushes the producer before
                # every commit, so acknowledged input still never has unsent output
                sink.send_soon(value=batch.encode(), partition=msg.partition)
            for letter in out.deadletters:
                await ctx.dead_letter(letter)
            states.advance(msg.topic, msg.partition, msg.offset)
            state.unacked.append(event)
            queue = state.unacked
            while queue and out.safe_offset is not None and queue[0].message.offset < out.safe_offset:
                await stream.ack(queue.popleft())

    return windows
