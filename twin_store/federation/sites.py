"""Where entities are, from a sites file, and DCS for any network: positions when known, traffic profiles alone
when not, and a cluster for entities that join later.

A **sites file** is a CSV with a header: ``entity`` and either ``lat,lon`` (degrees, WGS84: great-circle
distances) or ``x,y`` (metres on a floor plan or a local projection: straight-line distances). Optional columns
add DCS attributes: ``n_base_stations`` (backhaul similarity), ``bs_lat,bs_lon,bs_range_m`` (coverage overlap of
the serving BS; ``bs_x,bs_y`` with ``x,y``). Other columns are kept as text and ignored. Milan's grid plus
OpenCellID files are one such input: :meth:`Sites.from_milan` builds exactly what ``dcs.SquareAttributes``
holds, and :func:`affinity` then equals ``dcs.relationship_matrix`` (``tests/test_sites.py``), so Milan's
clusters and ``bench vhtwin`` figures do not change.

Pure numpy/pandas; no Kafka.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.spatial import cKDTree

from ingest.errors import InputError
from twin_store.federation import dcs


@dataclass(frozen=True, eq=False)
class Sites:
    """Per-entity positions and optional attributes, every array aligned with ``entities``.

    ``geo``: True when ``a, b`` are (lat, lon) degrees, False when they are (x, y) metres. Optional arrays are
    None when the file has no such column.
    """

    entities: tuple[str, ...]
    a: np.ndarray  # lat (geo) or x
    b: np.ndarray  # lon (geo) or y
    geo: bool = True
    n_base_stations: np.ndarray | None = None
    bs_a: np.ndarray | None = None
    bs_b: np.ndarray | None = None
    bs_range_m: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.entities)

    def has(self, entity: str) -> bool:
        return entity in self._index

    @property
    def _index(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.entities)}

    def subset(self, entities: Sequence[str]) -> Sites:
        """These entities' rows, in this order; every one must be present."""
        index = self._index
        missing = [e for e in entities if e not in index]
        if missing:
            raise InputError(f"sites: no position for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        rows = [index[e] for e in entities]

        def pick(arr: np.ndarray | None) -> np.ndarray | None:
            return None if arr is None else arr[rows]

        return Sites(
            tuple(entities),
            self.a[rows],
            self.b[rows],
            self.geo,
            pick(self.n_base_stations),
            pick(self.bs_a),
            pick(self.bs_b),
            pick(self.bs_range_m),
        )

    def distances_m(self, other: Sites | None = None) -> np.ndarray:
        """Pairwise distances in metres ``[len(self), len(other)]``: great-circle for lat/lon, else Euclidean."""
        o = other or self
        if self.geo != o.geo:
            raise ValueError("cannot measure between lat/lon and x/y sites")
        if self.geo:
            return dcs._haversine_m(self.b[:, None], self.a[:, None], o.b[None, :], o.a[None, :])
        return np.asarray(np.hypot(self.a[:, None] - o.a[None, :], self.b[:, None] - o.b[None, :]))

    @classmethod
    def from_milan(cls, milan_dir: Path, squares: Sequence[int]) -> Sites:
        """Milan's grid centroids and OpenCellID serving BSs (``dcs.SquareAttributes``); entity = square number."""
        return cls.from_square_attributes(dcs.SquareAttributes.load(milan_dir, squares))

    @classmethod
    def from_square_attributes(cls, attrs: dcs.SquareAttributes) -> Sites:
        return cls(
            tuple(str(s) for s in attrs.squares.tolist()),
            np.array(attrs.lat),
            np.array(attrs.lon),
            True,
            np.array(attrs.n_base_stations),
            np.array(attrs.bs_lat),
            np.array(attrs.bs_lon),
            np.array(attrs.bs_range_m),
        )

    def to_frame(self) -> pd.DataFrame:
        """The sites-file form (what :func:`load_sites` reads back)."""
        a, b = ("lat", "lon") if self.geo else ("x", "y")
        cols: dict[str, object] = {"entity": list(self.entities), a: self.a, b: self.b}
        if self.n_base_stations is not None:
            cols["n_base_stations"] = self.n_base_stations
        if self.bs_a is not None and self.bs_b is not None and self.bs_range_m is not None:
            cols[f"bs_{a}"], cols[f"bs_{b}"], cols["bs_range_m"] = self.bs_a, self.bs_b, self.bs_range_m
        return pd.DataFrame(cols)


def load_sites(path: Path) -> Sites:
    """Read a sites file (see the module docstring); one-line ``InputError`` on anything unusable."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"entity": str}, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read as a sites CSV: {exc}") from exc
    if "entity" not in frame.columns:
        raise InputError(f"{path}: no 'entity' column; found {list(frame.columns)}")
    if {"lat", "lon"} <= set(frame.columns):
        a_col, b_col, geo = "lat", "lon", True
    elif {"x", "y"} <= set(frame.columns):
        a_col, b_col, geo = "x", "y", False
    else:
        raise InputError(
            f"{path}: needs columns lat,lon (degrees) or x,y (metres); found {list(frame.columns)}"
        )
    entities = [str(e).strip() for e in frame["entity"].tolist()]
    if any(not e for e in entities):
        raise InputError(f"{path}:{entities.index('') + 2}: empty entity")
    dup = pd.Series(entities)[pd.Series(entities).duplicated()].tolist()
    if dup:
        raise InputError(f"{path}: entity {dup[0]!r} is listed twice")

    def numbers(col: str) -> np.ndarray:
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise InputError(f"{path}:{int(bad[0]) + 2}: {col}={frame[col].iloc[bad[0]]!r} is not a number")
        return values

    a, b = numbers(a_col), numbers(b_col)
    if geo and (np.any(np.abs(a) > 90) or np.any(np.abs(b) > 180)):
        raise InputError(f"{path}: lat must lie in -90..90 and lon in -180..180")
    n_bs = numbers("n_base_stations") if "n_base_stations" in frame.columns else None
    bs_cols = (f"bs_{a_col}", f"bs_{b_col}", "bs_range_m")
    bs = [numbers(c) for c in bs_cols] if set(bs_cols) <= set(frame.columns) else [None, None, None]
    return Sites(tuple(entities), a, b, geo, n_bs, *bs)


def affinity(
    sites: Sites | None,
    profiles: np.ndarray,
    weights: dcs.DcsWeights = dcs.DcsWeights(),
    scale_m: float | None = None,
) -> np.ndarray:
    """DCS affinity ``[n, n]`` (symmetric, in [0, 1], zero diagonal) for entities in ``sites`` order with their
    traffic ``profiles [n, m]``: the weighted mean of the similarities the sites support (proximity with
    positions, backhaul with ``n_base_stations``, coverage with the BS columns) and traffic. Without sites:
    traffic alone.

    Proximity is ``exp(-d / scale_m)``; ``scale_m`` None: the median distance between the entities, so a lab
    floor and a country both get a useful scale (Milan's DCS uses ``weights.distance_scale_m``, 2 km: pass it,
    and with every attribute present this equals ``dcs.relationship_matrix``)."""
    p = np.asarray(profiles, dtype=float)
    n = p.shape[0]
    parts: list[tuple[float, np.ndarray]] = []
    if sites is not None:
        if len(sites) != n:
            raise ValueError(f"{len(sites)} sites but {n} profiles")
        if weights.distance > 0:
            d = sites.distances_m()
            if scale_m is None:
                off = d[~np.eye(n, dtype=bool)]
                scale_m = float(np.median(off)) if off.size and np.median(off) > 0 else 1.0
            parts.append((weights.distance, np.exp(-d / scale_m)))
        if weights.backhaul > 0 and sites.n_base_stations is not None:
            parts.append((weights.backhaul, dcs.backhaul_similarity(sites.n_base_stations)))
        if weights.coverage > 0 and sites.bs_a is not None and sites.bs_b is not None:
            assert sites.bs_range_m is not None
            if sites.geo:
                lat0 = np.radians(float(np.mean(sites.bs_a))) if n else 0.0
                x = dcs.EARTH_RADIUS_M * np.radians(sites.bs_b) * np.cos(lat0)
                y = dcs.EARTH_RADIUS_M * np.radians(sites.bs_a)
            else:
                x, y = sites.bs_a, sites.bs_b
            parts.append((weights.coverage, dcs.circle_overlap(x, y, sites.bs_range_m)))
    if weights.traffic > 0 or not parts:
        if p.ndim != 2 or p.shape[1] < 2 or not np.all(np.isfinite(p)):
            raise ValueError("profiles need >= 2 finite values per entity")
        parts.append((weights.traffic if weights.traffic > 0 else 1.0, dcs.traffic_similarity(p)))
    total = sum(w * s for w, s in parts)
    out = np.asarray(total / sum(w for w, _ in parts), dtype=float)
    out = np.clip((out + out.T) / 2, 0.0, 1.0)
    np.fill_diagonal(out, 0.0)
    return out


DENSE_MAX = 1_000  # up to this many entities the dense [n, n] affinity (8 MB each array); above, k-NN
KNN = 8  # the DCS graph keeps each entity's 8 strongest links (``dcs.cluster``'s default)
CANDIDATES = 32  # per entity and per kind (position, profile): the pairs the sparse affinity measures
MEDIAN_SAMPLE = 200_000  # random pairs for the default proximity scale above DENSE_MAX entities


def _unit_profiles(profiles: np.ndarray) -> np.ndarray:
    """Centred, unit-length rows: their dot product is ``dcs.traffic_similarity`` before clipping."""
    p = np.asarray(profiles, dtype=float)
    centred = p - p.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1)
    # in place: a second [n, slots] array is 115 MB at 10,000 entities of 1-minute profiles
    flat = norm == 0
    np.divide(centred, norm[:, None], out=centred, where=~flat[:, None])
    centred[flat] = 0.0
    return centred


def _position_points(sites: Sites) -> np.ndarray:
    """Points whose straight-line neighbours are the sites' nearest: unit-sphere xyz for lat/lon (the chord
    grows with the great-circle distance, so the k nearest are exactly the great-circle k nearest), x/y as
    they are."""
    if not sites.geo:
        return np.column_stack([sites.a, sites.b])
    lat, lon = np.radians(sites.a), np.radians(sites.b)
    return np.column_stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])


def _nearest_by_position(sites: Sites, k: int) -> np.ndarray:
    """``[n, k]``: each site's k nearest other sites (a KD-tree, O(n log n)); ties to the lower index."""
    n = len(sites)
    _, idx = cKDTree(_position_points(sites)).query(_position_points(sites), k=min(k + 1, n))
    idx = np.asarray(idx).reshape(n, -1)
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):  # drop the site itself (not always first when two sites share a position)
        others = idx[i][idx[i] != i]
        out[i] = others[:k]
    return out


def _nearest_by_profile(unit: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """``[n, k]``: each profile's k best-correlated others, exactly, a block of rows at a time (memory
    ``chunk x n``)."""
    n = unit.shape[0]
    out = np.empty((n, k), dtype=np.int64)
    for lo in range(0, n, chunk):
        sim = unit[lo : lo + chunk] @ unit.T
        rows = np.arange(sim.shape[0])
        sim[rows, rows + lo] = -np.inf
        out[lo : lo + chunk] = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # ties to the lower index
    return out


PAIR_BLOCK_VALUES = 1 << 21  # values of ``unit[i]`` gathered at a time in ``pair_dots`` (16 MB of float64)


def pair_dots(unit: np.ndarray, i: np.ndarray, j: np.ndarray, block: int | None = None) -> np.ndarray:
    """``unit[i[k]] . unit[j[k]]`` for every pair k, ``block`` pairs at a time (default: ``PAIR_BLOCK_VALUES``
    values per gathered block). Gathering every pair's rows at once cost ``2 x pairs x slots`` floats: 10,000
    entities of 1-minute profiles (1,440 slots, ~300,000 pairs) took 6.3 GB in the bootstrap. Each pair's dot
    is computed exactly as in one pass, so the result does not depend on ``block``."""
    n_pairs = len(i)
    if block is None:
        block = max(1, PAIR_BLOCK_VALUES // max(1, unit.shape[1]))
    out = np.empty(n_pairs, dtype=np.result_type(unit.dtype, np.float64))
    for lo in range(0, n_pairs, block):
        hi = min(lo + block, n_pairs)
        out[lo:hi] = np.einsum("ij,ij->i", unit[i[lo:hi]], unit[j[lo:hi]])
    return out


def _pair_distances_m(sites: Sites, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    if sites.geo:
        return dcs._haversine_m(sites.b[i], sites.a[i], sites.b[j], sites.a[j])
    return np.asarray(np.hypot(sites.a[i] - sites.a[j], sites.b[i] - sites.b[j]))


def _median_distance_m(sites: Sites, seed: int = 0) -> float:
    """The default proximity scale: the median distance between the entities, exact up to ``DENSE_MAX``
    entities (as :func:`affinity`), else over ``MEDIAN_SAMPLE`` seeded random pairs."""
    n = len(sites)
    if n <= DENSE_MAX:
        d = sites.distances_m()
        off = d[~np.eye(n, dtype=bool)]
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, MEDIAN_SAMPLE)
        j = (i + rng.integers(1, n, MEDIAN_SAMPLE)) % n  # never i itself
        off = _pair_distances_m(sites, i, j)
    med = float(np.median(off)) if off.size else 0.0
    return med if med > 0 else 1.0


def knn_affinity(
    sites: Sites | None,
    profiles: np.ndarray,
    weights: dcs.DcsWeights = dcs.DcsWeights(),
    scale_m: float | None = None,
    candidates: int = CANDIDATES,
) -> csr_matrix:
    """DCS affinity of candidate pairs only, as a symmetric sparse matrix: each entity's ``candidates``
    nearest by position (great-circle for lat/lon, straight-line for x/y; a KD-tree) and ``candidates``
    best-correlated by traffic profile, both directions. Each stored value is exactly :func:`affinity`'s for
    that pair (the same weighted mean of proximity, backhaul, coverage and traffic), so ``dcs.cluster`` builds
    the same k-NN graph as from the dense matrix whenever an entity's 8 strongest links are among its
    candidates: always with one kind of similarity alone (profiles without sites, or positions with
    ``weights.traffic = 0``), and always when ``candidates >= n - 1``. With both kinds a pair far down both
    lists can be missed; ``tests/test_sites.py`` measures how often. Memory and time: O(n * candidates),
    plus O(n * 256) while ranking profiles and ``PAIR_BLOCK_VALUES`` while correlating the pairs."""
    p = np.asarray(profiles, dtype=float)
    n = p.shape[0]
    if sites is not None and len(sites) != n:
        raise ValueError(f"{len(sites)} sites but {n} profiles")
    use_traffic = weights.traffic > 0 or sites is None
    if use_traffic and (p.ndim != 2 or p.shape[1] < 2 or not np.all(np.isfinite(p))):
        raise ValueError("profiles need >= 2 finite values per entity")
    if n < 2:
        return csr_matrix((n, n))
    k = min(candidates, n - 1)
    unit = _unit_profiles(p) if use_traffic else None
    near: list[np.ndarray] = []
    if sites is not None:
        near.append(_nearest_by_position(sites, k))
    if unit is not None:
        near.append(_nearest_by_profile(unit, k))
    rows = np.repeat(np.arange(n), k)
    i = np.concatenate([rows for _ in near] + [m.ravel() for m in near])
    j = np.concatenate([m.ravel() for m in near] + [rows for _ in near])
    pairs = np.unique(np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j))
    i, j = pairs // n, pairs % n

    parts: list[tuple[float, np.ndarray]] = []
    if sites is not None:
        if weights.distance > 0:
            scale = _median_distance_m(sites) if scale_m is None else scale_m
            parts.append((weights.distance, np.exp(-_pair_distances_m(sites, i, j) / scale)))
        if weights.backhaul > 0 and sites.n_base_stations is not None:
            c = np.asarray(sites.n_base_stations, dtype=float)
            lo, hi = np.minimum(c[i], c[j]), np.maximum(c[i], c[j])
            parts.append((weights.backhaul, np.divide(lo, hi, out=np.ones_like(lo), where=hi > 0)))
        if weights.coverage > 0 and sites.bs_a is not None and sites.bs_b is not None:
            assert sites.bs_range_m is not None
            x, y = _coverage_xy(sites)
            r = sites.bs_range_m
            d = np.hypot(x[i] - x[j], y[i] - y[j])
            parts.append((weights.coverage, dcs.overlap_ratio(d, r[i], r[j])))
    if unit is not None:
        corr = np.clip(pair_dots(unit, i, j), 0.0, 1.0)
        parts.append((weights.traffic if weights.traffic > 0 else 1.0, corr))
    value = sum(w * v for w, v in parts) / sum(w for w, _ in parts)
    value = np.clip(value, 0.0, 1.0)
    both_i, both_j = np.concatenate([i, j]), np.concatenate([j, i])
    return csr_matrix((np.concatenate([value, value]), (both_i, both_j)), shape=(n, n))


def _coverage_xy(sites: Sites) -> tuple[np.ndarray, np.ndarray]:
    """The serving BSs in metres: an equirectangular projection around their mean latitude for lat/lon."""
    assert sites.bs_a is not None and sites.bs_b is not None
    if not sites.geo:
        return sites.bs_a, sites.bs_b
    lat0 = np.radians(float(np.mean(sites.bs_a))) if len(sites) else 0.0
    return (
        dcs.EARTH_RADIUS_M * np.radians(sites.bs_b) * np.cos(lat0),
        dcs.EARTH_RADIUS_M * np.radians(sites.bs_a),
    )


def cluster_entities(
    sites: Sites | None,
    profiles: np.ndarray,
    n_clusters: int | None,
    seed: int = 0,
    stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """DCS labels (0..C-1) for entities in ``profiles`` order (and ``sites`` order when given). ``n_clusters`` is
    capped at the entity count; 1 to 3 entities work (one entity: one cluster). Up to ``DENSE_MAX`` entities on
    the dense affinity, above on :func:`knn_affinity` (10,000 entities: a few MB instead of 800)."""
    n = np.asarray(profiles).shape[0]
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    k = None if n_clusters is None else max(1, min(n_clusters, n))
    if n <= DENSE_MAX:
        return dcs.cluster(affinity(sites, profiles), k, seed=seed, knn=KNN, stop=stop)
    return dcs.cluster(knn_affinity(sites, profiles), k, seed=seed, knn=KNN, stop=stop)


def nearest_cluster(sites: Sites, labels: np.ndarray, joiner: Sites) -> np.ndarray:
    """For each entity of ``joiner``: the cluster whose nearest member is closest (great-circle for lat/lon).
    ``sites`` are the clustered entities, ``labels`` their clusters."""
    d = joiner.distances_m(sites)  # [J, n]
    return np.asarray(labels)[np.argmin(d, axis=1)]


def nearest_profile(profiles: np.ndarray, labels: np.ndarray, joiner_profiles: np.ndarray) -> np.ndarray:
    """For late joiners without a position: the cluster whose mean profile correlates best with theirs."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    centres = np.stack([np.asarray(profiles)[labels == c].mean(axis=0) for c in ids])
    both = np.concatenate([centres, np.asarray(joiner_profiles)], axis=0)
    corr = dcs.traffic_similarity(both)[len(ids) :, : len(ids)]
    return np.asarray(ids[np.argmax(corr, axis=1)])


@dataclass(frozen=True)
class EntityGrouping:
    """Re-clustering DCS of a ``[twins]`` deployment (``reclustering.Reclusterer``), by the bootstrap's rule:
    positions from the sites file when it has every BS being clustered, their traffic profiles alone when it
    does not. ``names`` (registry key -> entity name) is the store's own map: late joiners appear in it as
    they join."""

    sites: Sites | None
    names: dict[int, str]

    def placeable(self, squares: list[int]) -> list[int]:
        return list(squares)

    def labels(
        self, squares: list[int], profiles: np.ndarray, n_clusters: int | None, seed: int
    ) -> np.ndarray:
        named = [self.names.get(s, str(s)) for s in squares]
        where = None
        if self.sites is not None and all(self.sites.has(n) for n in named):
            where = self.sites.subset(named)
        return cluster_entities(where, profiles, n_clusters, seed)
