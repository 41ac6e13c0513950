"""Unit tests: the batched twin model, sample building and aggregation (FedAvg, clusters, H-twinning)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from ingest.errors import Stopped
from twin_store.federation.samples import FIRST_TARGET, LAGS, Scaler, inputs_at, samples
from twin_store.federation.twinning import ClusterTwins, GlobalTwin, epsilon, fedavg
from twin_store.models import forecaster
from twin_store.models.forecaster import N_STEPS, FitConfig, TwinModel


def test_forward_equals_torch_lstm_with_the_same_weights() -> None:
    torch.manual_seed(0)
    model = TwinModel(hidden=8)
    params = model.init(3, seed=4)
    params[:, -N_STEPS:] = torch.randn(3, N_STEPS)  # a non-silent AR path, so it is checked too
    x = torch.randn(3, 5, N_STEPS)
    got = model.forward(params, x)
    p = model.unflatten(params)
    for b in range(3):
        ref = torch.nn.LSTM(1, 8, batch_first=True)
        head = torch.nn.Linear(8, 1)
        with torch.no_grad():
            ref.weight_ih_l0.copy_(p["w_ih"][b])
            ref.weight_hh_l0.copy_(p["w_hh"][b])
            ref.bias_ih_l0.copy_(p["b"][b])
            ref.bias_hh_l0.zero_()
            head.weight.copy_(p["w_out"][b].unsqueeze(0))
            head.bias.copy_(p["b_out"][b])
            out, _ = ref(x[b].unsqueeze(2))
            expected = head(out[:, -1]).squeeze(1) + x[b] @ p["w_ar"][b]  # plus the linear AR path
        assert_allclose(got[b].detach().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_layout_covers_the_vector_exactly() -> None:
    model = TwinModel(hidden=16)
    sizes = sum(v.shape[1:].numel() for v in model.unflatten(model.init(2, 0)).values())
    assert sizes == model.n_params == 4 * 16 * (1 + 16 + 1) + 16 + 1 + N_STEPS
    assert (model.init(2, 0)[:, -N_STEPS:] == 0).all()  # the AR path starts silent


def test_stacked_twins_train_independently() -> None:
    """Changing twin 1's data must not change twin 0's result: the stack is B separate trainings."""
    model = TwinModel(hidden=8)
    params = model.init(2, seed=1)
    x = torch.randn(2, 40, N_STEPS)
    y = torch.randn(2, 40)
    y_other = y.clone()
    y_other[1] = torch.randn(40) * 5
    cfg = FitConfig(steps=5, lr=1e-2, batch=16)
    a, _ = model.fit(params, x, y, cfg, torch.Generator().manual_seed(3))
    b, _ = model.fit(params, x, y_other, cfg, torch.Generator().manual_seed(3))
    assert_allclose(a[0].numpy(), b[0].numpy(), rtol=1e-6)
    assert not np.allclose(a[1].numpy(), b[1].numpy())


def test_fit_learns_a_learnable_signal() -> None:
    model = TwinModel(hidden=8)
    x = torch.randn(1, 256, N_STEPS)
    y = x[:, :, -1] * 0.8 + x[:, :, 0] * 0.2  # a linear function of the inputs
    params = model.init(1, seed=0)
    before = float(((model.predict(params, x) - y) ** 2).mean())
    trained, loss = model.fit(
        params, x, y, FitConfig(steps=300, lr=1e-2, batch=64), torch.Generator().manual_seed(0)
    )
    after = float(((model.predict(trained, x) - y) ** 2).mean())
    assert after < 0.2 * before
    assert loss.shape == (1,)


def test_inputs_use_only_earlier_hours_in_time_order() -> None:
    z = np.arange(2 * 300, dtype=float).reshape(2, 300)
    targets = np.array([FIRST_TARGET, 200])
    x = inputs_at(z, targets)
    assert x.shape == (2, 2, N_STEPS)
    assert (LAGS > 0).all()
    assert_allclose(x[1, 1], z[1, 200 - LAGS])
    assert (np.diff(x[0, 0]) > 0).all()  # oldest first
    assert x[0, 0, -1] == z[0, FIRST_TARGET - 1]  # the last input is the previous hour
    with pytest.raises(ValueError):
        inputs_at(z, np.array([FIRST_TARGET - 1]))
    xs, ys = samples(z, 0, 130)
    assert xs.shape == (2, 130 - FIRST_TARGET, N_STEPS)
    assert_allclose(ys[:, 0], z[:, FIRST_TARGET])


def test_scaler_uses_training_hours_only_and_inverts() -> None:
    rng = np.random.default_rng(0)
    series = rng.random((3, 100)) * 10
    scaler = Scaler.fit(series, train_hours=60)
    z = scaler.transform(series)
    assert_allclose(z[:, :60].mean(axis=1), 0, atol=1e-12)
    assert_allclose(z[:, :60].std(axis=1), 1, atol=1e-12)
    series2 = series.copy()
    series2[:, 60:] += 1000  # test-period values must not move the statistics
    assert_allclose(Scaler.fit(series2, 60).mean, scaler.mean)
    assert_allclose(scaler.inverse(z), series)
    flat = Scaler.fit(np.ones((1, 10)), 10)
    assert flat.std[0] == 1.0


def test_fedavg_is_sample_weighted_and_merges() -> None:
    rng = np.random.default_rng(1)
    vecs = torch.tensor(rng.random((6, 4)), dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    assert_allclose(fedavg(vecs, w).numpy(), (vecs * w[:, None]).sum(0).numpy() / w.sum().item())
    # two-level averaging (clusters weighted by their sample totals) equals one-level: merged equals flat
    a, b = fedavg(vecs[:2], w[:2]), fedavg(vecs[2:], w[2:])
    two_level = fedavg(torch.stack([a, b]), torch.stack([w[:2].sum(), w[2:].sum()]))
    assert_allclose(two_level.numpy(), fedavg(vecs, w).numpy(), rtol=1e-12)


def test_global_twin_merges_only_above_psi() -> None:
    g = GlobalTwin(torch.zeros(4), psi=0.5)
    assert epsilon(torch.ones(4), torch.zeros(4)) == 1.0
    assert not g.offer(torch.full((4,), 0.5), gamma=0.5)  # eps 0.25 <= 0.5
    assert g.version == 0 and g.syncs == 0
    assert g.offer(torch.ones(4), gamma=0.25)  # eps 1.0 > 0.5
    assert_allclose(g.params.numpy(), np.full(4, 0.25))
    assert (g.version, g.syncs, g.offers) == (1, 1, 2)
    sync = GlobalTwin(torch.zeros(2), psi=0.0)
    assert sync.offer(torch.full((2,), 1e-6), gamma=1.0)  # psi 0: every change merges
    assert_allclose(sync.params.numpy(), np.full(2, 1e-6))


def test_cluster_twins_aggregate_latest_updates_and_follow_moves() -> None:
    ct = ClusterTwins(labels={1: 0, 2: 0, 3: 1}, twins={0: torch.zeros(2), 1: torch.zeros(2)})
    ct.accept(1, torch.tensor([1.0, 1.0]), 1)
    assert_allclose(ct.twins[0].numpy(), [1.0, 1.0])  # member 2 has no update yet: it does not count
    ct.accept(2, torch.tensor([4.0, 4.0]), 3)
    assert_allclose(ct.twins[0].numpy(), [3.25, 3.25])
    ct.accept(1, torch.tensor([0.0, 0.0]), 1)  # a newer update replaces the old one
    assert_allclose(ct.twins[0].numpy(), [3.0, 3.0])
    ct.accept(3, torch.tensor([10.0, 10.0]), 1)
    ct.move(2, 1, fallback=torch.zeros(2))  # square 2 and its update move to cluster 1
    assert ct.members(0) == [1] and ct.members(1) == [2, 3]
    assert_allclose(ct.twins[0].numpy(), [0.0, 0.0])
    assert_allclose(ct.twins[1].numpy(), [(4.0 * 3 + 10.0) / 4] * 2)
    ct.move(1, 7, fallback=torch.full((2,), 9.0))  # a new cluster gets the member's update
    assert_allclose(ct.twins[7].numpy(), [0.0, 0.0])
    assert ct.samples(1) == 4


@pytest.mark.parametrize("per_twin_generators", [False, True])
def test_fit_in_chunks_gives_the_whole_stacks_result(
    monkeypatch: pytest.MonkeyPatch, per_twin_generators: bool
) -> None:
    """fit trains FIT_CHUNK twins at a time (bounded memory); the minibatches and the result are those of one
    stack, so chunking changes nothing but the memory."""
    model = TwinModel(hidden=8, n_inputs=5)
    bsz = 23
    start = model.init(bsz, seed=2)
    x, y = torch.randn(bsz, 40, 5), torch.randn(bsz, 40)
    counts = torch.arange(bsz) % 40 + 1
    cfg = FitConfig(steps=6, lr=1e-2, batch=16)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        gen: torch.Generator | list[torch.Generator]
        gen = (
            [torch.Generator().manual_seed(i) for i in range(bsz)]
            if per_twin_generators
            else torch.Generator()
        )
        if not per_twin_generators:
            gen.manual_seed(7)
        return model.fit(start, x, y, cfg, gen, counts=counts)

    whole = run()
    monkeypatch.setattr(forecaster, "FIT_CHUNK", 5)  # 5 chunks, the last one short
    chunked = run()
    assert_allclose(chunked[0].numpy(), whole[0].numpy(), rtol=0, atol=1e-6)
    assert_allclose(chunked[1].numpy(), whole[1].numpy(), rtol=0, atol=1e-6)


def test_fit_stops_when_asked() -> None:
    model = TwinModel(hidden=8, n_inputs=5)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(Stopped):
        model.fit(model.init(200, 0), torch.randn(200, 10, 5), torch.randn(200, 10), FitConfig(steps=50),
                  torch.Generator().manual_seed(0), stop=stop)  # fmt: skip
    assert len(asked) == 4  # asked before every chunk's step: it left at the fourth


def peak_growth_mb(code: str) -> int:
    """Run ``code`` in a fresh Python; how many MB its peak RSS grew after ``code`` set ``base`` (ru_maxrss)."""
    code += "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.slow
def test_fit_memory_is_bounded_by_the_chunk_not_the_stack() -> None:
    """1,000 stacked twins: the whole stack's autograd peaked ~950 MB above the imports (htwin's bootstrap
    at 1.7 GB); in chunks a few hundred MB at most."""
    code = (
        "import resource, torch\n"
        "from twin_store.models.forecaster import FitConfig, TwinModel\n"
        "torch.set_num_threads(1)\n"
        "m = TwinModel(32, 5)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m.fit(m.init(1000, 1), torch.randn(1000, 43, 5), torch.randn(1000, 43), FitConfig(steps=2),\n"
        "      torch.Generator().manual_seed(1))\n"
    )
    grown_mb = peak_growth_mb(code)
    assert grown_mb < 450, f"fit grew the process by {grown_mb} MB"


def test_members_follow_every_change_of_the_labels() -> None:
    """The member lists are kept per change of the membership (not scanned per update): each way of
    changing the labels is seen."""
    twins = ClusterTwins({1: 0, 2: 0, 3: 1}, {0: torch.zeros(2), 1: torch.zeros(2)})
    assert (twins.members(0), twins.members(1)) == ([1, 2], [3])
    twins.labels[4] = 1
    assert twins.members(1) == [3, 4]
    twins.move(2, 1, fallback=torch.zeros(2))
    assert (twins.members(0), twins.members(1)) == ([1], [2, 3, 4])
    del twins.labels[3]
    twins.labels.update({5: 0})
    twins.labels.pop(4)
    assert (twins.members(0), twins.members(1)) == ([1, 5], [2])
    twins.members(0).append(99)  # a caller's list is its own
    assert twins.members(0) == [1, 5]
    twins.labels.clear()
    assert twins.members(0) == []


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["accept", "write", "evict", "pop", "move", "join", "replace"]),
        st.integers(0, 7),  # square
        st.integers(0, 2),  # cluster (move, join)
        st.integers(0, 50),  # samples
        st.floats(-100, 100, allow_nan=False, width=32),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_OPS)
def test_fedavg_running_sums_equal_averaging_every_member_again(
    ops: list[tuple[str, int, int, int, float]],
) -> None:
    """Every cluster twin the running sums give equals the sample-weighted mean of its members' latest
    updates computed from scratch, after any mix of accepts, direct writes, evictions, moves and joins."""
    gen = torch.Generator().manual_seed(0)
    labels = {s: s % 3 for s in range(6)}
    ct = ClusterTwins(dict(labels), {c: torch.zeros(3) for c in range(3)})
    for op, square, cid, n, value in ops:
        params = torch.randn(3, generator=gen) * value
        if op in ("accept", "write") and square not in ct.labels:
            continue
        if op == "accept":
            ct.accept(square, params, n + 1)
        elif op == "write":  # what V-twinning and a restart do: write, aggregate later
            ct.latest[square] = (params, n + 1)
        elif op == "evict" and square in ct.labels:
            ct.evict(square, torch.zeros(3))
        elif op == "pop":
            ct.latest.pop(square, None)
        elif op == "move" and square in ct.labels:
            ct.move(square, cid, torch.zeros(3))
        elif op == "join":
            ct.labels[square] = cid
        elif op == "replace":  # a caller hands over a plain dict
            ct.latest = dict(ct.latest)
        for c in sorted(set(ct.labels.values())):
            have = [s for s in ct.members(c) if s in ct.latest]
            if not have:
                continue
            ct.aggregate(c)
            stack = torch.stack([ct.latest[s][0] for s in have]).double()
            weights = torch.tensor([ct.latest[s][1] for s in have], dtype=torch.float64)
            expected = (weights / weights.sum()) @ stack
            assert_allclose(ct.twins[c].numpy(), expected.float().numpy(), rtol=1e-5, atol=1e-4)


def test_predict_in_chunks_is_the_whole_stacks_prediction(monkeypatch: pytest.MonkeyPatch) -> None:
    """One twin on every entity's inputs, a chunk of entities at a time (the bootstrap's validation): the
    same floats as the whole stack in one pass, whatever the chunk (the last one short)."""
    model = TwinModel(hidden=8, n_inputs=5)
    params = model.init(1, seed=4)[0]
    x = torch.randn(103, 12, 5)
    whole = model.predict(params.expand(103, -1), x).numpy()
    for chunk in (1, 10, 103, 500):
        np.testing.assert_array_equal(forecaster.predict_in_chunks(model, params, x, chunk), whole)
    monkeypatch.setattr(forecaster, "PREDICT_CHUNK", 7)
    np.testing.assert_array_equal(forecaster.predict_in_chunks(model, params, x), whole)


@pytest.mark.slow
def test_validation_memory_is_bounded_by_the_chunk_not_the_entities() -> None:
    """One twin on 10,000 entities' validation inputs: in one pass the process grew by ~340 MB (the bootstrap's
    validation at 10,000 entities), in chunks by ~60 MB."""
    code = (
        "import resource, torch\n"
        "from twin_store.models.forecaster import TwinModel, predict_in_chunks\n"
        "torch.set_num_threads(1)\n"
        "m = TwinModel(32, 5)\n"
        "p, x = m.init(1, 1)[0], torch.randn(10000, 10, 5)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "predict_in_chunks(m, p, x)\n"
    )
    grown_mb = peak_growth_mb(code)
    assert grown_mb < 150, f"validation grew the process by {grown_mb} MB"
