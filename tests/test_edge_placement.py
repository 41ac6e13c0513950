"""Cluster placement on the live edge sites (pure): every site computes the same answer from the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

from twin_store.federation.edge.costs import Array
from twin_store.federation.edge.ledger import Site
from twin_store.federation.edge.placement import place_clusters
from twin_store.federation.edge.simulator import IntArray

SITES = [Site("west", 45.46, 9.15, 500), Site("east", 45.46, 9.25, 500), Site("north", 45.52, 9.20, 5000)]
CENTROIDS = {0: (45.46, 9.16), 1: (45.461, 9.151), 2: (45.46, 9.24)}
LIVE = {"west", "east", "north"}


def test_nearest_puts_each_cluster_on_its_closest_live_site() -> None:
    assert place_clusters(SITES, LIVE, CENTROIDS, {}) == {0: "west", 1: "west", 2: "east"}
    # west is dead: its clusters go to the closest live site, the others stay
    assert place_clusters(SITES, {"east", "north"}, CENTROIDS, {}) == {0: "east", 1: "north", 2: "east"}
    assert place_clusters(SITES, set(), CENTROIDS, {}) == {}


def test_balanced_respects_capacity_and_ignores_dead_sites() -> None:
    weights = {0: 400.0, 1: 300.0, 2: 100.0}
    got = place_clusters(SITES, LIVE, CENTROIDS, weights, "balanced")
    assert got[0] == "west" and got[1] != "west"  # the heavier cluster first; west has room for one
    assert place_clusters(SITES, {"north"}, CENTROIDS, weights, "balanced") == dict.fromkeys(
        CENTROIDS, "north"
    )


def test_learned_choice_on_a_dead_site_falls_back_to_the_nearest_live_one() -> None:
    def always_north(distance: Array, samples: Array, previous: IntArray) -> IntArray:
        assert distance.shape == (3, 3)  # the model sees every declared site
        return np.full(len(samples), 2, np.int64)

    assert place_clusters(SITES, LIVE, CENTROIDS, {}, "learned", always_north) == dict.fromkeys(
        CENTROIDS, "north"
    )
    assert place_clusters(SITES, {"west", "east"}, CENTROIDS, {}, "learned", always_north) == {
        0: "west",
        1: "west",
        2: "east",
    }
    with pytest.raises(ValueError, match="needs a trained"):
        place_clusters(SITES, LIVE, CENTROIDS, {}, "learned")
    with pytest.raises(ValueError, match="choose"):
        place_clusters(SITES, LIVE, CENTROIDS, {}, "random")


def test_heartbeats_parse_or_say_why() -> None:
    import json

    from twin_store.services.edge_site import Heartbeat, parse_heartbeat

    ok = {"site": "west", "at_ms": 5, "clusters": [0, 2], "leaving": True}
    assert parse_heartbeat(json.dumps(ok).encode()) == Heartbeat("west", 5, (0, 2), True)
    assert parse_heartbeat(b'{"site": "w", "at_ms": 1, "clusters": []}') == Heartbeat("w", 1, ())
    bad = [
        None,
        b"",
        b"not json",
        b"[1, 2]",
        b'"west"',
        b"[" * 100_000,
        b'{"site": "", "at_ms": 1, "clusters": []}',
        b'{"site": "w", "at_ms": true, "clusters": []}',
        b'{"site": "w", "at_ms": -1, "clusters": []}',
        b'{"site": "w", "at_ms": 1, "clusters": [0, "1"]}',
        b'{"site": "w", "at_ms": 1, "clusters": {"0": 1}}',
        b'{"site": "w", "at_ms": 1.5, "clusters": []}',
    ]
    for value in bad:
        assert isinstance(parse_heartbeat(value), str), value
