"""The edge ledger service against the real broker and InfluxDB: slots booked, migrations recorded, query."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kafka.structs import OffsetAndMetadata, TopicPartition

from ingest.kafka import make_consumer, make_producer
from ingest.settings import EdgeSettings, NettwinSettings, SiteSettings
from ingest.topics import Topics
from tests.conftest import SHARED_MILAN, run_cli, wait_until
from twin_store.adapters.influx import InfluxClient
from twin_store.federation import dcs
from twin_store.federation.models_topic import TwinMessage
from twin_store.services.edge import EdgeLedgerService, ledger_from_settings
from twin_store.services.processes import settings_env, spawn_cli

pytestmark = pytest.mark.integration


def _update(square: int, hour: int, samples: int) -> TwinMessage:
    meta = {"seq": hour, "hour": hour, "n_samples": samples, "loss": 0.1}
    return TwinMessage("bs", str(square), 0, 4, np.zeros(8, np.float32), meta)


def near_and_away(isolated: NettwinSettings) -> NettwinSettings:
    """Sites for squares 5060 and 5061: "here" between them with room for 55 samples a slot, "away" 5 km
    north with room for all (policy balanced: a heavy slot pushes a BS away)."""
    attrs = dcs.SquareAttributes.load(SHARED_MILAN, [5060, 5061])
    lat, lon = float(attrs.bs_lat.mean()), float(attrs.bs_lon.mean())
    sites = (
        SiteSettings(name="here", lat=lat, lon=lon, capacity=55),
        SiteSettings(name="away", lat=lat + 0.05, lon=lon, capacity=1000),
    )
    edge = EdgeSettings(policy="balanced", sites=sites, milan_dir=SHARED_MILAN)
    return isolated.model_copy(update={"edge": edge})


def edge_costs(settings: NettwinSettings) -> dict[tuple[int, str, str], tuple[float, int]]:
    """(time ms, site, kind) -> (energy, bytes) of every edge_cost row."""
    with InfluxClient(settings.influx) as influx:
        rows = [r for s in influx.query('SELECT * FROM "edge_cost"') for r in s.rows()]
    return {(int(r["time"]), r["site"], r["kind"]): (r["energy"], r["bytes"]) for r in rows}


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


def test_sigterm_stops_the_ledger_within_10_s_and_a_restart_books_every_slot_once(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    """``nettwin edge-ledger`` as a process, SIGTERM while updates arrive, then restarted: it stops within 10 s
    with exit code 0, and InfluxDB ends up holding exactly what one uninterrupted ledger books (the open
    slot is re-read, not lost; closed slots are not booked again, so no migration is counted twice)."""
    squares = [5060, 5061]
    settings = near_and_away(isolated)
    hours = 40
    # 5061 is heavy every third hour: it takes the near site's room and 5060 moves away and back
    plan = [
        (hour, square, 50 if square == 5061 and hour % 3 == 0 else 10)
        for hour in range(hours)
        for square in squares
    ]
    topic = Topics.from_settings(settings).updates_local

    def publish_paced(first_hour: int, last_hour: int) -> None:
        producer = make_producer(settings)
        for hour, square, n in plan[2 * first_hour : 2 * last_hour]:
            u = _update(square, hour, n)
            producer.send(topic, key=u.key, value=u.encode(), partition=0)
            if square == squares[-1]:
                producer.flush()
                time.sleep(0.25)
        producer.flush()
        producer.close()

    env = settings_env(settings)
    sender = threading.Thread(target=publish_paced, args=(2, hours))
    first = spawn_cli(["edge-ledger", "--milan-dir", str(SHARED_MILAN)], tmp_path / "ledger.log", env)
    second = None
    try:
        publish_paced(0, 2)  # slot 0 is booked once the ledger runs: then the paced updates start
        wait_until(lambda: edge_costs(settings), 60, "the first slot booked")
        sender.start()
        wait_until(lambda: len({t for t, _, _ in edge_costs(settings)}) >= 8, 60, "8 slots booked")
        assert sender.is_alive(), "the updates ended before the SIGTERM: pace them slower"
        started = time.monotonic()
        first.send_signal(signal.SIGTERM)
        rc = first.wait(30)
        took = time.monotonic() - started
        assert rc == 0 and took < 10, (rc, took, (tmp_path / "ledger.log").read_text()[-3000:])
        second = spawn_cli(["edge-ledger", "--milan-dir", str(SHARED_MILAN)], tmp_path / "ledger.log", env)
        sender.join()
        wait_until(lambda: len({t for t, _, _ in edge_costs(settings)}) >= hours, 60, f"{hours} slots booked")
        time.sleep(1.0)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, (tmp_path / "ledger.log").read_text()[-3000:]
    finally:
        if sender.is_alive():
            sender.join()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    ledger = ledger_from_settings(settings)
    attrs = dcs.SquareAttributes.load(SHARED_MILAN, squares)
    for s, la, lo in zip(squares, attrs.bs_lat.tolist(), attrs.bs_lon.tolist(), strict=True):
        ledger.place(str(s), la, lo)
    expected: dict[tuple[int, str, str], tuple[float, int]] = {}
    moves = 0
    for hour in range(hours):
        slot = ledger.slot(hour, {str(s): n for h, s, n in plan if h == hour})
        moves += len(slot.migrations)
        for site, kind, energy, volume in slot.rows():
            expected[(hour * 3_600_000, site, kind)] = (energy, volume)
    got = edge_costs(settings)
    assert moves >= 10  # the test moves twins: a migration booked twice would show
    assert got.keys() == expected.keys()
    for key, (energy, volume) in expected.items():
        assert got[key][0] == pytest.approx(energy, rel=1e-9, abs=1e-9) and got[key][1] == volume, key
    with InfluxClient(settings.influx) as influx:
        migrations = [r for s in influx.query('SELECT * FROM "edge_migration"') for r in s.rows()]
    assert len(migrations) == moves


def test_a_slot_read_again_after_its_rows_were_written_is_booked_the_same(isolated: NettwinSettings) -> None:
    """A ledger killed after writing a slot's rows but before committing past it reads the slot again on
    restart. The BS-to-site map it restores must be the one from before that slot: restored as of the end,
    the moved twins look as if they never moved, and the slot's migration energy is overwritten with 0."""
    settings = near_and_away(isolated)
    topic = Topics.from_settings(settings).updates_local
    producer = make_producer(settings)
    for u in [_update(5060, 0, 10), _update(5060, 1, 10), _update(5061, 1, 50)]:
        producer.send(topic, key=u.key, value=u.encode(), partition=0)
    producer.flush()
    producer.close()

    assert EdgeLedgerService(settings, None).run(idle_exit_s=4.0)["migrations"] == 1
    before = edge_costs(settings)
    assert before[(3_600_000, "away", "migration")][0] > 0
    # the crash: the rows are written, the offsets not committed past them
    group = make_consumer(settings, group_id=f"{settings.kafka.topic_prefix}nettwin-edge-ledger")
    group.assign([TopicPartition(topic, 0)])
    group.commit({TopicPartition(topic, 0): OffsetAndMetadata(0, "", -1)})
    group.close(autocommit=False)
    assert EdgeLedgerService(settings, None).run(idle_exit_s=4.0)["slots"] == 2
    assert edge_costs(settings) == before


def test_updates_of_a_slot_arriving_after_a_pause_add_to_its_rows(isolated: NettwinSettings) -> None:
    """Live, the BSs of one hour do not all report within the 2 s pause that closes a slot: a slot booked on
    a pause and then given more updates books them on top of what it booked, instead of rewriting its rows
    with the late updates alone."""
    settings = near_and_away(isolated)
    topic = Topics.from_settings(settings).updates_local
    service = EdgeLedgerService(settings, None)
    runner = threading.Thread(target=service.run, kwargs={"idle_exit_s": 30.0})
    runner.start()
    try:
        for part in ([_update(5060, 0, 10)], [_update(5061, 0, 20)]):
            producer = make_producer(settings)
            for u in part:
                producer.send(topic, key=u.key, value=u.encode(), partition=0)
            producer.flush()
            producer.close()
            before = service.counters["slots"]
            wait_until(lambda b=before: service.counters["slots"] > b, 30, "the slot booked on the pause")
    finally:
        service.stopping = True
        runner.join(30)
    ledger = ledger_from_settings(settings)
    attrs = dcs.SquareAttributes.load(SHARED_MILAN, [5060, 5061])
    for s, la, lo in zip((5060, 5061), attrs.bs_lat.tolist(), attrs.bs_lon.tolist(), strict=True):
        ledger.place(str(s), la, lo)
    expected: dict[tuple[int, str, str], tuple[float, int]] = {}
    for part in ({"5060": 10}, {"5061": 20}):  # booked as they came: two bookings of slot 0
        for site, kind, energy, volume in ledger.slot(0, part).rows():
            e, b = expected.get((0, site, kind), (0.0, 0))
            expected[(0, site, kind)] = (e + energy, b + volume)
    got = edge_costs(settings)
    assert got.keys() == expected.keys()
    for key, (energy, volume) in expected.items():
        assert got[key][0] == pytest.approx(energy, rel=1e-9, abs=1e-9) and got[key][1] == volume, key
