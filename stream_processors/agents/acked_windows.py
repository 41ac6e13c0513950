"""The per-partition loop of the windowing agents (``windows``, ``twin-windows``): a pure processor per input
partition turns each message into output batches, dead letters and a safe offset; this adapter sends them.

Acks are manual: an input message is acknowledged (and so its offset committed) only once every window it
fed has been emitted and sent, so a worker that crashed or lost the partition leaves its successor exactly
the input of its still-open windows to re-read. Re-emitted windows overwrite identical points in InfluxDB
(same series and timestamp). Faust flushes its producer before each (non-transactional) offset commit, so
acknowledged input never has unsent output.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ingest.deadletter import DeadLetter
from stream_processors.agents.context import WorkerContext
from stream_processors.partitions import PartitionStates
from stream_processors.processor import Output

log = logging.getLogger("nettwin.worker")


class WindowProcessor(Protocol):
    counters: dict[str, int]

    def on_message(self, value: bytes | None, offset: int) -> Output: ...


@dataclass
class PartitionWindows:
    processor: WindowProcessor
    unacked: deque[Any] = field(default_factory=deque)  # events fed into still-open windows, in order


def acked_windows_agent(
    ctx: WorkerContext,
    name: str,
    source: Any,
    sink: Any,
    states: PartitionStates[PartitionWindows],
    make: Callable[[str, int], WindowProcessor],
) -> Any:
    """A Faust agent named ``name``: ``source`` -> ``make(topic, partition)`` per partition -> ``sink``."""

    @ctx.app.agent(source, name=name)
    async def agent(stream: Any) -> None:
        async for event in stream.noack().events():
            msg = event.message
            state = states.get(msg.topic, msg.partition, msg.offset)
            if state is None:  # first message of this partition here, or re-read from its committed offset
                state = PartitionWindows(make(msg.topic, msg.partition))
                states.put(msg.topic, msg.partition, state, msg.offset)
            try:
                out = state.processor.on_message(event.value, msg.offset)
            except Exception as exc:  # a bug on some input must not stop every partition: keep it
                log.exception("%s: cannot process %s[%d]@%d", name, msg.topic, msg.partition, msg.offset)
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

    return agent
