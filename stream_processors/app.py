"""The Faust worker: thin adapters around PartitionProcessor (windows) and BsAgents (per-BS twins).

``windows``: raw telemetry -> closed windows on ``features.traffic``.

``sensor-screen``: sensor readings -> the same readings marked (score, flagged) on ``features.sensors``,
per source (``stream_processors/sensor_screening.py``, robust z-score with ADWIN re-baselining).

Acks are manual: an input message is acknowledged (and so its offset committed) only once every window it
fed has been emitted and sent, so a crashed worker re-reads exactly the input of its still-open windows.
Re-emitted windows overwrite identical points in InfluxDB (same series and timestamp). Faust flushes its
producer before each (non-transactional) offset commit, so acknowledged input never has unsent output.

``multimodal``: ``replay ftm``'s FTM, IMU and SIMULATED vision records -> per-device time-aligned windows
with a modality mask on ``features.multimodal`` (``stream_processors/multimodal_live.py``). It follows
``sites.ftm`` (AP positions per scene) through a plain consumer thread, like ``twin.models``, and adds the
least-squares FTM fix to the windows of scenes whose site it knows.

``bs-twins``: hourly windows -> forecasts/outcomes on ``forecasts`` and local updates on ``updates.local``.
It follows ``twin.models`` through a plain consumer thread (every worker needs every twin, so no group).
It never acknowledges: a restarted worker rebuilds the BS histories by reading ``features.traffic`` from
the start. It skips the updates the store has already accepted and re-issues only the forecasts whose twins
are still the ones of their hour (same points, same values).
Training runs in an executor thread, so heartbeats and windowing go on meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import faust

from ingest.deadletter import DeadLetter
from ingest.kafka import make_consumer
from ingest.readers.ftm import SiteGeometry, site_from_message
from ingest.schema import MalformedMessage, decode
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from stream_processors.bs_agents import BsAgents
from stream_processors.multimodal_live import MultimodalWindower, encode_window
from stream_processors.processor import PartitionProcessor, counters_total
from stream_processors.sensor_screening import SensorScreening
from twin_store.federation.keys import KeyRegistry
from twin_store.federation.models_topic import decode_twin
from twin_store.services.htwin import LOW_LATENCY_FETCH_MS

log = logging.getLogger("nettwin.worker")

# how long a BS agent waits for the twin store to publish its previous hour's updates before acting anyway
ACK_WAIT_S = 5.0


def build_app(settings: NettwinSettings) -> faust.App:
    """Build the Faust app (never at import time: settings decide topics, group and broker)."""
    topics = Topics.from_settings(settings)
    kafka = settings.kafka
    app_id = f"{kafka.topic_prefix}nettwin-worker"
    datadir = settings.state_dir.resolve() / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    broker_credentials = None
    if kafka.sasl_mechanism:
        broker_credentials = faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password.get_secret_value() if kafka.sasl_password else None,
            mechanism=kafka.sasl_mechanism,
        )
    app = faust.App(
        app_id,
        broker=[f"kafka://{s.strip()}" for s in kafka.bootstrap_servers.split(",")],
        broker_credentials=broker_credentials,
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        topic_disable_leader=True,
        topic_allow_declare=False,  # topics are created explicitly by `nettwin infra init`
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_ms / 3000),
        consumer_auto_offset_reset="earliest",
        datadir=str(datadir),
        producer_linger_ms=5,
        producer_max_request_size=2_000_000,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=1024,
    )
    source = app.topic(
        topics.telemetry_milan, value_type=bytes, value_serializer="raw", partitions=kafka.partitions
    )
    sink = app.topic(
        topics.features_traffic, value_type=bytes, value_serializer="raw", partitions=kafka.partitions
    )
    deadletters = app.topic(topics.deadletter, value_type=bytes, value_serializer="raw", partitions=1)
    processors: dict[int, PartitionProcessor] = {}

    @app.agent(source, name="windows")
    async def windows(stream: Any) -> None:
        pending: dict[int, deque[Any]] = {}
        async for event in stream.noack().events():
            msg = event.message
            proc = processors.get(msg.partition)
            if proc is None:
                proc = processors[msg.partition] = PartitionProcessor(
                    msg.topic, msg.partition, settings.worker
                )
                pending[msg.partition] = deque()
            out = proc.on_message(event.value, msg.offset)
            for batch in out.features:
                await sink.send(value=batch.encode(), partition=msg.partition)
            for letter in out.deadletters:
                await deadletters.send(
                    value=letter.original, key=letter.source.encode(), headers=letter.headers()
                )
            queue = pending[msg.partition]
            queue.append(event)
            while queue and out.safe_offset is not None and queue[0].message.offset < out.safe_offset:
                await stream.ack(queue.popleft())

    # sensor-screen: telemetry.sensors -> features.sensors, each reading marked with score and flagged.
    # Never acknowledges: a restarted worker re-reads the topic and re-emits identical marks and counts.
    sensor_source = app.topic(
        topics.telemetry_sensors, value_type=bytes, value_serializer="raw", partitions=kafka.partitions
    )
    sensor_sink = app.topic(
        topics.features_sensors, value_type=bytes, value_serializer="raw", partitions=kafka.partitions
    )
    screening = SensorScreening("robust")

    @app.agent(sensor_source, name="sensor-screen")
    async def sensor_screen(stream: Any) -> None:
        async for event in stream.noack().events():
            msg = event.message
            out = screening.on_message(event.value, msg.topic, msg.partition, msg.offset)
            for batch in out.batches:
                await sensor_sink.send(key=msg.key, value=batch.encode(), partition=msg.partition)
            for letter in out.deadletters:
                await deadletters.send(
                    value=letter.original, key=letter.source.encode(), headers=letter.headers()
                )

    keys_file = settings.security.keys_file
    agents = BsAgents(
        KeyRegistry.load(keys_file) if keys_file is not None else None, settings.security.screen_traffic
    )
    follower = TwinFollower(settings)
    forecasts = app.topic(
        topics.forecasts, value_type=bytes, value_serializer="raw", partitions=kafka.partitions
    )
    updates = app.topic(
        topics.updates_local, value_type=bytes, value_serializer="raw", partitions=kafka.partitions
    )

    @app.agent(sink, name="bs-twins")
    async def bs_twins(stream: Any) -> None:
        if not follower.is_alive():
            follower.start()
        loop = asyncio.get_running_loop()
        async for event in stream.noack().events():
            msg = event.message
            try:
                batch = decode(event.value)
            except MalformedMessage:
                continue  # the store dead-letters what it cannot read from this topic
            if batch.step_s != 3600 or not len(batch):
                continue
            # act on twins up to the previous hour: wait (bounded) until the store published our updates
            deadline = loop.time() + ACK_WAIT_S
            follower.drain_into(agents)
            while agents.unacknowledged_before(batch):
                if loop.time() > deadline:
                    agents.give_up_waiting()
                    break
                await asyncio.sleep(0.005)
                follower.drain_into(agents)
            try:
                out = await loop.run_in_executor(None, agents.on_hour, batch)
            except MalformedMessage as exc:
                where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
                letter = DeadLetter(str(exc), msg.topic, where, event.value, "bs-twins")
                await deadletters.send(
                    value=letter.original, key=letter.source.encode(), headers=letter.headers()
                )
                continue
            for rows in [*out.outcomes, *out.forecasts]:
                await forecasts.send(value=rows.encode(), partition=msg.partition)
            for update in out.updates:
                await updates.send(key=update.key, value=update.encode(), partition=msg.partition)

    # multimodal: telemetry.ftm + telemetry.imu + telemetry.vision_sim -> features.multimodal, per device/walk
    # time-aligned windows with a modality mask (stream_processors/multimodal_live.py). The three topics are
    # keyed alike, so a device's records share a partition number. Never acknowledges: a restarted worker
    # re-reads the topics and re-emits the windows (same key and end_ms).
    mm_kinds = {
        topics.telemetry_ftm: "ftm",
        topics.telemetry_imu: "imu",
        topics.telemetry_vision_sim: "vision",
    }
    mm_source = app.topic(*mm_kinds, value_type=bytes, value_serializer="raw", partitions=kafka.partitions)
    mm_sink = app.topic(
        topics.features_multimodal, value_type=bytes, value_serializer="raw", partitions=kafka.partitions
    )
    windowers: dict[int, MultimodalWindower] = {}
    sites: dict[str, SiteGeometry] = {}  # scene -> AP positions from sites.ftm, shared by the windowers
    site_follower = SiteFollower(settings)

    async def send_windows(windows: list[dict[str, Any]], partition: int) -> None:
        for w in windows:
            await mm_sink.send(key=w["key"].encode(), value=encode_window(w), partition=partition)

    @app.agent(mm_source, name="multimodal")
    async def multimodal(stream: Any) -> None:
        if not site_follower.is_alive():
            site_follower.start()
        async for event in stream.noack().events():
            msg = event.message
            site_follower.drain_into(sites)
            windower = windowers.setdefault(msg.partition, MultimodalWindower(sites=sites))
            key = msg.key.decode(errors="replace") if msg.key else ""
            where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
            try:
                rec = json.loads(event.value)
                windows, late = windower.on_record(key, mm_kinds[msg.topic], rec, time.monotonic())
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                reason = f"unreadable {mm_kinds[msg.topic]} record: {exc!r}"
                windows, late = [], False
                letter = DeadLetter(reason, msg.topic, where, event.value, "multimodal")
                await deadletters.send(
                    value=letter.original, key=letter.source.encode(), headers=letter.headers()
                )
            if late:
                reason = f"late: event time {rec['t_ms']} is not after the last emitted window of {key}"
                letter = DeadLetter(reason, msg.topic, where, event.value, "multimodal")
                await deadletters.send(
                    value=letter.original, key=letter.source.encode(), headers=letter.headers()
                )
            await send_windows(windows, msg.partition)

    @app.timer(interval=0.5)
    async def multimodal_idle() -> None:  # idle modalities and the grace period release windows
        site_follower.drain_into(sites)
        now = time.monotonic()
        for partition, windower in list(windowers.items()):
            await send_windows(windower.flush(now), partition)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode types async receivers too narrowly
    async def on_multimodal_revoked(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        for tp in args[0] if args else ():  # another worker re-reads these partitions
            windowers.pop(tp.partition, None)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode types async receivers too narrowly
    async def on_revoked(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        # Faust sends (app, revoked_partitions). Another worker now owns them: it re-reads from the
        # committed offset and rebuilds the open windows, so our state for them is dropped.
        for tp in args[0] if args else ():
            processors.pop(tp.partition, None)

    @app.timer(interval=30.0)
    async def report() -> None:
        if processors:
            log.info("worker counters %s", counters_total(list(processors.values())))
        if agents.counters["hours"]:
            log.info("bs agent counters %s", agents.counters)

    return app


class TopicFollower(threading.Thread):
    """Reads a compacted topic from the start and keeps following it (no consumer group) into an inbox the
    event loop drains (``pending``); says why if it stops, since its readers would otherwise wait silently."""

    def __init__(self, settings: NettwinSettings, topic: str, without_it: str) -> None:
        super().__init__(name=f"{topic}-follower", daemon=True)
        self.settings = settings
        self.topic = topic
        self.without_it = without_it  # what goes missing when the follower stops
        self.inbox: queue.SimpleQueue[tuple[bytes | None, bytes | None]] = queue.SimpleQueue()

    def run(self) -> None:
        try:
            consumer = make_consumer(
                self.settings, self.topic, group_id=None, fetch_max_wait_ms=LOW_LATENCY_FETCH_MS
            )
            for m in consumer:
                self.inbox.put((m.key, m.value))
        except Exception:
            log.exception("the %s follower stopped; %s", self.topic, self.without_it)

    def pending(self) -> Iterator[tuple[bytes | None, bytes | None]]:
        """The (key, value) messages received since the last call."""
        while True:
            try:
                yield self.inbox.get_nowait()
            except queue.Empty:
                return


class TwinFollower(TopicFollower):
    """Every twin on ``twin.models``, for the BS agents."""

    def __init__(self, settings: NettwinSettings) -> None:
        super().__init__(settings, Topics.from_settings(settings).twin_models, "BS agents get no new twins")

    def drain_into(self, agents: BsAgents) -> None:
        for _, value in self.pending():
            if value is None:
                continue
            try:
                agents.on_twin(decode_twin(value))
            except MalformedMessage as exc:
                log.warning("ignoring an unreadable twin on twin.models: %s", exc)


class SiteFollower(TopicFollower):
    """Every scene's AP positions on ``sites.ftm``, for the multimodal windows' least-squares fix."""

    def __init__(self, settings: NettwinSettings) -> None:
        super().__init__(
            settings, Topics.from_settings(settings).sites_ftm, "live windows get no new AP positions"
        )

    def drain_into(self, sites: dict[str, SiteGeometry]) -> None:
        for key, value in self.pending():
            if value is None:  # a tombstone: the scene's site is withdrawn
                sites.pop((key or b"").decode(errors="replace"), None)
                continue
            try:
                geo = site_from_message(json.loads(value))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("ignoring an unreadable site on sites.ftm: %r", exc)
                continue
            sites[geo.scene] = geo


def run_worker(settings: NettwinSettings, loglevel: str = "info") -> None:
    import torch
    from faust.worker import Worker

    torch.set_num_threads(1)  # 2 cores: one thread per process (measured 4x faster than the default)
    app = build_app(settings)
    Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
