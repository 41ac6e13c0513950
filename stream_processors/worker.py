"""The Faust worker: the app assembled from its agents, one module each (``stream_processors/agents/``).

- ``windows`` (agents/windows.py): raw telemetry -> closed 10-minute and hourly windows.
- ``bs-twins`` (agents/bs_twins.py): hourly windows -> forecasts, outcomes and local updates per BS.
- ``sensor-screen`` (agents/sensors.py): sensor readings -> readings marked by the per-source screen.
- ``multimodal`` (agents/multimodal.py): FTM, IMU and vision records -> aligned multimodal windows.

Each agent keeps its state per input (topic, partition) in a registry of the shared ``WorkerContext``; the
app drops a partition's states when it is revoked or no longer assigned, so whatever partitions a worker is
given, its states are those of the messages it was handed, in order.

Faust's ``stream_wait_empty`` is off: on a revocation or a stop Faust would wait for every message handed
to an agent to be acknowledged, and the windows agent holds the input of still-open windows unacknowledged
until they close (which needs more input), so the wait never ended. Without it Faust commits what has been
acknowledged, that is finished work only, and the next owner of a partition re-reads the rest.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from ingest.kafka import STREAM_FETCH_MAX_WAIT_MS
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from stream_processors.agents import bs_twins, multimodal, sensors, twin_windows, windows
from stream_processors.agents.context import WorkerContext

log = logging.getLogger("nettwin.worker")


class _LowLatencyConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust fixes 1,500 ms; aiokafka hands this attribute to its fetcher in start(), which comes later
        consumer._fetch_max_wait_ms = STREAM_FETCH_MAX_WAIT_MS
        return consumer


class _LowLatencyConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _LowLatencyConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _LowLatencyTransport(faust_aiokafka.Transport):
    Consumer = _LowLatencyConsumer


class _WorkerApp(faust.App):
    """The Faust app with a consumer that waits at most STREAM_FETCH_MAX_WAIT_MS for new data."""

    def _new_transport(self) -> Any:
        return _LowLatencyTransport(self.conf.broker_consumer, self)


def make_faust_app(settings: NettwinSettings) -> faust.App:
    """The Faust app with the worker's broker, group, state directory and delivery settings."""
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
    return _WorkerApp(
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
        producer_max_batch_size=1_000_000,  # several feature messages per request (under the 1 MiB brokers take)
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=1024,
        stream_wait_empty=False,  # see the module docstring: commit what is acknowledged, wait for nothing
    )


def build_app(settings: NettwinSettings) -> faust.App:
    """Build the Faust app (never at import time: settings decide topics, group and broker)."""
    app = make_faust_app(settings)
    ctx = WorkerContext(app, settings, Topics.from_settings(settings))
    for agent in (windows, twin_windows, sensors, bs_twins, multimodal):
        agent.register(ctx)
    connect_partition_states(ctx)

    @app.timer(interval=30.0)
    async def report() -> None:
        for what, counters in ctx.reports.items():
            figures = counters()
            if figures and any(figures.values()):
                log.info("%s %s", what, figures)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode types async receivers too narrowly
    async def on_shutdown(sender: Any, *args: Any, **kwargs: Any) -> None:
        ctx.stopping.set()
        for thread in ctx.threads:
            if hasattr(thread, "stopping"):
                thread.stopping.set()

    return app


def connect_partition_states(ctx: WorkerContext) -> None:
    """Drop the agents' states of partitions this worker no longer owns (Faust sends (app, partitions))."""

    @ctx.app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode types async receivers too narrowly
    async def on_revoked(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        revoked = [(tp.topic, tp.partition) for tp in (args[0] if args else ())]
        for states in ctx.registries:
            states.revoke(revoked)

    @ctx.app.on_partitions_assigned.connect  # type: ignore[arg-type]  # mode types async receivers too narrowly
    async def on_assigned(sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        assigned = [(tp.topic, tp.partition) for tp in (args[0] if args else ())]
        for states in ctx.registries:
            states.keep_only(assigned)


def run_worker(settings: NettwinSettings, loglevel: str = "info") -> None:
    from faust.worker import Worker

    # 2 cores: one torch thread per process (measured 4x faster than the default). Set before torch is
    # imported, which happens only once the BS agents have a twin to act on.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    app = build_app(settings)
    worker = Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
