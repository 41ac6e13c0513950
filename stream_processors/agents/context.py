"""What every agent of the worker shares: the app, settings, topics, the dead-letter topic, the per-partition
state registries (dropped on revocation by the app) and the counters the worker reports."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import faust

from ingest.deadletter import DeadLetter
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from stream_processors.partitions import PartitionStates

T = TypeVar("T")


@dataclass
class WorkerContext:
    app: faust.App
    settings: NettwinSettings
    topics: Topics
    stopping: threading.Event = field(default_factory=threading.Event)
    registries: list[PartitionStates[Any]] = field(default_factory=list)
    reports: dict[str, Callable[[], dict[str, int]]] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.deadletters = self.app.topic(
            self.topics.deadletter, value_type=bytes, value_serializer="raw", partitions=1
        )

    def topic(self, *names: str) -> Any:
        """A raw-bytes Faust topic (created beforehand by ``nettwin infra init``)."""
        return self.app.topic(
            *names, value_type=bytes, value_serializer="raw", partitions=self.settings.kafka.partitions
        )

    def partition_states(self, aliases: dict[str, str] | None = None) -> PartitionStates[Any]:
        """A per-(topic, partition) registry whose states the app drops when partitions are revoked."""
        states: PartitionStates[Any] = PartitionStates(aliases)
        self.registries.append(states)
        return states

    def start_thread(self, thread: threading.Thread) -> None:
        if not thread.is_alive() and thread not in self.threads:
            self.threads.append(thread)
            thread.start()

    async def dead_letter(self, letter: DeadLetter) -> None:
        await self.deadletters.send(
            value=letter.original, key=letter.source.encode(), headers=letter.headers()
        )


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking work (training, history reads) in a daemon thread: the event loop keeps heartbeating,
    and a stopping worker does not wait for it (unlike the default executor, joined at exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=getattr(fn, "__name__", "worker-task"), daemon=True).start()
    return await done
