"""``nettwin vtwin``: V-twinning from a history file, storing the initial global and cluster twins.

The twins go to the compacted ``twin.models`` topic, which BS agents follow (the global message carries the
per-square scaling statistics and the stream plan, so streams scale and train exactly as the benchmark
does), each BS's last V-twinning update (``bs:<square>``, so the store's cluster FedAvg starts where
V-twinning ended), and to InfluxDB as ``twin`` rows plus ``membership`` rows (epoch 0).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ingest.errors import InputError, ServiceError, Stopped
from ingest.kafka import make_producer
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.lineproto import point
from twin_store.adapters.twin_rows import twin_state_lines
from twin_store.federation.bootstrap import (
    Grid,
    cluster_profiles,
    default_need,
    grid_of,
    persistence_start,
    prepare,
    ready,
)
from twin_store.federation.inputs import daily_profiles
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import ROSTER_VERSION, TwinMessage, roster_message, split_roster
from twin_store.federation.plan import dcs_labels, load_matrix, split_hours, stream_plan
from twin_store.federation.samples import Scaler, samples
from twin_store.federation.sites import cluster_entities, load_sites
from twin_store.federation.twinning import ClusterTwins, VTwinResult, v_twinning
from twin_store.models.forecaster import FitConfig, TwinModel, predict_in_chunks
from twin_store.services.memory import release_freed_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VTwinJob:
    data: Path
    squares: int | None = None  # None: every square in the file
    seed: int = 1
    clusters: int | None = 4
    rounds: int = 10
    participation: float = 1.0
    hidden: int = 32
    train_hours: int | None = None  # default: all but the last 480 hours (the benchmark's training span)
    milan_dir: Path | None = None
    # the stream protocol the BS agents and the store follow after V-twinning (StreamPlan's defaults)
    update_every: int = StreamPlan.update_every
    window: int = StreamPlan.window
    stream: FitConfig = field(default_factory=lambda: StreamPlan(0, 0, 0).fit)
    recluster_every: int = StreamPlan.recluster_every  # accepted stream updates between re-clusterings
    fit: FitConfig = field(default_factory=lambda: FitConfig(steps=20, lr=1e-2, batch=64))


def send_to_twin_models(settings: NettwinSettings, messages: list[TwinMessage]) -> Topics:
    """Every message to ``twin.models``, acknowledged (a failed send is a ServiceError); returns the topics."""
    topics = Topics.from_settings(settings)
    producer = make_producer(settings)
    try:
        futures = [producer.send(topics.twin_models, key=m.key, value=m.encode()) for m in messages]
        producer.flush()
        for f in futures:
            if f.exception is not None:
                raise ServiceError(f"publishing twins to {topics.twin_models} failed: {f.exception}")
    finally:
        producer.close()
    return topics


def first_twin_rows(
    loss: float, n_updates: int, clusters: dict[int, int], labels: dict[str, int]
) -> list[str]:
    """The rows of freshly V-twinned twins: the global and cluster ``twin`` rows (version 1) with their
    ``twin_current`` points, and every entity's ``membership`` (epoch 0). ``clusters``: cluster id -> members; ``labels``: entity -> cluster."""
    now = int(time.time())
    fields = {"version": 1, "epsilon": 0.0, "loss": loss, "n_updates": n_updates}
    lines = twin_state_lines("global", "0", fields | {"n_members": len(labels)}, now)
    lines += [
        line
        for c, n in clusters.items()
        for line in twin_state_lines("cluster", str(c), fields | {"n_members": n}, now)
    ]
    lines += [point("membership", {"entity": e}, {"cluster": c, "epoch": 0}, now) for e, c in labels.items()]
    return lines


def run_vtwin(settings: NettwinSettings, job: VTwinJob) -> dict[str, Any]:
    if not job.data.is_file():
        raise InputError(f"{job.data}: no such file")
    if not 0 < job.participation <= 1:
        raise InputError(f"--participation {job.participation}: must be in (0, 1]")
    torch.set_num_threads(1)
    started = time.perf_counter()
    series, squares = load_matrix(job.data, job.squares, job.seed)
    train_hours = job.train_hours or split_hours(series.shape[1])[0]
    if not 24 * 6 <= train_hours <= series.shape[1]:
        raise InputError(f"--train-hours {train_hours}: needs 144..{series.shape[1]} (5 days of history + 1)")
    scaler = Scaler.fit(series, train_hours)
    z = scaler.transform(series)
    milan_dir = (job.milan_dir or job.data.parent).resolve()
    labels = dcs_labels(milan_dir, squares, z, train_hours, job.clusters, job.seed)
    x, y = samples(z, 0, train_hours)
    model = TwinModel(job.hidden)
    result = v_twinning(
        model,
        squares,
        labels,
        torch.as_tensor(x, dtype=torch.float32),
        torch.as_tensor(y, dtype=torch.float32),
        model.init(1, job.seed)[0],
        job.rounds,
        job.participation,
        job.fit,
        torch.Generator().manual_seed(job.seed),
        np.random.default_rng(job.seed),
    )
    ct = result.clusters
    cluster_ids = sorted(set(ct.labels.values()))
    loss = result.losses[-1] if result.losses else float("nan")
    members = {c: ct.members(c) for c in cluster_ids}
    meta: dict[str, Any] = {
        "members": squares.tolist(),
        "loss": loss,
        "rounds": result.rounds,
        "train_hours": train_hours,
        # how BS agents and the store run the stream (local_updates.py), and the DCS inputs
        "plan": stream_plan(job, train_hours).to_meta(),
        "clusters": job.clusters,
        "milan_dir": str(milan_dir),
        "as_of": -1,
        "scaler": {
            str(s): [float(m), float(d)] for s, m, d in zip(squares, scaler.mean, scaler.std, strict=True)
        },
    }
    messages = twin_messages(result, job.hidden, meta)
    topics = send_to_twin_models(settings, messages)

    clusters = {c: len(members[c]) for c in cluster_ids}
    entity_labels = {str(s): int(ct.labels[int(s)]) for s in squares.tolist()}
    lines = first_twin_rows(loss, result.uploads, clusters, entity_labels)
    with InfluxClient(settings.influx) as influx:
        influx.write("\n".join(lines).encode(), precision="s")
    return {
        "squares": len(squares),
        "train_hours": train_hours,
        "clusters": {str(c): len(members[c]) for c in cluster_ids},
        "rounds": result.rounds,
        "final_loss": round(loss, 5),
        "uploads": result.uploads,
        "downloads": result.downloads,
        "topic": topics.twin_models,
        "seconds": round(time.perf_counter() - started, 2),
    }


# ---- V-twinning of any deployment, from the [twins] steps its stream wrote to InfluxDB


VAL_TIE = (
    0.01  # V-twinned twins must beat persistence on the held-out steps by more than this (as bench twins)
)


@dataclass(frozen=True)
class StreamJob:
    """How bootstrap V-twinning trains (the VH-Twin defaults) and the stream protocol after it."""

    seed: int = 1
    rounds: int = 10
    participation: float = 1.0
    # at most this many BSs train in one round on average (partial participation, as FedAvg samples clients):
    # the bootstrap's time stops growing with the deployment (10,000 entities: each takes part in ~1 of the
    # 10 rounds); up to 1,000 entities every BS takes every round, as before
    max_participants: int = 1000
    hidden: int = 32
    update_every: int = StreamPlan.update_every  # steps between a BS's local updates
    window: int = StreamPlan.window  # steps of recent samples a local update trains on
    stream: FitConfig = field(default_factory=lambda: StreamPlan(0, 0, 0).fit)
    fit: FitConfig = field(default_factory=lambda: FitConfig(steps=20, lr=1e-2, batch=64))


def read_twin_steps(influx: InfluxClient, metric: str, step_s: int) -> Grid:
    """Every ``twin_input`` row of ``metric`` -> the grid of entities x steps (docs/twins.md)."""
    quoted = metric.replace("\\", "\\\\").replace("'", "\\'")
    q = f'SELECT "value", "key" FROM "twin_input" WHERE "metric" = \'{quoted}\' GROUP BY "entity"'
    # read piece by piece into columns: the whole answer parsed at once was ~150 MB at 10,000 entities
    keys, times, values = [], [], []
    names: dict[int, str] = {}
    for series in influx.query_chunks(q):
        name = series.tags.get("entity", "")
        rows = [r for r in series.values if r[1] is not None and r[2] is not None]
        if not rows:
            continue
        k = np.array([r[2] for r in rows], dtype=np.int64)
        keys.append(k)
        times.append(np.array([r[0] for r in rows], dtype=np.int64))
        values.append(np.array([r[1] for r in rows], dtype=np.float64))
        names.update(dict.fromkeys(np.unique(k).tolist(), name))
    if not keys:
        return grid_of(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), {}, step_s * 1000)
    return grid_of(np.concatenate(keys), np.concatenate(times), np.concatenate(values), names, step_s * 1000)


def bootstrap_need(settings: NettwinSettings) -> int:
    twins = settings.twins
    return twins.bootstrap_steps or default_need(twins.horizon)


def count_twin_steps(influx: InfluxClient, metric: str) -> dict[str, int]:
    """Reported steps per entity of ``metric`` in ``twin_input`` (one row per entity and step)."""
    quoted = metric.replace("\\", "\\\\").replace("'", "\\'")
    q = f'SELECT count("value") FROM "twin_input" WHERE "metric" = \'{quoted}\' GROUP BY "entity"'
    return {s.tags.get("entity", ""): int(s.values[0][1]) for s in influx.query(q, method="POST") if s.values}


def bootstrap_ready(settings: NettwinSettings, influx: InfluxClient) -> tuple[bool, int]:
    """Whether ``bootstrap_entities`` entities have ``bootstrap_need`` steps, and how many have: from a count
    per entity, not the history itself (htwin asks every 5 s; at 10,000 entities the history is 500,000 rows,
    the counts 10,000)."""
    twins = settings.twins
    if twins.target is None:
        raise InputError("[twins] has no target: name the metric to twin (docs/twins.md)")
    try:
        counts = count_twin_steps(influx, twins.target)
    except InputError as exc:
        if "database not found" not in str(exc):
            raise
        counts = {}  # the store has not created it yet: no history
    need = bootstrap_need(settings)
    have = sum(1 for c in counts.values() if c >= need)
    return have >= twins.bootstrap_entities, have


def run_vtwin_from_influx(
    settings: NettwinSettings,
    job: StreamJob | None = None,
    grid: Grid | None = None,
    stop: Callable[[], bool] | None = None,
    roster_first: bool = False,
) -> dict[str, Any]:
    """:func:`vtwin_from_influx`, then the heap pages it freed go back to the system (``nettwin htwin`` runs
    on for days after its bootstrap; glibc kept ~1 GB of them at 10,000 entities)."""
    try:
        return vtwin_from_influx(settings, job, grid, stop, roster_first)
    finally:
        release_freed_memory()


def compact(result: VTwinResult) -> VTwinResult:
    """The same twins without V-twinning's working state (its aggregation caches: before FedAvg kept running
    sums, every cluster's stacked members, ~110 MB at 10,000 entities). Pass the result itself (not a name
    that keeps it alive), then :func:`pack_latest` the returned one: the caches are gone before the packed
    copy is made."""
    ct = result.clusters
    clusters = ClusterTwins(dict(ct.labels), dict(ct.twins), dict(ct.latest), dict(ct.versions))
    return VTwinResult(
        result.global_params, clusters, result.rounds, result.uploads, result.downloads, list(result.losses)
    )


def pack_latest(clusters: ClusterTwins) -> None:
    """Every BS's last update into one ``[BSs, P]`` tensor, in place. V-twinning's are rows of each round's
    output, which stays whole while any of its rows is someone's last update (at 10,000 entities, 10 rounds of
    1,000: ~175 MB for ~6,500 BSs' ~115 MB)."""
    squares = sorted(clusters.latest)
    if squares:
        stack = torch.stack([clusters.latest[s][0] for s in squares])
        for k, s in enumerate(squares):  # in place: ``latest`` keeps its type (twinning.Latest)
            clusters.latest[s] = (stack[k], clusters.latest[s][1])


def vtwin_from_influx(
    settings: NettwinSettings,
    job: StreamJob | None = None,
    grid: Grid | None = None,
    stop: Callable[[], bool] | None = None,
    roster_first: bool = False,
) -> dict[str, Any]:
    """V-twinning on the history the stream wrote (``twin_input``), published like ``run_vtwin``'s twins
    (``twin_store/federation/bootstrap.py`` has the rules). Streaming starts at the step after the history.

    ``stop`` (``nettwin htwin``'s SIGTERM flag) is asked between the stages, between DCS levels and before every
    V-twinning round and minibatch step; True raises ``Stopped`` before any twin is published. Publishing the
    twins, once begun, finishes (a second or two), so twin.models never holds half of them.

    ``roster_first`` (htwin's bootstrap, when twin.models has no twins yet): the roster goes out with the stream
    plan once DCS is done, before the training, for the BS agents to record the steps they keep meanwhile (a
    stopped bootstrap leaves it; the next one republishes its own). Without it the roster goes just before the
    twins, so agents acting on twins already published do not meet another scaling minutes early."""
    never: Callable[[], bool] = lambda: False  # noqa: E731
    stop = stop or never

    published = ["nothing published"]

    def check(stage: str) -> None:
        if stop():
            raise Stopped(f"bootstrap stopped before {stage}: {published[0]}")

    job = job or StreamJob()
    twins = settings.twins
    if twins.target is None:
        raise InputError("[twins] has no target: name the metric to twin (docs/twins.md)")
    torch.set_num_threads(1)
    started = time.perf_counter()
    if grid is None:
        with InfluxClient(settings.influx) as influx:
            grid = read_twin_steps(influx, twins.target, twins.cadence_s)
    need = bootstrap_need(settings)
    if not ready(grid, need, twins.bootstrap_entities):
        most = int(grid.reported().max(initial=0)) if grid.values.size else 0
        raise InputError(
            f"twin_input has {len(grid.names)} entities of {twins.target!r} with up to {most} steps; "
            f"V-twinning needs {twins.bootstrap_entities} entities with {need} steps "
            "(twins.bootstrap_entities, twins.bootstrap_steps)"
        )
    check("preparing the samples")
    prep = prepare(grid, need, twins.horizon)
    grid = prep.grid
    names = grid.names
    sites = None
    if twins.sites is not None:
        all_sites = load_sites(twins.sites)
        if all(all_sites.has(n) for n in names):
            sites = all_sites.subset(names)
    profile = daily_profiles(prep.z, prep.train, grid.step_ms, grid.start_ms)
    check("DCS")
    labels = cluster_entities(sites, profile, twins.clusters or None, job.seed, stop=stop)
    # the roster's per-cluster hour-of-day means, now: the [entities, slots of a day] profiles (115 MB at
    # 10,000 entities of 1-minute steps) need not live through V-twinning
    profiles_of_clusters = cluster_profiles(profile, labels)
    del profile
    release_freed_memory()  # what the read and DCS left in the heap
    total = grid.steps
    plan = StreamPlan(
        seed=job.seed,
        start_hour=total,
        start_ms=grid.start_ms,
        update_every=job.update_every,
        window=job.window,
        fit=job.stream,
        recluster_every=(10 * len(grid.keys) if twins.recluster_every is None else twins.recluster_every),
        column=twins.target,
        step_ms=grid.step_ms,
        lags=tuple(int(v) for v in prep.plan.lags),
        steps_per_day=max(1, 86_400_000 // grid.step_ms),
        horizon=twins.horizon,
        fill_limit=prep.plan.fill_limit,
    )
    keys = grid.keys.tolist()
    roster: dict[str, Any] = {
        "members": keys,
        "scaler": {
            str(k): [float(m), float(d)]
            for k, m, d in zip(keys, prep.scaler.mean, prep.scaler.std, strict=True)
        },
        "entities": {str(k): n for k, n in zip(keys, names, strict=True)},
        # late joiners pick the cluster of the nearest member (sites) or of the best-correlated mean profile
        "cluster_profiles": profiles_of_clusters,
    }
    # a bootstrap's roster goes out now, with the plan, before the twins train: the BS agents record and screen
    # the steps they keep meanwhile, so the first live step waits for its own forecasts only (10,000 entities:
    # acting on the ~50 kept steps once the twins came took ~2.5 s of that step)
    if roster_first:
        check("publishing the roster")
        send_to_twin_models(settings, [roster_message(ROSTER_VERSION, roster | {"plan": plan.to_meta()})])
        published[0] = "only the roster (the coming twins' plan and scaling) published, no twin"
    log.info(
        "V-twinning %d entities on %d steps (%d clusters, lags %s)",
        len(names), prep.train, len(set(labels.tolist())), [int(v) for v in prep.plan.lags],
    )  # fmt: skip
    participation = min(job.participation, job.max_participants / len(names))
    n_inputs = prep.plan.n_inputs
    model = TwinModel(job.hidden, n_inputs)
    random_init = model.init(1, job.seed)[0]
    init = persistence_start(model, random_init)

    x_train = torch.as_tensor(prep.x, dtype=torch.float32)
    y_train = torch.as_tensor(prep.y, dtype=torch.float32)

    def v_twin(start: torch.Tensor) -> VTwinResult:
        result = compact(
            v_twinning(
                model,
                grid.keys,
                labels,
                x_train,
                y_train,
                start,
                job.rounds,
                participation,
                job.fit,
                torch.Generator().manual_seed(job.seed),
                np.random.default_rng(job.seed),
                counts=prep.counts,
                stop=stop,
            )
        )
        release_freed_memory()
        return result

    # the held-out steps decide: V-twinning from a random start, from the persistence twin, or persistence
    # itself (a V-twinned result must beat persistence by more than VAL_TIE)
    xv, yv, ok = prep.plan.samples(prep.z, prep.train, grid.steps)
    xv_t = torch.as_tensor(np.where(np.isfinite(xv), xv, 0.0), dtype=torch.float32)

    def val_mse(params: torch.Tensor) -> float:
        pred = predict_in_chunks(model, params, xv_t)
        return float(np.mean((pred[ok] - yv[ok]) ** 2)) if ok.any() else float("nan")

    # each candidate is scored as soon as it is trained, and only the better one is kept: the first packed
    # while the second trains, the second packed only if it wins, once the first is gone
    result = v_twin(random_init)
    pack_latest(result.clusters)
    release_freed_memory()
    kept, val_mse_twins = "v-twinning", val_mse(result.global_params)
    other = v_twin(init)
    other_mse = val_mse(other.global_params)
    if other_mse < val_mse_twins:  # a tie or NaN keeps the first, as min() over both did
        kept, val_mse_twins, result = "v-twinning from persistence", other_mse, other
        del other
        pack_latest(result.clusters)
    else:
        del other
    release_freed_memory()
    pers_mse = val_mse(init)
    if not pers_mse * (1 + VAL_TIE) >= val_mse_twins:  # NaN (nothing held out) keeps persistence too
        kept = "persistence"
        label_of = {int(k): int(c) for k, c in zip(grid.keys.tolist(), labels.tolist(), strict=True)}
        result = VTwinResult(
            init.clone(),
            ClusterTwins(label_of, {int(c): init.clone() for c in set(labels.tolist())}),
            result.rounds,
            result.uploads,
            result.downloads,
            result.losses,
        )

    ct = result.clusters
    cluster_ids = sorted(set(ct.labels.values()))
    members = {c: ct.members(c) for c in cluster_ids}
    loss = result.losses[-1] if result.losses else float("nan")
    meta: dict[str, Any] = roster | {
        "loss": loss,
        "rounds": result.rounds,
        "train_hours": prep.train,
        "plan": plan.to_meta(),
        "inputs": prep.plan.to_meta(),
        # the count found (``[twins] clusters = 0`` lets Louvain choose it): a restart re-reads it as such
        "clusters": len(cluster_ids),
        "as_of": -1,
        "metric": twins.target,
    }
    messages = twin_messages(result, job.hidden, meta)
    if roster_first:
        messages = [m for m in messages if m.level != "roster"]  # out already
    check("publishing")  # the last chance: from here the twins go out whole
    publish_twins(settings, messages, result, members, dict(zip(keys, names, strict=True)))
    return {
        "entities": len(keys),
        "steps": total,
        "train_steps": prep.train,
        "lags": [int(v) for v in prep.plan.lags],
        "clusters": {str(c): len(members[c]) for c in cluster_ids},
        "rounds": result.rounds,
        "participation": round(participation, 4),
        "final_loss": round(loss, 5),
        "validation_mse": round(val_mse_twins, 5),
        "persistence_mse": round(pers_mse, 5),
        "kept": kept,  # the V-twinned twins, or persistence when they did not beat it on validation
        "kept_validation_mse": round(pers_mse if kept == "persistence" else val_mse_twins, 5),
        "topic": Topics.from_settings(settings).twin_models,
        "seconds": round(time.perf_counter() - started, 2),
    }


def twin_messages(result: Any, hidden: int, global_meta: dict[str, Any]) -> list[TwinMessage]:
    """The roster, global, cluster and per-BS twins V-twinning ended with. ``global_meta`` has the roster's
    per-entity fields too: they go on the roster (first, so a reader has it when the global arrives), the
    rest on the global, which names the roster's version (``models_topic``)."""
    ct = result.clusters
    cluster_ids = sorted(set(ct.labels.values()))
    loss = global_meta["loss"]
    small, roster = split_roster(global_meta)
    return [
        roster_message(ROSTER_VERSION, roster),
        TwinMessage(
            "global", "0", 1, hidden, result.global_params.numpy(), small | {"roster": ROSTER_VERSION}
        ),
        *(
            TwinMessage(
                "cluster",
                str(c),
                1,
                hidden,
                ct.twins[c].numpy(),
                {"members": ct.members(c), "epoch": 0, "as_of": -1},
            )
            for c in cluster_ids
        ),
        *(
            TwinMessage(
                "bs",
                str(s),
                1,
                hidden,
                params.numpy(),
                {"seq": -1, "hour": -1, "n_samples": n, "loss": loss, "cluster": ct.labels[s]},
            )
            for s, (params, n) in sorted(ct.latest.items())
        ),
    ]


def publish_twins(
    settings: NettwinSettings,
    messages: list[TwinMessage],
    result: Any,
    members: dict[int, list[int]],
    names: dict[int, str],
) -> None:
    """Twins to ``twin.models``, then ``twin`` and ``membership`` rows (tag ``entity``) to InfluxDB."""
    send_to_twin_models(settings, messages)
    loss = result.losses[-1] if result.losses else float("nan")
    labels = result.clusters.labels
    entity_clusters = {names[s]: int(labels[s]) for s in sorted(names)}
    lines = first_twin_rows(loss, result.uploads, {c: len(m) for c, m in members.items()}, entity_clusters)
    with InfluxClient(settings.influx) as influx:
        influx.write("\n".join(lines).encode(), precision="s")
