"""Live H-twinning in the twin store: BS local updates in, cluster and global twins out.

Consumes ``updates.local`` (``TwinMessage`` level ``bs``: meta ``seq``, ``n_samples``, ``loss``), folds each
update into its cluster twin (FedAvg of the members' latest accepted updates), offers the changed cluster
to the global twin (merged only if ``eps > psi``), publishes every changed twin to the compacted
``twin.models`` topic, writes ``twin`` rows, and commits the input offsets last.

Recovery: ``twin.models`` is the snapshot. Accepted BS updates are published there too (key ``bs:<square>``,
with their ``seq``), so a restarted store rebuilds every twin from it and resumes ``updates.local`` from
the committed offsets. An update whose ``seq`` is not newer than the BS's last accepted one is a replay
(after a crash between publishing and committing, or a resend) and is skipped, so nothing is applied twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ingest.deadletter import DeadLetter, DeadLetterSink
from ingest.kafka import make_consumer, make_producer
from ingest.schema import MalformedMessage
from ingest.topics import Topics
from nettwin.errors import InputError
from nettwin.settings import NettwinSettings
from twin_store.influx import InfluxClient
from twin_store.lineproto import point
from twin_store.models_topic import TwinMessage, decode_twin
from twin_store.twinning import ClusterTwins, GlobalTwin

log = logging.getLogger("nettwin.twins")


@dataclass
class TwinState:
    """Everything the store knows about twins; rebuilt from ``twin.models`` at start."""

    hidden: int
    clusters: ClusterTwins
    global_twin: GlobalTwin
    seq: dict[int, int] = field(default_factory=dict)  # square -> last accepted sequence number
    bs_versions: dict[int, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # the global's meta (scaler, ...)
    counters: dict[str, int] = field(default_factory=lambda: {"uploads": 0, "downloads": 0, "replays": 0})

    @classmethod
    def from_messages(cls, latest: dict[bytes, TwinMessage], psi: float) -> TwinState:
        glob = latest.get(b"global:0")
        if glob is None:
            raise InputError("twin.models has no global twin yet: run `nettwin vtwin` first")
        labels: dict[int, int] = {}
        twins: dict[int, torch.Tensor] = {}
        versions: dict[int, int] = {}
        for msg in latest.values():
            if msg.level == "cluster":
                cid = int(msg.twin_id)
                twins[cid] = torch.as_tensor(msg.params)
                versions[cid] = msg.version
                labels.update({int(s): cid for s in msg.meta.get("members", [])})
        state = cls(
            hidden=glob.hidden,
            clusters=ClusterTwins(labels=labels, twins=twins, versions=versions),
            global_twin=GlobalTwin(torch.as_tensor(glob.params), psi, version=glob.version),
            meta=glob.meta,
        )
        for msg in latest.values():
            if msg.level == "bs":
                square = int(msg.twin_id)
                state.clusters.latest[square] = (torch.as_tensor(msg.params), int(msg.meta["n_samples"]))
                state.seq[square] = int(msg.meta["seq"])
                state.bs_versions[square] = msg.version
        return state

    def gamma(self, cid: int) -> float:
        """Default H-twinning step: the cluster's share of the BSs."""
        return len(self.clusters.members(cid)) / max(len(self.clusters.labels), 1)

    def apply(self, update: TwinMessage) -> tuple[list[TwinMessage], list[str]] | None:
        """Fold one local update in; return (twins to publish, InfluxDB lines), or None for a replay."""
        square = int(update.twin_id)
        seq = int(update.meta.get("seq", -1))
        if square not in self.clusters.labels:
            raise MalformedMessage(f"BS {square} is not a member of any cluster")
        if update.params.shape != self.global_twin.params.shape:
            raise MalformedMessage(
                f"BS {square}: {update.params.size} parameters, twins have {self.global_twin.params.numel()}"
            )
        if seq <= self.seq.get(square, -1):
            self.counters["replays"] += 1
            return None
        n_samples = int(update.meta.get("n_samples", 0))
        if n_samples <= 0 or not np.isfinite(update.params).all():
            raise MalformedMessage(f"BS {square}: update needs n_samples > 0 and finite parameters")
        self.seq[square] = seq
        self.bs_versions[square] = self.bs_versions.get(square, 0) + 1
        self.counters["uploads"] += 1
        params = torch.as_tensor(update.params)
        cid = self.clusters.accept(square, params, n_samples)
        members = self.clusters.members(cid)
        self.counters["downloads"] += len(members)  # the members follow their cluster twin
        synced = self.global_twin.offer(self.clusters.twins[cid], self.gamma(cid))
        eps = self.global_twin.last_epsilon
        loss = float(update.meta.get("loss", 0.0))
        now = int(time.time() * 1000)
        out = [
            TwinMessage(
                "bs",
                str(square),
                self.bs_versions[square],
                self.hidden,
                update.params,
                {"seq": seq, "n_samples": n_samples, "loss": loss, "cluster": cid},
            ),
            TwinMessage(
                "cluster",
                str(cid),
                self.clusters.versions[cid],
                self.hidden,
                self.clusters.twins[cid].numpy(),
                {"members": members},
            ),
        ]
        lines = [
            point(
                "twin",
                {"level": "bs", "twin_id": str(square)},
                {
                    "version": self.bs_versions[square],
                    "loss": loss,
                    "n_updates": self.bs_versions[square],
                    "n_members": 1,
                },
                None,
            )
            + f" {now}",
            point(
                "twin",
                {"level": "cluster", "twin_id": str(cid)},
                {
                    "version": self.clusters.versions[cid],
                    "epsilon": eps,
                    "n_updates": self.counters["uploads"],
                    "n_members": len(members),
                },
                None,
            )
            + f" {now}",
        ]
        if synced:
            out.append(
                TwinMessage(
                    "global",
                    "0",
                    self.global_twin.version,
                    self.hidden,
                    self.global_twin.params.numpy(),
                    self.meta,
                )
            )
            lines.append(
                point(
                    "twin",
                    {"level": "global", "twin_id": "0"},
                    {
                        "version": self.global_twin.version,
                        "epsilon": eps,
                        "n_updates": self.global_twin.syncs,
                        "n_members": len(self.clusters.labels),
                    },
                    None,
                )
                + f" {now}"
            )
        return out, lines


def read_latest_twins(settings: NettwinSettings) -> dict[bytes, TwinMessage]:
    """The latest message per key on twin.models (the compacted snapshot), read to its end."""
    topic = Topics.from_settings(settings).twin_models
    consumer = make_consumer(settings, topic, group_id=None, consumer_timeout_ms=2000)
    latest: dict[bytes, TwinMessage] = {}
    try:
        for m in consumer:
            if m.key is not None and m.value is not None:
                latest[m.key] = decode_twin(m.value)
    finally:
        consumer.close()
    return latest


class TwinService:
    def __init__(self, settings: NettwinSettings, psi: float) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.state = TwinState.from_messages(read_latest_twins(settings), psi)
        self.influx = InfluxClient(settings.influx)
        self.producer = make_producer(settings)
        self.deadletters = DeadLetterSink(self.producer, self.topics.deadletter)
        self.consumer = make_consumer(
            settings, self.topics.updates_local, group_id=f"{settings.kafka.topic_prefix}nettwin-twins"
        )
        self.stopping = False

    def run(self, idle_exit_s: float | None = None, max_messages: int | None = None) -> dict[str, int]:
        handled = 0
        last = time.monotonic()
        try:
            while not self.stopping:
                polled = self.consumer.poll(
                    timeout_ms=200, max_records=max_messages - handled if max_messages else None
                )
                if polled:
                    handled += self.process(polled)
                    last = time.monotonic()
                elif not self.consumer.assignment():
                    last = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last >= idle_exit_s:
                    break
                if max_messages is not None and handled >= max_messages:
                    break
        finally:
            self.consumer.close(autocommit=False)
            self.producer.close()
            self.influx.close()
        return self.state.counters | {"global_version": self.state.global_twin.version}

    def _on_retry(self, exc: Exception, delay: float) -> None:
        log.warning("InfluxDB write failed (%s); retrying in %.1f s without committing", exc, delay)

    def process(self, polled: dict[Any, list[Any]]) -> int:
        lines: list[str] = []
        n = 0
        for messages in polled.values():
            for m in messages:
                n += 1
                try:
                    update = decode_twin(m.value or b"")
                    if update.level != "bs":
                        raise MalformedMessage(f"expected a bs update, got level {update.level!r}")
                    result = self.state.apply(update)
                except MalformedMessage as exc:
                    self.deadletters.send(DeadLetter.for_message(m, str(exc), "twins"))
                    continue
                if result is None:
                    continue
                twins, rows = result
                for t in twins:
                    self.producer.send(self.topics.twin_models, key=t.key, value=t.encode())
                lines += rows
        self.producer.flush()  # the snapshot is durable before the offsets move
        self.influx.write_lines(lines, "ms", lambda: self.stopping, self._on_retry)
        self.consumer.commit()
        return n
