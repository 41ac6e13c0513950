"""``nettwin vtwin``: V-twinning from a history file, storing the initial global and cluster twins.

The twins go to the compacted ``twin.models`` topic, which BS agents follow (the global message carries the
per-square scaling statistics and the stream plan, so streams scale and train exactly as the benchmark
does), each BS's last V-twinning update (``bs:<square>``, so the store's cluster FedAvg starts where
V-twinning ended), and to InfluxDB as ``twin`` rows plus ``membership`` rows (epoch 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ingest.errors import InputError, ServiceError
from ingest.kafka import make_producer
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.lineproto import point
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import TwinMessage
from twin_store.federation.plan import dcs_labels, load_matrix, split_hours, stream_plan
from twin_store.federation.samples import Scaler, samples
from twin_store.federation.twinning import v_twinning
from twin_store.models.forecaster import FitConfig, TwinModel


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
    messages = [
        TwinMessage(
            "global",
            "0",
            1,
            job.hidden,
            result.global_params.numpy(),
            {
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
                    str(s): [float(m), float(d)]
                    for s, m, d in zip(squares, scaler.mean, scaler.std, strict=True)
                },
            },
        ),
        *(
            TwinMessage(
                "cluster",
                str(c),
                1,
                job.hidden,
                ct.twins[c].numpy(),
                {"members": members[c], "epoch": 0, "as_of": -1},
            )
            for c in cluster_ids
        ),
        # each BS's last V-twinning update: the cluster twins' FedAvg keeps counting it until the BS
        # sends a newer one (seq -1: any stream update is newer)
        *(
            TwinMessage(
                "bs",
                str(s),
                1,
                job.hidden,
                params.numpy(),
                {"seq": -1, "hour": -1, "n_samples": n, "loss": loss, "cluster": ct.labels[s]},
            )
            for s, (params, n) in sorted(ct.latest.items())
        ),
    ]
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

    now = int(time.time())
    n_updates = result.uploads
    lines = [
        point(
            "twin",
            {"level": "global", "twin_id": "0"},
            {"version": 1, "epsilon": 0.0, "loss": loss, "n_updates": n_updates, "n_members": len(squares)},
            now,
        )
    ]
    lines += [
        point(
            "twin",
            {"level": "cluster", "twin_id": str(c)},
            {
                "version": 1,
                "epsilon": 0.0,
                "loss": loss,
                "n_updates": n_updates,
                "n_members": len(members[c]),
            },
            now,
        )
        for c in cluster_ids
    ]
    lines += [
        point("membership", {"square": str(s)}, {"cluster": int(ct.labels[int(s)]), "epoch": 0}, now)
        for s in squares.tolist()
    ]
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
