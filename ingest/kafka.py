"""Thin kafka-python adapters: client construction, reachability checks, topic creation.

kafka-python 3.x is used (the maintained line). Unlike 2.x it does not raise NoBrokersAvailable at
construction but blocks on metadata, so every entry point first checks that a bootstrap server accepts
TCP connections and fails fast with one line if none does.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from ingest.errors import ServiceError
from ingest.settings import NettwinSettings
from ingest.topics import TopicSpec, topic_specs

# one Kafka message carries up to this many records; keeps messages well under the 1 MB default
# message.max.bytes of Apache Kafka (52 bytes a record with five activity columns -> ~520 kB)
MAX_RECORDS_PER_MESSAGE = 10_000
MAX_REQUEST_BYTES = 1_000_000
# How long the broker may hold a fetch that finds no new data, for the consumers on the streaming path
# (worker, store). Tansu answers such a fetch late even when data arrives meanwhile (measured delivery
# median / max: 0.27 / 0.74 s at Faust's fixed 1,500 ms, 0.06 / 0.23 s at kafka-python's 500 ms default,
# 47 / 76 ms at 200 ms), and every stage adds that to a window's lag. The price: an idle consumer asks 5
# times a second (measured 2% of a core in Tansu and 1.4% in the client, against 0.9% / 0.8% at 500 ms).
STREAM_FETCH_MAX_WAIT_MS = 200


def ensure_kafka_reachable(settings: NettwinSettings, timeout_s: float = 5.0) -> None:
    errors = []
    for server in settings.kafka.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "localhost", int(port)), timeout=timeout_s):
                return
        except (OSError, ValueError) as exc:
            errors.append(f"{server}: {getattr(exc, 'strerror', None) or exc}")
    raise ServiceError(
        f"Kafka unreachable ({'; '.join(errors)}); start the local broker with infra/up "
        "or set NETTWIN_KAFKA__BOOTSTRAP_SERVERS"
    )


def make_producer(settings: NettwinSettings, **overrides: Any) -> KafkaProducer:
    ensure_kafka_reachable(settings)
    opts: dict[str, Any] = {
        **settings.kafka.client_options(),
        "linger_ms": 5,
        "batch_size": 1 << 20,
        "max_request_size": MAX_REQUEST_BYTES + 64_000,
        "acks": "all",
        "retries": 5,
        **overrides,
    }
    try:
        return KafkaProducer(**opts)
    except KafkaError as exc:
        raise ServiceError(f"Kafka producer for {settings.kafka.bootstrap_servers}: {exc}") from exc


def make_consumer(
    settings: NettwinSettings, *topics: str, group_id: str | None, **overrides: Any
) -> KafkaConsumer:
    ensure_kafka_reachable(settings)
    opts: dict[str, Any] = {
        **settings.kafka.client_options(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": max(500, settings.session_timeout_ms // 3),
        "max_partition_fetch_bytes": 8 << 20,
        "fetch_max_bytes": 32 << 20,
        **overrides,
    }
    try:
        return KafkaConsumer(*topics, **opts)
    except KafkaError as exc:
        raise ServiceError(f"Kafka consumer for {settings.kafka.bootstrap_servers}: {exc}") from exc


def consume_until_stopped(
    consumer: KafkaConsumer,
    process: Callable[[dict[Any, list[Any]]], Any],
    stopping: Callable[[], bool],
    idle_exit_s: float | None = None,
    paused: Callable[[float], bool] | None = None,
) -> None:
    """The consuming loop of a service: poll and ``process`` until ``stopping()``, or until ``idle_exit_s``
    without a message while partitions are assigned (a rebalance does not count as idle). ``paused(idle_s)``
    is asked on every empty poll first and returns True when it acted on the pause (e.g. closed a slot)."""
    last = time.monotonic()
    while not stopping():
        polled = consumer.poll(timeout_ms=200)
        now = time.monotonic()
        if polled:
            process(polled)
            last = time.monotonic()
        elif paused is not None and paused(now - last):
            continue
        elif not consumer.assignment():
            last = now
        elif idle_exit_s is not None and now - last >= idle_exit_s:
            break


def make_admin(settings: NettwinSettings) -> KafkaAdminClient:
    ensure_kafka_reachable(settings)
    try:
        return KafkaAdminClient(**settings.kafka.client_options(), request_timeout_ms=15_000)
    except KafkaError as exc:
        raise ServiceError(f"Kafka admin for {settings.kafka.bootstrap_servers}: {exc}") from exc


def create_topics(settings: NettwinSettings, specs: list[TopicSpec]) -> dict[str, str]:
    """Create each topic that is missing; report 'created' / 'exists' per topic name.

    An existing topic with a different partition count is an error: square -> partition routing and
    per-partition windows depend on it.
    """
    admin = make_admin(settings)
    status: dict[str, str] = {}
    try:
        existing = set(admin.list_topics())
        for spec in specs:
            if spec.name in existing:
                status[spec.name] = "exists"
                continue
            configs = {"cleanup.policy": "compact"} if spec.compacted else {}
            topic = NewTopic(
                spec.name, spec.partitions, settings.kafka.replication_factor, topic_configs=configs
            )
            try:
                admin.create_topics([topic])
                status[spec.name] = "created"
            except TopicAlreadyExistsError:
                status[spec.name] = "exists"
    except KafkaError as exc:
        raise ServiceError(f"creating topics on {settings.kafka.bootstrap_servers}: {exc}") from exc
    finally:
        admin.close()
    probe = make_consumer(settings, group_id=None)
    try:
        for spec in specs:
            parts = probe.partitions_for_topic(spec.name) or set()
            if len(parts) != spec.partitions:
                raise ServiceError(
                    f"topic {spec.name} has {len(parts)} partitions, settings say {spec.partitions}; "
                    "delete it or set NETTWIN_KAFKA__PARTITIONS to match"
                )
    finally:
        probe.close()
    return status


def ensure_topics_exist(settings: NettwinSettings, names: list[str]) -> None:
    """Fail with one line if a topic is missing (a producer would have the broker auto-create it, with the
    broker's partition count, and the data would go where no worker reads) or has another partition count."""
    probe = make_consumer(settings, group_id=None)
    try:
        existing = probe.topics()  # a metadata request for all topics: creates nothing
        missing = [n for n in names if n not in existing]
        if missing:
            raise ServiceError(
                f"topic {missing[0]} does not exist on {settings.kafka.bootstrap_servers}"
                + (f" (nor {', '.join(missing[1:])})" if missing[1:] else "")
                + "; create the topics with `nettwin infra init` (same settings and --topic-prefix)"
            )
        want = {spec.name: spec.partitions for spec in topic_specs(settings)}
        for name in names:
            have = len(probe.partitions_for_topic(name) or ())
            if name in want and have != want[name]:
                raise ServiceError(
                    f"topic {name} has {have} partitions, settings say {want[name]}; "
                    "set NETTWIN_KAFKA__PARTITIONS to match"
                )
    except KafkaError as exc:
        raise ServiceError(f"listing topics on {settings.kafka.bootstrap_servers}: {exc}") from exc
    finally:
        probe.close()


def delete_topics(settings: NettwinSettings, names: list[str]) -> None:
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            admin.delete_topics(doomed)
    except KafkaError as exc:
        raise ServiceError(f"deleting topics on {settings.kafka.bootstrap_servers}: {exc}") from exc
    finally:
        admin.close()
