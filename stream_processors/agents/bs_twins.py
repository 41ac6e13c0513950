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
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
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
# a step's training starts once every partition of the worker has sent that step's forecasts, or after this long:
# a training thread beside the event loop slowed the other partitions' steps (10,000 entities in 4 partitions:
# ~250 ms between the partitions' forecasts of a step against ~80 ms of work each)
TRAIN_HOLD_S = 1.0
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
    bootstrap imports nothing. Importing torch and the models took ~3 s under load, and the first ``plan()``
    the local-update module (0.5 s). The agent trains partition by partition, so each second of that held back
    the next partitions' forecasts. (The first ``torch.optim.Adam`` imported ``torch._dynamo``: 3.3 s and
    68 MB; the model now steps Adam's functional form, ``forecaster.adam_step``, which does not.)"""
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
        # forecasts first: what a step's reader waits for (an outcome completes an earlier step's row)
        for rows in [*out.forecasts, *out.outcomes]:
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

    # partition -> (newest step start it trains on, its training, its start signal): a step's training
    # overlaps the next partitions' steps, so their forecasts do not wait for it
    training: dict[int, tuple[int, asyncio.Future[None], asyncio.Event]] = {}
    observed: dict[int, int] = {}  # partition -> start of the newest step its agents observed

    def release_trainings() -> None:
        """Start the trainings of every step that all of this worker's partitions have observed: their
        forecasts are out, and a training thread beside the event loop no longer slows them."""
        parts = [partition for (_, partition), _ in states.items()]
        done = min((observed.get(partition, -1) for partition in parts), default=-1)
        for step_ms, _, go in training.values():
            if step_ms <= done:
                go.set()

    def start_training(partition: int, step_ms: int, work: Callable[[asyncio.Event], Any]) -> None:
        go = asyncio.Event()
        training[partition] = (step_ms, asyncio.ensure_future(work(go)), go)
        release_trainings()

    async def settle_training(partition: int, batch: RecordBatch | None) -> None:
        """Before a message: its partition's training (its agents and its offsets come in order), and, for a
        batch, every training of an earlier step (the store must decide on those updates before the twins
        of this step are acted on, as when one partition's training ended before the next was read)."""
        first = int(batch.starts_ms.min()) if batch is not None and len(batch) else None
        for p, (step_ms, fut, go) in list(training.items()):
            if p == partition or (first is not None and step_ms < first):
                go.set()  # waited for: no longer held back
                await fut
                if p in training and training[p][1] is fut:
                    del training[p]

    async def held(go: asyncio.Event) -> None:
        """A training waits until the other partitions have sent its step's forecasts, at most TRAIN_HOLD_S
        (a partition without data for the step)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(go.wait(), TRAIN_HOLD_S)

    trimmed = [time.monotonic()]  # when the heap was last trimmed
    # one training thread at a time: a step's partitions' trainings, released together, took ~250 MB more at
    # once than one of them (10,000 entities: 4 threads of ~104 BSs, each in its own heap), and on 2 cores
    # running them side by side does not bring any step's forecasts sooner (they come before the trainings)
    lane = asyncio.Lock()

    async def train_then_ack(
        agents: BsAgents, out: AgentOutput, event: Any, stream: Any, go: asyncio.Event
    ) -> None:
        msg = event.message
        await held(go)
        async with lane:
            trained = await guarded(agents.train_only, out, event)
        if trained is not None:
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

    async def train_kept(
        agents: BsAgents, out: AgentOutput, where: str, partition: int, go: asyncio.Event
    ) -> None:
        await held(go)
        try:
            async with lane:
                trained = await in_thread(agents.train_only, out)
            agents.expect(trained)
            await send_updates(out, partition)
        except Exception:  # the steps were kept, not received now: nothing to dead-letter
            log.exception("bs-twins: training on the kept steps of %s failed", where)

    async def catch_up_loop() -> None:
        """Record the kept steps no forecast comes from as soon as the bootstrap has sent the twins' roster and
        plan (``BsAgents.record_kept``), while it trains them. Act on the steps kept while there was no global
        twin as soon as it arrives, not when the next step's batch comes: a whole step later (the first live step's forecasts came 5 s late at the scale bench's
        5-second steps, and would come a cadence late in a deployment). Every partition's forecasts first, then
        the trainings, each as a partition's training of its newest kept step (``training``), so the next steps
        wait for them as the protocol says, and the other partitions' forecasts do not (10,000 entities: the
        trainings held the first live step's forecasts back ~3 s when each ran before the next partition)."""
        while True:
            await asyncio.sleep(CATCH_UP_POLL_S)
            if not any(a.backlog for a in states.states()):
                continue
            async with acting:
                follower.drain_into(twins)
                for (topic, partition), agents in states.items():
                    where = f"{topic}[{partition}]"
                    if agents.can_record:  # the twins' roster and plan are here, the twins not yet
                        try:
                            await in_thread(agents.record_kept)
                        except Exception:
                            log.exception("bs-twins: recording the kept steps of %s failed", where)
                    if not (agents.backlog and agents.ready):
                        continue
                    try:
                        out = await in_thread(agents.catch_up)
                    except Exception:
                        log.exception("bs-twins: acting on the kept steps of %s failed", where)
                        continue
                    if out is None:
                        continue
                    await send_rows(out, partition)
                    plan = agents.plan()
                    newest = plan.start_ms + agents.newest_hour * plan.step_ms
                    observed[partition] = max(observed.get(partition, -1), newest)
                    if out.due:
                        await settle_training(partition, None)  # one training per partition at a time
                        step_ms = plan.start_ms + max(d.hour for d in out.due) * plan.step_ms
                        start_training(partition, step_ms, partial(train_kept, agents, out, where, partition))
                release_trainings()

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
                step_ms = int(batch.starts_ms.max())
                observed[msg.partition] = max(observed.get(msg.partition, -1), step_ms)
                if out.due:  # acknowledged once its updates are sent
                    start_training(
                        msg.partition, step_ms, partial(train_then_ack, agents, out, event, stream)
                    )
                    return
                release_trainings()
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
