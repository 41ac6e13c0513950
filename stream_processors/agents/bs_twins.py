"""``bs-twins``: hourly windows (``features.traffic``) -> forecasts and outcomes on ``forecasts``, local
updates on ``updates.local`` (``stream_processors/bs_agents.py``), one ``BsAgents`` per input partition,
all sharing the twins that a ``TwinFollower`` reads from ``twin.models`` (every worker needs every twin,
so no consumer group).

A message is acknowledged once its outputs are sent, so Faust commits only finished hours. The agents'
state is the whole history of their squares, so when a worker is given a partition whose committed offset
is past its start (a restart, a rebalance), it first rebuilds that partition's agents by reading the
partition from its beginning up to the first message it is handed, with the outputs of those hours
dropped (they were sent before they were committed), and after reading ``twin.models`` to its end offsets
(so the updates the store already decided on are not trained again). Training runs in a thread, so
heartbeats and windowing go on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ingest.deadletter import DeadLetter
from ingest.schema import MalformedMessage, RecordBatch, decode
from stream_processors.agents.context import WorkerContext, in_thread
from stream_processors.bs_agents import COUNTERS, AgentOutput, BsAgents, TwinVersions
from stream_processors.followers import TwinFollower, read_partition
from twin_store.federation.keys import KeyRegistry
from twin_store.services.memory import trim_heap

log = logging.getLogger("nettwin.worker")
T = TypeVar("T")

# how long a BS agent waits for the twin store to publish its previous hour's updates before acting anyway
ACK_WAIT_S = 5.0
# how often the agent looks for the first global twin while it keeps steps (``catch_up_loop``)
CATCH_UP_POLL_S = 0.1
HEAP_TRIM_S = 30.0  # the worker's heap is trimmed at most this often, after a training
HOUR_S = 3600


def hourly_batch(value: bytes | None, step_s: int = HOUR_S) -> RecordBatch | None:
    """The windows of the twins' step a message carries (Milan: hourly), None for anything else (10-minute
    windows, markers)."""
    if value is None:
        raise MalformedMessage("empty message value")
    batch = decode(value)
    return batch if batch.step_s == step_s and len(batch) else None


def warm_up() -> None:
    """Import what acting on the twins needs and run one tiny local update, so the first step after the
    bootstrap imports nothing. Importing torch and the models took ~3 s under load; the first optimizer then
    imported ``torch._dynamo`` (torch.optim does on its first ``Adam``: 3.3 s of a py-spy profile of the first
    step at 1,000 entities, load ~11) and the first ``plan()`` the local-update module (0.5 s). The agent
    trains partition by partition, so each second of that held back the next partitions' forecasts."""
    import torch

    import twin_store.federation.local_updates
    import twin_store.models.telemetry_screen  # noqa: F401
    from twin_store.models.forecaster import FitConfig, TwinModel

    model = TwinModel(2, 2)
    x, y = torch.zeros(1, 4, 2), torch.zeros(1, 4)
    model.fit(model.init(1, 0), x, y, FitConfig(1, 1e-3, 2), torch.Generator().manual_seed(0))
    model.predict(model.init(1, 0), x)


def register(ctx: WorkerContext) -> Any:
    settings = ctx.settings
    # a [twins] deployment twins its attached sources' steps; without one, Milan's replayed hourly traffic
    twins_on = settings.twins.target is not None
    if twins_on:  # its twins are coming (the bootstrap): import what acting on them needs while waiting
        threading.Thread(target=warm_up, name="twins-warm-up", daemon=True).start()
    source = ctx.topic(ctx.topics.features_twins if twins_on else ctx.topics.features_traffic)
    step_s = settings.twins.cadence_s if twins_on else HOUR_S
    forecasts = ctx.topic(ctx.topics.forecasts)
    updates = ctx.topic(ctx.topics.updates_local)
    keys_file = settings.security.keys_file
    keys = KeyRegistry.load(keys_file) if keys_file is not None else None
    twins = TwinVersions()
    awaiting: dict[int, int] = {}  # this worker's updates the store has not decided on, all partitions
    follower = TwinFollower(settings)
    states = ctx.partition_states()
    skipped = {"unreadable": 0, "rebuilt_messages": 0}

    sites = None
    if twins_on and settings.twins.sites is not None:
        from twin_store.federation.sites import load_sites

        sites = load_sites(settings.twins.sites)  # late joiners take the cluster of their nearest member

    def new_agents() -> BsAgents:
        return BsAgents(keys, settings.security.screen_traffic, twins=twins, awaiting=awaiting, sites=sites)

    def report() -> dict[str, int]:
        total = dict.fromkeys(COUNTERS, 0) | skipped
        for agents in states.states():
            for k, v in agents.counters.items():
                total[k] += v
        return total if total["hours"] else {}

    ctx.reports["bs agent counters"] = report
    ctx.reports["twin follower"] = lambda: dict(follower.counters)

    def rebuild(agents: BsAgents, topic: str, partition: int, until: int) -> None:
        for _, _, value in read_partition(settings, topic, partition, until, ctx.stopping):
            skipped["rebuilt_messages"] += 1
            try:
                batch = hourly_batch(value, step_s)
                if batch is not None:  # outputs dropped (sent before their input was committed), and
                    agents.observe(batch)  # no training: its updates were sent then too
            except MalformedMessage:
                continue

    async def agents_for(msg: Any) -> BsAgents:
        agents = states.get(msg.topic, msg.partition, msg.offset)
        if agents is not None:
            return agents
        while not follower.caught_up.is_set():  # the twins and the store's decisions so far
            await asyncio.sleep(0.05)
        follower.drain_into(twins)  # before the rebuild: it skips the updates the store decided on
        epoch = states.epoch
        agents = new_agents()
        if msg.offset > 0:
            log.info(
                "bs-twins: rebuilding %s[%d] from its first %d messages", msg.topic, msg.partition, msg.offset
            )
            await in_thread(rebuild, agents, msg.topic, msg.partition, msg.offset)
        states.put(msg.topic, msg.partition, agents, msg.offset, epoch)
        return agents

    async def wait_for_store(agents: BsAgents, batch: RecordBatch) -> None:
        """Act on twins up to the previous hour: wait (bounded) until the store published our updates."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACK_WAIT_S
        follower.drain_into(twins)
        while agents.unacknowledged_before(batch):
            if loop.time() > deadline:
                agents.give_up_waiting()
                return
            await asyncio.sleep(0.005)
            follower.drain_into(twins)

    async def send_rows(out: AgentOutput, partition: int) -> None:
        for rows in [*out.outcomes, *out.forecasts]:
            await forecasts.send(value=rows.encode(), partition=partition)

    async def send_updates(out: AgentOutput, partition: int) -> None:
        for update in out.updates:
            await updates.send(key=update.key, value=update.encode(), partition=partition)

    async def guarded(step: Callable[[Any], T], arg: Any, event: Any) -> T | None:
        """``step(arg)`` in a thread; bad data (or a bug it reveals) costs this message only: a dead letter
        and None. Sending is outside: a broker error is not the message's fault."""
        try:
            return await in_thread(step, arg)
        except Exception as exc:
            msg = event.message
            where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
            if not isinstance(exc, MalformedMessage):
                log.exception("bs-twins: cannot process %s", where)
            letter = DeadLetter(str(exc) or repr(exc), msg.topic, where, event.value or b"", "bs-twins")
            await ctx.dead_letter(letter)
            return None

    # partition -> (newest step start it trains on, its training): a step's training overlaps the next
    # partitions' steps, so their forecasts do not wait for it
    training: dict[int, tuple[int, asyncio.Future[None]]] = {}

    async def settle_training(partition: int, batch: RecordBatch | None) -> None:
        """Before a message: its partition's training (its agents and its offsets come in order), and, for a
        batch, every training of an earlier step (the store must decide on those updates before the twins
        of this step are acted on, as when one partition's training ended before the next was read)."""
        first = int(batch.starts_ms.min()) if batch is not None and len(batch) else None
        for p, (step_ms, fut) in list(training.items()):
            if p == partition or (first is not None and step_ms < first):
                await fut
                if training.get(p, (0, None))[1] is fut:
                    del training[p]

    trimmed = [time.monotonic()]  # when the heap was last trimmed

    async def train_then_ack(agents: BsAgents, out: AgentOutput, event: Any, stream: Any) -> None:
        msg = event.message
        if await guarded(agents.train_only, out, event) is not None:
            agents.expect(out.updates)
            await send_updates(out, msg.partition)
        states.advance(msg.topic, msg.partition, msg.offset)
        await stream.ack(event)
        if out.updates and time.monotonic() - trimmed[0] >= HEAP_TRIM_S:
            # a training frees most of what it allocated, in the heaps of short-lived threads, which glibc
            # keeps (resident) until asked (10,000 entities: ~800 MB steady with it, 860-905 MB in the run before)
            # in its own thread, not awaited: the next step waits for this coroutine, not for the trim
            trimmed[0] = time.monotonic()
            threading.Thread(target=trim_heap, name="heap-trim", daemon=True).start()

    acting = asyncio.Lock()  # one message, or one catch-up, at a time on the agents

    async def catch_up_loop() -> None:
        """Act on the steps kept while there was no global twin as soon as it arrives, not when the next step's
        batch comes: a whole step later (the first live step's forecasts came 5 s late at the scale bench's
        5-second steps, and would come a cadence late in a deployment)."""
        while True:
            await asyncio.sleep(CATCH_UP_POLL_S)
            if not any(a.backlog for a in states.states()):
                continue
            async with acting:
                follower.drain_into(twins)
                for (topic, partition), agents in states.items():
                    if not (agents.backlog and agents.ready):
                        continue
                    try:
                        out = await in_thread(agents.catch_up)
                        if out is not None:
                            await send_rows(out, partition)
                            if out.due:
                                agents.expect(await in_thread(agents.train_only, out))
                                await send_updates(out, partition)
                    except Exception:  # the steps were kept, not received now: nothing to dead-letter
                        log.exception("bs-twins: acting on the kept steps of %s[%d] failed", topic, partition)

    async def on_event(event: Any, stream: Any) -> None:
        """One message of the twins' step topic (the agent holds ``acting``)."""
        msg = event.message
        try:
            batch = hourly_batch(event.value, step_s)
        except MalformedMessage:
            batch = None  # the store dead-letters what it cannot read from this topic
            skipped["unreadable"] += 1
        await settle_training(msg.partition, batch)
        agents = await agents_for(msg)
        if batch is not None:
            await wait_for_store(agents, batch)
            # before the first global twin an hour is only kept: no thread, no torch
            out = await guarded(agents.observe, batch, event) if agents.ready else agents.observe(batch)
            if out is not None:
                await send_rows(out, msg.partition)  # forecasts first: they do not wait for training
                if out.due:  # acknowledged once its updates are sent
                    step_ms = int(batch.starts_ms.max())
                    task = asyncio.ensure_future(train_then_ack(agents, out, event, stream))
                    training[msg.partition] = (step_ms, task)
                    return
        states.advance(msg.topic, msg.partition, msg.offset)
        await stream.ack(event)

    @ctx.app.agent(source, name="bs-twins")
    async def bs_twins(stream: Any) -> None:
        ctx.start_thread(follower)
        catching_up = asyncio.ensure_future(catch_up_loop())
        try:
            async for event in stream.noack().events():
                async with acting:
                    await on_event(event, stream)
        finally:
            catching_up.cancel()

    return bs_twins
