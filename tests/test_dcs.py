"""DCS clustering: attribute loading, the four similarities, Girvan-Newman / Louvain, stable cluster ids."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest
from networkx.algorithms.community import girvan_newman
from numpy.testing import assert_allclose, assert_array_equal

from ingest.errors import InputError
from twin_store.federation.dcs import (
    DcsWeights,
    Membership,
    SquareAttributes,
    circle_overlap,
    cluster,
    edge_betweenness,
    knn_graph,
    recluster,
    relationship_matrix,
)

MILAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "milan"
R_EARTH = 6_371_008.8
ONLY = {
    "distance": DcsWeights(distance=1, backhaul=0, coverage=0, traffic=0),
    "backhaul": DcsWeights(distance=0, backhaul=1, coverage=0, traffic=0),
    "coverage": DcsWeights(distance=0, backhaul=0, coverage=1, traffic=0),
    "traffic": DcsWeights(distance=0, backhaul=0, coverage=0, traffic=1),
}


@pytest.fixture(scope="module")
def milan() -> Path:
    needed = ("milano-grid.geojson", "base_stations_per_cell_lte.csv", "base_stations_lte.csv")
    if not all((MILAN / f).is_file() for f in needed):
        pytest.skip(f"Milan grid / base-station files not in {MILAN}")
    return MILAN


@pytest.fixture(scope="module")
def real150(milan: Path) -> tuple[SquareAttributes, np.ndarray]:
    """The 150 squares of the hourly file, with mean daily profiles over the first 1008 hours (42 days)."""
    path = milan / "hourly_150squares_62days.csv"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    hourly = pd.read_csv(path)
    squares = hourly["square_id"].to_numpy()
    values = hourly.drop(columns="square_id").to_numpy(dtype=float)
    profiles = values[:, :1008].reshape(len(squares), 42, 24).mean(axis=1)
    return SquareAttributes.load(milan, squares), profiles


def _attrs(
    lon: list[float],
    lat: list[float],
    n_bs: list[float] | None = None,
    bs_lon: list[float] | None = None,
    bs_lat: list[float] | None = None,
    ranges: list[float] | None = None,
) -> SquareAttributes:
    n = len(lon)
    return SquareAttributes(
        squares=np.arange(1, n + 1),
        lon=np.array(lon),
        lat=np.array(lat),
        n_base_stations=np.array(n_bs if n_bs is not None else [1.0] * n),
        bs_lon=np.array(bs_lon if bs_lon is not None else lon),
        bs_lat=np.array(bs_lat if bs_lat is not None else lat),
        bs_range_m=np.array(ranges if ranges is not None else [1000.0] * n),
    )


def _flat_profiles(n: int) -> np.ndarray:
    return np.zeros((n, 24))


def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}


def _assert_canonical(labels: np.ndarray, n_clusters: int | None = None) -> None:
    """Labels are 0..C-1, all used, numbered by each cluster's smallest member index."""
    ids, first = np.unique(labels, return_index=True)
    assert_array_equal(ids, np.arange(len(ids)))
    assert np.all(np.diff(first) > 0)
    if n_clusters is not None:
        assert len(ids) == n_clusters


def _blocks(sizes: list[int], within: float, between: float, seed: int) -> tuple[np.ndarray, list[set[int]]]:
    """A noisy block-structured affinity with its members shuffled, and the planted blocks."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(sum(sizes))
    truth = np.repeat(np.arange(len(sizes)), sizes)[np.argsort(perm)]
    a = np.where(truth[:, None] == truth[None, :], within, between) + rng.uniform(0, 0.05, (len(truth),) * 2)
    a = (a + a.T) / 2
    np.fill_diagonal(a, 0.0)
    return a, [set(np.flatnonzero(truth == b).tolist()) for b in range(len(sizes))]


# --- loading --------------------------------------------------------------------------------------------


def test_load_real_squares_lie_in_milan_and_neighbours_are_235_m_apart(milan: Path) -> None:
    attrs = SquareAttributes.load(milan, [1, 2, 101, 5050])
    assert_array_equal(attrs.squares, [1, 2, 101, 5050])
    assert np.all((attrs.lon > 9.0) & (attrs.lon < 9.32) & (attrs.lat > 45.35) & (attrs.lat < 45.57))
    assert np.all(
        (attrs.bs_lon > 9.0) & (attrs.bs_lon < 9.32) & (attrs.bs_lat > 45.35) & (attrs.bs_lat < 45.57)
    )
    assert np.all((attrs.bs_range_m >= 100) & (attrs.bs_range_m <= 5000))
    assert np.all(attrs.n_base_stations >= 1)
    # independent equirectangular distance: 1 and 2 are east-west neighbours, 1 and 101 north-south
    for other in (1, 2):
        dx = np.radians(attrs.lon[other] - attrs.lon[0]) * np.cos(np.radians(attrs.lat[0])) * R_EARTH
        dy = np.radians(attrs.lat[other] - attrs.lat[0]) * R_EARTH
        assert np.hypot(dx, dy) == pytest.approx(235, rel=0.1)


def test_load_arrays_are_read_only(milan: Path) -> None:
    attrs = SquareAttributes.load(milan, [1])
    with pytest.raises(ValueError):
        attrs.lon[0] = 0.0


def test_load_unknown_square_is_an_input_error(milan: Path) -> None:
    with pytest.raises(InputError, match="10001"):
        SquareAttributes.load(milan, [1, 10001])


def test_load_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"milano-grid\.geojson: no such file"):
        SquareAttributes.load(tmp_path, [1])


def _write_mini_milan(root: Path) -> None:
    """Three 0.01-degree squares in a row; square 3 has no BS of its own and a blank count."""
    features = []
    for cell in (1, 2, 3):
        x0, y0 = 9.1 + 0.01 * (cell - 1), 45.4
        ring = [[x0, y0], [x0 + 0.01, y0], [x0 + 0.01, y0 + 0.01], [x0, y0 + 0.01], [x0, y0]]
        features.append(
            {
                "type": "Feature",
                "properties": {"cellId": cell},
                "geometry": {"type": "Polygon", "coordinates": [ring]},
            }
        )
    (root / "milano-grid.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (root / "base_stations_per_cell_lte.csv").write_text(
        "type,lng,lat,cellId,distance,n_base_stations,aggregated_bs_id\n"
        "LTE,9.105,45.405,1,0,2,1\nLTE,9.115,45.405,2,0,0,2\nLTE,9.125,45.405,3,0.1,,3\n"
    )
    (root / "base_stations_lte.csv").write_text(
        "bs_id,type,range,created,lng,lat,cellId,distance\n"
        "10,LTE,50,x,9.1001,45.4001,1,0\n"  # far corner of square 1, range below the floor
        "11,LTE,300000,x,9.1049,45.4051,1,0\n"  # next to square 1's centroid, absurd range
        "12,LTE,800,x,9.1150,45.4050,2,0\n"
    )


def test_load_picks_nearest_bs_falls_back_and_clips(tmp_path: Path) -> None:
    _write_mini_milan(tmp_path)
    attrs = SquareAttributes.load(tmp_path, [3, 1, 2])
    assert_allclose(attrs.lon, [9.125, 9.105, 9.115])
    assert_allclose(attrs.lat, [45.405] * 3)
    # the count: blank -> 1, 0 -> 1 (unknown, every square is served by some BS), 2 kept
    assert_allclose(attrs.n_base_stations, [1, 2, 1])
    # square 1: the in-cell BS nearest the centroid (11), its 300 km range clipped to 5 km
    assert (attrs.bs_lon[1], attrs.bs_range_m[1]) == (9.1049, 5000.0)
    # square 3 has none of its own: the nearest BS anywhere (12, in square 2) serves it
    assert (attrs.bs_lon[0], attrs.bs_lat[0], attrs.bs_range_m[0]) == (9.1150, 45.4050, 800.0)


def test_load_floors_small_ranges(tmp_path: Path) -> None:
    _write_mini_milan(tmp_path)
    bs = tmp_path / "base_stations_lte.csv"
    bs.write_text(bs.read_text().replace("300000", "20"))
    assert SquareAttributes.load(tmp_path, [1]).bs_range_m[0] == 100.0


def test_load_bad_coordinate_names_file_and_line(tmp_path: Path) -> None:
    _write_mini_milan(tmp_path)
    bs = tmp_path / "base_stations_lte.csv"
    bs.write_text(bs.read_text().replace("9.1150", "east"))
    with pytest.raises(InputError, match=r"base_stations_lte\.csv:4: lng='east'"):
        SquareAttributes.load(tmp_path, [1])


def test_attributes_must_align_with_squares() -> None:
    with pytest.raises(ValueError, match="lat"):
        SquareAttributes(
            squares=np.array([1, 2]),
            lon=np.zeros(2),
            lat=np.zeros(3),
            n_base_stations=np.ones(2),
            bs_lon=np.zeros(2),
            bs_lat=np.zeros(2),
            bs_range_m=np.ones(2),
        )


# --- relationship matrix ----------------------------------------------------------------------------


def test_relationship_matrix_on_real_squares_is_a_symmetric_affinity(
    real150: tuple[SquareAttributes, np.ndarray],
) -> None:
    attrs, profiles = real150
    a = relationship_matrix(attrs, profiles, DcsWeights())
    assert a.shape == (150, 150)
    assert_array_equal(a, a.T)
    assert_array_equal(np.diag(a), 0.0)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.count_nonzero(a) > 150 * 100  # most pairs are related through some attribute


def test_distance_only_is_exp_of_haversine_and_decreases() -> None:
    # 0.01 degree of latitude is 1111.95 m on the mean-radius sphere
    attrs = _attrs(lon=[9.2] * 4, lat=[45.40, 45.41, 45.42, 45.45])
    a = relationship_matrix(attrs, _flat_profiles(4), ONLY["distance"])
    assert a[0, 1] > a[0, 2] > a[0, 3] > 0
    assert_allclose(a[0, 1], np.exp(-1111.95 / 2000.0), rtol=1e-4)
    scaled = relationship_matrix(attrs, _flat_profiles(4), DcsWeights(1, 0, 0, 0, distance_scale_m=500.0))
    assert_allclose(scaled[0, 1], np.exp(-1111.95 / 500.0), rtol=1e-4)


def test_backhaul_only_is_min_over_max_of_bs_counts() -> None:
    attrs = _attrs(lon=[9.1, 9.2, 9.3], lat=[45.4] * 3, n_bs=[1, 2, 4])
    a = relationship_matrix(attrs, _flat_profiles(3), ONLY["backhaul"])
    assert_allclose(a, [[0, 0.5, 0.25], [0.5, 0, 0.5], [0.25, 0.5, 0]])


def test_coverage_only_identical_nested_and_disjoint_circles() -> None:
    attrs = _attrs(
        lon=[9.1, 9.1, 9.1, 9.3],
        lat=[45.4] * 4,
        bs_lon=[9.15, 9.15, 9.151, 9.25],  # 0 and 1 share a BS; 2 sits inside their disc; 3 is ~8 km away
        bs_lat=[45.45] * 4,
        ranges=[1000, 1000, 200, 1000],
    )
    a = relationship_matrix(attrs, _flat_profiles(4), ONLY["coverage"])
    assert a[0, 1] == pytest.approx(1.0)
    assert a[0, 2] == pytest.approx(1.0)  # the smaller disc lies wholly inside the larger
    assert a[0, 3] == 0.0


def test_circle_overlap_matches_the_lens_formula() -> None:
    # two unit circles one radius apart: lens = 2 acos(1/2) - (1/2) sqrt(3), over pi
    lens = (2 * np.arccos(0.5) - 0.5 * np.sqrt(3)) / np.pi
    got = circle_overlap(np.array([0.0, 1.0, 5.0]), np.zeros(3), np.ones(3))
    assert_allclose(got, [[1, lens, 0], [lens, 1, 0], [0, 0, 1]], atol=1e-12)
    # just touching from inside and outside: overlap 1 and 0
    touching = circle_overlap(np.array([0.0, 1.0, 3.0]), np.zeros(3), np.array([2.0, 1.0, 1.0]))
    assert touching[0, 1] == pytest.approx(1.0) and touching[1, 2] == pytest.approx(0.0)


def test_traffic_only_is_clipped_pearson_correlation() -> None:
    hours = np.arange(24)
    base = np.sin(2 * np.pi * hours / 24) + 2
    profiles = np.stack([base, 3 * base + 7, -base, np.ones(24)])
    attrs = _attrs(lon=[9.1, 9.2, 9.3, 9.25], lat=[45.4] * 4)
    a = relationship_matrix(attrs, profiles, ONLY["traffic"])
    assert a[0, 1] == pytest.approx(1.0)  # same shape, other volume: identical for DCS
    assert a[0, 2] == 0.0  # anti-correlated -> unrelated
    assert a[0, 3] == 0.0 and a[2, 3] == 0.0  # a flat profile correlates with nothing


def test_weights_give_a_weighted_mean_and_zero_drops_an_attribute() -> None:
    attrs = _attrs(lon=[9.1, 9.12, 9.2], lat=[45.4] * 3, n_bs=[1, 3, 2])
    profiles = np.random.default_rng(0).random((3, 24))
    dist = relationship_matrix(attrs, profiles, ONLY["distance"])
    back = relationship_matrix(attrs, profiles, ONLY["backhaul"])
    mixed = relationship_matrix(attrs, profiles, DcsWeights(distance=1, backhaul=3, coverage=0, traffic=0))
    assert_allclose(mixed, (dist + 3 * back) / 4)
    # with the traffic weight at 0 the profiles are not needed at all
    relationship_matrix(attrs, np.zeros((3, 0)), DcsWeights(traffic=0))


def test_relationship_matrix_rejects_misaligned_profiles() -> None:
    with pytest.raises(ValueError, match="traffic_profiles"):
        relationship_matrix(_attrs(lon=[9.1, 9.2], lat=[45.4] * 2), np.zeros((3, 24)), DcsWeights())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"distance": -1.0},
        {"distance": 0, "backhaul": 0, "coverage": 0, "traffic": 0},
        {"distance_scale_m": 0.0},
    ],
)
def test_weights_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DcsWeights(**kwargs)


# --- clustering ---------------------------------------------------------------------------------------


def test_edge_betweenness_matches_networkx_with_ties_and_components() -> None:
    rng = np.random.default_rng(3)
    for seed in range(6):
        graph = nx.gnm_random_graph(25, 60, seed=seed)
        graph.add_edges_from([(30, 31), (31, 32)])
        for u, v in graph.edges:
            # integer lengths make many equal-length shortest paths
            graph[u][v]["distance"] = float(rng.integers(1, 4)) if seed % 2 else float(rng.uniform(1, 5))
        ref = nx.edge_betweenness_centrality(graph, weight="distance", normalized=False)
        got = edge_betweenness(graph)
        assert set(got) == set(ref)
        assert_allclose([got[e] for e in ref], list(ref.values()), rtol=1e-9, atol=1e-9)


def test_knn_graph_keeps_strongest_positive_edges_symmetrised() -> None:
    a, _ = _blocks([5, 5], within=0.8, between=0.0, seed=0)
    a[a < 0.5] = 0.0  # no affinity across blocks at all
    graph = knn_graph(a, knn=2)
    assert graph.number_of_nodes() == 10
    assert nx.number_connected_components(graph) == 2
    assert all(d["distance"] == pytest.approx(1 / d["weight"]) for _, _, d in graph.edges(data=True))
    assert all(graph.degree(v) >= 2 for v in graph)


@pytest.mark.parametrize(("sizes", "seed"), [([8, 6], 0), ([7, 5, 6], 1), ([10, 4, 9], 2)])
def test_girvan_newman_recovers_planted_blocks(sizes: list[int], seed: int) -> None:
    a, truth = _blocks(sizes, within=0.8, between=0.1, seed=seed)
    labels = cluster(a, len(sizes), knn=4)
    _assert_canonical(labels, len(sizes))
    assert _partition(labels) == {frozenset(b) for b in truth}


def test_girvan_newman_equals_networkx_reference() -> None:
    """Same communities as networkx's girvan_newman with its own (slow) weighted edge betweenness."""
    rng = np.random.default_rng(7)
    xy = rng.random((40, 2))
    a = np.exp(-np.linalg.norm(xy[:, None] - xy[None, :], axis=-1) / 0.2)
    np.fill_diagonal(a, 0.0)

    def reference_edge(graph: nx.Graph) -> tuple[int, int]:
        centrality = nx.edge_betweenness_centrality(graph, weight="distance")
        return max(centrality, key=centrality.__getitem__)

    for n_clusters in (2, 4):
        expected = next(
            c
            for c in girvan_newman(knn_graph(a, 6), most_valuable_edge=reference_edge)
            if len(c) == n_clusters
        )
        assert _partition(cluster(a, n_clusters, knn=6)) == {frozenset(c) for c in expected}


def test_more_components_than_clusters_merge_by_affinity() -> None:
    sizes = [5, 4, 6, 3]  # A, B, C, D in index order
    starts = np.cumsum([0, *sizes])
    a = np.zeros((18, 18))
    for lo, hi in itertools.pairwise(starts):
        a[lo:hi, lo:hi] = 0.9
    a[0:5, 5:9] = a[5:9, 0:5] = 0.01  # A-B weakly related
    a[9:15, 15:18] = a[15:18, 9:15] = 0.02  # C-D weakly related
    a[0:5, 15:18] = a[15:18, 0:5] = 0.001  # D-A even more weakly
    np.fill_diagonal(a, 0.0)
    # knn=2: D's 3 squares have only 2 in-block neighbours each, a third edge would reach C
    graph = knn_graph(a, 2)
    assert nx.number_connected_components(graph) == 4
    labels = cluster(a, 2, knn=2)
    assert _partition(labels) == {frozenset(range(0, 9)), frozenset(range(9, 18))}
    assert _partition(cluster(a, 4, knn=2)) == {
        frozenset(range(lo, hi)) for lo, hi in itertools.pairwise(starts)
    }


def test_isolated_square_still_yields_the_requested_count() -> None:
    a, _ = _blocks([6, 6], within=0.8, between=0.1, seed=4)
    a = np.pad(a, ((0, 1), (0, 1)))  # square 12 relates to nobody
    labels = cluster(a, 3)
    _assert_canonical(labels, 3)
    assert np.sum(labels == labels[12]) == 1


@pytest.mark.parametrize("n_clusters", [0, 5])
def test_cluster_rejects_impossible_counts(n_clusters: int) -> None:
    a, _ = _blocks([2, 2], within=0.8, between=0.1, seed=0)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster(a, n_clusters)


@pytest.mark.parametrize("n_clusters", [2, 5, 8])
def test_girvan_newman_on_real_squares_gives_exactly_c_clusters(
    real150: tuple[SquareAttributes, np.ndarray], n_clusters: int
) -> None:
    attrs, profiles = real150
    a = relationship_matrix(attrs, profiles, DcsWeights())
    labels = cluster(a, n_clusters)
    assert labels.shape == (150,)
    _assert_canonical(labels, n_clusters)
    assert_array_equal(labels, cluster(a, n_clusters))


def test_louvain_recovers_planted_blocks() -> None:
    a, truth = _blocks([7, 5, 6], within=0.8, between=0.05, seed=5)
    labels = cluster(a, None, seed=0, knn=4)
    _assert_canonical(labels)
    assert _partition(labels) == {frozenset(b) for b in truth}


def test_louvain_on_real_squares_is_a_deterministic_partition(
    real150: tuple[SquareAttributes, np.ndarray],
) -> None:
    attrs, profiles = real150
    a = relationship_matrix(attrs, profiles, DcsWeights())
    labels = cluster(a, None, seed=42)
    assert labels.shape == (150,)
    _assert_canonical(labels)
    assert 1 < labels.max() + 1 < 150
    assert_array_equal(labels, cluster(a, None, seed=42))


# --- stable ids across epochs -------------------------------------------------------------------------


def test_first_epoch_takes_labels_as_ids_and_everything_moves_in() -> None:
    membership, moves = recluster(None, [10, 11, 12], np.array([0, 1, 0]))
    assert membership == Membership(labels={10: 0, 11: 1, 12: 0}, epoch=0)
    assert moves == [(10, None, 0), (11, None, 1), (12, None, 0)]
    assert all(type(k) is int and type(v) is int for k, v in membership.labels.items())


def test_permuted_labels_keep_ids_and_report_only_real_moves() -> None:
    squares = list(range(100, 120))
    old = np.array([0] * 7 + [1] * 6 + [2] * 7)
    previous, _ = recluster(None, squares, old)
    permuted = np.array([2, 0, 1])[old]  # the same clusters under other labels
    same, moves = recluster(previous, squares, permuted)
    assert same.labels == previous.labels and moves == [] and same.epoch == 1

    changed = permuted.copy()
    changed[[0, 8]] = permuted[15]  # squares 100 (cluster 0) and 108 (cluster 1) join cluster 2
    after, moves = recluster(same, squares, changed)
    assert moves == [(100, 0, 2), (108, 1, 2)]
    assert after.epoch == 2
    assert {s: c for s, c in after.labels.items() if s not in (100, 108)} == {
        s: c for s, c in previous.labels.items() if s not in (100, 108)
    }


def test_split_gets_a_fresh_id_and_new_squares_move_in() -> None:
    previous = Membership(labels={1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1}, epoch=3)
    # cluster 0 splits into {1, 2, 3} and {4}; square 6 left; square 7 is new and joins 5
    membership, moves = recluster(previous, [1, 2, 3, 4, 5, 7], [5, 5, 5, 8, 9, 9])
    assert membership.labels == {1: 0, 2: 0, 3: 0, 4: 2, 5: 1, 7: 1}
    assert membership.epoch == 4
    assert moves == [(4, 0, 2), (7, None, 1)]


def test_recluster_rejects_misaligned_input() -> None:
    with pytest.raises(ValueError, match="labels"):
        recluster(None, [1, 2], [0])


def test_load_duplicate_squares_is_an_input_error(milan: Path) -> None:
    with pytest.raises(InputError, match="duplicate"):
        SquareAttributes.load(milan, [1, 2, 1])
