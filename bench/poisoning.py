"""Poisoning benchmark: VH-Twin's stream under attack, per defense. The protocol behind ``nettwin bench
poisoning``.

Same data, temporal split, V-twinning (on clean training hours) and stream protocol as ``nettwin bench
vhtwin`` (``evaluation.py``). During the validation and test hours a share of the BSs is malicious
(``producers/attacks.py``): fake BSs join the clusters (``mpaf``, ``tpi``) or compromised BSs tamper with
their updates (``signflip``, ``scale``) or learn from poisoned traffic (``telemetry``). Every update passes
the store's checks in arrival order (square order within an hour, as the benchmark's other streams):

- ``auth``: an update must come from a BS in the key registry. Fake BSs have no key and are rejected;
  compromised BSs hold genuine keys and pass.
- the defense's screening (``twin_store/federation/screening``), then its aggregation of each cluster twin.

Defenses: every name of ``twin_store.federation.screening.DEFENSES`` (statistics only, no authentication), ``auth``
(authentication + FedAvg), and ``default`` (nettwin's: authentication + temporal screening of updates +
telemetry screening at the BSs, which keeps flagged hours out of local training).

The global twin follows H-twinning at a fixed ``psi``; its forecasts are scored on the clean series, so the
figure is the damage done to the twin. The clean run (no attack, FedAvg) is computed in the same run as the
baseline, and the undefended run of each attack beside it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.vhtwin import VTwinned, as_tensor, metrics, prediction_rows, v_twinned
from producers import attacks
from producers.attacks import ATTACKS, FAKE_BS_ATTACKS, AttackConfig
from twin_store.federation import dcs
from twin_store.federation.local_updates import due_updates, profile_upto
from twin_store.federation.plan import TEST_HOURS, VAL_HOURS, VhTwinConfig, stream_plan
from twin_store.federation.reclustering import MilanGrouping, Reclusterer
from twin_store.federation.samples import inputs_at
from twin_store.federation.screening import DEFENSES, Candidate, cluster_aggregator, make_defense
from twin_store.federation.twinning import ClusterTwins, GlobalTwin

DEFENSE_CHOICES = (*DEFENSES, "auth", "default")
BASELINE = ("none", "mean")


@dataclass(frozen=True)
class PoisonConfig:
    base: VhTwinConfig = field(default_factory=VhTwinConfig)
    attacks: tuple[str, ...] = ("none",)
    defenses: tuple[str, ...] = ("default",)
    malicious: float = 0.2
    psi: float = 0.01
    attack: AttackConfig = field(default_factory=AttackConfig)


def check(cfg: PoisonConfig) -> None:
    for a in cfg.attacks:
        if a not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
    for d in cfg.defenses:
        if d not in DEFENSE_CHOICES:
            raise ValueError(f"unknown defense {d!r}; choose from {', '.join(DEFENSE_CHOICES)}")
    if not 0.0 <= cfg.malicious < 0.5:
        raise ValueError(f"--malicious {cfg.malicious}: give a share of the BSs in [0, 0.5)")


def run(
    data_path: Path, cfg: PoisonConfig
) -> tuple[dict[str, Any], list[tuple[str, int, int, float, float]]]:
    """Every (attack, defense) pair plus the clean baseline; returns the report and the prediction rows of
    the first requested pair (method ``vhtwin``), in original units."""
    check(cfg)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.base.seed)
    gen = torch.Generator().manual_seed(cfg.base.seed)
    t0 = time.perf_counter()
    begun = v_twinned(data_path, cfg.base, gen, np.random.default_rng(cfg.base.seed))
    walls = {"vtwinning_s": round(time.perf_counter() - t0, 2)}

    pairs = [BASELINE] + [(a, d) for a in cfg.attacks for d in cfg.defenses if (a, d) != BASELINE]
    results: dict[tuple[str, str], dict[str, Any]] = {}
    first_pred: np.ndarray | None = None
    for attack, defense in pairs:
        t0 = time.perf_counter()
        pred, result = _stream(begun, cfg, attack, defense)
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        results[(attack, defense)] = result
        if (attack, defense) == (cfg.attacks[0], cfg.defenses[0]):
            first_pred = pred
    clean = results[BASELINE]["test"]["mse"]
    runs = []
    for (attack, defense), r in results.items():
        r["test_mse_vs_clean"] = round(r["test"]["mse"] / clean, 3)
        runs.append({"attack": attack, "defense": defense} | r)
    report = {
        "squares": len(begun.squares),
        "malicious": cfg.malicious,
        "psi": cfg.psi,
        "clean_test_mse": clean,
        "runs": runs,
        "split": {"train_hours": begun.val_start, "val_hours": VAL_HOURS, "test_hours": TEST_HOURS},
        "wall_s": walls,
    }
    assert first_pred is not None
    test_hours = np.arange(begun.test_start, begun.series.shape[1])
    pred_z = first_pred[:, VAL_HOURS:]
    return report, prediction_rows("vhtwin", begun.squares, test_hours, begun.series, begun.scaler, pred_z)


def _stream(
    begun: VTwinned, cfg: PoisonConfig, attack: str, defense_name: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """One stream of validation and test hours under ``attack`` with ``defense_name``."""
    seed, acfg = cfg.base.seed, cfg.attack
    rng = np.random.default_rng([seed, 7])
    model, z, val_start = begun.model, begun.z, begun.val_start
    sq_list = begun.squares.tolist()
    n_sq, hours = z.shape
    plan = stream_plan(cfg.base, val_start)
    auth = defense_name in ("auth", "default")
    screen_telemetry = defense_name == "default"
    defense = make_defense(
        {"auth": "mean", "default": "temporal"}.get(defense_name, defense_name),
        **({"max_samples": plan.window} if defense_name in ("default", "temporal") else {}),
    )
    vt = begun.vt
    ctwins = ClusterTwins(
        labels=dict(vt.clusters.labels),
        twins={c: p.clone() for c, p in vt.clusters.twins.items()},
        latest=dict(vt.clusters.latest),
        versions=dict(vt.clusters.versions),
        aggregator=cluster_aggregator(defense),
    )
    n_bad = round(cfg.malicious * n_sq) if attack != "none" else 0
    fakes: list[int] = []
    compromised: set[int] = set()
    if attack in FAKE_BS_ATTACKS:
        cluster_ids = sorted(set(ctwins.labels.values()))
        fakes = [max(sq_list) + 1 + k for k in range(n_bad)]
        for k, f in enumerate(fakes):  # the attacker spreads its fake BSs over the clusters
            ctwins.labels[f] = cluster_ids[k % len(cluster_ids)]
    elif n_bad:
        compromised = set(rng.choice(sq_list, n_bad, replace=False).tolist())
    fake_models = model.init(len(fakes), seed + 1) if fakes else torch.empty(0)

    # what the BSs train on: the observed (for attacked squares, poisoned) series, flagged hours removed
    train_z = z.copy()
    if attack == "telemetry":
        for i, s in enumerate(sq_list):
            if s in compromised:
                train_z[i] = attacks.poison_series(z[i], val_start, acfg, rng)
    flagged = 0
    if screen_telemetry:
        from twin_store.models.telemetry_screen import screen_series

        for i in range(n_sq):
            _, flags = screen_series(train_z[i])
            flagged += int(flags[val_start:].sum())
            train_z[i, flags] = np.nan

    reclusterer = Reclusterer(
        MilanGrouping(dcs.SquareAttributes.load(begun.milan_dir, sq_list)),
        cfg.base.clusters,
        seed,
        plan.recluster_every,
        dcs.recluster(None, sq_list, begun.labels)[0],
    )
    stream_hours = np.arange(val_start, hours)
    x_stream = as_tensor(inputs_at(z, stream_hours))
    g = GlobalTwin(vt.global_params.clone(), cfg.psi)
    seen = g.params
    global_at: dict[int, torch.Tensor] = {val_start - 1: g.params}
    pred = np.empty((n_sq, len(stream_hours)))
    decisions: Counter[tuple[str, str]] = Counter()
    honest_flagged: set[int] = set()
    reasons: Counter[str] = Counter()
    for col, t in enumerate(stream_hours.tolist()):
        pred[:, col] = model.predict(seen.expand(n_sq, -1), x_stream[:, col : col + 1])[:, 0].numpy()
        seen = g.params

        arriving: list[tuple[int, torch.Tensor, int, str]] = []  # (square, params, n_samples, group)
        for u in due_updates(model, plan, ctwins, sq_list, train_z, t):
            if u.n_samples == 0:
                continue
            params, group = u.params, "honest"
            if u.square in compromised:
                group = "compromised"
                if attack == "signflip":
                    params = attacks.signflip(params, u.start, acfg.flip_boost)
                elif attack == "scale":
                    params = attacks.scale(params, u.start, acfg.scale_factor)
            arriving.append((u.square, params, u.n_samples, group))
        before = global_at.get(t - plan.update_every, vt.global_params)
        for k, f in enumerate(fakes):
            if plan.due(f, t):
                if attack == "mpaf":
                    params = attacks.mpaf(ctwins.twins[ctwins.labels[f]], fake_models[k], acfg.mpaf_lambda)
                else:
                    ref = ctwins.twins[ctwins.labels[f]]
                    params = attacks.tpi(ref, g.params, before, fake_models[k], acfg.tpi_kappa)
                arriving.append((f, params, plan.window, "fake"))
        if arriving and reclusterer.due(t):
            reclusterer.run(ctwins, vt.global_params)

        for s, params, n, group in arriving:
            if group == "fake" and auth:
                decisions[(group, "rejected")] += 1
                continue
            cid = ctwins.labels[s]
            verdict = defense.screen(
                Candidate(s, cid, params, ctwins.twins[cid], tuple(ctwins.members(cid)), n, 0.0, t)
            )
            if not verdict.accepted:
                decisions[(group, "quarantined")] += 1
                reasons[verdict.reason.split(":")[0]] += 1
                if group == "honest":
                    honest_flagged.add(s)
                if (
                    ctwins.evict(s, g.params) is not None
                ):  # as the store does: its last accepted update leaves too
                    g.offer(ctwins.twins[cid], len(ctwins.members(cid)) / len(ctwins.labels))
                continue
            decisions[(group, "accepted")] += 1
            ctwins.accept(s, params, n)
            if group != "fake":
                reclusterer.accepted(s, t, profile_upto(train_z[sq_list.index(s)], t))
            g.offer(ctwins.twins[cid], len(ctwins.members(cid)) / len(ctwins.labels))
        global_at[t] = g.params

    actual = z[:, stream_hours]
    val, test = slice(0, VAL_HOURS), slice(VAL_HOURS, len(stream_hours))
    honest_total = sum(v for (grp, _), v in decisions.items() if grp == "honest")
    result: dict[str, Any] = {
        "test": metrics(pred[:, test], actual[:, test]),
        "val_mse": metrics(pred[:, val], actual[:, val])["mse"],
        "global_syncs": g.syncs,
        "malicious_bs": len(fakes) + len(compromised),
        "decisions": {f"{grp}_{d}": v for (grp, d), v in sorted(decisions.items())},
        "honest_false_quarantine": round(decisions[("honest", "quarantined")] / max(honest_total, 1), 4),
        "honest_bs_ever_quarantined": round(len(honest_flagged) / max(n_sq - len(compromised), 1), 4),
        "quarantine_reasons": dict(reasons),
    }
    if screen_telemetry:
        result["telemetry_flagged_hours"] = flagged
    return pred, result
