"""Per-BS local twins on the hourly stream: forecasts, outcomes and local updates. No Kafka here.

``BsAgents.on_hour`` takes the closed hourly windows of some squares (one feature batch) and returns:

- **outcomes**: predicted vs actual for the hour that just closed, for squares whose forecast was issued;
- **forecasts** for the next hour, from the global twin (the network's twin, as the benchmark's
  ``vhtwin``), issued before that hour's data exists;
- **local updates** of the BSs due this hour (``StreamPlan.due``). Each trains from its cluster twin, with
  all due BSs of the batch in one stacked pass. The update carries seq = the hour, so a re-run of the
  same hour (agent restart) is recognised by the store as a replay.

``on_hour`` is ``observe`` (screening, histories, outcomes, forecasts: what a forecast waits for) then
``train`` (the local updates ``observe`` found due): the worker sends the forecasts in between, so an
hour's forecasts are not held back by its training.

Twins come from ``twin.models`` through ``on_twin``. ``TwinVersions`` keeps a few versions per twin with
the hour they reflect (``as_of``), so an agent acts on twins up to the previous hour whatever the arrival
order (the protocol in ``twin_store/federation/local_updates.py``). The plan and model size come with the global
twin, the scaling statistics with the roster (``roster:0``, published once, not with every global merge). Until
both have arrived, in either order, hours are only kept. A bootstrap publishes the roster with the plan before it
trains the twins: meanwhile ``record_kept`` screens and records the kept steps no forecast comes from, so the
twins' arrival leaves only the newest steps to act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ingest.schema import RecordBatch
from twin_store.federation.models_topic import TwinMessage, cluster_membership, roster_meta

if TYPE_CHECKING:  # torch, the models and the screen are imported once there is a twin to act on (seconds
    # of start-up and memory that a worker without published twins does not pay)
    from twin_store.federation.keys import KeyRegistry
    from twin_store.federation.local_updates import StreamPlan
    from twin_store.federation.sites import Sites
    from twin_store.models.forecaster import TwinModel
    from twin_store.models.telemetry_screen import ScreenBank

# hours per twin: an agent acts on the newest version up to its previous hour, and partitions (or a stream
# read all at once) may be many hours apart (70 measured in tests/test_twins_live.py with 16 it dropped forecasts)
KEEP_VERSIONS = 256
# an entity the twins do not know (it joined after V-twinning) gets its scaler from this many reported steps
JOIN_STEPS = 24


class TwinVersions:
    """Recent versions of every twin, each with the last hour of updates it reflects."""

    def __init__(self) -> None:
        self.versions: dict[bytes, list[TwinMessage]] = {}
        self.decided: dict[int, int] = {}  # square -> newest update (seq) the store has decided on
        # the latest roster that decoded (a malformed one never gets here: the last good one is kept)
        self.roster: TwinMessage | None = None
        # the cluster versions ``cluster_of`` last read, and the membership they make
        self._membership: tuple[tuple[TwinMessage, ...], dict[int, int]] | None = None

    def add(self, msg: TwinMessage) -> None:
        if msg.level == "roster":
            self.roster = msg
            return
        if msg.level == "bs":  # the store decided on this BS's update: a restarted agent need not redo it
            seq = max(int(msg.meta.get("seq", -1)), int(msg.meta.get("decided_seq", -1)))
            square = int(msg.twin_id)
            self.decided[square] = max(seq, self.decided.get(square, -1))
            return
        before = self.versions.get(msg.key, [])
        members = msg.meta.get("members")
        if members is not None and before and members == before[-1].meta.get("members"):
            # one list for the versions of an unchanged membership (a cluster of 2,000 members: 70 KB of
            # Python ints per version, KEEP_VERSIONS versions per cluster)
            msg.meta["members"] = before[-1].meta["members"]
        kept = sorted([*before, msg], key=lambda m: (as_of(m), m.version))
        # only the newest version of each hour can be acted on: a twin republished many times in one hour
        # (a global merge per accepted update) must not push the previous hours' versions out
        newest = [
            m
            for m, after in zip(kept, [*kept[1:], None], strict=True)
            if after is None or as_of(after) != as_of(m)
        ]
        # a new list, swapped in whole: the worker trains in a thread that reads these lists while its event
        # loop adds versions (an in-place sort shows readers an empty list while it runs)
        self.versions[msg.key] = newest[-KEEP_VERSIONS:]

    def at(self, key: bytes, hour: int) -> TwinMessage | None:
        """The newest version reflecting updates up to ``hour``; None if every known one is newer (an
        agent re-reading old hours after a restart must not forecast them with twins from their future)."""
        fit = [m for m in self.versions.get(key, []) if as_of(m) <= hour]
        return fit[-1] if fit else None

    def roster_meta(self) -> dict[str, Any] | None:
        """Members, scaling statistics, names and cluster profiles (``models_topic.roster_meta``); None until
        the roster has arrived."""
        kept = self.versions.get(b"global:0")
        return roster_meta(kept[-1] if kept else None, self.roster)

    def cluster_of(self, hour: int) -> dict[int, int]:
        """square -> cluster, from the cluster versions as of ``hour`` (the latest epoch wins). A new dict
        (callers add to it)."""
        # a snapshot of the keys: a training thread asks while the event loop may add a new cluster's key
        as_then = [self.at(key, hour) for key in list(self.versions) if key.startswith(b"cluster:")]
        kept = tuple(m for m in as_then if m is not None)
        # the same versions answer most hours (every hour until the next cluster message): built once, as
        # each build reads every member (10,000 entities: ~6 ms, at every step of every partition, and for
        # each of the steps kept before the twins came, on the first live step's path). One entry, swapped
        # whole: the training thread and the event loop both ask.
        cached = self._membership
        if (
            cached is None
            or len(cached[0]) != len(kept)
            or any(a is not b for a, b in zip(cached[0], kept, strict=True))
        ):
            cached = self._membership = (kept, cluster_membership(kept))
        return dict(cached[1])


def as_of(msg: TwinMessage) -> int:
    return int(msg.meta.get("as_of", -1))


@dataclass
class SquareHistory:
    raw: np.ndarray = field(default_factory=lambda: np.full(1024, np.nan))  # index = hour
    flagged: np.ndarray = field(default_factory=lambda: np.zeros(1024, bool))  # telemetry screen's verdicts

    def put(self, hour: int, value: float, flagged: bool = False) -> None:
        if hour < 0:
            return  # before the series' hour 0: outside the plan
        if hour >= self.raw.size:
            size = max(hour + 1, 2 * self.raw.size)
            self.raw = np.concatenate([self.raw, np.full(size - self.raw.size, np.nan)])
            self.flagged = np.concatenate([self.flagged, np.zeros(size - self.flagged.size, bool)])
        self.raw[hour] = value
        self.flagged[hour] = flagged


@dataclass(frozen=True)
class DueHour:
    """The local updates due at one hour: the squares and the cluster each trains from."""

    hour: int
    squares: list[int]
    clusters: dict[int, int]


@dataclass
class AgentOutput:
    forecasts: list[RecordBatch] = field(default_factory=list)  # per hour: the next hour, predicted
    outcomes: list[RecordBatch] = field(default_factory=list)  # per hour: predicted, actual, abs_error
    updates: list[TwinMessage] = field(default_factory=list)
    skipped: int = 0  # records without scaling statistics (a BS the twins do not know)
    due: list[DueHour] = field(default_factory=list)  # observed, not yet trained (``BsAgents.train``)


FORECAST_COLUMNS = ("predicted", "cluster")
# flagged: 1 if the telemetry screen flagged the actual value (kept, but left out of local training)
OUTCOME_COLUMNS = ("predicted", "actual", "abs_error", "flagged", "cluster")


COUNTERS = (
    "hours",
    "forecasts",
    "outcomes",
    "updates",
    "skipped_updates",
    "other_batches",
    "flagged_hours",
    "ack_timeouts",  # own updates the store had not published when the agent stopped waiting
    "past_hours",  # hours re-read after a restart whose forecasts were issued back then
    "unsigned_updates",
    "waiting",  # steps of entities the twins do not know yet, kept until they have JOIN_STEPS
    "joined",  # entities that joined after V-twinning: first-stretch scaler, nearest cluster
)


class BsAgents:
    """The BS agents of some squares (the worker keeps one per input partition).

    ``twins`` and ``awaiting`` may be shared by several instances: the twins are the network's, and an
    agent acts on an hour only once the store has decided on every update of the hours before it that this
    worker sent (whichever partition's agents sent it), as a single agent over all partitions would. The
    histories are each instance's own.
    """

    def __init__(
        self,
        keys: KeyRegistry | None = None,
        screen_traffic: bool = False,
        twins: TwinVersions | None = None,
        awaiting: dict[int, int] | None = None,
        sites: Sites | None = None,
    ) -> None:
        self.keys = keys  # signs every local update when the deployment authenticates them
        # per-square online screen of the hourly (z-scored) traffic: flagged hours never reach training
        self.screen_traffic = screen_traffic
        self._screens: ScreenBank | None = None
        self.twins = twins if twins is not None else TwinVersions()
        self.history: dict[int, SquareHistory] = {}
        self.issued: dict[tuple[int, int], tuple[float, int]] = {}  # (square, hour) -> (predicted, cluster)
        # square -> hour of its update not yet published by the store
        self.awaiting: dict[int, int] = awaiting if awaiting is not None else {}
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.backlog: list[RecordBatch] = []
        self.newest_hour = -1  # the newest step acted on
        self._model: TwinModel | None = None
        self.names: dict[int, str] = {}  # entity key -> name, from the batches
        self.sites = sites  # positions of a [twins] deployment's entities (late joiners' nearest cluster)
        # entities that joined after V-twinning: key -> (mean, std, cluster chosen at joining)
        self.joined: dict[int, tuple[float, float, int]] = {}
        # the roster's scaler with the joined entities', rebuilt only when either changes (not every step)
        self._scaler: tuple[dict[str, list[float]], int, dict[str, list[float]]] | None = None
        # kept steps recorded before the twins came (``record_kept``), with the roster and plan they were
        # recorded with: redone from scratch if the twins come with others (a bootstrap that ran again)
        self._recorded: list[RecordBatch] = []
        self._recorded_with: tuple[TwinMessage, StreamPlan] | None = None
        self._before_recording: tuple[dict[str, int], int] | None = None  # counters, newest_hour
        # (roster, the first kept batch it could not record with it)
        self._blocked: tuple[TwinMessage, RecordBatch] | None = None
        self._preview: tuple[TwinMessage, StreamPlan | None] | None = None  # the roster, its plan parsed once

    # ---- twins
    def on_twin(self, msg: TwinMessage) -> None:
        self.twins.add(msg)

    @property
    def accepted_seq(self) -> dict[int, int]:
        return self.twins.decided

    def _forget_decided(self) -> None:
        decided = self.twins.decided
        for square in [s for s, h in self.awaiting.items() if decided.get(s, -1) >= h]:
            del self.awaiting[square]

    def unacknowledged_before(self, batch: RecordBatch) -> int:
        """Own updates of hours before this batch's first hour that the store has not published yet.

        Acting before they are in would use twins older than the protocol says, so the adapter waits for
        them (bounded by ``give_up_waiting``).
        """
        self._forget_decided()
        if not self.awaiting or not len(batch) or not self.ready:
            return 0
        first = self.plan().hour_of(int(batch.starts_ms.min()))
        return sum(1 for h in self.awaiting.values() if h < first)

    def give_up_waiting(self) -> None:
        """The store did not answer in time (it may have rejected an update): act on what we have."""
        self.counters["ack_timeouts"] += len(self.awaiting)
        self.awaiting.clear()

    @property
    def ready(self) -> bool:
        return b"global:0" in self.twins.versions and self.twins.roster_meta() is not None

    def _newest_global(self) -> TwinMessage:
        return self.twins.versions[b"global:0"][-1]

    def plan(self) -> StreamPlan:
        from twin_store.federation.local_updates import StreamPlan

        return StreamPlan.from_meta(self._newest_global().meta["plan"])

    def model(self) -> TwinModel:
        hidden = self._newest_global().hidden
        n_inputs = len(self.plan().lags)
        if self._model is None or self._model.hidden != hidden or self._model.n_inputs != n_inputs:
            from twin_store.models.forecaster import TwinModel

            self._model = TwinModel(hidden, n_inputs)
        return self._model

    def scaler(self) -> dict[str, list[float]]:
        """Scaling statistics of every entity: V-twinning's, and the joined entities' first-stretch ones."""
        scaler: dict[str, list[float]] = (self.twins.roster_meta() or {}).get("scaler", {})
        if not self.joined:
            return scaler
        cached = self._scaler
        if cached is None or cached[0] is not scaler or cached[1] != len(self.joined):
            merged = scaler | {str(s): [m, d] for s, (m, d, _) in self.joined.items()}
            cached = self._scaler = (scaler, len(self.joined), merged)
        return cached[2]

    # ---- hours
    def on_hour(self, batch: RecordBatch) -> AgentOutput:
        """One closed hourly feature batch (any squares, normally one hour of one partition): ``observe``
        then ``train``."""
        out = self.observe(batch)
        self.train(out)
        return out

    def observe(self, batch: RecordBatch) -> AgentOutput:
        """Screening, histories, outcomes and the next hour's forecasts of a batch: the part a forecast
        waits for. The local updates due are left in ``out.due`` for ``train``, so the adapter can send the
        forecasts before the (much longer) training."""
        out = AgentOutput()
        if not self.ready:  # hours before the first global twin and roster wait for them (plan, scaler)
            self.backlog.append(batch)
            return out
        self._settle_recorded()
        plan, scaler, model = self.plan(), self.scaler(), self.model()
        by_hour: dict[int, list[tuple[int, float]]] = {}
        for b in [*self.backlog, batch]:
            for s, hour, v in self._rows(b, plan):
                by_hour.setdefault(hour, []).append((s, v))
        self.backlog.clear()
        self.newest_hour = max([self.newest_hour, *by_hour])
        for hour in sorted(by_hour):
            self._close_hour(hour, by_hour[hour], plan, scaler, model, out)
        return out

    def catch_up(self) -> AgentOutput | None:
        """``observe`` of the steps kept while there was no global twin, once it is here (the worker calls it
        when the twin arrives, not at the next step's batch); None if there is no twin yet or nothing kept."""
        if not self.ready:
            return None
        self._settle_recorded()  # (redone, the recorded steps are kept again)
        return self.observe(self.backlog.pop()) if self.backlog else None

    # ---- kept steps, recorded while the twins train
    def _previewed(self) -> tuple[TwinMessage, StreamPlan] | None:
        """The roster and the plan of twins still being trained (the bootstrap sends them first), or None."""
        roster = self.twins.roster
        if roster is None or "plan" not in roster.meta or self.ready:
            return None
        if self._preview is None or self._preview[0] is not roster:
            from twin_store.federation.local_updates import StreamPlan

            try:
                plan: StreamPlan | None = StreamPlan.from_meta(roster.meta["plan"])
            except (TypeError, ValueError, KeyError, AttributeError):
                plan = None  # a plan this agent cannot read: the kept steps wait for the twins
            self._preview = (roster, plan)
        plan = self._preview[1]
        return None if plan is None else (roster, plan)

    @property
    def can_record(self) -> bool:
        """``record_kept`` has kept steps to act on now."""
        preview = self._previewed()
        if preview is None or not self.backlog:
            return False
        blocked = self._blocked
        return blocked is None or blocked[0] is not preview[0] or blocked[1] is not self.backlog[0]

    def record_kept(self) -> int:
        """Screen and record, as ``observe`` will, the kept steps that give no forecast and no update (each
        ``horizon`` steps or more before the plan's first forecast step) while the twins are being trained, with
        the roster and plan the bootstrap sent ahead of them. Batches go in order, while each has only later
        steps than those recorded and only entities of the roster; the first that does not waits for the twins,
        and so do those after it. Returns the number of batches recorded."""
        preview = self._previewed()
        if preview is None:
            return 0
        roster, plan = preview
        if self._recorded_with is not None and not self._recorded_with_these(roster, plan):
            self._redo_recorded()  # a bootstrap that ran again: its own scaling and plan
        if self._before_recording is None:
            self._before_recording = (dict(self.counters), self.newest_hour)
        self._recorded_with = (roster, plan)
        scaler = roster.meta["scaler"]
        done = 0
        while self.backlog:
            batch = self.backlog[0]
            rows = self._rows(batch, plan)
            hours = {h for _, h, _ in rows}
            if hours and (
                min(hours) <= self.newest_hour
                or max(hours) + plan.horizon >= plan.start_hour
                or any(str(s) not in scaler for s, _, _ in rows)
            ):
                self._blocked = (roster, batch)
                break
            self._blocked = (roster, batch)  # stays if acting on it fails: not retried until the twins come
            by_hour: dict[int, list[tuple[int, float]]] = {}
            for s, hour, v in rows:
                by_hour.setdefault(hour, []).append((s, v))
            for hour in sorted(by_hour):
                self._close_hour(hour, by_hour[hour], plan, scaler, None, AgentOutput())
            self._blocked = None
            self._recorded.append(self.backlog.pop(0))
            self.newest_hour = max([self.newest_hour, *hours])
            done += 1
        return done

    def _recorded_with_these(self, roster: TwinMessage | None, plan: StreamPlan) -> bool:
        assert self._recorded_with is not None
        was, was_plan = self._recorded_with
        same = roster is was or (
            roster is not None and roster.version == was.version and roster.meta == was.meta
        )
        return same and plan == was_plan

    def _redo_recorded(self) -> None:
        """Forget what ``record_kept`` did: its batches are kept again, as they came."""
        assert self._before_recording is not None
        self.history.clear()
        self.issued.clear()
        self._screens = None
        self.counters, self.newest_hour = dict(self._before_recording[0]), self._before_recording[1]
        self.backlog[:0] = self._recorded
        self._recorded, self._recorded_with = [], None
        self._before_recording = self._blocked = None

    def _settle_recorded(self) -> None:
        """The twins are here: keep what was recorded if it was with their roster and plan, else redo it."""
        if self._recorded_with is None:
            return
        if not self._recorded_with_these(self.twins.roster, self.plan()):
            self._redo_recorded()
        self._recorded, self._recorded_with, self._before_recording = [], None, None
        self._blocked = self._preview = None

    def _rows(self, batch: RecordBatch, plan: StreamPlan) -> list[tuple[int, int, float]]:
        if plan.column not in batch.columns:  # e.g. 10-minute activity windows of a raw replay
            self.counters["other_batches"] += 1
            return []
        j = batch.columns.index(plan.column)
        names = batch.extra.get("entities")
        if names:
            self.names.update((int(k), v) for k, v in names.items())
        hours = (batch.starts_ms - plan.start_ms) // plan.step_ms
        return list(zip(batch.squares.tolist(), hours.tolist(), batch.values[:, j].tolist(), strict=True))

    def _screen(self, known: list[tuple[int, float]], scaler: dict[str, list[float]]) -> list[bool]:
        """The telemetry screen's verdicts on this hour's values, all squares in one vectorised pass."""
        if not self.screen_traffic:
            return [False] * len(known)
        from twin_store.models.telemetry_screen import ScreenBank

        if self._screens is None:
            self._screens = ScreenBank("robust")
        stats = np.array([scaler[str(s)] for s, _ in known]).reshape(-1, 2)
        values = np.array([v for _, v in known])
        flags = self._screens.update([s for s, _ in known], (values - stats[:, 0]) / stats[:, 1])[1]
        self.counters["flagged_hours"] += int(flags.sum())
        return flags.tolist()

    def _close_hour(
        self,
        hour: int,
        values: list[tuple[int, float]],
        plan: StreamPlan,
        scaler: dict[str, list[float]],
        model: TwinModel | None,
        out: AgentOutput,
    ) -> None:
        """One step of the entities' ``values``: screen, histories, outcomes, forecasts (from ``model``, which
        only steps the plan forecasts from need) and the updates due."""
        import torch

        from twin_store.models.forecaster import predict_in_chunks

        self.counters["hours"] += 1
        joined = self.joined
        known = [(s, v) for s, v in values if s in joined or str(s) in scaler]
        if len(known) < len(values):  # entities the twins do not know: kept until they can join
            known += self._join(
                hour, [(s, v) for s, v in values if str(s) not in scaler and s not in self.joined], plan
            )
        if self.joined:
            scaler = self.scaler()
        out.skipped += len(values) - len(known)
        outcome_rows: list[tuple[int, float, float, float, float, int]] = []
        histories, pending = self.history, self.issued  # (locals: this loop runs for every entity and step)
        for (s, v), flagged in zip(known, self._screen(known, scaler), strict=True):
            history = histories.get(s)
            if history is None:
                history = self._history(s)
            history.put(hour, v, flagged)
            issued = pending.pop((s, hour), None) if pending else None
            if issued is not None:
                outcome_rows.append((s, issued[0], v, abs(v - issued[0]), float(flagged), issued[1]))
        if outcome_rows:
            out.outcomes.append(_batch(OUTCOME_COLUMNS, plan, hour, outcome_rows, self.names))
            self.counters["outcomes"] += len(outcome_rows)
        day = plan.steps_per_day
        if hour % day == 0:  # forecasts whose step never came (an entity that went silent)
            self.issued = {k: v for k, v in self.issued.items() if k[1] > hour - day}
        if not known:
            return
        clusters = self.twins.cluster_of(hour - 1)
        for s, (_, _, cid) in self.joined.items():  # joined entities: their own choice until the store's
            clusters.setdefault(s, cid)

        # forecast hour + horizon from the global twin as of hour - 1, for squares with a full input history
        target = hour + plan.horizon
        glob = self.twins.at(b"global:0", hour - 1) if target >= plan.start_hour else None
        if target < plan.start_hour:
            pass  # the history V-twinning trained on: no forecast
        elif glob is None:
            self.counters["past_hours"] += 1  # re-read after a restart: forecast already issued then
        else:
            assert model is not None, "a step the plan forecasts from needs the model"
            everyone = [s for s, _ in known]
            inputs = self._inputs(everyone, scaler, target - plan.lag_array, plan.fill_limit)
            full = np.isfinite(inputs).all(axis=1)
            squares = [s for s, ok in zip(everyone, full.tolist(), strict=True) if ok]
            if squares:
                # in chunks: one step of 10,000 entities in one forward pass held ~100 MB of temporaries
                pred = predict_in_chunks(
                    model, torch.as_tensor(glob.params), torch.from_numpy(inputs[full]).float().unsqueeze(1)
                )
                rows = []
                for s, p in zip(squares, pred[:, 0].tolist(), strict=True):
                    mean, std = scaler[str(s)]
                    value = p * std + mean
                    cid = clusters.get(s, -1)
                    self.issued[(s, target)] = (value, cid)
                    rows.append((s, value, float(cid)))
                out.forecasts.append(_batch(FORECAST_COLUMNS, plan, target, rows, self.names))
                self.counters["forecasts"] += len(rows)

        # local updates of the BSs due this hour, from their cluster twins as of hour - 1 (``train``)
        # (no BS is due before the plan's first hour: the steps kept before the twins came skip the scan)
        due = [s for s, _ in known if plan.due(s, hour) and s in clusters] if hour >= plan.start_hour else []
        fresh = [s for s in due if self.accepted_seq.get(s, -1) < hour]
        self.counters["skipped_updates"] += len(due) - len(fresh)
        if fresh:
            out.due.append(DueHour(hour, fresh, {s: clusters[s] for s in fresh}))

    def train(self, out: AgentOutput) -> list[TwinMessage]:
        """The local updates ``observe`` left due, hour by hour, into ``out.updates`` (returned), each then
        awaited from the store (``expect``). Training reads only the history up to its hour and the twins as
        of the hour before, so hours observed since do not change it."""
        self.expect(self.train_only(out))
        return out.updates

    def train_only(self, out: AgentOutput) -> list[TwinMessage]:
        """``train`` without ``expect``: the worker trains in a thread while its event loop reads
        ``awaiting`` (other partitions' steps), so it registers the updates itself, in the loop."""
        for due in out.due:
            self._train_hour(due, out)
        out.due.clear()
        return out.updates

    def expect(self, updates: list[TwinMessage]) -> None:
        """The store has yet to decide on these updates (sent or about to be)."""
        self.awaiting.update({int(u.twin_id): int(u.meta["seq"]) for u in updates})

    def _train_hour(self, due: DueHour, out: AgentOutput) -> None:
        import torch

        from twin_store.federation.local_updates import local_updates, profile_upto

        plan, scaler, model = self.plan(), self.scaler(), self.model()
        hour, clusters = due.hour, due.clusters
        fresh, starts, bases = [], [], []
        for s in due.squares:
            twin = self.twins.at(f"cluster:{clusters[s]}".encode(), hour - 1)
            if twin is not None:
                fresh.append(s)
                starts.append(torch.as_tensor(twin.params))
                bases.append(twin.version)
        if not fresh:
            return
        series = [self._z(s, scaler, np.arange(hour + 1), training=True) for s in fresh]
        new, loss, counts = local_updates(model, torch.stack(starts), series, fresh, hour, plan)
        hidden = model.hidden
        members = self.twins.cluster_of(hour - 1)
        updates = []
        for k, s in enumerate(fresh):
            if counts[k] == 0:
                continue
            meta = {
                "seq": hour,
                "hour": hour,
                "cluster": clusters[s],
                "base_version": bases[k],
                "n_samples": counts[k],
                "loss": round(float(loss[k]), 6),
                "profile": profile_upto(series[k], hour, plan.steps_per_day),
            }
            if s in self.names:
                meta["entity"] = self.names[s]
            if s not in members:  # not a member yet: the store admits it to the cluster it names
                meta["joined"] = True
            updates.append(TwinMessage("bs", str(s), bases[k], hidden, new[k].numpy(), meta))
        if self.keys is not None:
            for update in updates:
                if update.twin_id in self.keys.keys:
                    self.keys.sign(update)
                else:  # sent unsigned: the store rejects it and says so in an `update` row
                    self.counters["unsigned_updates"] += 1
        self.counters["updates"] += len(updates)
        out.updates += updates

    def _history(self, square: int) -> SquareHistory:
        """The square's history, created on first use (``setdefault`` would build and drop one per call:
        9 KB of arrays per entity per step)."""
        history = self.history.get(square)
        if history is None:
            history = self.history[square] = SquareHistory()
        return history

    def _inputs(
        self, squares: list[int], scaler: dict[str, list[float]], hours: np.ndarray, fill: int
    ) -> np.ndarray:
        """``_z(s, scaler, hours, fill=fill)`` of every square, as rows: the same floats, gathered at once
        (10,000 entities a step; one ``_z`` each took ~20 ms of every 80 ms partition step)."""
        out = np.full((len(squares), hours.size), np.nan)
        if not squares:
            return out
        lo, hi = int(hours.min()), int(hours.max())
        histories = [self.history[s].raw for s in squares]
        inside = [i for i, raw in enumerate(histories) if lo >= 0 and raw.size > hi]
        if inside:
            out[inside] = np.array([histories[i][hours] for i in inside])
        stats = np.array([scaler[str(s)] for s in squares]).reshape(-1, 2)
        out = (out - stats[:, :1]) / stats[:, 1:]
        # steps outside a history, or missing ones that ``fill`` may bridge: the square's own ``_z``
        for i in np.flatnonzero(~np.isfinite(out).all(axis=1)).tolist():
            out[i] = self._z(squares[i], scaler, hours, fill=fill)
        return out

    def _z(
        self,
        square: int,
        scaler: dict[str, list[float]],
        hours: np.ndarray,
        training: bool = False,
        fill: int = 0,
    ) -> np.ndarray:
        """z-scored history at ``hours`` (NaN where unknown; for training, also where screened out). With
        ``fill``, a missing step takes the latest known value at most ``fill`` steps before it (never a later
        one): how model inputs bridge short gaps."""
        history = self.history[square]
        mean, std = scaler[str(square)]
        vals = np.full(hours.shape, np.nan)
        ok = (hours >= 0) & (hours < history.raw.size)
        vals[ok] = history.raw[hours[ok]]
        if fill > 0 and not np.isfinite(vals).all():
            for i in np.flatnonzero(~np.isfinite(vals)):
                h = int(hours[i])
                lo = max(0, h - fill)
                past = history.raw[lo : min(h, history.raw.size)]
                known = np.flatnonzero(np.isfinite(past))
                if known.size:
                    vals[i] = past[known[-1]]
        if training:
            vals[ok & history.flagged[np.clip(hours, 0, history.raw.size - 1)]] = np.nan
        return (vals - mean) / std

    def _join(self, hour: int, values: list[tuple[int, float]], plan: StreamPlan) -> list[tuple[int, float]]:
        """Entities the twins do not know: kept; once one has ``JOIN_STEPS`` reported steps it joins with a
        scaler from them and the cluster of its nearest member (sites) or best-correlated profile. Returns the
        ones that joined with this step."""
        joined = []
        for s, v in values:
            history = self._history(s)
            history.put(hour, v)
            reported = history.raw[np.isfinite(history.raw)]
            if reported.size < JOIN_STEPS:
                self.counters["waiting"] += 1
                continue
            first = reported[:JOIN_STEPS]
            std = float(first.std())
            mean, std = float(first.mean()), std if std > 0 else 1.0
            self.joined[s] = (mean, std, self._nearest_cluster(s, (history.raw - mean) / std, hour, plan))
            self.counters["joined"] += 1
            joined.append((s, v))
        return joined

    def _nearest_cluster(self, square: int, z: np.ndarray, hour: int, plan: StreamPlan) -> int:
        from twin_store.federation.bootstrap import hourly_bins
        from twin_store.federation.inputs import daily_profiles
        from twin_store.federation.sites import nearest_cluster, nearest_profile

        labels = self.twins.cluster_of(hour - 1)
        meta: dict[str, Any] = self.twins.roster_meta() or {}
        if not labels:
            return 0
        members = sorted(labels)
        name = self.names.get(square, str(square))
        named = [self.names.get(m, meta.get("entities", {}).get(str(m), str(m))) for m in members]
        if self.sites is not None and self.sites.has(name) and all(self.sites.has(n) for n in named):
            cluster = nearest_cluster(
                self.sites.subset(named), np.array([labels[m] for m in members]), self.sites.subset([name])
            )
            return int(cluster[0])
        centres = meta.get("cluster_profiles", {})
        ids = sorted(int(c) for c in centres if int(c) in set(labels.values()))
        if not ids:
            return int(labels[members[0]])
        mine = hourly_bins(daily_profiles(z[None, : hour + 1], hour + 1, plan.step_ms, plan.start_ms))
        theirs = np.array([centres[str(c)] for c in ids])
        if theirs.shape[1] != mine.shape[1]:
            return ids[0]
        return int(nearest_profile(theirs, np.array(ids), mine)[0])


def _batch(
    columns: tuple[str, ...],
    plan: StreamPlan,
    hour: int,
    rows: Sequence[tuple[float, ...]],
    names: dict[int, str] | None = None,
) -> RecordBatch:
    """Forecast rows of one step; ``extra`` names the metric and, for entities with names, the names (the
    store's ``forecast`` tags)."""
    arr = np.array(rows, dtype=np.float64)
    keys = arr[:, 0].astype(np.uint32)
    extra: dict[str, object] = {"metric": plan.column}
    if names:
        extra["entities"] = {str(k): names[k] for k in set(keys.tolist()) if k in names}
    return RecordBatch(
        "forecast",
        columns,
        plan.step_ms // 1000,
        keys,
        np.full(len(rows), plan.start_ms + hour * plan.step_ms, np.int64),
        arr[:, 1:],
        extra=extra,
    )
