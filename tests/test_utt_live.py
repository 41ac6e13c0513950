"""Live multimodal windows: the pure windower (order, lateness, a missing modality, the least-squares fix
with and without site metadata) and the Faust agent on the real broker (following ``sites.ftm``), all
checked against the offline ``build_windows`` on the same rows, fix channel included."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from numpy.testing import assert_allclose
from typer.testing import CliRunner

from ingest.kafka import make_consumer
from ingest.readers.ftm import SiteGeometry, recover_ap_positions, site_files_near, trilaterate
from ingest.settings import NettwinSettings
from ingest.topics import Topics
from producers.ftm_replay import KINDS, _events, _record, load_walks
from stream_processors.multimodal_live import LiveWindowConfig, MultimodalWindower
from twin_store.federation.utt_locator import Locator, build_merged
from twin_store.federation.utt_positioning import TASK_FIELDS, tracks_of
from twin_store.models.ftm_features import ALL_GROUPS
from twin_store.models.ftm_filter import FilterParams, RangeFilter, kalman_track
from twin_store.models.multimodal import build_windows, grid_ends, hold
from twin_store.models.utt import Scaler

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "ftm_imu" / "raw"
needs_data = pytest.mark.skipif(not RAW.is_dir(), reason="../shared/data/ftm_imu/raw is absent")
WALK = "CarPark__5__524"
KIND = {"ftm": "ftm", "imu": "imu", "vision_sim": "vision"}


def _stream(seconds: float) -> tuple[Any, Any, list[tuple[str, dict[str, Any]]]]:
    walks, vision, _ = load_walks([RAW / f"{WALK}.csv"], seed=1)
    w = walks[0]
    recs = [
        (KIND[KINDS[kind]], _record(kind, w, i, vision))
        for t, kind, _wi, i in _events(walks, vision)
        if t < seconds * 1000
    ]
    return w, vision[w.name], recs


def _site(walk: Any) -> SiteGeometry:
    """What ``replay ftm`` publishes for this walk alone: recovered, mirror resolved by the site files."""
    return recover_ap_positions([walk], site_files_near([walk.source])[walk.scene])


def _check_against_offline(
    windows: list[dict[str, Any]], walk: Any, vision: Any, vision_on: bool, geo: SiteGeometry | None = None
) -> None:
    ends = np.array([w["end_ms"] for w in windows])
    ap_ids = list(walk.ap_ids)
    fix = trilaterate(walk, geo) if geo is not None else None
    off = build_windows(walk, ap_ids, ends, vision if vision_on else None, fix)
    assert all(w["mask"]["fix"] for w in windows) == (geo is not None)  # this walk is ranged from row 1
    if geo is not None:  # the same least-squares fix; RTT goes out at 4 dp, hence the tolerance
        assert_allclose(np.array([w["fix"] for w in windows]), off.ftm[:, :, -2:], atol=1e-3)
    for i, w in enumerate(windows):
        ranged = [k for k, _a in enumerate(ap_ids) if off.ftm[i, :, 4 * k + 3].any()]
        assert w["ap_ids"] == [ap_ids[k] for k in ranged]  # the APs ranged in the window
        cols = [4 * k + c for k in ranged for c in range(4)]
        assert [w["mask"][m] for m in ("ftm", "imu", "vision")] == off.mask[i].tolist()
        assert_allclose(np.array(w["ftm"]), off.ftm[i][:, cols], atol=6e-5)  # sent at 4 dp
        assert_allclose(np.array(w["imu"]), off.imu[i], atol=1e-5)
        assert_allclose(np.array(w["vision"])[:, :5], off.vision[i, :, :5], atol=1e-2)  # u, v, box: 2 dp
        assert_allclose(np.array(w["vision"])[:, 5:], off.vision[i, :, 5:], atol=1e-3)


@needs_data
def test_shuffled_within_lateness_gives_the_offline_windows() -> None:
    walk, vision, recs = _stream(30.0)
    rng = random.Random(0)
    shuffled = sorted(recs, key=lambda r: r[1]["t_ms"] + rng.uniform(0, 800))  # out of order by < 1 s
    assert [r[1]["t_ms"] for r in shuffled] != sorted(r[1]["t_ms"] for r in shuffled)
    out: dict[str, list[dict[str, Any]]] = {}
    geo = _site(walk)
    for name, seq in (("ordered", recs), ("shuffled", shuffled)):
        win = MultimodalWindower(LiveWindowConfig(lateness_ms=1000.0), sites={"CarPark": geo})
        got: list[dict[str, Any]] = []
        for kind, rec in seq:
            windows, late = win.on_record(f"M2/{WALK}", kind, rec, now=0.0)
            assert not late
            got.extend(windows)
        got.extend(win.flush(now=10.0))  # every modality idle: the rest is emitted
        out[name] = got
    assert out["ordered"] == out["shuffled"]
    ends = np.array([w["end_ms"] for w in out["ordered"]])
    assert_allclose(ends, grid_ends(walk, 20, 5)[: len(ends)])  # the offline grid
    assert ends[-1] == pytest.approx(grid_ends(walk, 20, 5)[grid_ends(walk, 20, 5) < 30_000][-1])
    assert all(all(w["mask"].values()) for w in out["ordered"][:10])
    _check_against_offline(out["ordered"], walk, vision, vision_on=True, geo=geo)


@needs_data
def test_a_missing_modality_waits_for_the_grace_period_then_is_masked_and_late_rows_are_refused() -> None:
    walk, vision, recs = _stream(12.0)
    no_vision = [r for r in recs if r[0] != "vision"]
    sites: dict[str, SiteGeometry] = {}  # the scene's site is not known (yet)
    win = MultimodalWindower(LiveWindowConfig(grace_s=2.0, idle_s=5.0), sites=sites)
    got: list[dict[str, Any]] = []
    for kind, rec in no_vision:
        got.extend(win.on_record("M2/w", kind, rec, now=1.0)[0])
    assert got == []  # vision, and the site, may still show up
    got = win.flush(now=3.5)  # grace over; FTM and IMU still active: up to their watermark - lateness
    assert got and max(w["end_ms"] for w in got) <= 12_000 - 1000
    assert not any(w["mask"]["vision"] for w in got) and all(w["mask"]["imu"] for w in got)
    _check_against_offline(got, walk, vision, vision_on=False)  # no site: the fix is masked out
    assert all(w["fix"] == [[0.0, 0.0]] * 20 for w in got)
    late_rec = dict(no_vision[5][1])
    windows, late = win.on_record("M2/w", no_vision[5][0], late_rec, now=3.6)
    assert late and windows == [] and win.keys["M2/w"].late == 1
    sites["CarPark"] = _site(walk)  # the site arrives: the next windows carry the fix
    more = win.flush(now=20.0)  # everything idle: emitted up to the newest reading
    assert more and more[0]["end_ms"] == got[-1]["end_ms"] + 500
    assert all(w["mask"]["fix"] for w in more)
    off = trilaterate(walk, sites["CarPark"])[walk.t_ms <= more[-1]["end_ms"]][-1]
    assert_allclose(more[-1]["fix"][-1], off, atol=0.05)  # started from the centroid, then converged
    assert more[-1]["end_ms"] <= no_vision[-1][1]["t_ms"] < more[-1]["end_ms"] + 500


def _untrained_locator() -> Locator:
    """A positioning twin with random weights and identity scalers: what the live path does with it must
    equal the offline path on the same rows, trained or not."""
    in_channels, lengths = (
        {"ftm": 13, "imu": 13, "vision": 1},
        {"position": 20, "trajectory": 10, "tracking": 20},
    )
    twins = build_merged(["gating", "concatenation"], in_channels, lengths, 32, seed=3)  # an ensemble
    ident = {k: Scaler(np.zeros(c), np.ones(c)) for k, c in (("ftm", 13), ("imu", 13), ("position", 2))}
    arch = {
        "fusers": ["gating", "concatenation"],
        "in_channels": in_channels,
        "lengths": lengths,
        "d": 32,
        "seed": 3,
    }
    return Locator(twins, ident, FilterParams(bias_m=0.9, range_sigma_m=0.75), ALL_GROUPS, 0.5, arch)


@needs_data
def test_the_live_filter_is_causal_and_the_live_twin_positions_like_the_offline_one(tmp_path: Path) -> None:
    walk, vision, recs = _stream(40.0)
    geo = _site(walk)
    loc = _untrained_locator()
    loc.save(tmp_path)
    loc = Locator.load(tmp_path)  # what the worker does
    win = MultimodalWindower(LiveWindowConfig(lateness_ms=1000.0), sites={"CarPark": geo}, locator=loc)
    got: list[dict[str, Any]] = []
    for kind, rec in recs:
        got.extend(win.on_record(f"M2/{WALK}", kind, rec, now=0.0)[0])
    got.extend(win.flush(now=10.0))
    assert len(got) > 60 and all(w["mask"]["kf"] and w["position"] is not None for w in got)
    ends = np.array([w["end_ms"] for w in got])
    rows = np.searchsorted(walk.t_ms, ends, side="right") - 1  # the last row at or before each window's end
    for i, end in zip(rows[::15], ends[::15], strict=True):
        # the filter over the rows up to the window's end only: no later row may change the live value
        upto = walk.t_ms <= end
        cut = replace(walk, t_ms=walk.t_ms[upto], rtt=walk.rtt[upto], std=walk.std[upto], imu=walk.imu[upto])
        causal = kalman_track(cut, geo, loc.filter)[-1]
        live = next(w for w in got if w["end_ms"] == end)
        assert_allclose(live["kf"][-1], causal, atol=2e-3)  # RTT and std go out at 4 dp
        assert_allclose([live["position"]["kf_x"], live["position"]["kf_y"]], causal, atol=2e-3)
        assert i == np.flatnonzero(upto)[-1]
    # the offline features of the same rows, held on the same grid, give the same positions
    tr = tracks_of(walk, geo, loc.filter)
    tq = ends[:, None] + (np.arange(20) - 19) * 100.0
    feats, ok = hold(walk.t_ms, tr.feats, tq, 1000.0)
    assert_allclose(np.array([w["kf"] for w in got]), feats[:, :, 2:4], atol=2e-3)
    assert_allclose(np.array([w["quality"] for w in got]), feats[:, :, 4:], atol=5e-2)  # rss mean: 4 dp in
    off = build_windows(walk, list(walk.ap_ids), ends, vision, None)
    pos, _ = loc.locate(feats, ok, off.imu, off.mask)
    live_pos = np.array([[w["position"]["x"], w["position"]["y"]] for w in got])
    assert_allclose(live_pos, pos, atol=2e-2)
    assert np.abs(live_pos - feats[:, -1, 2:4]).max() > 1e-3  # the twin moved the filter's position
    assert TASK_FIELDS["position"] == "pos"


def test_without_a_stored_twin_windows_carry_the_filter_but_no_position() -> None:
    """No locator: the filter still runs (default constants) and ``position`` is None."""
    from ingest.readers.ftm import SiteGeometry as Geo

    geo = Geo("S", ["A", "B", "C"], np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), {}, {}, "test")
    win = MultimodalWindower(LiveWindowConfig(), sites={"S": geo})
    got: list[dict[str, Any]] = []
    for k in range(60):
        t = 1000.0 + 100.0 * k
        p = np.array([3.0 + 0.05 * k, 4.0])
        aps = {
            a: [round(float(np.linalg.norm(p - geo.positions[j])), 4), 0.1, -60.0]
            for j, a in enumerate("ABC")
        }
        rec_ftm = {"t_ms": t, "scene": "S", "aps": aps}
        rec_imu = {"t_ms": t, "acc": [0.0, 0.0, 9.81], "gyro": [0, 0, 0], "mag": [0, 0, 0],
                   "azimuth": 0.0, "pitch": 0.0, "roll": 0.0}  # fmt: skip
        got.extend(win.on_record("d/w", "ftm", rec_ftm, now=0.0)[0])
        got.extend(win.on_record("d/w", "imu", rec_imu, now=0.0)[0])
    got.extend(win.flush(now=10.0))
    assert got and all(w["position"] is None for w in got)
    assert all(w["mask"]["kf"] for w in got)
    assert_allclose(got[-1]["kf"][-1], [3.0 + 0.05 * 59, 4.0], atol=0.5)  # standing still per the IMU: lags


def _synthetic_rows(
    geo: SiteGeometry, n: int, three_aps: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """A device walking along x past three APs, ranged by all three every 100 ms (by two only after the
    first ``three_aps`` rows, if given), with its IMU rows."""
    out: list[tuple[str, dict[str, Any]]] = []
    for k in range(n):
        t = 1000.0 + 100.0 * k
        p = np.array([3.0 + 0.05 * k, 4.0])
        aps = {
            a: [round(float(np.linalg.norm(p - geo.positions[j])) + 0.3 * math.sin(k), 4), 0.1, -60.0]
            for j, a in enumerate(geo.ap_ids)
            if three_aps is None or k < three_aps or j < 2
        }
        acc = [0.0, 0.3 * math.sin(k / 2), 9.81]  # walking: |acc| varies
        out.append(("ftm", {"t_ms": t, "scene": "S", "aps": aps}))
        out.append(("imu", {"t_ms": t, "acc": acc, "gyro": [0, 0, 0], "mag": [0, 0, 0],
                            "azimuth": 0.0, "pitch": 0.0, "roll": 0.0}))  # fmt: skip
    return out


def _square_site() -> SiteGeometry:
    return SiteGeometry(
        "S", ["A", "B", "C"], np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), {}, {}, "test"
    )


def test_a_twin_stored_after_a_key_started_positions_that_key_from_its_next_window() -> None:
    """The key's filter started with the default constants; the twin's differ. Once the twin is there, the
    key's filter restarts with the twin's constants over the key's held final rows, so the next window has a
    position, and its filter value is causal: the filter over rows from the restart's first row up to the
    window's end, none after."""
    geo = _square_site()
    loc = _untrained_locator()
    assert loc.filter != FilterParams()  # the key's filter runs other constants than the twin's
    rows = _synthetic_rows(geo, 120)
    win = MultimodalWindower(LiveWindowConfig(), sites={"S": geo})
    before: list[dict[str, Any]] = []
    for kind, rec in rows[:120]:  # 6 s of the walk, no twin yet
        before.extend(win.on_record("d/w", kind, rec, now=rec["t_ms"] / 1000)[0])  # replayed in real time
    assert before and all(w["position"] is None and w["mask"]["kf"] for w in before)
    win.locator = loc  # the worker's timer does this once positioning.json appears
    after: list[dict[str, Any]] = []
    for kind, rec in rows[120:]:
        after.extend(win.on_record("d/w", kind, rec, now=rec["t_ms"] / 1000)[0])
    after.extend(win.flush(now=30.0))
    st = win.keys["d/w"]
    assert after and all(w["position"] is not None for w in after)  # from the first window on
    assert st.restarts == 1 and st.filter is not None and st.filter.p == loc.filter
    assert after[0]["end_ms"] == before[-1]["end_ms"] + 500
    assert {w["position"]["twin"] for w in after} == {loc.twin_id}
    assert st.filter_from <= after[0]["end_ms"] - 19 * 100.0  # the restarted filter covers the window
    ftm = [r for k, r in rows if k == "ftm"]
    imu = {r["t_ms"]: float(np.linalg.norm(r["acc"])) for k, r in rows if k == "imu"}
    for w in after[::3]:
        filt = RangeFilter(geo, None, loc.filter)  # the restart's rows up to the window's end, no later
        for r in ftm:
            if st.filter_from <= r["t_ms"] <= w["end_ms"]:
                kf = filt.step_ranged(
                    r["t_ms"], {a: (v[0], v[1]) for a, v in r["aps"].items()}, imu[r["t_ms"]]
                )
        assert_allclose(w["kf"][-1], kf, atol=1e-6)
        assert_allclose([w["position"]["kf_x"], w["position"]["kf_y"]], kf, atol=1e-4)
    # a twin retrained with the same constants does not restart the filter again
    win.locator = _untrained_locator()
    win.on_record("d/w", "ftm", {**rows[-2][1], "t_ms": 30_000.0}, now=31.0)
    win.flush(now=40.0)
    assert st.restarts == 1
    # a site withdrawn from sites.ftm: the running filter goes on, whatever the twin's constants
    del win.sites["S"]  # type: ignore[index]
    win.locator = replace(loc, filter=FilterParams(bias_m=0.1))
    win.on_record("d/w", "ftm", {**rows[-2][1], "t_ms": 31_000.0}, now=41.0)
    assert win.flush(now=60.0) and st.restarts == 1


def test_a_restart_over_held_rows_never_ranged_by_three_aps_goes_on_from_the_running_filter() -> None:
    """Sparse ranging: after the first second only two APs range the device, so the held rows cannot start a
    filter. The restarted filter takes the running one's state and the key still gets positions."""
    geo = _square_site()
    loc = _untrained_locator()
    rows = _synthetic_rows(geo, 120, three_aps=10)
    win = MultimodalWindower(LiveWindowConfig(), sites={"S": geo})
    before: list[dict[str, Any]] = []
    for kind, rec in rows[:120]:
        before.extend(win.on_record("d/w", kind, rec, now=rec["t_ms"] / 1000)[0])
    assert before and all(w["mask"]["kf"] for w in before)
    st = win.keys["d/w"]
    running = st.filter
    assert running is not None
    win.locator = loc
    after: list[dict[str, Any]] = []
    for kind, rec in rows[120:]:
        after.extend(win.on_record("d/w", kind, rec, now=rec["t_ms"] / 1000)[0])
    after.extend(win.flush(now=30.0))
    assert st.restarts == 1 and st.filter is not running and st.filter is not None
    assert st.filter.p == loc.filter and st.filter.started
    assert after and all(w["mask"]["kf"] and w["position"] is not None for w in after)
    assert np.linalg.norm(np.array(after[0]["kf"][-1]) - before[-1]["kf"][-1]) < 1.0  # no jump to a fix


def _read_all(settings: NettwinSettings, topic: str, expected: int, timeout: float) -> list[Any]:
    consumer = make_consumer(settings, topic, group_id=None)
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(out) < expected:
            for msgs in consumer.poll(timeout_ms=300).values():
                out.extend(msgs)
        for msgs in consumer.poll(timeout_ms=500).values():  # a duplicate or extra window would show here
            out.extend(msgs)
    finally:
        consumer.close()
    return out


@pytest.mark.integration
@needs_data
def test_worker_publishes_aligned_multimodal_windows_of_a_replayed_walk(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    from nettwin.cli.replay_ftm import ftm
    from tests.conftest import Pipeline

    settings = isolated
    pipeline = Pipeline(settings, tmp_path)  # the worker only: no store needed
    pipeline.start("worker")
    try:
        _replay_and_check(settings, pipeline, ftm)
    finally:
        pipeline.stop("worker", kill=True)  # its never-acknowledged topics make a clean stop wait ~20 s


def _replay_and_check(settings: NettwinSettings, pipeline: Any, ftm: Any) -> None:
    app = typer.Typer()
    app.command()(ftm)
    res = CliRunner().invoke(
        app, [str(RAW / f"{WALK}.csv"), "--max", "--limit", "900", "--json"], obj=settings
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["total"] == 900 and summary["sites_undetermined"] == {}
    walks, vision, _ = load_walks([RAW / f"{WALK}.csv"], seed=1)
    geo = _site(walks[0])
    assert summary["sites"]["CarPark"]["mirror_resolved"] == geo.ap_ids  # the site files next to the walk
    assert_allclose(summary["sites"]["CarPark"]["positions"], geo.positions, rtol=0, atol=0)
    sent = [t for t, *_ in _events(walks, vision)][:900]
    grid = grid_ends(walks[0], 20, 5)
    topics = Topics.from_settings(settings)
    msgs = _read_all(settings, topics.features_multimodal, len(grid[grid <= sent[-1]]), timeout=90.0)
    pipeline.assert_running()
    windows = sorted((json.loads(m.value) for m in msgs), key=lambda w: w["end_ms"])
    assert windows, pipeline.logs()
    assert {m.key for m in msgs} == {f"M2/{WALK}".encode()}
    ends = np.array([w["end_ms"] for w in windows])
    assert len(set(ends)) == len(ends)  # each window once
    assert_allclose(ends, grid[grid <= sent[-1]])  # every grid window up to the newest record, no gap
    full = [w for w in windows if w["end_ms"] < sent[-1]]  # rows up to these ends were all sent
    assert all(w["mask"]["ftm"] and w["mask"]["imu"] for w in full)
    assert sum(w["mask"]["vision"] for w in full) > len(full) // 2
    _check_against_offline(full, walks[0], vision[walks[0].name], vision_on=True, geo=geo)
    (site,) = _read_all(settings, topics.sites_ftm, 1, timeout=5.0)
    assert site.key == b"CarPark" and json.loads(site.value) == summary["sites"]["CarPark"]


@pytest.mark.integration
@needs_data
def test_worker_positions_live_windows_with_the_twin_nettwin_twin_position_stored(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    """``nettwin twin position`` trains and stores the generalising merged twin (a short run); the worker's
    multimodal agent loads it, runs the range Kalman filter row by row and adds the twin's position to every
    window. The filter value of each window is the causal one: the offline filter over the rows up to that
    window's end only. The store writes every window's position to InfluxDB (``position``), where
    ``nettwin query positions`` finds exactly what the windows carried; a bad window is a dead letter."""
    from ingest.deadletter import DeadLetter
    from ingest.kafka import make_producer
    from nettwin.cli.replay_ftm import ftm
    from tests.conftest import Pipeline, run_cli, wait_until
    from twin_store.adapters.influx import InfluxClient

    settings = isolated
    res = run_cli(
        settings, "twin", "position", "--data", str(RAW), "--rounds", "1", "--augment", "0",
        "--fusers", "gating", "--json", timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    assert Path(record["stored"]).is_file() and record["metrics"]["test_walks"]
    loc = Locator.load(Path(settings.state_dir) / "utt")
    topics = Topics.from_settings(settings)
    producer = make_producer(settings)
    producer.send(topics.features_multimodal, key=b"M9/bad", value=b'{"key": "M9/bad", "end_ms": "soon"}')
    producer.flush()
    producer.close()
    pipeline = Pipeline(settings, tmp_path)
    pipeline.start("worker")
    pipeline.start("store")
    try:
        app = typer.Typer()
        app.command()(ftm)
        out = CliRunner().invoke(
            app, [str(RAW / f"{WALK}.csv"), "--max", "--limit", "900", "--json"], obj=settings
        )
        assert out.exit_code == 0, out.output
        walks, vision, _ = load_walks([RAW / f"{WALK}.csv"], seed=1)
        walk = walks[0]
        sent = [t for t, *_ in _events(walks, vision)][:900]
        grid = grid_ends(walk, 20, 5)
        msgs = _read_all(settings, topics.features_multimodal, len(grid[grid <= sent[-1]]) + 1, 90.0)
        msgs = [m for m in msgs if m.key != b"M9/bad"]
        with InfluxClient(settings.influx) as influx:
            q = 'SELECT count("kf_x") FROM "position"'
            wait_until(
                lambda: sum(r["count"] for s in influx.query(q) for r in s.rows()) >= len(msgs),
                60.0,
                "every window's position in InfluxDB",
            )
        pipeline.assert_running()
    finally:
        pipeline.stop("worker", kill=True)
        pipeline.stop("store")
    windows = sorted((json.loads(m.value) for m in msgs), key=lambda w: w["end_ms"])
    res = run_cli(settings, "query", "positions", "--entity", f"M2/{WALK}", "--json")
    assert res.returncode == 0, res.stderr
    stored = {r["end_ms"]: r for r in json.loads(res.stdout)}
    assert sorted(stored) == [round(w["end_ms"]) for w in windows]  # each window once, at its end (ms)
    for w in windows:
        row, pos = stored[round(w["end_ms"])], w["position"]
        assert (row["entity"], row["device"], row["walk"]) == (f"M2/{WALK}", "M2", WALK)
        assert {k: row[k] for k in ("x", "y", "kf_x", "kf_y", "alpha")} == {
            k: pos[k] for k in ("x", "y", "kf_x", "kf_y", "alpha")
        }  # exactly: the store writes shortest round-trip floats
        assert (
            (row["twin"], row["twin_version"]) == (pos["twin"], pos["version"]) == (loc.twin_id, loc.version)
        )
        assert [row["fix_x"], row["fix_y"]] == w["fix"][-1]
    letters = [
        DeadLetter.from_kafka(m.value, m.headers) for m in _read_all(settings, topics.deadletter, 1, 10.0)
    ]
    (bad,) = [d for d in letters if d.stage == "store"]
    assert (
        "end_ms must be a finite number" in bad.reason
        and bad.original == b'{"key": "M9/bad", "end_ms": "soon"}'
    )
    assert bad.position.startswith(f"{topics.features_multimodal}[")
    assert windows, pipeline.logs()
    placed = [w for w in windows if w["position"] is not None]
    assert len(placed) == len(windows) > 50  # CarPark__5__524 is ranged from its first row
    assert {w["position"]["twin"] for w in placed} == {loc.twin_id}
    pos = np.array([[w["position"]["x"], w["position"]["y"]] for w in placed])
    assert np.isfinite(pos).all()
    assert walk.gt is not None
    truth = walk.gt[np.searchsorted(walk.t_ms, [w["end_ms"] for w in placed], side="right") - 1]
    assert np.median(np.linalg.norm(pos - truth, axis=1)) < 3.0  # a position on the floor, near the walk
    geo = _site(walk)
    for w in placed[::20]:
        upto = walk.t_ms <= w["end_ms"]
        cut = replace(walk, t_ms=walk.t_ms[upto], rtt=walk.rtt[upto], std=walk.std[upto], imu=walk.imu[upto])
        causal = kalman_track(cut, geo, loc.filter)[-1]
        assert_allclose([w["position"]["kf_x"], w["position"]["kf_y"]], causal, atol=2e-3)


@pytest.mark.integration
@needs_data
def test_a_twin_stored_while_a_walk_streams_positions_that_walk_and_influxdb_has_the_filter_before_it(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    """Worker and store run, a walk streams at twice real time with no twin stored: its windows carry the
    filter and no position, and InfluxDB has the filter's position. A twin is stored mid-walk: the same key
    (not a new one) gets the twin's positions within the worker's look at the file (5 s) and a window, and
    every window after that has one."""
    import subprocess
    import sys

    from tests.conftest import Pipeline, wait_until
    from twin_store.adapters.influx import InfluxClient
    from twin_store.services.processes import settings_env

    settings = isolated
    pipeline = Pipeline(settings, tmp_path)
    pipeline.start("worker")
    pipeline.start("store")
    replay = subprocess.Popen(
        [sys.executable, "-m", "nettwin.cli.main", "replay", "ftm", str(RAW / f"{WALK}.csv"),
         "--speed", "2", "--limit", "1200", "--json"],
        env=settings_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        with InfluxClient(settings.influx) as influx:

            def count(field: str) -> int:
                q = f'SELECT count("{field}") FROM "position"'
                return sum(r["count"] for s in influx.query(q) for r in s.rows())

            wait_until(lambda: count("kf_x") >= 8, 60.0, "the filter's positions without a twin")
            assert count("x") == 0
            _untrained_locator().save(Path(settings.state_dir) / "utt")  # what `nettwin twin position` stores
            last = influx.query('SELECT last("kf_x") FROM "position"')
            stored_at = max(r["time"] for s in last for r in s.rows())  # the newest window in InfluxDB then
            _out, err = replay.communicate(timeout=90)
            assert replay.returncode == 0, err
            walks, vision, _ = load_walks([RAW / f"{WALK}.csv"], seed=1)
            sent = [t for t, *_ in _events(walks, vision)][:1200]
            grid = grid_ends(walks[0], 20, 5)
            expected = len(grid[grid <= sent[-1]])
            wait_until(lambda: count("kf_x") >= expected, 60.0, "every window's position in InfluxDB")
        pipeline.assert_running()
    finally:
        if replay.poll() is None:
            replay.kill()
        pipeline.stop("worker", kill=True)
        pipeline.stop("store")
    res = run_cli_json(settings, "query", "positions", "--entity", f"M2/{WALK}", "--json")
    assert len(res) == expected and {r["entity"] for r in res} == {f"M2/{WALK}"}  # one key throughout
    placed = [i for i, r in enumerate(res) if "x" in r]
    assert placed and placed == list(range(placed[0], len(res)))  # from the first positioned window on
    assert 0 < placed[0] < len(res) - 10
    assert all("kf_x" in r and "twin" not in r for r in res[: placed[0]])  # the filter alone before the twin
    # twice real time: the worker looks at the file every 5 s (10 s of walk), loads the twin (torch) and
    # releases a window 1 s of lateness after its end; the store writes it. Generous on shared cores.
    delay = res[placed[0]]["end_ms"] - stored_at
    print(f"first positioned window ends {delay} ms of walk after the twin was stored")
    assert 0 < delay <= 20_000


def run_cli_json(settings: NettwinSettings, *args: str) -> Any:
    from tests.conftest import run_cli

    res = run_cli(settings, *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)
