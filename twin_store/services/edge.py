"""``nettwin edge-ledger``: the energy ledger of the deployment's edge sites (DITEN), written per slot.

Reads ``updates.local`` in its own consumer group (beside ``nettwin htwin``, which it does not touch):
every BS local update of a slot is one training step of that BS's twin. When a slot closes (an update of
a later slot arrived, or the stream went idle) the BSs that trained in it are placed on the declared
sites by the configured policy (``[edge] policy``), migrations are recorded, and eqs. 13-15 are booked
per site and kind into InfluxDB, measurement ``edge_cost`` (tags ``site``, ``kind``; fields ``energy``,
``bytes``) at the slot's start, and ``edge_migration`` (tags ``bs``, ``source``, ``target``).

Offsets: only messages of closed slots are committed, after their rows are written; a restart re-reads
the open slot. Updates of a slot already booked (they came after the pause that closed it) are booked on top
of it: its rows are the sum (kept for the last few slots, in this process). The BS-to-site map is rebuilt on restart from the last ``edge_host`` row
per BS (tag ``bs``, field ``site``) before the first slot it books, so a restarted ledger books the same
migrations, also for a slot it reads again because it stopped between writing its rows and committing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from kafka.structs import OffsetAndMetadata

from ingest.deadletter import DeadLetter, DeadLetterSink
from ingest.errors import InputError
from ingest.kafka import consume_until_stopped, make_consumer, make_producer
from ingest.schema import MalformedMessage
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.lineproto import point
from twin_store.federation import dcs
from twin_store.federation.edge.deployed import LearnedAssociation
from twin_store.federation.edge.ledger import EdgeLedger, Migration, Site, SlotLedger
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import decode_twin

log = logging.getLogger(__name__)
HOUR_MS = 3_600_000


def ledger_from_settings(settings: NettwinSettings) -> EdgeLedger:
    edge = settings.edge
    sites = [Site(s.name, s.lat, s.lon, s.capacity, s.eps, s.energy) for s in edge.sites]
    try:
        learned = None
        if edge.policy == "learned":
            if edge.learned_model is None:
                raise ValueError(
                    "policy 'learned' needs edge.learned_model (nettwin bench diten --save-agent)"
                )
            learned = LearnedAssociation(edge.learned_model)
            if learned.sites != len(sites):
                raise ValueError(
                    f"{edge.learned_model} was trained for {learned.sites} sites, {len(sites)} declared"
                )
        return EdgeLedger(
            sites, edge.policy, sample_bytes=edge.sample_bytes, twin_bytes=edge.twin_bytes, learned=learned
        )
    except ValueError as exc:
        raise InputError(f"edge settings: {exc}") from None


def cost_lines(
    costs: Iterable[tuple[str, str, float, int]], migrations: Iterable[Migration], time_ms: int
) -> list[str]:
    """A slot's ``edge_cost`` rows (site, kind, energy, bytes) and its ``edge_migration`` rows."""
    lines = [
        point("edge_cost", {"site": site, "kind": kind}, {"energy": e, "bytes": b}, time_ms)
        for site, kind, e, b in costs
    ]
    lines += [
        point(
            "edge_migration",
            {"bs": m.bs, "source": m.source, "target": m.target},
            {"energy": m.energy, "bytes": m.bytes},
            time_ms,
        )
        for m in migrations
    ]
    return lines


def slot_lines(ledger: SlotLedger, time_ms: int) -> list[str]:
    lines = cost_lines(ledger.rows(), ledger.migrations, time_ms)
    lines += [point("edge_host", {"bs": bs}, {"site": site}, time_ms) for bs, site in ledger.hosts.items()]
    return lines


class EdgeLedgerService:
    def __init__(self, settings: NettwinSettings, milan_dir: Path | None) -> None:
        from twin_store.services.htwin import read_latest_twins

        if settings.edge.policy == "learned":
            raise InputError(
                "edge policy 'learned' is not wired into the running ledger yet: use nearest or balanced"
            )
        self.settings = settings
        self.ledger = ledger_from_settings(settings)
        self.milan_dir = milan_dir or settings.edge.milan_dir
        self.slot_ms = settings.edge.slot_s * 1000
        glob = next((t for t in read_latest_twins(settings).values() if t.level == "global"), None)
        plan = StreamPlan.from_meta(glob.meta["plan"]) if glob is not None and "plan" in glob.meta else None
        self.start_ms = plan.start_ms if plan is not None else 0
        self.topics = Topics.from_settings(settings)
        self.influx = InfluxClient(settings.influx)
        self.hosts_restored = False  # at the first slot booked: the map as it was before that slot
        self.producer = make_producer(settings)
        self.deadletters = DeadLetterSink(self.producer, self.topics.deadletter)
        self.consumer = make_consumer(
            settings, self.topics.updates_local, group_id=f"{settings.kafka.topic_prefix}nettwin-edge-ledger"
        )
        self.open: dict[int, dict[str, int]] = {}  # slot -> BS -> samples
        self.first_offset: dict[int, dict[Any, int]] = {}  # slot -> partition -> first offset in it
        self.booked: dict[int, SlotLedger] = {}  # recent slots: what was booked in them so far
        self.stopping = False
        self.counters = {"updates": 0, "slots": 0, "migrations": 0, "bad": 0}

    def _restore_hosts(self, before_ms: int) -> None:
        """Each BS's site from its last ``edge_host`` row before ``before_ms``: a slot read again after a
        crash (its rows written, its offsets not committed) is booked from the map it was booked from."""
        names = {s.name: i for i, s in enumerate(self.ledger.sites)}
        q = f'SELECT last("site") AS site FROM "edge_host" WHERE time < {before_ms}ms GROUP BY "bs"'
        for series in self.influx.query(q):
            for row in series.rows():
                bs, site = str(row.get("bs", "")), row.get("site")
                if bs and site in names:
                    self.ledger.hosts[bs] = names[site]

    def _place(self, squares: list[str]) -> None:
        missing = [s for s in squares if s not in self.ledger.positions]
        if not missing:
            return
        if self.milan_dir is None:
            raise InputError(
                "the edge ledger needs BS positions: give --milan-dir or edge.milan_dir (grid and base stations)"
            )
        attrs = dcs.SquareAttributes.load(self.milan_dir, [int(s) for s in missing])
        for s, lat, lon in zip(missing, attrs.bs_lat.tolist(), attrs.bs_lon.tolist(), strict=True):
            self.ledger.place(s, lat, lon)

    def _slot_of(self, hour: int) -> int:
        return hour * HOUR_MS // self.slot_ms

    def process(self, polled: dict[Any, list[Any]]) -> int:
        n = 0
        for tp, messages in polled.items():
            for m in messages:
                n += 1
                try:
                    update = decode_twin(m.value or b"")
                    if update.level != "bs":
                        raise MalformedMessage(f"expected a bs update, got level {update.level!r}")
                    hour, samples = int(update.meta["hour"]), int(update.meta["n_samples"])
                except (MalformedMessage, KeyError, TypeError, ValueError) as exc:
                    self.counters["bad"] += 1
                    self.deadletters.send(DeadLetter.for_message(m, f"edge ledger: {exc}", "edge-ledger"))
                    continue
                slot = self._slot_of(hour)
                self.open.setdefault(slot, {})[update.twin_id] = samples
                self.first_offset.setdefault(slot, {}).setdefault(tp, m.offset)
                self.counters["updates"] += 1
        if self.open:
            self.close(before=max(self.open))
        return n

    def close(self, before: int | None = None) -> None:
        """Book every open slot older than ``before`` (all with None), write, then commit past them."""
        done = sorted(s for s in self.open if before is None or s < before)
        if not done:
            return
        if not self.hosts_restored:
            self._restore_hosts(self.start_ms + done[0] * self.slot_ms)
            self.hosts_restored = True
        lines: list[str] = []
        for slot in done:
            samples = self.open.pop(slot)
            self.first_offset.pop(slot, None)
            self._place(sorted(samples))
            booked = self.ledger.slot(slot, samples)
            lines += slot_lines(self._so_far(booked), self.start_ms + slot * self.slot_ms)
            self.counters["slots"] += 1
            self.counters["migrations"] += len(booked.migrations)
        self.producer.flush()
        self.influx.write_lines(lines, "ms", lambda: self.stopping, lambda exc, d: log.warning("%s", exc))
        self._commit()

    def _so_far(self, booked: SlotLedger) -> SlotLedger:
        """The slot with what this process booked in it before: updates that come after the pause that closed
        it add to its rows instead of rewriting them with their own costs alone."""
        before = self.booked.get(booked.slot)
        if before is not None:
            booked = replace(
                booked,
                energy={k: v + before.energy.get(k, 0.0) for k, v in booked.energy.items()},
                bytes={k: v + before.bytes.get(k, 0) for k, v in booked.bytes.items()},
            )
        self.booked[booked.slot] = booked
        for old in sorted(self.booked)[:-4]:  # a late update comes within a few slots
            del self.booked[old]
        return booked

    def _commit(self) -> None:
        offsets = {}
        for tp in self.consumer.assignment():
            firsts = [f[tp] for f in self.first_offset.values() if tp in f]
            offset = min(firsts) if firsts else self.consumer.position(tp)
            offsets[tp] = OffsetAndMetadata(offset, "", -1)
        if offsets:
            self.consumer.commit(offsets)

    def _paused(self, idle_s: float) -> bool:
        """The stream paused: the newest slot is complete as far as we know."""
        if not self.open or idle_s < 2.0:
            return False
        self.close()
        return True

    def run(self, idle_exit_s: float | None = None) -> dict[str, int]:
        try:
            consume_until_stopped(
                self.consumer, self.process, lambda: self.stopping, idle_exit_s, self._paused
            )
        finally:
            self.consumer.close(autocommit=False)
            self.producer.close()
            self.influx.close()
        return self.counters
