"""Twin operations as jobs: make a new task twin by transfer, merge or split of stored twins, with lineage.

Source twins are the function-specific (direct) twins of each task, trained federatedly from the walks on
first use and stored under ``<state_dir>/utt/`` (``<twin_id>.pt`` weights + ``<twin_id>.json`` lineage).
The new twin is trained federatedly (frozen reused parts), evaluated on the test walks (normalised MSE) and
stored the same way; the caller writes its ``twin`` row (level ``utt``) to InfluxDB.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nettwin.errors import InputError
from stream_processors.multimodal import Windows
from twin_store.lineproto import point
from twin_store.utt import TASKS, FedConfig, TaskTwin, fed_train, merge, new_twin, nmse, split, transfer
from twin_store.utt_bench import Data, UttConfig, prepare

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

    def paths(self, twin: TaskTwin) -> tuple[Path, Path]:
        stem = twin.lineage.twin_id.replace("/", "_")
        return self.root / f"{stem}.pt", self.root / f"{stem}.json"

    def save(self, twin: TaskTwin) -> Path:
        weights, meta = self.paths(twin)
        torch.save(twin.state_dict(), weights)
        meta.write_text(json.dumps(asdict(twin.lineage), indent=1))
        return meta

    def load_into(self, twin: TaskTwin) -> bool:
        weights, meta_path = self.paths(twin)
        if not weights.is_file() or not meta_path.is_file():
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
) -> list[dict[str, Any]]:
    """Perform ``op`` and return one lineage dict per new twin (with its metrics and stored path)."""
    _check(op, sources, targets)
    torch.set_num_threads(1)
    data = Data(prepare(data_paths, UttConfig(seed=seed, rounds=rounds)))
    fed = FedConfig(rounds=rounds, seed=seed)
    store = TwinStore(state_dir)
    test = Windows.concat(list(data.test_grid.values()))

    def evaluate(twin: TaskTwin) -> float:
        return round(nmse(data.predict(twin, test), getattr(test, TASKS[twin.lineage.task][0])), 4)

    def train(twin: TaskTwin) -> None:
        t0 = time.perf_counter()
        r = fed_train(twin, data.clients(twin.lineage.task), data.val_client(twin.lineage.task), fed)
        twin.lineage.metrics = {
            "test_nmse": evaluate(twin),
            "val_loss": round(min(r.val_curve), 4),
            "train_s": round(time.perf_counter() - t0, 2),
            "comm_mb": round(r.comm_bytes / 1e6, 2),
            "clients": len(data.train),
            "rounds": rounds,
        }

    def source(task: str) -> TaskTwin:
        twin = new_twin(task, task, [TASKS[task][2]], data.in_channels, data.lengths, seed=seed)
        if not store.load_into(twin):
            train(twin)
            store.save(twin)
        return twin

    src = [source(s) for s in sources]
    made: list[TaskTwin] = []
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
    """``twin`` rows (level ``utt``) with the lineage as string fields."""
    return [
        point(
            "twin",
            {"level": "utt", "twin_id": r["twin_id"]},
            {
                "version": int(r["version"]),
                "loss": float(r["metrics"]["test_nmse"]),
                "n_updates": int(r["metrics"]["rounds"]),
                "n_members": int(r["metrics"]["clients"]),
                "operation": r["operation"],
                "sources": ",".join(r["sources"]),
                "fuser": r["fuser"] or "",
                "task": r["task"],
            },
            time_s,
        )
        for r in records
    ]
