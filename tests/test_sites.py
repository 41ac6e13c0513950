"""Sites files, DCS on positions or profiles alone, and nearest-cluster assignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ingest.errors import InputError
from twin_store.federation import dcs
from twin_store.federation.sites import (
    Sites,
    affinity,
    cluster_entities,
    load_sites,
    nearest_cluster,
    nearest_profile,
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
