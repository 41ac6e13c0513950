"""Sites files, DCS on positions or profiles alone, and nearest-cluster assignment."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.errors import InputError
from twin_store.federation import dcs
from twin_store.federation.sites import (
    Sites,
    affinity,
    cluster_entities,
    knn_affinity,
    load_sites,
    nearest_cluster,
    nearest_profile,
    pair_dots,
)

MILAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan"


@pytest.mark.skipif(not (MILAN / dcs.GRID_FILE).exists(), reason="needs ../shared/data/milan")
def test_milan_as_a_sites_input_keeps_dcs(tmp_path: Path) -> None:
    squares = [5060, 5061, 5161, 4259, 1, 10000, 7777]
    attrs = dcs.SquareAttributes.load(MILAN, squares)
    profiles = np.random.default_rng(0).normal(size=(len(squares), 24))
    want = dcs.relationship_matrix(attrs, profiles, dcs.DcsWeights())
    sites = Sites.from_milan(MILAN, squares)
    np.testing.assert_allclose(affinity(sites, profiles, scale_m=2000.0), want, rtol=0, atol=1e-12)
    path = tmp_path / "sites.csv"
    sites.to_frame().to_csv(path, index=False)  # written and read back as a plain sites file
    np.testing.assert_allclose(affinity(load_sites(path), profiles, scale_m=2000.0), want, rtol=0, atol=1e-9)


def test_positions_or_profiles(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("entity,x,y,room\nm1,0,0,a\nm2,1,0,a\nm3,40,0,b\nm4,41,0,b\n")
    sites = load_sites(path)
    assert not sites.geo and sites.distances_m()[0, 2] == 40.0
    flat = np.tile(np.sin(np.arange(24) / 4.0), (4, 1))  # identical profiles: only positions split them
    a = affinity(sites, flat)
    assert a[0, 1] > a[0, 2] and a[2, 3] > a[1, 2]  # proximity on metres, scaled to the lab
    assert np.allclose(affinity(None, flat)[~np.eye(4, dtype=bool)], 1.0)
    prof = np.array([np.sin(np.arange(24) / 4.0 + s) for s in (0.0, 0.1, 3.0, 3.1)])
    labels = cluster_entities(None, prof, 2)  # no sites: profiles alone
    assert labels[0] == labels[1] != labels[2] == labels[3]
    for n in (1, 2, 3):
        assert len(cluster_entities(None, prof[:n], 4)) == n


def test_late_joiners_get_a_cluster(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("entity,lat,lon\na,45.46,9.19\nb,45.47,9.20\nc,41.90,12.49\nlate,41.91,12.48\n")
    sites = load_sites(path)
    known = sites.subset(["a", "b", "c"])
    assert nearest_cluster(known, np.array([0, 0, 1]), sites.subset(["late"])).tolist() == [1]
    d = sites.distances_m()
    assert 470_000 < d[0, 2] < 490_000  # Milan to Rome, great-circle
    prof = np.array([np.sin(np.arange(24) / 4.0 + s) for s in (0.0, 0.1, 3.0)])
    joiner = np.sin(np.arange(24) / 4.0 + 3.05)[None, :]
    assert nearest_profile(prof, np.array([0, 0, 1]), joiner).tolist() == [1]


@pytest.mark.parametrize(
    "text",
    [
        "id,lat,lon\na,1,2\n",
        "entity,lat\na,1\n",
        "entity,lat,lon\na,x,2\n",
        "entity,lat,lon\na,1,2\na,1,2\n",
        "entity,lat,lon\na,91,2\n",
    ],
)
def test_bad_sites_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "s.csv"
    path.write_text(text)
    with pytest.raises(InputError):
        load_sites(path)


# ---- the sparse (k-nearest) DCS: the dense path's graph and clusters at a fraction of the memory


def _city(n: int, seed: int) -> tuple[Sites, np.ndarray]:
    """n sites in a 20 km box around Milan whose daily profile shifts with latitude, plus noise."""
    rng = np.random.default_rng(seed)
    lat, lon = 45.4 + 0.2 * rng.random(n), 9.1 + 0.2 * rng.random(n)
    hours = np.arange(24) / 24 * 2 * np.pi
    profiles = np.sin(hours[None, :] + (lat[:, None] - 45.4) * 20) + 0.3 * rng.normal(size=(n, 24))
    return Sites(tuple(f"e{i}" for i in range(n)), lat, lon, True), profiles


def _edges(graph: object) -> list[tuple[int, int, float]]:
    return [(u, v, round(d["weight"], 12)) for u, v, d in graph.edges(data=True)]  # type: ignore[attr-defined]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 60), m=st.integers(4, 24), seed=st.integers(0, 2**31 - 1), geo=st.booleans())
def test_sparse_dcs_equals_dense_with_one_kind_of_similarity(n: int, m: int, seed: int, geo: bool) -> None:
    """Profiles alone, or positions alone: the k nearest candidates hold every entity's 8 strongest links,
    so even with only 8 candidates the graph and the Louvain and Girvan-Newman clusters are the dense ones.
    (At least 4 values a profile: with 2, every correlation is +-1 and float rounding decides the ties.)"""
    rng = np.random.default_rng(seed)
    profiles = rng.normal(size=(n, m))
    dense, sparse = affinity(None, profiles), knn_affinity(None, profiles, candidates=8)
    assert _edges(dcs.knn_graph(dense, 8)) == _edges(dcs.knn_graph(sparse, 8))
    assert dcs.cluster(dense, None, seed=seed).tolist() == dcs.cluster(sparse, None, seed=seed).tolist()
    k = min(3, n)
    assert dcs.cluster(dense, k).tolist() == dcs.cluster(sparse, k).tolist()

    if geo:
        sites = Sites(tuple(map(str, range(n))), rng.uniform(-60, 60, n), rng.uniform(-180, 180, n), True)
    else:
        sites = Sites(tuple(map(str, range(n))), rng.uniform(0, 50, n), rng.uniform(0, 50, n), False)
    only_positions = dcs.DcsWeights(traffic=0.0)
    dense = affinity(sites, profiles, only_positions)
    sparse = knn_affinity(sites, profiles, only_positions, candidates=8)
    assert _edges(dcs.knn_graph(dense, 8)) == _edges(dcs.knn_graph(sparse, 8))
    assert dcs.cluster(dense, None, seed=seed).tolist() == dcs.cluster(sparse, None, seed=seed).tolist()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 33), seed=st.integers(0, 2**31 - 1))
def test_sparse_dcs_is_the_dense_one_when_every_pair_is_a_candidate(n: int, seed: int) -> None:
    sites, profiles = _city(n, seed)
    sites = Sites(sites.entities, sites.a, sites.b, True, np.arange(n) % 3 + 1.0, sites.a, sites.b,
                  np.full(n, 800.0))  # fmt: skip
    dense, sparse = affinity(sites, profiles), knn_affinity(sites, profiles)  # 32 candidates >= n - 1
    assert sparse.nnz == n * (n - 1)
    np.testing.assert_allclose(sparse.toarray(), dense, rtol=0, atol=1e-12)
    assert dcs.cluster(dense, None).tolist() == dcs.cluster(sparse, None).tolist()


def test_sparse_dcs_on_positions_and_profiles_matches_dense_on_a_city() -> None:
    """Both kinds at once is where a strong link could be missed (far down both candidate lists); on a city
    whose profiles follow the positions it is not: the same graph and the same clusters."""
    for n in (200, 1000):
        sites, profiles = _city(n, seed=n)
        dense, sparse = affinity(sites, profiles), knn_affinity(sites, profiles)
        assert _edges(dcs.knn_graph(dense, 8)) == _edges(dcs.knn_graph(sparse, 8))
        assert dcs.cluster(dense, None).tolist() == dcs.cluster(sparse, None).tolist()


def test_dcs_of_thousands_of_entities_stays_small() -> None:
    """Above DENSE_MAX entities cluster_entities measures candidate pairs only: 3,000 entities peak at ~50 MB,
    the networkx graph included (the dense path: 576 MB, several 72 MB [n, n] arrays)."""
    sites, profiles = _city(3000, seed=3)
    tracemalloc.start()
    try:
        labels = cluster_entities(sites, profiles, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(labels) == 3000 and len(set(labels.tolist())) > 1
    assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 60), slots=st.integers(1, 50), pairs=st.integers(0, 400), block=st.integers(1, 500),
       seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_pair_dots_in_blocks_are_the_dots_in_one_pass(
    n: int, slots: int, pairs: int, block: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    unit = rng.normal(size=(n, slots))
    i, j = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    whole = np.einsum("ij,ij->i", unit[i], unit[j])
    np.testing.assert_array_equal(pair_dots(unit, i, j, block), whole)
    np.testing.assert_array_equal(pair_dots(unit, i, j), whole)


def test_sparse_dcs_of_long_profiles_stays_small() -> None:
    """Sub-hour cadences give long daily profiles (1-minute steps: 1,440 slots). The candidate pairs' rows were
    gathered all at once, 2 x pairs x slots floats: 10,000 entities of 1-minute profiles took 6.3 GB in the
    bootstrap, and these 2,000 of 5-minute ones 210 MB (tracemalloc). In blocks, the profiles and their unit copy
    (2 x 4.6 MB) and one block stay."""
    rng = np.random.default_rng(4)
    slots = 288
    phase = rng.uniform(0, 2 * np.pi, 2000)
    profiles = np.sin(np.arange(slots)[None, :] * 2 * np.pi / slots + phase[:, None])
    profiles += rng.normal(0, 0.3, profiles.shape)
    tracemalloc.start()
    try:
        labels = cluster_entities(None, profiles, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(set(labels.tolist())) > 1
    assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"
