"""Live H-twinning in the twin store: BS local updates in, cluster and global twins out.

Consumes ``updates.local`` (``TwinMessage`` level ``bs``: meta ``seq``, ``n_samples``, ``loss``), folds each
update into its cluster twin (FedAvg of the members' latest accepted updates), offers the changed cluster
to the global twin (merged only if ``eps > psi``), publishes every changed twin to the compacted
``twin.models`` topic, writes ``twin`` rows, and commits the input offsets last.

``nettwin htwin`` is the one-machine combination of ``nettwin cloud`` (``services/cloud.py``, the global merge,
``TwinState._offer_global``) and one ``nettwin edge`` site holding every cluster (``services/edge_site.py``, a
``TwinService`` that decides only its clusters' updates and leaves the global to the cloud).

Recovery: ``twin.models`` is the snapshot. Accepted BS updates are published there too (key ``bs:<square>``,
with their ``seq``), so a restarted store rebuilds every twin from it and resumes ``updates.local`` from
the committed offsets. An update whose ``seq`` is not newer than the BS's last accepted one is a replay
(after a crash between publishing and committing, or a resend) and is skipped, so nothing is applied twice.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from ingest.deadletter import DeadLetter, DeadLetterSink
from ingest.errors import InputError, ServiceError, Stopped
from ingest.kafka import make_consumer, make_producer
from ingest.schema import MalformedMessage
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.lineproto import point
from twin_store.adapters.twin_rows import twin_state_lines
from twin_store.federation import dcs
from twin_store.federation.keys import KeyRegistry
from twin_store.federation.local_updates import StreamPlan, snapshot_problem, update_problem
from twin_store.federation.models_topic import (
    ROSTER_KEY,
    ROSTER_VERSION,
    TwinMessage,
    cluster_membership,
    decode_twin,
    roster_message,
    roster_meta,
    roster_problem,
    split_roster,
)
from twin_store.federation.reclustering import Grouping, MilanGrouping, Reclusterer
from twin_store.federation.screening import Candidate, Defense, cluster_aggregator, make_defense
from twin_store.federation.screening.temporal import TemporalScreen
from twin_store.federation.sites import EntityGrouping, Sites, load_sites
from twin_store.federation.twinning import ClusterTwins, GlobalTwin

log = logging.getLogger("nettwin.twins")

# updates and twins are small and rare: answer fetches within 20 ms instead of the 500 ms default, so the
# round trip BS agent -> store -> BS agent fits well inside one streamed hour
LOW_LATENCY_FETCH_MS = 20
# the screen's memory (every BS's last delta: ~70 MB at 4,000 BSs of 4,390 parameters, 2-3 s to write) is
# saved at most this often while updates flow, and at stop; a crash loses at most this much of it
SCREEN_SAVE_S = 10.0


@dataclass
class TwinState:
    """Everything the store knows about twins; rebuilt from ``twin.models`` at start."""

    hidden: int
    clusters: ClusterTwins
    global_twin: GlobalTwin
    reclusterer: Reclusterer | None = None  # None: re-clustering off
    seq: dict[int, int] = field(default_factory=dict)  # square -> last accepted sequence number
    bs_versions: dict[int, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # the global's small meta (plan, roster version, ...)
    # a roster to publish before the next global: the one split off a global of the former protocol
    roster_out: list[TwinMessage] = field(default_factory=list)
    # registry key -> entity name of a [twins] deployment (bootstrapped ones and late joiners); Milan: none
    names: dict[int, str] = field(default_factory=dict)
    accepted: int = 0  # accepted updates since V-twinning (kept on twin.models with the cluster twins)
    fixed_gamma: float | None = None  # H-twinning step; None: each cluster's share of the BSs
    keys: KeyRegistry | None = None  # None: updates are not authenticated
    max_staleness: int = 500  # versions an update's base twin may lag behind its cluster twin
    defense: Defense = field(default_factory=Defense)  # screening + cluster aggregation (FedAvg: none)
    sigs: dict[int, str] = field(default_factory=dict)  # square -> signature of its last accepted update
    # False on an edge site (``nettwin edge``): the cloud (``nettwin cloud``) merges cluster changes into the
    # global twin from twin.models; True in ``nettwin htwin``, which is the cloud and one site in one process
    merge_global: bool = True
    epoch: int = 0  # the membership's clustering epoch (kept by the reclusterer when there is one)
    host: str | None = None  # the edge site hosting these cluster twins (named on their messages)
    # updates.local partition -> first offset not yet decided, as of the update being applied: a site that
    # takes a cluster over re-reads its updates from there (kept on the cluster's message)
    cursor: dict[int, int] = field(default_factory=dict)
    decided: dict[int, int] = field(default_factory=dict)  # square -> newest seq refused or accepted
    # square -> its latest accepted update (params, samples), kept even after it was evicted from its cluster
    accepted_updates: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "uploads": 0,
            "downloads": 0,
            "replays": 0,
            "reclusterings": 0,
            "moves": 0,
            "rejected": 0,
            "quarantined": 0,
            "evictions": 0,
            "joined": 0,  # BSs that joined after V-twinning (late entities of a [twins] deployment)
        }
    )

    @classmethod
    def from_messages(
        cls,
        latest: dict[bytes, TwinMessage],
        psi: float,
        milan_dir: Path | None = None,
        gamma: float | None = None,
        keys: KeyRegistry | None = None,
        defense: Defense | None = None,
        max_staleness: int = 500,
        recluster_every: int | None = None,
        sites: Sites | None = None,
    ) -> TwinState:
        """The state on ``latest``; ``recluster_every`` overrides the stream plan's interval (0: never).
        Re-clustering places Milan squares by the grid files (``milan_dir``), a ``[twins]`` deployment's
        entities by ``sites`` (its sites file) or, without it, by their traffic profiles alone."""
        glob = latest.get(b"global:0")
        if glob is None:
            raise InputError("twin.models has no global twin yet: run `nettwin vtwin` first")
        roster = latest.get(ROSTER_KEY)
        fits = {
            k: m for k, m in latest.items() if m.level != "roster" and m.params.shape == glob.params.shape
        }
        for key in sorted(latest.keys() - fits.keys() - {ROSTER_KEY}):
            log.warning(
                "twin.models %s: %d parameters, the global has %d; left out",
                key,
                latest[key].params.size,
                glob.params.size,
            )
        latest = fits
        cluster_msgs = [m for m in latest.values() if m.level == "cluster"]
        clusters = ClusterTwins(
            labels=cluster_membership(cluster_msgs),
            twins={int(m.twin_id): torch.as_tensor(m.params) for m in cluster_msgs},
            versions={int(m.twin_id): m.version for m in cluster_msgs},
        )
        epoch = max((int(m.meta.get("epoch", 0)) for m in cluster_msgs), default=0)
        accepted = max((int(m.meta.get("accepted", 0)) for m in cluster_msgs), default=0)
        last_recluster = max((int(m.meta.get("reclustered_at", 0)) for m in cluster_msgs), default=0)
        # the global's per-entity fields live on the roster; a global of the former protocol still has them
        small, legacy = split_roster(glob.meta)
        roster_out = []
        if legacy and roster is None and roster_problem(legacy) is None:
            roster_out.append(roster_message(ROSTER_VERSION, legacy))
            small["roster"] = ROSTER_VERSION
        state = cls(
            hidden=glob.hidden,
            clusters=clusters,
            global_twin=GlobalTwin(torch.as_tensor(glob.params), psi, version=glob.version),
            meta=small,
            roster_out=roster_out,
            accepted=accepted,
            fixed_gamma=gamma,
            keys=keys,
            max_staleness=max_staleness,
            defense=defense or Defense(),
            epoch=epoch,
        )
        state.clusters.aggregator = cluster_aggregator(state.defense)
        plan = StreamPlan.from_meta(glob.meta["plan"]) if "plan" in glob.meta else None
        if (
            plan is not None
            and isinstance(state.defense, TemporalScreen)
            and state.defense.max_samples is None
        ):
            state.defense.max_samples = plan.window  # no honest update trains on more samples than that
        entities = (roster_meta(glob, roster) or {}).get("entities", {})
        state.names = {int(k): str(v) for k, v in entities.items()}
        every = recluster_every if recluster_every is not None else plan.recluster_every if plan else 0
        if every > 0:
            grouping: Grouping
            if milan_dir is not None or "milan_dir" in glob.meta:
                where = milan_dir or Path(glob.meta["milan_dir"])
                grouping = MilanGrouping(dcs.SquareAttributes.load(where, sorted(clusters.labels)))
            else:
                grouping = EntityGrouping(sites, state.names)
            state.reclusterer = Reclusterer(
                grouping,
                glob.meta.get("clusters"),
                plan.seed if plan else 1,
                every,
                dcs.Membership(dict(clusters.labels), epoch),
                since=accepted - last_recluster,
            )
        for msg in latest.values():
            if msg.level == "bs":
                state.restore_bs(msg)
        return state

    def restore_bs(self, msg: TwinMessage) -> None:
        """A BS's last accepted update and decisions, from its message on twin.models."""
        square = int(msg.twin_id)
        self.accepted_updates[square] = (msg.params, int(msg.meta["n_samples"]))
        if not msg.meta.get("evicted"):
            self.clusters.latest[square] = (torch.as_tensor(msg.params), int(msg.meta["n_samples"]))
        else:
            self.clusters.latest.pop(square, None)
        self.seq[square] = int(msg.meta["seq"])
        self.decided[square] = int(msg.meta.get("decided_seq", self.seq[square]))
        if "sig" in msg.meta:
            self.sigs[square] = msg.meta["sig"]
        if "entity" in msg.meta:  # a late joiner's name (bootstrapped entities are named by the global)
            self.names[square] = msg.meta["entity"]
        self.bs_versions[square] = msg.version
        if self.reclusterer is not None:
            r = self.reclusterer
            r.last_hour = max(r.last_hour, int(msg.meta.get("hour", -1)))
            if msg.meta.get("profile") is not None:
                r.profiles[square] = list(msg.meta["profile"])

    def gamma(self, cid: int) -> float:
        """H-twinning step: the configured one, or by default the cluster's share of the BSs."""
        if self.fixed_gamma is not None:
            return self.fixed_gamma
        return len(self.clusters.members(cid)) / max(len(self.clusters.labels), 1)

    def _cluster_message(self, cid: int, as_of: int) -> TwinMessage:
        r = self.reclusterer
        return TwinMessage(
            "cluster",
            str(cid),
            self.clusters.versions.get(cid, 0),
            self.hidden,
            self.clusters.twins[cid].numpy(),
            {
                "members": self.clusters.members(cid),
                "epoch": r.membership.epoch if r else self.epoch,
                "as_of": as_of,
                "accepted": self.accepted,
                "reclustered_at": self.accepted - r.since if r else 0,
                **(
                    {"host": self.host, "offsets": {str(p): o for p, o in sorted(self.cursor.items())}}
                    if self.host is not None
                    else {}
                ),
            },
        )

    def recluster(self, hour: int, now: int) -> tuple[list[TwinMessage], list[str]]:
        """DCS re-clustering before the first update of ``hour`` (when due): members and their twins move."""
        r = self.reclusterer
        if r is None or not r.due(hour):
            return [], []
        moves = r.run(self.clusters, self.global_twin.params)
        self.counters["reclusterings"] += 1
        self.counters["moves"] += len(moves)
        log.info("re-clustered (epoch %d) before hour %d: %d BSs moved", r.membership.epoch, hour, len(moves))
        changed = sorted({c for _, old, new in moves for c in (old, new) if c is not None})
        lines = [
            point(
                "membership",
                {"entity": self.names.get(s, str(s))},
                {"cluster": c, "epoch": r.membership.epoch},
                None,
            )
            + f" {now}"
            for s, c in sorted(self.clusters.labels.items())
        ]
        # every cluster is republished: its members list carries the new epoch for the BS agents
        return [self._cluster_message(c, hour - 1) for c in sorted(self.clusters.twins)], lines + [
            line for c in changed for line in self._twin_rows("cluster", c, now)
        ]

    def _twin_rows(self, level: str, cid: int, now: int, eps: float | None = None) -> list[str]:
        """The cluster twin's ``twin`` row and ``twin_current`` point (``now``: ns)."""
        fields = {
            "version": self.clusters.versions.get(cid, 0),
            "epsilon": eps,
            "n_updates": self.accepted,
            "n_members": len(self.clusters.members(cid)),
            "n_offers": self.global_twin.offers,  # H-twinning offers so far: merges against offers
        }
        return twin_state_lines(level, str(cid), fields, now, "ns")

    def _admit(self, square: int, update: TwinMessage) -> bool:
        """A BS that joined after V-twinning: it names the cluster its agent chose (nearest by position or
        profile) in its signed meta; it becomes a member there. With a key registry only BSs with a key get
        this far (``keys.problem`` refused the others)."""
        claimed = update.meta.get("cluster")
        if update.meta.get("joined") is not True:
            return False
        if not isinstance(claimed, int) or claimed not in self.clusters.twins:
            return False
        self.clusters.labels[square] = claimed
        self.names[square] = str(update.meta.get("entity", square))
        if self.reclusterer is not None:
            self.reclusterer.joined(square, claimed)
        return True

    def apply(self, update: TwinMessage, now: int | None = None) -> Outcome | None:
        """Check, screen and fold in one local update; None for a duplicate delivery of an accepted one.

        Rejected (not authentic, a replay, too stale) and quarantined (screened out) updates never touch a
        twin. Every decision writes an ``update`` row; refused ones are also acknowledged to the BS
        agents (``decided_seq`` on its ``bs`` twin), so an agent does not wait for an answer that never
        comes.

        Rows are timestamped ``now`` (ns; by default the clock): the service passes the message's own Kafka
        timestamp, so a message applied again after a crash rewrites the same rows instead of adding rows.
        """
        malformed = update_problem(update)
        if malformed is not None:
            raise MalformedMessage(malformed)
        square = int(update.twin_id)
        seq = int(update.meta.get("seq", -1))
        now = time.time_ns() if now is None else now
        problem = self.keys.problem(update) if self.keys is not None else None
        if problem is None and update.params.shape != self.global_twin.params.shape:
            raise MalformedMessage(
                f"BS {square}: {update.params.size} parameters, twins have {self.global_twin.params.numel()}"
            )
        joining = problem is None and square not in self.clusters.labels
        if joining and not self._admit(square, update):
            raise MalformedMessage(f"BS {square} is not a member of any cluster")
        if problem is None and seq <= self.seq.get(square, -1):
            if self.keys is None or update.meta.get("sig") == self.sigs.get(square):
                self.counters["replays"] += 1  # redelivered after a restart: already in the twins
                return None
            problem = f"replay: seq {seq} is not newer than the accepted {self.seq[square]}"
        if problem is None:
            base, claimed = int(update.meta.get("base_version", -1)), int(update.meta.get("cluster", -1))
            lag = self.clusters.versions.get(claimed, base) - base
            if lag > self.max_staleness:
                problem = (
                    f"stale: base twin {lag} versions behind cluster {claimed} (bound {self.max_staleness})"
                )
        if problem is not None:
            if joining:  # refused: it does not join
                del self.clusters.labels[square]
                if self.reclusterer is not None:
                    self.reclusterer.membership.labels.pop(square, None)
            self.counters["rejected"] += 1
            return self._refused(update, "rejected", problem, float("nan"), now)
        n_samples = int(update.meta["n_samples"])
        hour = int(update.meta.get("hour", seq))
        out, lines = self.recluster(hour, now)
        if joining:
            self.counters["joined"] += 1
            epoch = self.reclusterer.membership.epoch if self.reclusterer else 0
            lines.append(
                point(
                    "membership",
                    {"entity": self.names[square]},
                    {"cluster": self.clusters.labels[square], "epoch": epoch},
                    None,
                )
                + f" {now}"
            )
        params = torch.as_tensor(update.params)
        cid = self.clusters.labels[square]
        loss = float(update.meta.get("loss", 0.0))
        verdict = self.defense.screen(
            Candidate(
                square,
                cid,
                params,
                self.clusters.twins[cid],
                tuple(self.clusters.members(cid)),
                n_samples,
                loss,
                hour,
            )
        )
        if not verdict.accepted:
            self.counters["quarantined"] += 1
            # its earlier accepted update leaves its cluster too
            evicted = self.clusters.evict(square, self.global_twin.params)
            refused = self._refused(update, "quarantined", verdict.reason, verdict.score, now, verdict.norm)
            out, lines = out + refused.twins, lines + refused.lines
            if evicted is not None:
                self.counters["evictions"] += 1
                out.append(self._cluster_message(cid, hour))
                glob = self._offer_global(cid, hour, now)
                lines += self._twin_rows("cluster", cid, now, self.global_twin.last_epsilon)
                out += glob.twins
                lines += glob.lines
            return Outcome(out, lines, "quarantined", verdict.reason)
        self.seq[square] = self.decided[square] = seq
        self.accepted_updates[square] = (update.params, n_samples)
        if "sig" in update.meta:
            self.sigs[square] = update.meta["sig"]
        self.bs_versions[square] = self.bs_versions.get(square, 0) + 1
        self.accepted += 1
        self.counters["uploads"] += 1
        cid = self.clusters.accept(square, params, n_samples)
        if self.reclusterer is not None:
            self.reclusterer.accepted(square, hour, update.meta.get("profile"))
        members = self.clusters.members(cid)
        self.counters["downloads"] += len(members)  # the members follow their cluster twin
        glob = self._offer_global(cid, hour, now)
        # the BS's own message last: a restart takes it as "applied" (replay check), so everything it
        # caused is on twin.models before it (one partition, in order)
        out += [
            self._cluster_message(cid, hour),
            *glob.twins,
            self._bs_message(square, update.params, hour, n_samples, loss, update.meta),
        ]
        bs_fields = {
            "version": self.bs_versions[square],
            "loss": loss,
            "n_updates": self.bs_versions[square],
            "n_members": 1,
        }
        # a [twins] entity's name; a Milan square's entity is its number
        entity = update.meta.get("entity")
        entity = entity if isinstance(entity, str) else str(square)
        lines += [
            *twin_state_lines("bs", str(square), bs_fields, now, "ns", entity),
            *self._twin_rows("cluster", cid, now, self.global_twin.last_epsilon),
            self._update_row(update, "accepted", "", verdict.score, verdict.norm, now),
            *glob.lines,
        ]
        return Outcome(out, lines, "accepted")

    def _offer_global(self, cid: int, hour: int, now: int) -> Outcome:
        """H-twinning: offer the changed cluster twin to the global; the global's message and row if merged.
        Nothing on an edge site: there the cloud offers what the site publishes (``merge_global``)."""
        if not self.merge_global or not self.global_twin.offer(self.clusters.twins[cid], self.gamma(cid)):
            return Outcome([], [], "")
        # the meta is small (no per-entity fields: those are on the roster), so a merge costs the parameters
        msg = TwinMessage(
            "global",
            "0",
            self.global_twin.version,
            self.hidden,
            self.global_twin.params.numpy(),
            self.meta | {"as_of": hour},
        )
        fields = {
            "version": self.global_twin.version,
            "epsilon": self.global_twin.last_epsilon,
            "n_updates": self.global_twin.syncs,
            "n_members": len(self.clusters.labels),
            "n_offers": self.global_twin.offers,
        }
        first, self.roster_out = self.roster_out, []
        return Outcome([*first, msg], twin_state_lines("global", "0", fields, now, "ns"), "")

    def _bs_message(
        self, square: int, params: np.ndarray, hour: int, n_samples: int, loss: float, meta: dict[str, Any]
    ) -> TwinMessage:
        """The BS's latest accepted update, as kept on twin.models (``decided_seq``: the newest it refused)."""
        return TwinMessage(
            "bs",
            str(square),
            self.bs_versions.get(square, 0),
            self.hidden,
            params,
            {
                "seq": self.seq.get(square, -1),
                "decided_seq": self.decided.get(square, -1),
                "hour": hour,
                "n_samples": n_samples,
                "loss": loss,
                "cluster": self.clusters.labels.get(square, -1),
                "profile": meta.get("profile"),
                **({"entity": self.names[square]} if square in self.names else {}),
                **({"sig": self.sigs[square]} if square in self.sigs else {}),
                **({"evicted": True} if square not in self.clusters.latest else {}),
                **({"host": self.host} if self.host is not None else {}),  # the edge site that decided it
            },
        )

    def _refused(
        self,
        update: TwinMessage,
        decision: str,
        reason: str,
        score: float,
        now: int,
        norm: float | None = None,
    ) -> Outcome:
        lines = [self._update_row(update, decision, reason, score, norm, now)]
        square = int(update.twin_id)
        if square not in self.accepted_updates:  # not a BS the agents serve: nothing to acknowledge
            return Outcome([], lines, decision, reason)
        seq = int(update.meta.get("seq", -1))
        self.decided[square] = max(self.decided.get(square, -1), seq)
        params, n_samples = self.accepted_updates[square]
        last = {"profile": self.reclusterer.profiles.get(square)} if self.reclusterer else {}
        ack = self._bs_message(square, params, self.seq.get(square, -1), n_samples, 0.0, last)
        return Outcome([ack], lines, decision, reason)

    def _update_row(
        self, update: TwinMessage, decision: str, reason: str, score: float, norm: float | None, now: int
    ) -> str:
        fields: dict[str, Any] = {
            "score": score if np.isfinite(score) else None,
            "reason": reason,
            "base_version": int(update.meta.get("base_version", -1)),
            "seq": int(update.meta.get("seq", -1)),
        }
        if norm is not None:
            fields["norm"] = norm
        tags = {
            "entity": update.twin_id,
            "cluster": str(update.meta.get("cluster", -1)),
            "decision": decision,
        }
        return point("update", tags, fields, None) + f" {now}"


@dataclass
class Outcome:
    twins: list[TwinMessage]  # to publish on twin.models
    lines: list[str]  # InfluxDB rows
    decision: str  # accepted, quarantined or rejected
    reason: str = ""


def read_latest_twins(
    settings: NettwinSettings, deadletters: DeadLetterSink | None = None, stall_s: float = 30.0
) -> dict[bytes, TwinMessage]:
    """The latest valid message per key on twin.models (the compacted snapshot), read at least to the end
    offsets the topic had when reading began (never just "until quiet": a slow broker must not yield half a
    snapshot), then to the end of what the broker already returned.

    A message that does not decode or cannot be rebuilt from is dead-lettered (when ``deadletters`` is
    given) and leaves that key at its previous valid message; a tombstone (null value) deletes the key.
    """
    topic = Topics.from_settings(settings).twin_models
    consumer = make_consumer(settings, group_id=None)
    latest: dict[bytes, TwinMessage] = {}
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return latest
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        remaining = {tp for tp in tps if consumer.position(tp) < end[tp]}
        last_progress = time.monotonic()
        while remaining:
            polled = consumer.poll(timeout_ms=500)
            for messages in polled.values():
                for m in messages:
                    _read_snapshot_message(m, latest, deadletters)
            if polled:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > stall_s:
                behind = {f"{tp.partition}": end[tp] - consumer.position(tp) for tp in sorted(remaining)}
                raise ServiceError(
                    f"{topic}: no progress for {stall_s:.0f} s reading to its end offsets "
                    f"(messages left per partition: {behind}); is the broker healthy?"
                )
            remaining = {tp for tp in remaining if consumer.position(tp) < end[tp]}
        # then what the last fetch already holds (no wait): some brokers (Tansu) answer "end offset" with the
        # last batch's base offset + 1, which leaves the rest of that batch unread; on Kafka this finds nothing
        while any(end[tp] > 0 for tp in tps):
            polled = consumer.poll(timeout_ms=0)
            if not polled:
                break
            for messages in polled.values():
                for m in messages:
                    _read_snapshot_message(m, latest, deadletters)
    finally:
        consumer.close()
    if deadletters is not None:
        deadletters.producer.flush()
    return latest


def _read_snapshot_message(
    m: Any, latest: dict[bytes, TwinMessage], deadletters: DeadLetterSink | None
) -> None:
    if m.value is None:
        if m.key is not None:
            latest.pop(m.key, None)  # a tombstone: the twin was deleted
        return
    try:
        msg = decode_twin(m.value)
        problem = snapshot_problem(msg)
        if problem is None and m.key != msg.key:
            problem = f"key {m.key!r} does not name the twin {msg.key!r} in the message"
    except MalformedMessage as exc:
        problem = str(exc)
    if problem is None:
        latest[msg.key] = msg
        return
    log.warning("twin.models %s[%d]@%d skipped: %s", m.topic, m.partition, m.offset, problem)
    if deadletters is not None:
        deadletters.send(DeadLetter.for_message(m, problem, "twins"))


def deployment_sites(settings: NettwinSettings) -> Sites | None:
    """The ``[twins] sites`` file's positions, for re-clustering; None without one."""
    return load_sites(settings.twins.sites) if settings.twins.sites is not None else None


class TwinService:
    def __init__(
        self,
        settings: NettwinSettings,
        psi: float,
        milan_dir: Path | None = None,
        gamma: float | None = None,
    ) -> None:
        # one torch thread, as in the worker: the processes of a deployment share the cores, and the store's
        # tensors (one update's screen and sums, ~4,400 parameters) are too small to gain from more
        torch.set_num_threads(1)
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        sec = settings.security
        keys = KeyRegistry.load(sec.keys_file) if sec.keys_file is not None else None
        try:
            defense = make_defense(sec.defense)
        except ValueError as exc:
            raise InputError(f"security.defense: {exc}") from None
        self.producer = make_producer(settings)
        self.deadletters = DeadLetterSink(self.producer, self.topics.deadletter)
        self.psi, self.milan_dir, self.fixed_gamma = psi, milan_dir, gamma
        self.keys, self.defense = keys, defense
        self.stopping = False
        # the screen's memory (peer deltas, per-BS detectors) is not on twin.models: it is kept beside the
        # committed offsets (at most SCREEN_SAVE_S behind them), so a restarted store screens at once
        self.screen_file = self._screen_file()
        self.screen_saved = time.monotonic()  # when the screen's memory was last saved
        self.screen_unsaved = False  # decisions since then
        latest = read_latest_twins(settings, self.deadletters)
        # a [twins] deployment without twins yet bootstraps them from its stream's history (``run``)
        self.bootstrapping = b"global:0" not in latest and settings.twins.target is not None
        if not self.bootstrapping:
            self._load_state(latest)
        self.influx = InfluxClient(settings.influx)
        self.consumer = self._make_consumer()
        self.counters = {"deadletters": 0}

    def _screen_file(self) -> Path:
        return self.settings.state_dir / "store" / f"{self.settings.kafka.topic_prefix}screen.npz"

    def _make_consumer(self) -> KafkaConsumer:
        """updates.local in the one-machine store's group (an edge site reads it in its own)."""
        return make_consumer(
            self.settings,
            self.topics.updates_local,
            group_id=f"{self.settings.kafka.topic_prefix}nettwin-twins",
            fetch_max_wait_ms=LOW_LATENCY_FETCH_MS,
        )

    def _load_state(self, latest: dict[bytes, TwinMessage]) -> None:
        sec = self.settings.security
        self.state = TwinState.from_messages(
            latest,
            self.psi,
            self.milan_dir,
            self.fixed_gamma,
            self.keys,
            self.defense,
            sec.max_staleness,
            sites=deployment_sites(self.settings),
        )
        if self.state.defense.remembers:
            saved = load_screen(
                self.screen_file, type(self.state.defense), self.state.global_twin.params.numel()
            )
            if saved is not None:
                self.state.defense = saved
                self.state.clusters.aggregator = cluster_aggregator(saved)

    def bootstrap(self, poll_s: float = 5.0) -> dict[str, Any] | None:
        """Wait until the stream's history is enough (``[twins]`` bootstrap thresholds), V-twin on it, and
        load the twins; None if stopped first. Progress is logged at every check."""
        from twin_store.services.vtwin import bootstrap_need, bootstrap_ready, run_vtwin_from_influx

        twins = self.settings.twins
        need = bootstrap_need(self.settings)
        last_log = 0.0
        while not self.stopping:
            ok, have = bootstrap_ready(self.settings, self.influx)
            if ok and not self.stopping:
                try:
                    summary = run_vtwin_from_influx(
                        self.settings, stop=lambda: self.stopping, roster_first=True
                    )
                except Stopped as exc:  # SIGTERM: leave now; the next start bootstraps from scratch
                    log.info("bootstrap stopped (%s): no twin published", exc)
                    return None
                log.info("bootstrap V-twinning done: %s", summary)
                self._load_state(read_latest_twins(self.settings, self.deadletters))
                self.bootstrapping = False
                return summary
            if time.monotonic() - last_log > 30:
                log.info(
                    "bootstrap: %d of %d entities have %d steps of %r; waiting",
                    have,
                    twins.bootstrap_entities,
                    need,
                    twins.target,
                )
                last_log = time.monotonic()
            deadline = time.monotonic() + poll_s
            while not self.stopping and time.monotonic() < deadline:
                time.sleep(0.1)
        return None

    def run(self, idle_exit_s: float | None = None, max_messages: int | None = None) -> dict[str, int]:
        handled = 0
        try:
            if self.bootstrapping and self.bootstrap() is None:
                return self.counters | {"bootstrapped": 0}
            last = time.monotonic()
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
            self.keep_screen(now=True)
            self.consumer.close(autocommit=False)
            self.producer.close()
            self.influx.close()
        return self.state.counters | self.counters | {"global_version": self.state.global_twin.version}

    def _on_retry(self, exc: Exception, delay: float) -> None:
        log.warning("InfluxDB write failed (%s); retrying in %.1f s without committing", exc, delay)

    def _deadletter(self, m: Any, reason: str) -> None:
        self.deadletters.send(DeadLetter.for_message(m, reason, "twins"))
        self.counters["deadletters"] += 1

    def _decide(self, m: Any) -> Outcome | None:
        """Decode, check and apply one message of updates.local; raises MalformedMessage for bad data."""
        update = decode_twin(m.value or b"")
        if update.level != "bs":
            raise MalformedMessage(f"expected a bs update, got level {update.level!r}")
        if m.key is not None and m.key != update.key:
            raise MalformedMessage(f"key {m.key!r} does not name the BS {update.key!r} in the message")
        try:
            return self.state.apply(update, received_ns(m))
        except MalformedMessage:
            raise
        except Exception as exc:  # an input we did not foresee must cost that message only
            log.exception("update %s[%d]@%d could not be applied", m.topic, m.partition, m.offset)
            raise MalformedMessage(f"could not be applied: {type(exc).__name__}: {exc}") from exc

    def process(self, polled: dict[Any, list[Any]]) -> int:
        """Decide on one poll: rows first (timestamped by the messages, so rewriting them after a crash is
        idempotent), then the twins on twin.models (a restart skips what is there as replays), the screen's
        memory, and the offsets last."""
        decided: list[tuple[Any, Outcome]] = []
        n = 0
        for messages in polled.values():
            for m in messages:
                n += 1
                try:
                    result = self._decide(m)
                except MalformedMessage as exc:
                    self._deadletter(m, str(exc))
                    continue
                if result is not None:
                    decided.append((m, result))
        self._write([(m, result.lines) for m, result in decided])
        for m, result in decided:
            for t in result.twins:
                self.producer.send(self.topics.twin_models, key=t.key, value=t.encode())
            if result.decision != "accepted":  # kept, with why, where `nettwin query updates` finds them
                headers = [("decision", result.decision.encode()), ("reason", result.reason.encode())]
                self.producer.send(self.topics.updates_quarantine, key=m.key, value=m.value, headers=headers)
        self.producer.flush()  # the snapshot and the dead letters are durable before the offsets move
        if n and self.state.defense.remembers:
            self.screen_unsaved = True
            self.keep_screen()
        self.consumer.commit()
        return n

    def keep_screen(self, now: bool = False) -> None:
        """Save the screen's memory if it changed and ``SCREEN_SAVE_S`` have passed (or ``now``: at stop)."""
        if self.screen_unsaved and (now or time.monotonic() - self.screen_saved >= SCREEN_SAVE_S):
            save_screen(self.screen_file, self.state.defense)
            self.screen_saved, self.screen_unsaved = time.monotonic(), False

    def _write(self, written: list[tuple[Any, list[str]]]) -> None:
        """Write the rows; if InfluxDB refuses some (HTTP 400), write message by message and dead-letter
        the messages whose rows it refuses (their twins are still published: the decision stands)."""

        def write(lines: list[str]) -> None:
            self.influx.write_lines(lines, "ns", lambda: self.stopping, self._on_retry)

        try:
            write([line for _, lines in written for line in lines])
        except InputError:
            for m, lines in written:
                try:
                    write(lines)
                except InputError as exc:
                    self._deadletter(m, f"InfluxDB refused its rows: {exc}")


def received_ns(m: Any) -> int:
    """Row time of a consumed message: its Kafka timestamp (ms) plus its offset as sub-millisecond digits,
    unique per partition and the same every time the message is read."""
    ts = getattr(m, "timestamp", None)
    if not isinstance(ts, int) or ts <= 0:
        return time.time_ns()
    return ts * 1_000_000 + m.offset % 1_000_000


SCREEN_FORMAT = 1


def save_screen(path: Path, defense: Defense) -> None:
    """The screen's memory as an .npz of plain arrays (no pickled objects): the JSON document as bytes and
    the per-square tensors as one float32 matrix. Written atomically: a crash leaves the previous one."""
    doc, tensors = defense.state()
    squares = list(tensors)  # in the defense's order (the temporal screen's is recency)
    width = max((tensors[s].numel() for s in squares), default=0)
    matrix = np.zeros((len(squares), width), np.float32)
    for i, s in enumerate(squares):
        matrix[i] = tensors[s].numpy()
    head = json.dumps({"format": SCREEN_FORMAT, "defense": defense.name, "state": doc}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, doc=np.frombuffer(head, np.uint8), squares=np.asarray(squares, np.int64), tensors=matrix)
    tmp.replace(path)


def load_screen(path: Path, kind: type[Defense], n_params: int) -> Defense | None:
    """The memory ``save_screen`` wrote, checked; None (the screen warms up again) when there is none or
    it cannot be used. Loaded with ``allow_pickle=False``: the file is data, never code."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            head = json.loads(f["doc"].tobytes())
            squares, matrix = f["squares"], f["tensors"]
        if (
            not isinstance(head, dict)
            or head.get("format") != SCREEN_FORMAT
            or head.get("defense") != kind.name
        ):
            raise ValueError(f"not a {kind.name} screen memory (format {SCREEN_FORMAT})")
        if squares.ndim != 1 or squares.dtype.kind != "i" or matrix.dtype != np.float32 or matrix.ndim != 2:
            raise ValueError("squares must be integers and tensors a float32 matrix")
        if len(squares) != len(matrix) or (len(squares) and matrix.shape[1] != n_params):
            raise ValueError(f"tensors of shape {matrix.shape}, expected ({len(squares)}, {n_params})")
        if not np.isfinite(matrix).all():
            raise ValueError("tensors must be finite")
        tensors = {int(s): torch.from_numpy(matrix[i].copy()) for i, s in enumerate(squares)}
        return kind.from_state(head["state"], tensors)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
        log.warning("screen memory %s unusable (%s); the screen warms up again", path, exc)
        return None
