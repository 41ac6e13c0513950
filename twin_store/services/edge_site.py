"""``nettwin edge --site NAME``: one edge site, hosting the cluster twins the placement gives it.

Routing: **filter by assignment**. Every site reads all of ``updates.local`` (its own consumer group,
``nettwin-edge-<site>``) and decides only the updates of the clusters it hosts. We chose this over keying
or partitioning updates by cluster because (1) the BS agents key updates by BS and a BS changes cluster
on re-clustering, so a cluster-keyed topic would need the agents to follow membership before sending,
and a BS's updates would then cross partitions (out of order); (2) Kafka's group assignment gives
partitions to members by its own rule, while the deployment's policy (``nearest``, ``balanced``,
``learned``) must decide which site hosts which cluster; (3) the update stream is small (one message per
BS per hour), so reading it on every site costs little.

Placement: every site runs ``place_clusters`` over the declared sites that are alive, so all sites agree
without a coordinator. Alive = a heartbeat on ``edge.sites`` (JSON ``{site, at_ms, clusters, leaving}``,
every second) not older than ``timeout_s``; a heartbeat also lists the clusters the site holds.

Handover, through the topics:

- the site that loses a cluster (the placement changed, or it stops on SIGTERM) publishes the cluster's
  message on ``twin.models`` with ``host`` = the new site and ``offsets`` = per partition of
  ``updates.local`` the first offset it has not decided, flushes, drops the cluster, and sends a heartbeat
  without it;
- the site that gains a cluster waits until no live site claims it (a killed site stops claiming when its
  heartbeats are ``timeout_s`` old), reads the snapshot (``twin.models`` to its end: the cluster twin and
  its BSs' last accepted updates and sequence numbers), then re-reads ``updates.local`` from the cluster's
  ``offsets`` up to its own position, deciding that cluster's updates only. An update already accepted (or
  refused) is recognised by its BS's sequence number and skipped; an update its old site accepted but never
  published is decided here. Nothing accepted is lost, nothing applied twice.

A killed site's cluster messages always carry offsets no later than what it decided (the offset of the
update being applied, inclusive: re-deciding it is a replay). Heartbeats come from a thread of their own, so a
site busy in a long step is not taken for dead while it may still apply its clusters' updates; a hung (not
dead) site therefore keeps its clusters until it is killed. Liveness uses the sites' wall clocks (one machine,
or clocks in sync well within ``timeout_s``).

Energy ledger: every update a site accepts is a training step of its BS's twin on this site (sync over
the BS's link and compute, eqs. 14-15); a BS twin that arrives from another site (its cluster was handed
over, or a re-clustering moved it) migrates (eq. 13: twin + its last training data over the Manhattan
distance between the sites), booked when it arrives, in the slot of its last accepted update.
Rows ``edge_cost`` (tags ``site``, ``kind``; fields ``energy``, ``bytes``) per slot, as the ledger writes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from ingest.deadletter import DeadLetter
from ingest.errors import InputError
from ingest.kafka import make_consumer
from ingest.schema import MalformedMessage
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from twin_store.federation import dcs
from twin_store.federation.edge.ledger import KINDS, EdgeLedger, Migration
from twin_store.federation.edge.placement import place_clusters
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import TwinMessage, decode_twin
from twin_store.services.edge import HOUR_MS, cost_lines, ledger_from_settings
from twin_store.services.htwin import LOW_LATENCY_FETCH_MS, Outcome, TwinService, read_latest_twins

log = logging.getLogger("nettwin.edge")
HEARTBEAT_S = 1.0
WINDOW_SAMPLES = 336  # a BS's training window when the plan does not say (VH-Twin's two weeks of hours)


def cluster_offsets(meta: dict[str, Any]) -> dict[int, int]:
    """partition -> first undecided offset, from a cluster message; {} (read from the start) if unusable."""
    raw = meta.get("offsets")
    if not isinstance(raw, dict):
        return {}
    try:
        return {int(p): max(int(o), 0) for p, o in raw.items()}
    except (TypeError, ValueError):
        return {}


@dataclass(frozen=True)
class Heartbeat:
    site: str
    at_ms: int
    clusters: tuple[int, ...]
    leaving: bool = False
    epoch: int = 0  # the membership's clustering epoch the site holds


def parse_heartbeat(value: bytes | None) -> Heartbeat | str:
    """A heartbeat from ``edge.sites``, or why the message is not one."""
    try:
        beat = json.loads(value or b"")
        if not isinstance(beat, dict):
            return "not a JSON object"
        site, at, clusters = beat.get("site"), beat.get("at_ms"), beat.get("clusters")
        if not isinstance(site, str) or not site:
            return "site must be a non-empty string"
        if not isinstance(at, int) or isinstance(at, bool) or at < 0:
            return "at_ms must be an integer >= 0"
        if not isinstance(clusters, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in clusters
        ):
            return "clusters must be a list of cluster ids"
        epoch = beat.get("epoch", 0)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            return "epoch must be an integer >= 0"
        return Heartbeat(site, at, tuple(clusters), beat.get("leaving") is True, epoch)
    except (ValueError, RecursionError) as exc:
        return f"not JSON ({type(exc).__name__})"


class Presence:
    """The sites' heartbeats on ``edge.sites``: who is alive and which clusters each holds. A message that
    is not a heartbeat, one of a site not declared, or one dated more than the timeout ahead of this clock
    (it would keep its site alive; an undeclared one would hold its clusters from the declared sites), is
    handed to ``bad``."""

    def __init__(
        self, settings: NettwinSettings, timeout_s: float, bad: Callable[[Any, str], None] | None = None
    ) -> None:
        self.bad = bad or (lambda m, reason: None)
        self.declared = {s.name for s in settings.edge.sites}
        self.topic = Topics.from_settings(settings).edge_sites
        self.timeout_ms = timeout_s * 1000
        self.consumer = make_consumer(settings, group_id=None, fetch_max_wait_ms=LOW_LATENCY_FETCH_MS)
        tp = TopicPartition(self.topic, 0)
        self.consumer.assign([tp])
        end = self.consumer.end_offsets([tp])[tp]
        self.consumer.seek(tp, max(0, end - 2000))  # recent heartbeats only: older ones are stale anyway
        self.seen: dict[str, Heartbeat] = {}  # site -> its newest heartbeat

    def poll(self) -> None:
        for messages in self.consumer.poll(timeout_ms=0).values():
            for m in messages:
                beat = parse_heartbeat(m.value)
                if isinstance(beat, Heartbeat) and beat.at_ms > time.time() * 1000 + self.timeout_ms:
                    beat = f"at_ms {beat.at_ms} is ahead of this clock by more than the timeout"
                elif isinstance(beat, Heartbeat) and beat.site not in self.declared:
                    beat = f"site {beat.site!r} is not declared ([[edge.sites]])"
                if isinstance(beat, str):
                    log.warning("edge.sites @%d: not a heartbeat (%s)", m.offset, beat)
                    self.bad(m, beat)
                    continue
                if beat.site not in self.seen or beat.at_ms >= self.seen[beat.site].at_ms:
                    self.seen[beat.site] = beat

    def live(self, now_ms: int) -> set[str]:
        return {s for s, b in self.seen.items() if not b.leaving and now_ms - b.at_ms <= self.timeout_ms}

    def claims(self, now_ms: int, other_than: str) -> dict[int, str]:
        """cluster -> the live site (not ``other_than``) that still holds it."""
        live = self.live(now_ms) - {other_than}
        return {c: s for s in sorted(live) for c in self.seen[s].clusters}

    def epochs(self, now_ms: int, other_than: str) -> set[int]:
        """The membership epochs the other live sites hold."""
        return {self.seen[s].epoch for s in self.live(now_ms) - {other_than}}

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class SiteService(TwinService):
    def __init__(
        self,
        settings: NettwinSettings,
        site: str,
        milan_dir: Path | None = None,
        timeout_s: float = 6.0,
    ) -> None:
        declared = [s.name for s in settings.edge.sites]
        if site not in declared:
            raise InputError(
                f"edge site {site!r} is not declared; declared: {', '.join(declared) or 'none ([[edge.sites]])'}"
            )
        self.site = site
        self.ledger: EdgeLedger = ledger_from_settings(settings)
        self.site_index = declared.index(site)
        # twin.models from its end before the snapshot is read: a membership published meanwhile is not missed
        self.follower = make_consumer(settings, group_id=None, fetch_max_wait_ms=LOW_LATENCY_FETCH_MS)
        models = TopicPartition(Topics.from_settings(settings).twin_models, 0)
        self.follower.assign([models])
        self.follower.seek(models, self.follower.end_offsets([models])[models])
        super().__init__(settings, psi=0.0, milan_dir=milan_dir)
        self.state.merge_global = False  # the cloud merges what this site publishes
        self.state.host = site
        self.state.reclusterer = None  # the cloud re-clusters; the membership comes on the global's message
        self.timeout_s = timeout_s
        self.owned: set[int] = set()
        self.start: dict[int, dict[int, int]] = {}  # cluster -> partition -> first offset it decides
        glob = self.state.meta
        plan = StreamPlan.from_meta(glob["plan"]) if "plan" in glob else None
        self.start_ms = plan.start_ms if plan is not None else 0
        self.window = plan.window if plan is not None else WINDOW_SAMPLES
        where = milan_dir or settings.edge.milan_dir or Path(str(glob.get("milan_dir", "")))
        squares = sorted(self.state.clusters.labels)
        attrs = dcs.SquareAttributes.load(where, squares)
        self.position = {
            s: (lat, lon)
            for s, lat, lon in zip(squares, attrs.bs_lat.tolist(), attrs.bs_lon.tolist(), strict=True)
        }
        for s, (lat, lon) in self.position.items():
            self.ledger.place(str(s), lat, lon)
        self.presence = Presence(settings, timeout_s, self._bad_heartbeat)
        self.heartbeats = self.topics.edge_sites
        self.slots: dict[int, dict[str, int]] = {}  # open slot -> BS -> samples trained here
        self.moves: dict[int, list[Migration]] = {}  # open slot -> twins that arrived here
        self.booked: dict[int, dict[str, list[float]]] = {}  # slot -> kind -> [energy, bytes] so far
        self.beat_lock = threading.Lock()
        self.beats_done = threading.Event()
        self.counters |= {"takeovers": 0, "handovers": 0, "foreign": 0, "migrations": 0}
        # a membership newer than the cluster messages: a re-clustering was under way
        self._adopt(self.state.meta)

    def _screen_file(self) -> Path:
        # each site screens its own clusters' updates: its own memory
        prefix = self.settings.kafka.topic_prefix
        return self.settings.state_dir / "edge" / f"{prefix}{self.site}-screen.npz"

    def _bad_heartbeat(self, m: Any, reason: str) -> None:
        # every site reads it: the first declared site alive dead-letters it, once
        live = self.presence.live(int(time.time() * 1000)) | {self.site}
        if self.site == next(s.name for s in self.ledger.sites if s.name in live):
            self.deadletters.send(DeadLetter.for_message(m, f"edge.sites: {reason}", "edge"))

    # -- consuming -------------------------------------------------------------------------------------------
    def _make_consumer(self) -> KafkaConsumer:
        """All partitions of updates.local, assigned (no group rebalance), from this site's committed
        offsets; the group only keeps those offsets."""
        consumer = make_consumer(
            self.settings,
            group_id=f"{self.settings.kafka.topic_prefix}nettwin-edge-{self.site}",
            fetch_max_wait_ms=LOW_LATENCY_FETCH_MS,
        )
        topic = self.topics.updates_local
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or set())]
        consumer.assign(tps)
        self.state.cursor = {tp.partition: consumer.position(tp) for tp in tps}
        return consumer

    def _decide(self, m: Any) -> Outcome | None:
        """This site's updates only; the others are left to the sites that host their clusters."""
        cid = self._cluster_of(m)
        if cid is None or cid not in self.owned or m.offset < self.start.get(cid, {}).get(m.partition, 0):
            self.state.cursor[m.partition] = m.offset + 1
            self.counters["foreign"] += 1
            return None
        self.state.cursor[m.partition] = m.offset  # inclusive while it is applied: re-deciding is a replay
        try:
            out = super()._decide(m)
        finally:
            self.state.cursor[m.partition] = m.offset + 1
        if out is not None and out.decision == "accepted":
            update = decode_twin(m.value)
            slot = self._slot(int(update.meta.get("hour", 0)))
            self.slots.setdefault(slot, {})[update.twin_id] = int(update.meta["n_samples"])
        return out

    def _cluster_of(self, m: Any) -> int | None:
        """The cluster an update belongs to; a message no cluster owns (unreadable, unknown BS, already
        BS) belongs to the site holding the lowest cluster id, so it is dead-lettered once."""
        try:
            update = decode_twin(m.value or b"")
            square = int(update.twin_id)
        except (MalformedMessage, ValueError):
            return min(self.state.clusters.twins, default=None)
        return self.state.clusters.labels.get(square, min(self.state.clusters.twins, default=-1))

    # -- placement and handover ------------------------------------------------------------------------------
    def placement(self, now_ms: int, leaving: bool = False) -> dict[int, str]:
        live = (
            self.presence.live(now_ms) - {self.site} if leaving else self.presence.live(now_ms) | {self.site}
        )
        clusters = self.state.clusters
        centroids, weights = {}, {}
        for cid in sorted(set(clusters.labels.values())):
            members = clusters.members(cid)
            if not members:
                continue
            pos = np.array([self.position[s] for s in members])
            centroids[cid] = (float(pos[:, 0].mean()), float(pos[:, 1].mean()))
            weights[cid] = float(len(members) * self.window)
        return place_clusters(
            self.ledger.sites, live, centroids, weights, self.settings.edge.policy, self.ledger.learned
        )

    def rebalance(self) -> None:
        now_ms = int(time.time() * 1000)
        target = self.placement(now_ms)
        for cid in sorted(self.owned - {c for c, s in target.items() if s == self.site}):
            self.hand_over(cid, target.get(cid))
        claims = self.presence.claims(now_ms, self.site)
        if self.presence.epochs(now_ms, self.site) - {self.state.epoch}:
            return  # a re-clustering: take nothing until every live site holds the same membership
        gained = [c for c, s in target.items() if s == self.site and c not in self.owned and c not in claims]
        if gained:
            self.take_over(sorted(gained))

    def hand_over(self, cid: int, to: str | None) -> None:
        """Publish the cluster for its next site (``host`` = that site), then drop it."""
        msg = self.state._cluster_message(cid, -1)
        msg.meta |= {"host": to or "", "from": self.site, "handover": True}
        self.producer.send(self.topics.twin_models, key=msg.key, value=msg.encode())
        self.producer.flush()
        self.owned.discard(cid)
        self.counters["handovers"] += 1
        log.info("site %s: cluster %d handed over to %s", self.site, cid, to or "whichever site takes it")
        self.heartbeat()

    def take_over(self, cids: list[int]) -> None:
        """Rebuild the clusters from the snapshot, then decide their updates since their last site's offsets.

        A cluster whose message is of an older epoch than this site's membership (a re-clustering since) is
        rebuilt from its new members' last accepted updates, and its updates are re-read from the earliest
        offsets any cluster was handed back at: its members come from any old cluster."""
        latest = read_latest_twins(self.settings)  # its bad messages were dead-lettered at start
        glob = latest.get(b"global:0")
        if glob is not None:  # an emptied or brand-new cluster starts from it
            self.state.global_twin.params = torch.as_tensor(glob.params)
        names = [s.name for s in self.ledger.sites]
        old_site: dict[int, str] = {}  # square -> the site its previous cluster was on (by epoch order)
        handed: list[dict[int, int]] = []
        for m in sorted(
            (m for m in latest.values() if m.level == "cluster"), key=lambda m: m.meta.get("epoch", 0)
        ):
            if int(m.meta.get("epoch", 0)) < self.state.epoch:
                handed.append(cluster_offsets(m.meta))
            for square in m.meta.get("members", []):
                old_site[int(square)] = _previous_site(m.meta)
        earliest = {p: min((h.get(p, 0) for h in handed), default=0) for p in self.state.cursor}
        catch_up: dict[int, int] = {}
        clusters = self.state.clusters
        for cid in cids:
            msg = latest.get(f"cluster:{cid}".encode())
            fresh = msg is None or int(msg.meta.get("epoch", 0)) < self.state.epoch
            if msg is not None:
                clusters.twins[cid] = torch.as_tensor(msg.params)
                clusters.versions[cid] = msg.version
            else:
                clusters.twins[cid] = self.state.global_twin.params.clone()
            for square in clusters.members(cid):
                bs = latest.get(f"bs:{square}".encode())
                if bs is not None:
                    self.state.restore_bs(bs)
                # its old cluster's message may already be its new owner's (not listing it): then the site
                # that decided its last update
                before = old_site.get(square) or (str(bs.meta.get("host", "")) if bs is not None else "")
                if before in names and before != self.site and square in self.state.accepted_updates:
                    self._moved(square, names.index(before), bs)
            if fresh:
                clusters.aggregate(cid)  # its new members' last accepted updates
                self.start[cid] = earliest
            else:
                assert msg is not None
                self.start[cid] = cluster_offsets(msg.meta)
            for p in self.state.cursor:
                catch_up[p] = min(catch_up.get(p, self.state.cursor[p]), self.start[cid].get(p, 0))
            self.owned.add(cid)
            self.counters["takeovers"] += 1
            previous = _previous_site(msg.meta) if msg is not None else ""
            log.info("site %s: took cluster %d over (from %s)", self.site, cid, previous or "no site")
            announce = self.state._cluster_message(cid, int(msg.meta.get("as_of", -1)) if msg else -1)
            announce.meta["from"] = previous
            self.producer.send(self.topics.twin_models, key=announce.key, value=announce.encode())
        self.producer.flush()
        self.heartbeat()
        self._catch_up(catch_up)

    def _moved(self, square: int, source: int, last: TwinMessage | None) -> None:
        """Book a BS twin that arrived from another site (eq. 13: its twin and its last training data), in the
        slot of its last accepted update."""
        samples = self.state.accepted_updates[square][1]
        move = self.ledger.migration(str(square), source, self.site_index, samples)
        hour = int(last.meta.get("hour", 0)) if last is not None else 0
        self.moves.setdefault(self._slot(max(hour, 0)), []).append(move)

    def _slot(self, hour: int) -> int:
        return hour * HOUR_MS // (self.settings.edge.slot_s * 1000)

    def follow(self) -> None:
        """A new membership on the global twin's message (the cloud re-clustered): hand every cluster back,
        adopt it, and take the new clusters over once every live site has adopted it too."""
        for messages in self.follower.poll(timeout_ms=0).values():
            for m in messages:
                try:
                    msg = decode_twin(m.value or b"")
                except MalformedMessage:
                    continue  # the cloud, which follows all of twin.models, dead-letters it
                if msg.level == "global":
                    self._adopt(msg.meta)

    def _adopt(self, meta: dict[str, Any]) -> None:
        epoch, raw = meta.get("epoch"), meta.get("membership")
        if not isinstance(epoch, int) or epoch <= self.state.epoch or not isinstance(raw, dict):
            return
        try:
            labels = {int(s): int(c) for s, c in raw.items()}
        except (TypeError, ValueError):
            log.warning("site %s: membership of epoch %r unusable", self.site, epoch)
            return
        for cid in sorted(self.owned):
            self.hand_over(cid, None)
        known = self.state.clusters.labels
        known.update({s: c for s, c in labels.items() if s in known and c >= 0})
        self.state.epoch = epoch
        log.info("site %s: membership epoch %d adopted", self.site, epoch)
        self.heartbeat()

    def _catch_up(self, since: dict[int, int]) -> None:
        """Re-read updates.local from ``since`` up to this site's position; ``_decide`` keeps only the updates
        of the clusters just taken over that were not decided yet."""
        until = dict(self.state.cursor)
        todo = {p: o for p, o in since.items() if o < until.get(p, 0)}
        if not todo:
            return
        saved = self.state.cursor
        # what the clusters taken over have decided: the catch-up's position, moving as it reads
        self.state.cursor = {p: min(since.get(p, o), o) for p, o in until.items()}
        reader = make_consumer(self.settings, group_id=None, fetch_max_wait_ms=LOW_LATENCY_FETCH_MS)
        try:
            tps = {p: TopicPartition(self.topics.updates_local, p) for p in todo}
            reader.assign(list(tps.values()))
            for p, o in todo.items():
                reader.seek(tps[p], o)
            deadline = time.monotonic() + 60
            while todo and time.monotonic() < deadline:
                polled = reader.poll(timeout_ms=200)
                batch: dict[Any, list[Any]] = {}
                for tp, messages in polled.items():
                    keep = [m for m in messages if m.offset < until[tp.partition]]
                    if keep:
                        batch[tp] = keep
                    if not keep or keep[-1].offset + 1 >= until[tp.partition]:
                        todo.pop(tp.partition, None)
                if batch:
                    self.process(batch)
        finally:
            self.state.cursor = saved
            reader.close(autocommit=False)

    def heartbeat(self, leaving: bool = False) -> None:
        with self.beat_lock:  # the beat thread and the loop: a newer beat never carries older clusters
            beat: dict[str, Any] = {
                "site": self.site,
                "at_ms": int(time.time() * 1000),
                "clusters": sorted(self.owned),
                "epoch": self.state.epoch,
            }
            if leaving:
                beat["leaving"] = True
            self.producer.send(self.heartbeats, key=self.site.encode(), value=json.dumps(beat).encode())

    def _beat(self) -> None:
        """Heartbeats from a thread: a site busy in a long step (a slow InfluxDB write) stays alive, so no other
        site takes its clusters while it may still apply their updates; only a dead process stops beating."""
        while not self.beats_done.wait(HEARTBEAT_S):
            try:
                self.heartbeat()
            except Exception as exc:  # the broker is away: the loop's own calls will say so
                log.warning("site %s: heartbeat not sent (%s)", self.site, exc)

    # -- the energy ledger -----------------------------------------------------------------------------------
    def book(self, before: int | None = None) -> None:
        """Book the open slots older than ``before`` (all with None) for this site and write their rows."""
        done = sorted(s for s in self.slots.keys() | self.moves.keys() if before is None or s < before)
        lines: list[str] = []
        for slot in done:
            samples = self.slots.pop(slot, {})
            bss = sorted(samples)
            for b in bss:  # trained here: its migrations were booked when its state arrived
                self.ledger.hosts[b] = self.site_index
            part = self.ledger.book(
                slot,
                bss,
                np.array([float(samples[b]) for b in bss]),
                np.full(len(bss), self.site_index, np.int64),
            )
            totals = self.booked.setdefault(slot, {k: [0.0, 0.0] for k in KINDS})
            for kind in KINDS:
                totals[kind][0] += part.energy[(self.site, kind)]
                totals[kind][1] += part.bytes[(self.site, kind)]
            moves = self.moves.pop(slot, [])
            totals["migration"][0] += sum(mv.energy for mv in moves)
            totals["migration"][1] += sum(mv.bytes for mv in moves)
            self.counters["migrations"] += len(moves)
            when = self.start_ms + slot * self.settings.edge.slot_s * 1000
            costs = [(self.site, k, e, int(b)) for k, (e, b) in sorted(totals.items())]
            lines += cost_lines(costs, moves, when)
        for slot in sorted(self.booked)[:-4]:  # a late update rewrites its slot's totals; keep a few
            del self.booked[slot]
        if lines:
            self.influx.write_lines(lines, "ms", lambda: self.stopping, self._on_retry)

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self, idle_exit_s: float | None = None, max_messages: int | None = None) -> dict[str, int]:
        started = last = time.monotonic()
        self.heartbeat()
        beats = threading.Thread(target=self._beat, name=f"edge-{self.site}-heartbeat", daemon=True)
        beats.start()
        try:
            while not self.stopping:
                self.presence.poll()
                self.follow()
                if time.monotonic() - started >= 2 * HEARTBEAT_S + 0.5:  # first hear who else is alive
                    self.rebalance()
                polled = self.consumer.poll(timeout_ms=200)
                if polled:
                    self.process(polled)
                    if self.slots:
                        self.book(before=max(self.slots))
                    last = time.monotonic()
                elif (self.slots or self.moves) and time.monotonic() - last >= 2.0:
                    self.book()
                elif idle_exit_s is not None and time.monotonic() - last >= idle_exit_s:
                    break
        finally:
            self.keep_screen(now=True)
            self._leave()
        return self.state.counters | self.counters | {"clusters": len(self.owned)}

    def _leave(self) -> None:
        """Stop: book what trained, hand every cluster to the site the placement picks without this one."""
        self.beats_done.set()
        try:
            if self.slots or self.moves:
                self.book()
            self.presence.poll()
            target = self.placement(int(time.time() * 1000), leaving=True)
            for cid in sorted(self.owned):
                self.hand_over(cid, target.get(cid))
            self.heartbeat(leaving=True)
            self.producer.flush()
        finally:
            self.presence.close()
            self.follower.close(autocommit=False)
            self.consumer.close(autocommit=False)
            self.producer.close()
            self.influx.close()


def _previous_site(meta: dict[str, Any]) -> str:
    """The site a cluster comes from: a handover names it, otherwise its last host (killed, or gone)."""
    return str(meta.get("from") if meta.get("handover") else meta.get("host") or "")
