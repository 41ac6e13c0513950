"""``nettwin cloud``: the global twin (G-NDT), kept current from the cluster twins the edge sites publish.

Consumes ``twin.models`` in its own consumer group and offers every changed cluster twin (a cluster message
with a newer version than the one last offered) to the global twin by the psi rule (merged only if
``eps > psi``, step gamma = the cluster's share of the BSs); a merged global is published on ``twin.models``
and written as a ``twin`` row. ``nettwin htwin`` does the same in-process (``TwinState._offer_global``, the
same code): it is the cloud and one edge site holding every cluster.

Re-clustering (when the stream plan says so, or ``--recluster-every K``) is decided here, where every BS's
accepted updates are seen (their messages on ``twin.models`` carry hour and traffic profile): after K accepted
updates, the first one of a later hour triggers DCS (``TwinState.recluster``, htwin's code). The new membership
and its epoch go out on the global twin's message (meta ``membership``, ``epoch``); the edge sites hand every
cluster back, then take the new clusters over (``services/edge_site.py``).

Bad input: a message on ``twin.models`` that does not decode, cannot be rebuilt from, names a cluster the
membership does not have, or fails in a way not foreseen is dead-lettered (stage ``cloud``: reason,
position, original bytes) and costs that message only. The cloud dead-letters for the edge sites too: it is
the one process that follows all of ``twin.models`` while it runs.

Restart: the versions offered so far travel on the global's own message (meta ``offered``), the input
offsets are committed after the global is published. On a first start (no ``offered`` yet) the cluster
versions on the snapshot count as merged: V-twinning built the global from them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ingest.deadletter import DeadLetter, DeadLetterSink
from ingest.kafka import consume_until_stopped, make_consumer, make_producer
from ingest.schema import MalformedMessage
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from twin_store.adapters.influx import InfluxClient
from twin_store.federation.local_updates import snapshot_problem
from twin_store.federation.models_topic import TwinMessage, decode_twin, is_int
from twin_store.services.htwin import (
    LOW_LATENCY_FETCH_MS,
    TwinState,
    deployment_sites,
    read_latest_twins,
    received_ns,
)

log = logging.getLogger("nettwin.cloud")


def offered_versions(meta: dict[str, Any]) -> dict[int, int] | None:
    """The cluster versions the cloud offered so far, from the global's meta; None if absent or unusable."""
    raw = meta.get("offered")
    if not isinstance(raw, dict):
        return None
    try:
        return {int(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        return None


class CloudService:
    def __init__(
        self,
        settings: NettwinSettings,
        psi: float,
        gamma: float | None = None,
        milan_dir: Path | None = None,
        recluster_every: int | None = None,
    ) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.producer = make_producer(settings)
        self.deadletters = DeadLetterSink(self.producer, self.topics.deadletter)
        latest = read_latest_twins(settings, self.deadletters)
        self.state = TwinState.from_messages(
            latest, psi, milan_dir, gamma, recluster_every=recluster_every, sites=deployment_sites(settings)
        )
        if self.state.reclusterer is not None:
            self.state.reclusterer.since = 0  # counted from this start (the sites count their own)
        self.seen_seq = {int(m.twin_id): int(m.meta["seq"]) for m in latest.values() if m.level == "bs"}
        offered = offered_versions(self.state.meta)
        if offered is None:
            offered = {int(m.twin_id): m.version for m in latest.values() if m.level == "cluster"}
        self.offered = offered
        self.influx = InfluxClient(settings.influx)
        self.consumer = make_consumer(
            settings,
            self.topics.twin_models,
            group_id=f"{settings.kafka.topic_prefix}nettwin-cloud",
            fetch_max_wait_ms=LOW_LATENCY_FETCH_MS,
        )
        self.stopping = False
        self.counters = {"offers": 0, "merges": 0, "skipped": 0, "reclusterings": 0}

    def offer(self, m: Any) -> tuple[list[Any], list[str]]:
        """One twin.models message: a cluster change is offered to the global; the global's message and row.
        A message that cannot be used is dead-lettered (the cloud is the one reader that follows all of
        twin.models while it runs) and costs that message only."""
        if m.value is None:
            return [], []
        try:
            msg = decode_twin(m.value)
            problem = snapshot_problem(msg) or self._unusable(msg)
        except MalformedMessage as exc:
            problem = str(exc)
        if problem is not None:
            self._deadletter(m, problem)
            return [], []
        try:
            if msg.level == "bs":
                return self._accepted(msg, received_ns(m))
            if msg.level == "cluster":
                return self._cluster_changed(msg, m)
        except Exception as exc:  # an input we did not foresee must cost that message only
            log.exception("twin.models %s[%d]@%d could not be used", m.topic, m.partition, m.offset)
            self._deadletter(m, f"could not be used: {type(exc).__name__}: {exc}")
        return [], []

    def _unusable(self, msg: TwinMessage) -> str | None:
        """Why a well-formed twin message cannot be used by the cloud, or None."""
        if msg.level != "cluster":
            return None
        cid = int(msg.twin_id)
        if cid not in self.state.clusters.twins:
            known = ", ".join(str(c) for c in sorted(self.state.clusters.twins))
            return f"cluster {cid} is not in the membership (clusters {known})"
        if msg.params.shape != tuple(self.state.global_twin.params.shape):
            return f"cluster {cid}: {msg.params.size} parameters, twins have {self.state.global_twin.params.numel()}"
        if "as_of" in msg.meta and not is_int(msg.meta["as_of"], -1):
            return f"cluster {cid}: as_of must be an integer >= -1, got {msg.meta['as_of']!r}"
        return None

    def _deadletter(self, m: Any, reason: str) -> None:
        log.warning("twin.models %s[%d]@%d dead-lettered: %s", m.topic, m.partition, m.offset, reason)
        self.deadletters.send(DeadLetter.for_message(m, reason, "cloud"))
        self.counters["skipped"] += 1

    def _cluster_changed(self, msg: TwinMessage, m: Any) -> tuple[list[Any], list[str]]:
        """A newer version of a cluster twin: take its membership and twin, offer it to the global."""
        cid = int(msg.twin_id)
        if msg.version <= self.offered.get(cid, -1):
            return [], []
        glob = self.state.global_twin
        clusters = self.state.clusters
        for square in [s for s, c in clusters.labels.items() if c == cid]:
            del clusters.labels[square]
        clusters.labels.update({int(s): cid for s in msg.meta.get("members", [])})
        clusters.twins[cid] = torch.as_tensor(msg.params)
        clusters.versions[cid] = msg.version
        self.offered[cid] = msg.version
        self.state.meta = self.state.meta | {"offered": {str(c): v for c, v in sorted(self.offered.items())}}
        self.counters["offers"] += 1
        before = glob.version
        out = self.state._offer_global(cid, int(msg.meta.get("as_of", 0)), received_ns(m))
        self.counters["merges"] += self.state.global_twin.version - before
        return out.twins, out.lines

    def _accepted(self, msg: TwinMessage, now: int) -> tuple[list[TwinMessage], list[str]]:
        """A BS update a site accepted: counts towards the next re-clustering, which it may trigger first."""
        square, seq = int(msg.twin_id), int(msg.meta["seq"])
        r = self.state.reclusterer
        if r is None or seq <= self.seen_seq.get(square, -1):
            return [], []
        self.seen_seq[square] = seq
        hour = int(msg.meta.get("hour", seq))
        clusters, lines = self.state.recluster(hour, now)  # the cluster twins stay the sites' to publish
        out = []
        if clusters:
            membership = {str(s): c for s, c in sorted(self.state.clusters.labels.items())}
            self.state.meta = self.state.meta | {"membership": membership, "epoch": r.membership.epoch}
            glob = self.state.global_twin
            out.append(
                TwinMessage(
                    "global",
                    "0",
                    glob.version,
                    self.state.hidden,
                    glob.params.numpy(),
                    self.state.meta | {"as_of": hour},
                )
            )
            self.counters["reclusterings"] += 1
        r.accepted(square, hour, msg.meta.get("profile"))
        return out, lines

    def process(self, polled: dict[Any, list[Any]]) -> int:
        twins, lines, n = [], [], 0
        for messages in polled.values():
            for m in messages:
                n += 1
                t, rows = self.offer(m)
                twins += t
                lines += rows
        if lines:
            self.influx.write_lines(
                lines, "ns", lambda: self.stopping, lambda exc, d: log.warning("InfluxDB: %s", exc)
            )
        # only the newest global matters (compacted topic, one key), after a roster split off a former one
        for t in [t for t in twins if t.level == "roster"] + twins[-1:]:
            self.producer.send(self.topics.twin_models, key=t.key, value=t.encode())
        self.producer.flush()
        self.consumer.commit()
        return n

    def run(self, idle_exit_s: float | None = None) -> dict[str, int]:
        try:
            consume_until_stopped(self.consumer, self.process, lambda: self.stopping, idle_exit_s)
        finally:
            self.consumer.close(autocommit=False)
            self.producer.close()
            self.influx.close()
        return self.counters | {"global_version": self.state.global_twin.version}
