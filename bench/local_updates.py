"""Local-update throughput: all due BSs in one stacked pass vs one BS at a time (the baseline).

Trains B real BS series (the hourly Milan file) from the same start twin with the stream plan's settings and
prints one JSON line: seconds and BS updates/s for both ways, for each B, and the largest difference
between the two results (they must agree: each BS's minibatches are seeded by square and hour).

    .venv/bin/python bench/local_updates.py [--data FILE] [--sizes 1,8,32,128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twin_store.federation.local_updates import StreamPlan, local_updates
from twin_store.federation.plan import load_matrix
from twin_store.federation.samples import Scaler
from twin_store.models.forecaster import TwinModel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan" / "hourly_150squares_62days.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--sizes", default="1,8,32,128")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    series, squares = load_matrix(args.data, None, 1)
    hour = 1100
    z = Scaler.fit(series, 1008).transform(series)
    model = TwinModel(32)
    plan = StreamPlan(seed=1, start_hour=1008, start_ms=0)
    start = model.init(1, 1)[0]
    report: dict[str, object] = {
        "hidden": 32,
        "fit": plan.fit.__dict__,
        "window_hours": plan.window,
        "sizes": [],
    }
    for size in (int(s) for s in args.sizes.split(",")):
        size = min(size, len(squares))
        sq = squares[:size].tolist()
        rows = [z[i] for i in range(size)]
        starts = start.expand(size, -1).clone()
        stacked, single = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            together, _, _ = local_updates(model, starts, rows, sq, hour, plan)
            stacked.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            alone = [
                local_updates(model, starts[i : i + 1], rows[i : i + 1], sq[i : i + 1], hour, plan)[0][0]
                for i in range(size)
            ]
            single.append(time.perf_counter() - t0)
        diff = float((together - torch.stack(alone)).abs().max())
        s_med, b_med = statistics.median(stacked), statistics.median(single)
        report["sizes"].append(  # type: ignore[attr-defined]
            {
                "bss": size,
                "stacked_s": round(s_med, 3),
                "one_by_one_s": round(b_med, 3),
                "stacked_updates_per_s": round(size / s_med, 1),
                "one_by_one_updates_per_s": round(size / b_med, 1),
                "speedup": round(b_med / s_med, 2),
                "max_abs_param_diff": diff,
            }
        )
    print(json.dumps(report))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
