"""The store's cost per accepted local update at N entities: ``TwinState.apply`` in process, no services.

N BSs in K clusters (every K-th BS in each), the default temporal screen, FedAvg cluster twins and the global
offered every change (psi 1e-6). Every BS's first update is applied (the screen fills with peers and the
clusters with members' updates), then ``--updates`` more from randomly chosen BSs are timed, each decoded from
its wire bytes and each resulting twin message encoded, as ``nettwin htwin`` does between Kafka's poll and its
send. Prints one JSON line: ``ms_per_update`` and ``rss_mb`` (after all updates) for this checkout and, with
``--baseline REF``, for that git ref in the same run (each in a fresh process).

Usage: .venv/bin/python -m bench.htwin_updates [--entities 10000] [--clusters 7] [--updates 1000] [--baseline a77adde]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench.checkouts import REPO, run_in_checkout, worktree

# run in the child with the checkout under test first on sys.path; only public entry points, so older
# versions run it too
CHILD = r"""
import json, sys, time
import numpy as np, torch
from twin_store.federation.local_updates import StreamPlan
from twin_store.federation.models_topic import TwinMessage, decode_twin
from twin_store.federation.screening import make_defense
from twin_store.models.forecaster import FitConfig, TwinModel
from twin_store.services.htwin import TwinState

n, k, timed = (int(a) for a in sys.argv[1:4])
torch.set_num_threads(1)
rng = np.random.default_rng(0)
p = TwinModel(32, 5).n_params
plan = StreamPlan(1, 100, 0, fit=FitConfig(2, 1e-2, 4), recluster_every=0)
start = rng.normal(0, 0.1, p).astype(np.float32)
msgs = [TwinMessage("global", "0", 1, 32, start.copy(), {"plan": plan.to_meta(), "clusters": k, "as_of": -1})]
msgs += [TwinMessage("cluster", str(c), 1, 32, start.copy(), {"members": list(range(c, n, k))}) for c in range(k)]
state = TwinState.from_messages({m.key: m for m in msgs}, psi=1e-6, defense=make_defense("temporal"))


def update(square, seq):
    meta = {"seq": seq, "hour": seq, "n_samples": 50, "loss": 0.1, "cluster": square % k,
            "base_version": state.clusters.versions.get(square % k, 1), "profile": [0.1] * 24}
    params = start + rng.normal(0, 0.01, p).astype(np.float32)
    return TwinMessage("bs", str(square), 1, 32, params, meta).encode()


for s in range(n):
    state.apply(decode_twin(update(s, 1)))
wire = [update(s, 2) for s in rng.choice(n, timed, replace=False).tolist()]
t0 = time.perf_counter()
decisions = {}
for data in wire:
    out = state.apply(decode_twin(data))
    decisions[out.decision] = decisions.get(out.decision, 0) + 1
    for msg in out.twins:
        msg.encode()
seconds = time.perf_counter() - t0
with open("/proc/self/status") as fh:
    rss = next(int(line.split()[1]) // 1024 for line in fh if line.startswith("VmRSS:"))
print(json.dumps({"ms_per_update": round(seconds / timed * 1000, 2), "rss_mb": rss, "decisions": decisions}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=10_000)
    ap.add_argument("--clusters", type=int, default=7)
    ap.add_argument("--updates", type=int, default=1_000, help="timed updates after every BS's first")
    ap.add_argument("--baseline", default=None, help="a git ref to measure beside this checkout")
    args = ap.parse_args()
    if not 0 < args.updates <= args.entities:
        raise SystemExit("bench.htwin_updates: error: --updates must be between 1 and --entities")
    sizes = (str(args.entities), str(args.clusters), str(args.updates))
    out: dict[str, object] = {
        "entities": args.entities,
        "clusters": args.clusters,
        "timed_updates": args.updates,
    }
    if args.baseline:
        with (
            tempfile.TemporaryDirectory(prefix="nettwin-htwin-updates-") as tmp,
            worktree(args.baseline, Path(tmp) / "baseline") as checkout,
        ):
            out["baseline_ref"] = args.baseline
            out["baseline"] = run_in_checkout(CHILD, checkout, args=sizes)
    out["this"] = run_in_checkout(CHILD, REPO, args=sizes)
    out["load_1m"] = round(os.getloadavg()[0], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
