"""The edge ledger service against the real broker and InfluxDB: slots booked, migrations recorded, query."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ingest.kafka import make_producer
from ingest.settings import EdgeSettings, NettwinSettings, SiteSettings
from ingest.topics import Topics
from tests.conftest import SHARED_MILAN, run_cli
from twin_store.adapters.influx import InfluxClient
from twin_store.federation import dcs
from twin_store.federation.models_topic import TwinMessage
from twin_store.services.edge import EdgeLedgerService

pytestmark = pytest.mark.integration


def _update(square: int, hour: int, samples: int) -> TwinMessage:
    meta = {"seq": hour, "hour": hour, "n_samples": samples, "loss": 0.1}
    return TwinMessage("bs", str(square), 0, 4, np.zeros(8, np.float32), meta)


def test_ledger_books_slots_and_a_capacity_migration(isolated: NettwinSettings) -> None:
    squares = [5060, 5061]  # neighbours in central Milan: the same nearest site
    attrs = dcs.SquareAttributes.load(SHARED_MILAN, squares)
    lat, lon = float(attrs.bs_lat.mean()), float(attrs.bs_lon.mean())
    sites = [
        {"name": "here", "lat": lat, "lon": lon, "capacity": 55},
        {"name": "away", "lat": lat + 0.05, "lon": lon, "capacity": 1000},
    ]
    edge = EdgeSettings(policy="balanced", sites=tuple(SiteSettings(**s) for s in sites))  # type: ignore[arg-type]
    settings = isolated.model_copy(update={"edge": edge})
    producer = make_producer(settings)
    topic = Topics.from_settings(settings).updates_local
    # hour 0: only 5060 trains (stays near); hour 1: 5061 is heavier and takes the near site's room
    for u in [_update(5060, 0, 10), _update(5060, 1, 10), _update(5061, 1, 50), b"not a twin"]:
        if isinstance(u, bytes):
            producer.send(topic, key=b"x", value=u, partition=0)
        else:
            producer.send(topic, key=u.key, value=u.encode(), partition=0)
    producer.flush()
    producer.close()

    counters = EdgeLedgerService(settings, SHARED_MILAN).run(idle_exit_s=4.0)
    assert counters == {"updates": 3, "slots": 2, "migrations": 1, "bad": 1}

    with InfluxClient(settings.influx) as influx:
        moves = [r for s in influx.query('SELECT * FROM "edge_migration"') for r in s.rows()]
    assert [(m["bs"], m["source"], m["target"]) for m in moves] == [("5060", "here", "away")]
    assert moves[0]["bytes"] == settings.edge.twin_bytes + 10 * settings.edge.sample_bytes

    res = run_cli(settings, "query", "edge", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == 2 * 2 * 3  # slots x sites x kinds
    mig = [r for r in rows if r["kind"] == "migration" and r["site"] == "away" and r["energy"] > 0]
    assert len(mig) == 1 and mig[0]["energy"] == pytest.approx(moves[0]["energy"])
    assert all(r["energy"] > 0 for r in rows if r["kind"] == "compute" and r["site"] == "here")

    # a restarted ledger keeps the committed offsets (no slot booked twice) and its BS-to-site map: 5060,
    # alone again at hour 2, goes back to the near site, a migration only if it remembers being away
    producer = make_producer(settings)
    u = _update(5060, 2, 10)
    producer.send(topic, key=u.key, value=u.encode(), partition=0)
    producer.flush()
    producer.close()
    # (positions from the settings this time: edge.milan_dir)
    from_settings = settings.model_copy(update={"edge": edge.model_copy(update={"milan_dir": SHARED_MILAN})})
    again = EdgeLedgerService(from_settings, None).run(idle_exit_s=4.0)
    assert again == {"updates": 1, "slots": 1, "migrations": 1, "bad": 0}
