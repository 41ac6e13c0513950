"""DITEN's closed forms (hand-computed values), the gamma solver (against a brute-force grid), the policies."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from twin_store.federation.edge.costs import (
    DitenParams,
    barrier,
    compute_cost,
    compute_energy_per_sample,
    migration_cost,
    norm,
    slot_objective,
    sync_cost,
    uplink_rate,
    utility,
    v_phi,
)
from twin_store.federation.edge.gamma import solve_gamma
from twin_store.federation.edge.policies import balanced, nearest
from twin_store.federation.edge.simulator import (
    DitenConfig,
    DitenEnv,
    Servers,
    SlotContext,
    coefficients,
    evaluate,
)

P = DitenParams()


def test_v_of_phi_matches_the_fitted_curve() -> None:
    # 0.9172 exp(-((-0.0231 + phi) / 0.8366)^2) worked out by hand
    assert_allclose(v_phi(0.0), 0.9165009846, rtol=1e-9)
    assert_allclose(v_phi(0.6), 0.5700985878, rtol=1e-9)


def test_utility_hand_values() -> None:
    assert_allclose(utility(np.array([1000.0]), 0.0), [0.9042545709], rtol=1e-9)
    assert_allclose(utility(np.array([200.0]), 0.6), [0.4550587604], rtol=1e-9)
    # more data never hurts, and no data gives v - alpha_1
    d = np.linspace(0, 5000, 50)
    assert np.all(np.diff(utility(d, 0.2)) > 0)
    assert_allclose(utility(np.array([0.0]), 0.0), [0.9165009846 - 0.8862], rtol=1e-9)


def test_norm_is_the_logistic_form() -> None:
    assert_allclose(norm(400.0, 200.0), 2 / (1 + math.exp(-1.0)) - 1, rtol=1e-12)
    assert_allclose(norm(400.0, 200.0), 0.4621171573, rtol=1e-9)
    assert_allclose(norm(0.0, 200.0), 0.0, atol=1e-15)
    assert_allclose(norm(-400.0, 200.0), -0.4621171573, rtol=1e-9)


def test_energy_closed_forms() -> None:
    # eq. 13: n_mig l (Dbar + D_twin) = 1e-4 * 30 * (1500 + 4500), only for moved twins
    assert_allclose(
        migration_cost(
            np.array([30.0, 30.0]), np.array([1500.0] * 2), np.array([4500.0] * 2), np.array([True, False]), P
        ),
        [18.0, 0.0],
    )
    # eq. 14: W log2(1 + P xi / (N0 W)) at 20 m with 3GPP path loss, then n_syn D bits / rate * l
    assert_allclose(uplink_rate(np.array([20.0]), P), [453595.958], rtol=1e-6)
    assert_allclose(sync_cost(np.array([1000.0]), np.array([20.0]), P), [8.8184207], rtol=1e-6)
    # eq. 15: n_cmp eps (E_s + E_us) Dbar = 1e-7 * 55 * (5000 + 50 * 20) * 1000
    per = compute_energy_per_sample(np.array([55.0]), np.array([5000.0]), np.array([20.0]), P)
    assert_allclose(compute_cost(np.array([1000.0]), per), [33.0])


def test_barrier_is_log_then_its_tangent() -> None:
    assert_allclose(barrier(np.array([1.0, 0.5]), 0.01), [0.0, math.log(0.5)])
    assert_allclose(barrier(np.array([-0.1]), 0.01), [math.log(0.01) - 11.0])


def test_slot_objective_hand_value() -> None:
    rho = np.array([0.8, 0.6])
    terms = slot_objective(
        rho,
        migration=np.array([0.0, 100.0]),
        sync=np.array([60.0, 0.0]),
        compute=np.array([700.0, 0.0]),
        compute_cap=np.array([1400.0, 1400.0]),
        sync_cap=np.array([120.0, 120.0]),
        p=P,
    )
    util = 0.3 * 0.7
    cost = 0.7 * (math.tanh(760 / 800) + math.tanh(100 / 800)) / 2
    bar = 0.01 * (math.log(0.5) + math.log(0.5)) / 2
    assert_allclose(terms.objective, util - cost + bar, rtol=1e-12)
    assert_allclose(terms.cost, 860.0)


def _tiny(users: int = 3, servers: int = 2, seed: int = 4) -> tuple[Servers, SlotContext]:
    env = DitenEnv(DitenConfig(users=users, servers=servers, phi=0.2), seed)
    env.step(nearest(env.ctx.distance), np.zeros(users))
    env.step(np.zeros(users, dtype=np.int64), np.zeros(users))  # some twins moved: migration terms
    return env.servers, env.ctx


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_gamma_solver_matches_brute_force_grid(seed: int) -> None:
    servers, ctx = _tiny(seed=seed)
    rng = np.random.default_rng(seed)
    host = rng.integers(0, 2, 3)
    co = coefficients(servers, ctx, host, P)
    gamma = solve_gamma(servers.compute_cap, ctx, co, P)
    assert np.all((gamma >= 0) & (gamma <= 1))
    best = -np.inf
    grid = np.linspace(0, 1, 31)
    for g in itertools.product(grid, repeat=3):
        best = max(best, evaluate(servers, ctx, host, np.array(g), P).objective)
    ours = evaluate(servers, ctx, host, gamma, P).objective
    assert ours >= best - 1e-7


def test_gamma_reuses_more_when_new_data_is_scarce() -> None:
    servers, ctx = _tiny(users=2)
    ctx = SlotContext(
        t=ctx.t,
        position=ctx.position,
        distance=ctx.distance,
        samples=np.array([200.0, 2000.0]),
        prev_samples=np.array([1500.0, 1500.0]),
        prev_host=ctx.prev_host,
        twin_size=ctx.twin_size,
        phi=0.0,
    )
    host = np.zeros(2, dtype=np.int64)
    gamma = solve_gamma(servers.compute_cap, ctx, coefficients(servers, ctx, host, P), P)
    assert gamma[0] > gamma[1]


def test_nearest_and_balanced_on_a_tiny_instance() -> None:
    distance = np.array([[1.0, 5.0], [2.0, 6.0], [3.0, 1.0]])
    assert_array_equal(nearest(distance), [0, 0, 1])
    # server 0 holds one heavy twin: the second closest to it goes next door
    host = balanced(distance, weight=np.array([5.0, 4.0, 1.0]), capacity=np.array([6.0, 10.0]))
    assert_array_equal(host, [0, 1, 1])
    # sticky: a twin stays on its previous server while it fits
    near = np.array([[1.0, 1.4], [2.0, 6.0], [3.0, 1.0]])
    host = balanced(near, np.array([1.0, 1.0, 1.0]), np.array([10.0, 10.0]), previous=np.array([1, 1, 1]))
    assert_array_equal(host, [1, 0, 1])
    # nobody fits: the server with most room left, never dropped
    assert_array_equal(balanced(distance, np.array([9.0, 9.0, 9.0]), np.array([1.0, 2.0])), [1, 0, 1])


def test_simulator_is_seeded_and_stays_in_the_area() -> None:
    a, b = DitenEnv(DitenConfig(), 9), DitenEnv(DitenConfig(), 9)
    for _ in range(50):
        host = nearest(a.ctx.distance)
        ta, tb = a.step(host, np.zeros(20)), b.step(host, np.zeros(20))
        assert ta.objective == tb.objective
    assert np.all((a.ctx.position >= 0) & (a.ctx.position <= 120))
    assert np.all((a.ctx.samples >= 200) & (a.ctx.samples <= 2000))


def _one_good_server(seed: int) -> DitenEnv:
    """Two servers side by side; server 1 spends 20x the energy per sample: every twin belongs on 0."""
    cfg = DitenConfig(users=4, servers=2)
    servers = Servers(
        position=np.array([[60.0, 60.0], [62.0, 60.0]]),
        compute_cap=np.full(2, 1.45e3),
        sync_cap=np.full(2, 125.0),
        eps=np.full(2, 55.0),
        energy=np.array([2e3, 4e4]),
        manhattan=np.array([[0.0, 2.0], [2.0, 0.0]]),
    )
    return DitenEnv(cfg, seed, servers=servers)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "gain"), [("ppo", 0.1), ("b1", 0.03)])
def test_actor_critics_learn_the_efficient_server_on_a_tiny_instance(method: str, gain: float) -> None:
    import torch

    from twin_store.federation.edge.features import FEATURES
    from twin_store.federation.edge.learning import LEARNED, TrainPlan, _actor_critic_episode, _features
    from twin_store.models.diten_agents import AgentConfig

    torch.set_num_threads(1)
    agent = LEARNED[method](FEATURES, AgentConfig(), seed=0)
    env = _one_good_server(1)
    before = agent.act(_features(env)).probs[:, 0].mean()
    for episode in range(6):
        _actor_critic_episode(agent, _one_good_server(episode), TrainPlan(episode_slots=40, rollout=20))
    after = agent.act(_features(_one_good_server(99))).probs[:, 0].mean()
    assert after > before + gain, (before, after)  # plain actor-critic learns slower (one step per rollout)


def test_move_gains_equal_the_objective_change() -> None:
    from twin_store.federation.edge.simulator import move_gains

    env = DitenEnv(DitenConfig(servers=5), 3)
    env.step(nearest(env.ctx.distance), np.zeros(20))
    host = nearest(env.ctx.distance)
    gamma = np.random.default_rng(0).uniform(0, 1, 20)
    gains = move_gains(env.servers, env.ctx, host, gamma, P)
    base = evaluate(env.servers, env.ctx, host, gamma, P).objective
    for u in (0, 7):
        for s in range(5):
            moved = host.copy()
            moved[u] = s
            change = evaluate(env.servers, env.ctx, moved, gamma, P).objective - base
            assert_allclose(gains[u, s], change, atol=1e-12)


@pytest.mark.slow
def test_bench_quick_json_lists_every_method_and_ratio(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from nettwin.cli.bench import app

    args = ["diten", "--quick", "--json", "--servers", "9", "--phi", "0.2", "--plot", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    import json

    report = json.loads(res.output)
    methods = {r["method"] for r in report["results"]}
    assert {"ppo", "b1", "b2", "b3", "b4"} <= methods
    assert all(
        {"servers", "phi", "method", "objective", "utility", "cost"} <= set(r) for r in report["results"]
    )
    assert set(report["ratios"]) == {"b1", "b2", "b3", "b4"}
    b2 = next(r for r in report["results"] if r["method"] == "b2")
    b3 = next(r for r in report["results"] if r["method"] == "b3")
    assert b3["objective"] < b2["objective"]  # random gamma never beats the solved one on the same slots
    for name in ("diten_objective_vs_servers.svg", "diten_objective_vs_phi.svg"):
        assert (tmp_path / name).read_text().startswith("<svg")


def test_bench_rejects_bad_options() -> None:
    from typer.testing import CliRunner

    from ingest.errors import InputError
    from nettwin.cli.bench import app

    res = CliRunner().invoke(app, ["diten", "--quick", "--phi", "2"])
    assert isinstance(res.exception, InputError) and "--phi" in str(res.exception)
    res = CliRunner().invoke(app, ["diten", "--quick", "--servers", "a,b"])
    assert isinstance(res.exception, InputError) and "--servers" in str(res.exception)


def _ledger(policy: str = "nearest", capacity: float = 1e6):  # type: ignore[no-untyped-def]
    from twin_store.federation.edge.ledger import EdgeLedger, Site

    sites = [Site("west", 45.46, 9.15, capacity), Site("east", 45.46, 9.25, capacity)]
    ledger = EdgeLedger(sites, policy=policy, sample_bytes=250, twin_bytes=20_000)
    ledger.place("1", 45.46, 9.16)  # next to west
    ledger.place("2", 45.46, 9.24)  # next to east
    ledger.place("3", 45.46, 9.19)  # west of the middle
    return ledger


def test_ledger_books_eqs_13_to_15_per_site_and_kind() -> None:
    from twin_store.federation.edge.ledger import project

    ledger = _ledger()
    first = ledger.slot(0, {"1": 10, "2": 20, "3": 30})
    assert first.hosts == {"1": "west", "2": "east", "3": "west"}
    assert first.migrations == []
    rows = {(s, k): (e, b) for s, k, e, b in first.rows()}
    assert len(rows) == 6 and rows[("east", "migration")] == (0.0, 0)
    # sync and compute of BS 2 alone on east, by the closed forms
    xy = project(np.array([45.46, 45.46]), np.array([9.24, 9.25]), 45.46, 9.20)
    d = float(np.linalg.norm(xy[0] - xy[1]))
    assert_allclose(rows[("east", "sync")][0], sync_cost(np.array([20.0]), np.array([d]), P)[0], rtol=1e-9)
    per = compute_energy_per_sample(np.array([55.0]), np.array([7e3]), np.array([d]), P)[0]
    assert_allclose(rows[("east", "compute")][0], 20 * per, rtol=1e-9)
    assert rows[("east", "sync")][1] == 20 * 250


def test_ledger_records_a_migration_when_the_site_changes() -> None:
    ledger = _ledger()
    ledger.slot(0, {"3": 30})
    ledger.place("3", 45.46, 9.23)  # the BS's twin now belongs east (a re-declared position)
    second = ledger.slot(1, {"3": 40})
    assert [(m.bs, m.source, m.target) for m in second.migrations] == [("3", "west", "east")]
    m = second.migrations[0]
    l_ss = float(ledger.manhattan[0, 1])
    assert_allclose(m.energy, 1e-4 * l_ss * (40 + 20_000 / 250), rtol=1e-12)
    assert m.bytes == 20_000 + 40 * 250
    assert second.energy[("east", "migration")] == m.energy


def test_ledger_balanced_respects_site_capacity() -> None:
    ledger = _ledger("balanced", capacity=35)
    out = ledger.slot(0, {"1": 30, "3": 20})
    # both are nearest to west, which holds 35 samples: the lighter one goes east
    assert out.hosts == {"1": "west", "3": "east"}


def test_ledger_rejects_bad_declarations() -> None:
    from twin_store.federation.edge.ledger import EdgeLedger, Site

    with pytest.raises(ValueError, match="no edge sites"):
        EdgeLedger([])
    with pytest.raises(ValueError, match="unique"):
        EdgeLedger([Site("a", 0, 0, 1), Site("a", 1, 1, 1)])
    with pytest.raises(ValueError, match="policy"):
        EdgeLedger([Site("a", 0, 0, 1)], policy="random")


@pytest.mark.slow
def test_bench_milan_quick_reports_energy_beside_nearest() -> None:
    from typer.testing import CliRunner

    from nettwin.cli.main import app
    from tests.conftest import SHARED_MILAN

    res = CliRunner().invoke(app, ["bench", "diten", "--milan", str(SHARED_MILAN), "--quick", "--json"])
    assert res.exit_code == 0, res.output
    import json

    report = json.loads(res.output)
    rows = {r["method"]: r for r in report["milan"]}
    assert set(rows) == {"nearest", "balanced", "ppo"}
    assert rows["nearest"]["energy_vs_nearest"] == 1.0
    assert rows["nearest"]["migrations"] == 0.0  # BSs stand still: nearest never moves a twin
    assert report["setting"]["bss"] == 150 and len(report["setting"]["sites"]) == 6


def test_saved_association_chooses_as_the_trained_actor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from twin_store.federation.edge.deployed import LearnedAssociation, save_agent
    from twin_store.federation.edge.features import FEATURES, pair_features
    from twin_store.federation.edge.ledger import EdgeLedger, Site
    from twin_store.federation.edge.simulator import FeatureScale
    from twin_store.models.diten_agents import PPO, AgentConfig

    env = DitenEnv(DitenConfig(servers=3), 5)
    agent = PPO(FEATURES, AgentConfig(), seed=2)
    scale = FeatureScale()
    save_agent(tmp_path / "a.pt", agent, env.servers, scale, P, 4500.0)
    chooser = LearnedAssociation(tmp_path / "a.pt")
    ctx = env.ctx
    ctx = SlotContext(
        ctx.t, ctx.position, ctx.distance, ctx.samples, ctx.samples, ctx.prev_host, np.full(20, 4500.0), 0.0
    )
    expected = agent.act(pair_features(env.servers, ctx, P, None, scale), greedy=True).host
    assert_array_equal(chooser(ctx.distance, ctx.samples, ctx.prev_host), expected)
    # the ledger takes it as its learned policy; a model for 3 sites refuses a deployment of 2
    sites = [Site(n, 45.46, 9.15 + 0.02 * i, 1e6) for i, n in enumerate("abc")]
    ledger = EdgeLedger(sites, policy="learned", learned=chooser)
    ledger.place("1", 45.46, 9.16)
    assert set(ledger.slot(0, {"1": 300}).hosts.values()) <= {"a", "b", "c"}
    with pytest.raises(ValueError, match="trained for 3 sites"):
        chooser(np.ones((2, 2)), np.ones(2), np.zeros(2, dtype=np.int64))
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a saved association model"):
        LearnedAssociation(tmp_path / "bad.pt")


def test_balanced_on_declared_capacities_weighs_samples() -> None:
    from twin_store.federation.edge.policies import Balanced

    env = DitenEnv(DitenConfig(users=3, servers=2), 1)
    ctx = env.ctx
    capacity = np.array([ctx.samples.sum(), 0.0])  # server 1 holds nothing: everyone on 0
    assert_array_equal(Balanced(capacity).associate(env.servers, ctx, P), [0, 0, 0])
    capacity = np.array([0.0, ctx.samples.sum()])
    assert_array_equal(Balanced(capacity).associate(env.servers, ctx, P), [1, 1, 1])


def test_ledger_settings_errors_are_one_line_input_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ingest.errors import InputError
    from ingest.settings import EdgeSettings, SiteSettings, load_settings
    from twin_store.services.edge import ledger_from_settings

    site = SiteSettings(name="a", lat=45.0, lon=9.0, capacity=10)
    for edge, message in [
        (EdgeSettings(), "no edge sites"),
        (EdgeSettings(sites=(site,), policy="learned"), "learned_model"),
        (EdgeSettings(sites=(site,), policy="learned", learned_model=tmp_path / "none.pt"), "not a saved"),
    ]:
        with pytest.raises(InputError, match=message):
            ledger_from_settings(load_settings().model_copy(update={"edge": edge}))
    with pytest.raises(Exception, match="unique"):
        EdgeSettings(sites=(site, site))


def test_baseline_prior_reaches_b1_and_b4_only() -> None:
    from dataclasses import replace

    from bench.diten import QUICK_PLAN
    from twin_store.federation.edge.learning import train
    from twin_store.federation.edge.simulator import DitenConfig

    plan = replace(QUICK_PLAN, episodes=1, episode_slots=4, baseline_prior=0.0)
    priors = {
        m: train(m, DitenConfig(), (9,), (0.0,), plan, seed=1).cfg.distance_prior for m in ("ppo", "b1", "b4")
    }
    assert priors == {"ppo": 10.0, "b1": 0.0, "b4": 0.0}
    assert (
        train("b4", DitenConfig(), (9,), (0.0,), replace(plan, baseline_prior=None), 1).cfg.distance_prior
        == 10.0
    )
