"""Edge sites as separate processes (issue 14): clusters placed by policy, handed over through the topics when
a site is killed, restarted or stopped; nothing accepted is lost or applied twice; the cloud merges."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ingest.kafka import make_producer
from ingest.settings import EdgeSettings, NettwinSettings, SiteSettings
from ingest.topics import Topics
from tests.conftest import SHARED_MILAN
from tests.processes import Processes, managed
from tests.test_htwin_service import HOURLY, bootstrap, local_updates, publish
from twin_store.adapters.influx import InfluxClient
from twin_store.federation import dcs
from twin_store.federation.models_topic import TwinMessage
from twin_store.federation.twinning import fedavg
from twin_store.services.htwin import read_latest_twins

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not HOURLY.exists(), reason="real data not found")]


@pytest.fixture
def procs(isolated: NettwinSettings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    yield from managed(Processes(isolated, tmp_path / "logs"), request)


def wait_for(
    settings: NettwinSettings, done: Callable[[dict[bytes, TwinMessage]], bool], what: str, procs: Processes
) -> dict[bytes, TwinMessage]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        latest = read_latest_twins(settings)
        if done(latest):
            return latest
        time.sleep(1.0)
    with InfluxClient(settings.influx) as influx:
        q = 'SELECT * FROM "update" WHERE "decision" != \'accepted\''
        refused = [
            (r.get("entity"), r.get("seq"), r.get("reason")) for x in influx.query(q) for r in x.rows()
        ]
    seen = {
        k: (m.version, m.meta.get("seq"), m.meta.get("host"), m.meta.get("epoch")) for k, m in latest.items()
    }
    raise AssertionError(f"timed out waiting for {what}: {seen}, refused {refused}\n{procs.logs()}")


def hosts(latest: dict[bytes, TwinMessage]) -> dict[int, str]:
    return {int(m.twin_id): str(m.meta.get("host")) for m in latest.values() if m.level == "cluster"}


def seqs(latest: dict[bytes, TwinMessage]) -> dict[int, int]:
    return {int(m.twin_id): int(m.meta["seq"]) for m in latest.values() if m.level == "bs"}


def two_sites(
    isolated: NettwinSettings, latest: dict[bytes, TwinMessage]
) -> tuple[NettwinSettings, dict[int, list[int]], list[int]]:
    """Settings with site "a" where cluster 0's BSs are and "b" where cluster 1's (the nearest policy splits
    them), the clusters' members and all their squares."""
    members = {int(m.twin_id): list(m.meta["members"]) for m in latest.values() if m.level == "cluster"}
    squares = sorted(s for ms in members.values() for s in ms)
    attrs = dcs.SquareAttributes.load(SHARED_MILAN, squares)
    where = dict(zip(squares, zip(attrs.bs_lat.tolist(), attrs.bs_lon.tolist(), strict=True), strict=True))
    sites = [
        SiteSettings(
            name=name,
            lat=float(np.mean([where[s][0] for s in members[c]])),
            lon=float(np.mean([where[s][1] for s in members[c]])),
            capacity=1e6,
        )
        for name, c in (("a", 0), ("b", 1))
    ]
    # no screening: what is accepted must not depend on which site's screen memory saw what (the
    # temporal screen warms up again on a site that takes a cluster over)
    security = isolated.security.model_copy(update={"defense": "mean"})
    settings = isolated.model_copy(
        update={
            "edge": EdgeSettings(sites=tuple(sites), policy="nearest", milan_dir=SHARED_MILAN),
            "security": security,
        }
    )
    return settings, members, squares


def test_sites_hand_clusters_over_on_kill_restart_and_sigterm(
    isolated: NettwinSettings, procs: Processes
) -> None:
    latest = bootstrap(isolated)  # 6 squares, 2 clusters
    settings, members, squares = two_sites(isolated, latest)
    assert sorted(members) == [0, 1]
    procs.settings = settings
    global_before = latest[b"global:0"].version
    updates = local_updates(latest, rounds=4)
    per_round = len(squares)

    procs.start("cloud", "cloud")
    procs.start("a", "edge", "--site", "a")
    procs.start("b", "edge", "--site", "b")
    wait_for(settings, lambda t: hosts(t) == {0: "a", 1: "b"}, "each site to take its cluster", procs)

    publish(settings, updates[:per_round])
    wait_for(settings, lambda t: set(seqs(t).values()) == {0}, "round 0 applied", procs)

    # kill -9 site a while round 1 is arriving: b takes cluster 0 once a's heartbeats are stale
    publish(settings, updates[per_round : 2 * per_round])
    procs.procs["a"].send_signal(signal.SIGKILL)
    procs.procs["a"].wait()
    wait_for(settings, lambda t: hosts(t) == {0: "b", 1: "b"}, "b to take cluster 0 over", procs)
    publish(settings, updates[2 * per_round : 3 * per_round])
    wait_for(settings, lambda t: set(seqs(t).values()) == {2}, "rounds 1-2 applied by b", procs)

    # a comes back: the placement gives it cluster 0 again, b hands it over (a planned migration)
    procs.start("a2", "edge", "--site", "a")
    wait_for(settings, lambda t: hosts(t) == {0: "a", 1: "b"}, "b to hand cluster 0 back to a", procs)

    # SIGTERM b: it hands cluster 1 to a and stops within 10 s
    t0 = time.monotonic()
    procs.procs["b"].send_signal(signal.SIGTERM)
    rc = procs.procs["b"].wait(30)
    stopped_s = time.monotonic() - t0
    assert rc == 0 and stopped_s < 10, (rc, stopped_s, procs.logs())
    wait_for(settings, lambda t: hosts(t) == {0: "a", 1: "a"}, "a to take cluster 1 over", procs)
    publish(settings, updates[3 * per_round :])
    final = wait_for(settings, lambda t: set(seqs(t).values()) == {3}, "round 3 applied by a", procs)

    # every update accepted exactly once: a BS twin's version counts its accepted updates
    bs = {int(m.twin_id): m for m in final.values() if m.level == "bs"}
    before = {int(m.twin_id): m.version for m in latest.values() if m.level == "bs"}
    assert {s: m.version for s, m in bs.items()} == {s: before[s] + 4 for s in squares}
    # and each cluster twin is the FedAvg of its members' last updates (none lost on the way)
    last = {int(u.twin_id): u for u in updates[3 * per_round :]}
    for cid, ms in members.items():
        stack = torch.stack([torch.as_tensor(last[s].params) for s in sorted(ms)])
        weights = torch.tensor([last[s].meta["n_samples"] for s in sorted(ms)], dtype=torch.float32)
        got = torch.as_tensor(final[f"cluster:{cid}".encode()].params)
        assert torch.allclose(got, fedavg(stack, weights), atol=1e-6), cid
    # the cloud merged the sites' cluster changes into the global twin
    assert final[b"global:0"].version > global_before

    for name in ("a2", "cloud"):
        procs.procs[name].send_signal(signal.SIGTERM)
        assert procs.procs[name].wait(15) == 0, procs.logs()

    with InfluxClient(settings.influx) as influx:
        costs = [r for s in influx.query('SELECT * FROM "edge_cost"') for r in s.rows()]
        moves = [r for s in influx.query('SELECT * FROM "edge_migration"') for r in s.rows()]
    assert {r["site"] for r in costs} == {"a", "b"}
    trained = [r for r in costs if r["kind"] == "compute" and r["bytes"] > 0]
    assert trained and all(r["energy"] > 0 for r in trained)
    # cluster 0's BSs moved a -> b (the kill) and back, cluster 1's b -> a (SIGTERM): each booked once trained
    assert {(r["source"], r["target"]) for r in moves} == {("a", "b"), ("b", "a")}
    assert all(r["energy"] > 0 and r["bytes"] >= settings.edge.twin_bytes for r in moves)


def test_a_lone_site_and_the_cloud_stop_within_10_s_of_sigterm(
    isolated: NettwinSettings, procs: Processes
) -> None:
    latest = bootstrap(isolated)
    squares = sorted(int(m.twin_id) for m in latest.values() if m.level == "bs")
    attrs = dcs.SquareAttributes.load(SHARED_MILAN, squares)
    site = SiteSettings(
        name="only", lat=float(attrs.bs_lat.mean()), lon=float(attrs.bs_lon.mean()), capacity=1e6
    )
    settings = isolated.model_copy(update={"edge": EdgeSettings(sites=(site,), milan_dir=SHARED_MILAN)})
    procs.settings = settings
    procs.start("cloud", "cloud")
    procs.start("only", "edge", "--site", "only")
    wait_for(settings, lambda t: set(hosts(t).values()) == {"only"}, "the site to take every cluster", procs)
    publish(settings, local_updates(latest, rounds=1))  # work in flight while it stops
    for name in ("only", "cloud"):
        t0 = time.monotonic()
        procs.procs[name].send_signal(signal.SIGTERM)
        rc = procs.procs[name].wait(30)
        assert rc == 0 and time.monotonic() - t0 < 10, (name, rc, time.monotonic() - t0, procs.logs())
    # no other site is alive: the clusters are handed to whichever site comes next (host ""), from "only"
    after = read_latest_twins(settings)
    clusters = [m for m in after.values() if m.level == "cluster"]
    assert clusters and all(m.meta["host"] == "" and m.meta["from"] == "only" for m in clusters)


def test_reclusterings_hand_twins_over_between_sites_through_the_topics(
    isolated: NettwinSettings, procs: Processes
) -> None:
    latest = bootstrap(isolated)
    settings, _, squares = two_sites(isolated, latest)
    procs.settings = settings
    rounds = 4  # then one more after a membership that moves a BS to the other site's cluster
    updates = local_updates(latest, rounds=rounds + 1)
    table = np.loadtxt(HOURLY, delimiter=",", skiprows=1)
    series = {int(r[0]): r[1:] for r in table}
    for u in updates:  # the hour each round trains at, and the BS's traffic profile DCS clusters on
        seq, square = int(u.meta["seq"]), int(u.twin_id)
        u.meta["hour"] = 1008 + 24 * seq
        u.meta["profile"] = series[square][: 1008 + 24 * seq].reshape(-1, 24).mean(axis=0).round(3).tolist()
    before = {int(m.twin_id): m.version for m in latest.values() if m.level == "bs"}
    per_round = len(squares)

    procs.start("cloud", "cloud", "--recluster-every", str(per_round))
    procs.start("a", "edge", "--site", "a")
    procs.start("b", "edge", "--site", "b")
    wait_for(settings, lambda t: hosts(t) == {0: "a", 1: "b"}, "each site to take its cluster", procs)
    for r in range(rounds):
        publish(settings, updates[r * per_round : (r + 1) * per_round])
        wait_for(settings, lambda t, r=r: set(seqs(t).values()) == {r}, f"round {r} applied", procs)

    def settled(t: dict[bytes, TwinMessage], at_least: int = 1) -> bool:
        epoch = t[b"global:0"].meta.get("epoch", 0)
        current = [m for m in t.values() if m.level == "cluster" and m.meta.get("epoch") == epoch]
        held = {s for m in current for s in m.meta["members"]} == set(squares)
        return epoch >= at_least and held and all(m.meta.get("host") in ("a", "b") for m in current)

    # the cloud re-clustered (DCS keeps these 6 BSs' clusters: geography dominates); stop it and publish, as
    # it would, a membership that moves a BS into the other site's cluster
    now = wait_for(settings, settled, "the sites to hold the re-clustered membership", procs)
    procs.procs["cloud"].send_signal(signal.SIGTERM)
    assert procs.procs["cloud"].wait(15) == 0, procs.logs()
    glob = read_latest_twins(settings)[b"global:0"]
    epoch = int(glob.meta["epoch"]) + 1
    held = {int(m.twin_id): m for m in now.values() if m.level == "cluster" and m.meta["epoch"] == epoch - 1}
    source = next(m for m in held.values() if len(m.meta["members"]) >= 2)
    target = next(m for m in held.values() if m.meta["host"] != source.meta["host"])
    mover = int(source.meta["members"][0])
    membership = {int(s): c for s, c in glob.meta["membership"].items()} | {mover: int(target.twin_id)}
    meta = glob.meta | {"membership": {str(s): c for s, c in membership.items()}, "epoch": epoch}
    moved = TwinMessage("global", "0", glob.version, glob.hidden, glob.params, meta)
    producer = make_producer(settings)
    producer.send(Topics.from_settings(settings).twin_models, key=moved.key, value=moved.encode())
    producer.flush()
    producer.close()
    publish(settings, updates[rounds * per_round :])
    wait_for(settings, lambda t: set(seqs(t).values()) == {rounds}, "the last round applied", procs)
    rounds += 1

    final = wait_for(settings, lambda t: settled(t, epoch), "the sites to hold the moved membership", procs)
    assert final[b"global:0"].meta["epoch"] == epoch
    current = {int(m.twin_id): m for m in final.values() if m.level == "cluster" and m.meta["epoch"] == epoch}
    assert {s: c for c, m in current.items() for s in m.meta["members"]} == {
        int(s): c for s, c in final[b"global:0"].meta["membership"].items()
    }
    bs = {int(m.twin_id): m for m in final.values() if m.level == "bs"}
    assert {s: m.version for s, m in bs.items()} == {s: before[s] + rounds for s in squares}
    last = {int(u.twin_id): u for u in updates[(rounds - 1) * per_round :]}
    for cid, m in current.items():
        ms = sorted(m.meta["members"])
        stack = torch.stack([torch.as_tensor(last[s].params) for s in ms])
        weights = torch.tensor([last[s].meta["n_samples"] for s in ms], dtype=torch.float32)
        assert torch.allclose(torch.as_tensor(m.params), fedavg(stack, weights), atol=1e-6), cid
    for name in ("a", "b"):  # a site books its open slot when it stops
        procs.procs[name].send_signal(signal.SIGTERM)
        assert procs.procs[name].wait(15) == 0, procs.logs()
    with InfluxClient(settings.influx) as influx:
        rows = [r for s in influx.query('SELECT * FROM "membership"') for r in s.rows()]
    assert max(r["epoch"] for r in rows) == epoch - 1  # the cloud's own re-clusterings
    with InfluxClient(settings.influx) as influx:
        moves = [r for s in influx.query('SELECT * FROM "edge_migration"') for r in s.rows()]
    # the mover's twin went from its old cluster's site to its new one's when the new membership took effect
    # (more migrations follow as the sites stop and hand their clusters over)
    assert (str(mover), source.meta["host"], target.meta["host"]) in {
        (r["bs"], r["source"], r["target"]) for r in moves
    }
    assert all(r["energy"] > 0 and r["bytes"] >= settings.edge.twin_bytes for r in moves)
