"""Twin operations as jobs: make a new task twin by transfer, merge or split of stored twins, with lineage.

Source twins are the function-specific (direct) twins of each task, trained federatedly from the walks on
first use and stored under ``<state_dir>/utt/`` (``<twin_id>.pt`` weights + ``<twin_id>.json`` lineage).
The new twin is trained federatedly (frozen reused parts; every client update screened and aggregated by a
``twin_store.federation.screening`` defense, ``mean`` = FedAvg by default), evaluated on the test walks (normalised MSE)
and stored the same way; the caller writes its ``twin`` row (level ``utt``) to InfluxDB, and one ``update``
row per client upload of every federated training the operation ran (:func:`update_lines`). With ``unified`` the
new twin is instead a view of the stored unified model (loss = transfer + merge + split), with the same
lineage record and ``model = unified.<fuser>``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ingest.errors import InputError
from twin_store.adapters.lineproto import point
from twin_store.adapters.twin_rows import twin_state_lines
from twin_store.federation.utt_data import Data, UttConfig, prepare
from twin_store.federation.utt_positioning import PositioningConfig
from twin_store.federation.utt_training import FedConfig, Upload, fed_train
from twin_store.models.multimodal import Windows
from twin_store.models.utt import (
    TASKS,
    UNIFIED_DIRECTIONS,
    TaskTwin,
    UnifiedTwin,
    find_direction,
    merge,
    new_twin,
    nmse,
    split,
    transfer,
)

OPERATIONS = {"transfer": (1, 1), "merge": (2, 1), "split": (1, 2)}  # (sources, targets)


def _check(op: str, sources: list[str], targets: list[str]) -> None:
    n_src, n_tgt = OPERATIONS[op]
    for t in sources + targets:
        if t not in TASKS:
            raise InputError(f"unknown task twin {t!r}; one of {', '.join(TASKS)}")
    if len(sources) != n_src or len(targets) != n_tgt:
        raise InputError(f"{op} takes {n_src} --from twin(s) and {n_tgt} --to twin(s)")


class TwinStore:
    """Twins on disk: weights and lineage side by side under ``<state_dir>/utt``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "utt"
        self.root.mkdir(parents=True, exist_ok=True)

    def paths(self, twin: TaskTwin | UnifiedTwin) -> tuple[Path, Path]:
        stem = twin.lineage.twin_id.replace("/", "_")
        return self.root / f"{stem}.pt", self.root / f"{stem}.json"

    def save(self, twin: TaskTwin | UnifiedTwin) -> Path:
        weights, meta = self.paths(twin)
        torch.save(twin.state_dict(), weights)
        meta.write_text(json.dumps(asdict(twin.lineage), indent=1))
        return meta

    def load_into(self, twin: TaskTwin | UnifiedTwin, trained_with: dict[str, Any]) -> bool:
        """Load a stored twin if it was trained with the same settings (``trained_with`` against its
        lineage metrics); otherwise the caller retrains it."""
        weights, meta_path = self.paths(twin)
        if not weights.is_file() or not meta_path.is_file():
            return False
        stored = json.loads(meta_path.read_text()).get("metrics", {})
        if any(stored.get(k) != v for k, v in trained_with.items()):
            return False
        try:
            twin.load_state_dict(torch.load(weights, weights_only=True))
        except (RuntimeError, OSError):
            return False  # another data set's shapes: retrain
        meta = json.loads(meta_path.read_text())
        twin.lineage.version = int(meta.get("version", 0))
        twin.lineage.metrics = dict(meta.get("metrics", {}))
        return True


def run_operation(
    op: str,
    sources: list[str],
    targets: list[str],
    data_paths: list[Path],
    state_dir: Path,
    fuser: str = "gating",
    rounds: int = 10,
    seed: int = 1,
    defense: str = "mean",
    unified: bool = False,
    uploads: list[tuple[str, Upload]] | None = None,
) -> list[dict[str, Any]]:
    """Perform ``op`` and return one lineage dict per new twin (with its metrics and stored path).

    ``unified``: the new twin is the direction's view of the stored unified model (``unified.<fuser>``,
    trained with loss = transfer + merge + split on first use) instead of a function-specific twin.
    ``uploads`` collects (twin id, upload) for every client upload of every training run here (source twins
    and the unified model included; a stored twin that is reused had none).
    """
    _check(op, sources, targets)
    directions = find_direction(op, sources, targets) if unified else []
    if unified and not directions:
        known = "; ".join(
            f"{o} --from {','.join(src)} --to {task}" for o, src, _m, task in UNIFIED_DIRECTIONS.values()
        )
        raise InputError(f"the unified model is not trained for {op} {','.join(sources)} -> {','.join(targets)}; "
                         f"it has: {known}")  # fmt: skip
    torch.set_num_threads(1)
    data = Data(prepare(data_paths, UttConfig(seed=seed, rounds=rounds)))
    fed = FedConfig(rounds=rounds, seed=seed, defense=defense)
    store = TwinStore(state_dir)
    test = Windows.concat(list(data.test_grid.values()))

    def evaluate(twin: TaskTwin) -> float:
        return round(nmse(data.predict(twin, test), getattr(test, TASKS[twin.lineage.task][0])), 4)

    # a stored source twin is reused only if it was trained like this run asks
    trained_with = {"rounds": rounds, "seed": seed, "defense": defense, "data": sorted(map(str, data_paths))}

    def train(twin: TaskTwin | UnifiedTwin) -> None:
        t0 = time.perf_counter()
        tasks = tuple(TASKS) if isinstance(twin, UnifiedTwin) else (twin.lineage.task,)
        r = fed_train(twin, data.clients(tasks), data.val_client(tasks), fed)
        if uploads is not None:
            uploads.extend((twin.lineage.twin_id, u) for u in r.uploads)
        twin.lineage.metrics = {
            **trained_with,
            "val_loss": round(min(r.val_curve), 4),
            "train_s": round(time.perf_counter() - t0, 2),
            "comm_mb": round(r.comm_bytes / 1e6, 2),
            "clients": len(data.train),
            "accepted": r.accepted,
            "quarantined": r.quarantined,
        }
        if isinstance(twin, TaskTwin):
            twin.lineage.metrics["test_nmse"] = evaluate(twin)

    made: list[TaskTwin] = []
    if unified:
        model = UnifiedTwin(f"unified.{fuser}", data.in_channels, data.lengths, fuser=fuser, seed=seed)
        if not store.load_into(model, trained_with):
            train(model)
            store.save(model)
        for direction, target in zip(directions, targets, strict=True):
            view = model.view(direction, f"{target}.{op}.{'+'.join(sources)}.unified.{fuser}")
            view.lineage.metrics = {**model.lineage.metrics, "test_nmse": evaluate(view)}
            made.append(view)
        return [{**asdict(t.lineage), "stored": str(store.save(t))} for t in made]

    def source(task: str) -> TaskTwin:
        twin = new_twin(task, task, [TASKS[task][2]], data.in_channels, data.lengths, seed=seed)
        if not store.load_into(twin, trained_with):
            train(twin)
            store.save(twin)
        return twin

    src = [source(s) for s in sources]
    if op == "transfer":
        made = [transfer(src[0], f"{targets[0]}.transfer.{sources[0]}", targets[0], data.lengths, seed)]
    elif op == "merge":
        tid = f"{targets[0]}.merge.{'+'.join(sources)}.{fuser}"
        made = [merge(src, tid, targets[0], fuser, data.lengths, seed)]
    else:
        made = list(
            split(src[0], {t: f"{t}.split.{sources[0]}" for t in targets}, data.lengths, seed).values()
        )
    out = []
    for twin in made:
        train(twin)
        path = store.save(twin)
        out.append({**asdict(twin.lineage), "stored": str(path)})
    return out


def twin_lines(records: list[dict[str, Any]], time_s: int) -> list[str]:
    """``twin`` rows (level ``utt``) with the lineage as string fields, and their ``twin_current`` points;
    ``n_updates`` = client updates the defense accepted, ``quarantined`` = the ones it refused."""
    return [
        line
        for r in records
        for line in twin_state_lines(
            "utt",
            r["twin_id"],
            {
                "version": int(r["version"]),
                "loss": float(r["metrics"]["test_nmse"]),
                "n_updates": int(r["metrics"]["accepted"]),
                "n_members": int(r["metrics"]["clients"]),
                "rounds": int(r["metrics"]["rounds"]),
                "quarantined": int(r["metrics"]["quarantined"]),
                "defense": r["metrics"]["defense"],
                "model": r["model"],
                "operation": r["operation"],
                "sources": ",".join(r["sources"]),
                "fuser": r["fuser"] or "",
                "task": r["task"],
            },
            time_s,
        )
    ]


def update_lines(uploads: list[tuple[str, Upload]]) -> list[str]:
    """``update`` rows (time: when screened, ns), as the traffic store writes them: tags ``square`` = the
    client (walk / local-area twin), ``cluster`` = the twin id, ``decision``; fields ``norm``, ``score``,
    ``reason``, ``base_version`` and ``seq`` (the round)."""
    return [
        point(
            "update",
            {"entity": u.client, "cluster": twin_id, "decision": "accepted" if u.accepted else "quarantined"},
            {
                "norm": u.norm if math.isfinite(u.norm) else None,
                "score": u.score if math.isfinite(u.score) else None,
                "reason": u.reason,
                "base_version": int(u.base_version),
                "seq": int(u.round),
            },
            u.time_ns,
        )
        for twin_id, u in uploads
    ]


def train_locator(
    data_paths: list[Path],
    state_dir: Path,
    seed: int = 1,
    pcfg: PositioningConfig | None = None,
) -> dict[str, Any]:
    """``nettwin twin position``: the generalising merged (FTM + IMU) positioning twin, made by the bench's
    protocol for one seed (select fuser, rounds and the shrink alpha on the held-out validation walks, refit
    on every training walk, score on the test walks), stored as a :class:`Locator` under
    ``<state_dir>/utt`` for the live windows. Returns its record: figures beside trilateration and the filter."""
    from twin_store.federation.positioning_study import PositioningStudy

    torch.set_num_threads(1)
    cfg = UttConfig(seed=seed)
    t0 = time.perf_counter()
    study = PositioningStudy(prepare(data_paths, cfg), cfg, pcfg)
    run = study.run_seed(seed)
    loc = study.locators[seed]
    prep = study.prep
    loc.metrics = {
        "seed": seed,
        "data": sorted(map(str, data_paths)),
        "fit_walks": prep.fit,
        "validation_walks": prep.val,
        "test_walks": prep.test,
        "chosen_fuser": run["chosen_fuser"],
        "rounds_kept": run["rounds_kept"],
        "alpha": run["alpha"],
        "val_median_m": run["val_median_m"],
        "test_median_m": run["test_median_m"],
        "baselines_val_median_m": study.baselines(prep.val) if prep.val else {},
        "baselines_test_median_m": study.baselines(prep.test),
        "train_s": round(time.perf_counter() - t0, 1),
    }
    loc.metrics["deployed"] = run["deployed"]
    path = loc.save(TwinStore(state_dir).root)
    return {
        "twin_id": "positioning",
        "twins": loc.twin_id,
        "version": loc.version,
        "fusers": loc.arch["fusers"],
        "metrics": loc.metrics,
        "stored": str(path),
    }


def locator_lines(record: dict[str, Any], time_s: int) -> list[str]:
    """The ``twin`` row (level ``utt``, twin_id ``positioning``) of a stored positioning twin and its
    ``twin_current`` point: ``loss`` = its median error (m) over the test walks of every scene, with the
    filter's beside it (``kalman``)."""
    m = record["metrics"]
    merged = m["test_median_m"]["merged"]
    kalman = {s: v["kalman"] for s, v in m["baselines_test_median_m"].items()}
    return twin_state_lines(
        "utt",
        record["twin_id"],
        {
            "version": int(record["version"]),
            "loss": float(max(merged.values())) if merged else math.nan,
            "kalman": float(max(kalman.values())) if kalman else math.nan,
            "alpha": float(m["alpha"]),
            "model": record["twins"],
            "operation": "position",
            "sources": "position,tracking",
            "fuser": ",".join(record["fusers"]),
            "task": "position",
        },
        time_s,
    )
