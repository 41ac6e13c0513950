"""Bad input to a running edge site and cloud (``nettwin edge --site``, ``nettwin cloud``) on the real services:
every bad message on ``updates.local`` and ``twin.models`` is dead-lettered (reason, position, original bytes)
or refused with its reason, neither process stops, and a good update sent after them is still applied."""

from __future__ import annotations

import json
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from ingest.deadletter import DeadLetter
from ingest.kafka import make_producer
from ingest.settings import EdgeSettings, NettwinSettings, SiteSettings
from ingest.topics import Topics
from nettwin.cli.query import read_deadletters
from tests.conftest import SHARED_MILAN, run_cli, wait_until
from tests.processes import Processes
from tests.test_edge_sites import hosts, procs, seqs, wait_for
from tests.test_htwin_service import HOURLY, bootstrap, local_updates, publish
from twin_store.adapters.influx import InfluxClient
from twin_store.federation import dcs
from twin_store.federation.keys import KeyRegistry
from twin_store.federation.models_topic import MAGIC, TwinMessage
from twin_store.services.htwin import read_latest_twins

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not HOURLY.exists(), reason="real data not found")]
__all__ = ["procs"]  # the fixture, imported for these tests


def framed(header: dict[str, object], body: bytes = b"") -> bytes:
    """A twin message frame around any header: readable as JSON, wrong in its fields."""
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + body


def send(
    settings: NettwinSettings, topic: str, messages: list[tuple[bytes | None, bytes]]
) -> dict[bytes, int]:
    """Publish on partition 0; the offset each value landed at."""
    producer = make_producer(settings)
    futures = [(value, producer.send(topic, key=key, value=value, partition=0)) for key, value in messages]
    producer.flush()
    offsets = {value: f.get(10).offset for value, f in futures}
    producer.close()
    return offsets


def test_bad_updates_and_twin_messages_cost_those_messages_only(
    isolated: NettwinSettings, procs: Processes, tmp_path: Path
) -> None:
    latest = bootstrap(isolated)
    keys_file = tmp_path / "bs-keys.json"
    res = run_cli(isolated, "keys", "create", str(keys_file), "--from-twins")
    assert res.returncode == 0, res.stderr
    keys = KeyRegistry.load(keys_file)
    squares = sorted(int(m.twin_id) for m in latest.values() if m.level == "bs")
    attrs = dcs.SquareAttributes.load(SHARED_MILAN, squares)
    site = SiteSettings(
        name="only", lat=float(attrs.bs_lat.mean()), lon=float(attrs.bs_lon.mean()), capacity=1e6
    )
    settings = isolated.model_copy(
        update={
            "edge": EdgeSettings(sites=(site,), milan_dir=SHARED_MILAN),
            "security": isolated.security.model_copy(update={"keys_file": keys_file, "defense": "mean"}),
        }
    )
    procs.settings = settings
    topics = Topics.from_settings(settings)
    procs.start("cloud", "cloud")
    procs.start("only", "edge", "--site", "only")
    wait_for(settings, lambda t: set(hosts(t).values()) == {"only"}, "the site to take every cluster", procs)
    global_before = read_latest_twins(settings)[b"global:0"].version

    good = local_updates(latest, rounds=1)
    for u in good:
        u.meta["base_version"], u.meta["cluster"] = 1, -1
        keys.sign(u)
    template = good[0]
    hidden, params = template.hidden, template.params

    def bs(twin_id: str, meta: dict[str, object]) -> TwinMessage:
        return TwinMessage("bs", twin_id, 1, hidden, params, meta)

    wrong_seq = bs(template.twin_id, template.meta | {"seq": "x"})
    keys.sign(wrong_seq)
    unsigned = bs(template.twin_id, {k: v for k, v in template.meta.items() if k != "sig"})
    forged = bs(template.twin_id, template.meta | {"sig": "00" * 32})
    stranger = bs("99999", {"seq": 0, "n_samples": 10, "cluster": 0, "joined": True})
    bad_updates = [  # (value, dead-lettered or refused, what the reason says)
        (b"\x00\xffnot a twin at all", "dead", "bad magic"),
        (b'{"level": "bs", "twin_id": "1", "seq": 0}', "dead", "bad magic"),
        (
            framed({"level": "bs", "twin_id": "1", "version": "one", "hidden": 1, "n_params": 0}),
            "dead",
            "version",
        ),
        (wrong_seq.encode(), "dead", "seq"),
        (unsigned.encode(), "refused", ""),
        (forged.encode(), "refused", ""),
        (stranger.encode(), "refused", ""),
    ]
    glob = latest[b"global:0"]
    cluster = next(m for m in latest.values() if m.level == "cluster")
    bad_models = [  # (key, value, what the reason says)
        (b"cluster:0", b"\x00\xffgarbage", "bad magic"),
        (b"cluster:0", b'{"level": "cluster", "twin_id": "0"}', "bad magic"),
        (b"bs:1", framed({"level": "bs", "twin_id": "1", "version": 1, "hidden": 1, "n_params": 0}), "seq"),
        (  # a cluster no membership has: merging it would move the global twin
            b"cluster:99",
            TwinMessage("cluster", "99", 50, glob.hidden, glob.params * 0 + 1, {"members": [99999]}).encode(),
            "cluster 99",
        ),
        (  # a known cluster whose hour is not a number
            cluster.key,
            TwinMessage(
                "cluster", cluster.twin_id, 60, glob.hidden, glob.params, cluster.meta | {"as_of": "x"}
            ).encode(),
            "as_of",
        ),
    ]
    # a heartbeat of a site nobody declared, claiming a cluster: it would hold that cluster from the sites
    ghost = json.dumps({"site": "ghost", "at_ms": int(time.time() * 1000), "clusters": [0]}).encode()
    update_at = send(settings, topics.updates_local, [(None, v) for v, _, _ in bad_updates])
    models_at = send(settings, topics.twin_models, [(k, v) for k, v, _ in bad_models])
    ghost_at = send(settings, topics.edge_sites, [(b"ghost", ghost)])[ghost]
    time.sleep(3)  # both processes read them before the good updates arrive
    publish(settings, good)

    final = wait_for(settings, lambda t: set(seqs(t).values()) == {0}, "the good round applied", procs)
    for name in ("only", "cloud"):
        assert procs.procs[name].poll() is None, f"{name} exited\n{procs.logs()}"
    bs_twins = {int(m.twin_id): m for m in final.values() if m.level == "bs"}
    before = {int(m.twin_id): m.version for m in latest.values() if m.level == "bs"}
    assert {s: m.version for s, m in bs_twins.items()} == {s: before[s] + 1 for s in squares}
    wait_until(
        lambda: read_latest_twins(settings)[b"global:0"].version > global_before, 60, "the cloud to merge"
    )
    assert "99" not in read_latest_twins(settings)[b"global:0"].meta.get("offered", {})

    def letters() -> dict[str, DeadLetter] | None:
        found = {d.position: d for d in read_deadletters(settings, 1000, timeout_s=2)}
        wanted = [f"{topics.updates_local}[0]@{update_at[v]}" for v, kind, _ in bad_updates if kind == "dead"]
        wanted += [f"{topics.twin_models}[0]@{models_at[v]}" for _, v, _ in bad_models]
        wanted.append(f"{topics.edge_sites}[0]@{ghost_at}")
        return found if all(w in found for w in wanted) else None

    found = wait_until(letters, 60, "a dead letter for every bad message")
    for value, kind, why in bad_updates:
        if kind == "dead":
            letter = found[f"{topics.updates_local}[0]@{update_at[value]}"]
            assert letter.original == value and why in letter.reason, letter
    for _, value, why in bad_models:
        letter = found[f"{topics.twin_models}[0]@{models_at[value]}"]
        assert letter.original == value and why in letter.reason, letter

    letter = found[f"{topics.edge_sites}[0]@{ghost_at}"]
    assert letter.original == ghost and "not declared" in letter.reason, letter

    # the refused ones are decisions: an update row with the reason, the twins untouched
    with InfluxClient(settings.influx) as influx:
        rows = [
            r
            for s in influx.query('SELECT * FROM "update" WHERE "decision" = \'rejected\'')
            for r in s.rows()
        ]
    assert len(rows) >= 3 and all(r["reason"] for r in rows), rows

    for name in ("only", "cloud"):
        procs.procs[name].send_signal(signal.SIGTERM)
        assert procs.procs[name].wait(15) == 0, procs.logs()
    np.testing.assert_array_equal(bs_twins[int(template.twin_id)].params, template.params)
