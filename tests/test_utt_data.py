"""FTM/IMU readers, AP recovery, the SIMULATED pinhole camera, multimodal windows and the UTT fusers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from ingest.errors import InputError
from ingest.readers.ftm import discover, read_site_file, read_walk, recover_ap_positions, trilaterate
from ingest.readers.simulated_vision import PinholeCamera, VisionNoise, camera_for_scene, simulate_detections
from twin_store.federation.utt_training import FedConfig, Upload, fed_train
from twin_store.models.multimodal import build_windows, grid_ends
from twin_store.models.utt import (
    FUSERS,
    UNIFIED_DIRECTIONS,
    Client,
    UnifiedTwin,
    find_direction,
    make_fuser,
    merge,
    new_twin,
    nmse,
    split,
    transfer,
)
from twin_store.services.twin import update_lines

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "ftm_imu" / "raw"
needs_data = pytest.mark.skipif(not RAW.is_dir(), reason="../shared/data/ftm_imu/raw is absent")
CARPARK = ["CarPark__5__513", "CarPark__5__524", "CarPark__6__613", "CarPark__6__624"]


@needs_data
def test_per_ap_layout_reads_ground_truth_true_distance_and_absent_aps() -> None:
    w = read_walk(RAW / "CarPark__5__513.csv")
    assert (w.layout, w.scene, w.device) == ("per_ap", "CarPark", "M1")
    assert w.ap_ids == ["AP1", "AP2", "AP3", "AP4", "AP5", "AP6"]
    assert len(w) == 1281 and w.gt is not None and w.true_dist is not None
    assert_allclose(w.gt[0], [22.995, 11.15])
    assert_allclose(w.rtt[0], [12.75515098, 0, 0, 0, 13.06481443, 25.94037249])
    assert not w.present[0, 1] and w.present[0, 0]
    assert_allclose(w.imu[0, :3], [-0.35353956, 0.38703907, 9.87159])
    assert w.t_raw[1] == "275.696955" and np.all(np.diff(w.t_ms) >= 0)


@needs_data
def test_phone_log_layout_keys_aps_by_mac_and_has_no_ground_truth() -> None:
    w = read_walk(RAW / "CarPark__5__13_17_06_22.csv")
    assert w.layout == "phone_log" and w.gt is None and w.true_dist is None
    assert "14:22:3b:2a:86:f5" in w.ap_ids
    k = w.ap_ids.index("14:22:3b:2a:86:f5")
    assert w.rtt[0, k] == pytest.approx(13.074) and w.std[0, k] == pytest.approx(0.093)
    assert w.t_ms[0] == pytest.approx(83979.713314)
    office = read_walk(RAW / "Office__office_different_AP_positions__position1__circle1.csv")
    assert office.scene == "Office" and len(office.ap_ids) >= 7 and len(office) == 4117


def test_xy_columns_layout_and_a_bad_row(tmp_path: Path) -> None:
    header = ["Time Stamp (ms)"] + [
        f"AP{k} {f}" for k in (1, 2) for f in ("RTT Distance (m)", "RTT std (m)", "RSS (dBm)")
    ]
    header += [
        "AccX",
        "AccY",
        "AccZ",
        "GyroX",
        "GyroY",
        "GyroZ",
        "MagX",
        "MagY",
        "MagZ",
        "Azimuth",
        "Pitch",
        "Roll",
    ]
    header += ["true_x", "true_y"]
    rows = [
        ["0", "3.0", "0.1", "-50", "0", "0", "0", *["0.5"] * 12, "1.0", "2.0"],
        ["100", "oops", "0.1", "-50", "4.0", "0.2", "-60", *["0.5"] * 12, "1.5", "2.0"],
        ["200", "3.1", "0.1", "-51", "4.1", "0.2", "-61", *["0.5"] * 12, "2.0", "2.0"],
    ]
    p = tmp_path / "Lab__walk1.csv"
    with open(p, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    w = read_walk(p)
    assert w.scene == "Lab" and w.true_dist is None and w.gt is not None
    assert_allclose(w.gt, [[1.0, 2.0], [2.0, 2.0]])
    assert [b[0] for b in w.bad_rows] == [3] and "oops" in w.bad_rows[0][1]
    assert_allclose(w.rtt[:, 1], [0.0, 4.1])


def test_unreadable_files_raise_one_line_input_errors(tmp_path: Path) -> None:
    bad = tmp_path / "x.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="not an FTM/IMU walk file"):
        read_walk(bad)
    peer = tmp_path / "p.csv"
    peer.write_text("Time Stamp (ms),M1-M2 RTT Distance (m),RTT std (m),RSS (dBm)\n0,1,0,-70\n")
    with pytest.raises(InputError, match="phone-to-phone"):
        read_walk(peer)
    with pytest.raises(InputError, match="no such file"):
        read_walk(tmp_path / "missing.csv")
    only_bad = tmp_path / "S__w.csv"
    only_bad.write_text("T Time Stamp (ms),AP1 RTT Distance (m),AccX\nabc,1,2\n")
    with pytest.raises(InputError, match="IMU columns missing"):
        read_walk(only_bad)
    with pytest.raises(InputError, match="no FTM/IMU walk file"):
        discover([tmp_path / "x.csv"])


@needs_data
def test_ap_recovery_on_real_walks_has_small_residual_and_resolves_the_mirror() -> None:
    walks = [read_walk(RAW / f"{n}.csv") for n in CARPARK]
    found = discover([RAW])
    geo = recover_ap_positions(walks, found.site_files["CarPark"])
    assert geo.ambiguous == []
    assert max(geo.residual_m.values()) < 0.01
    site = read_site_file(RAW / "CarPark__AP_idx_CarPark.csv")
    for ap in ("AP1", "AP4", "AP5", "AP6"):
        assert_allclose(geo.position(ap), site[ap], atol=0.01)
    # AP2 and AP3: the data's true distances put them 2.35 m from the site file's position; reported, not hidden
    assert geo.site_check_m["AP2"] == pytest.approx(2.35, abs=0.01)
    one = recover_ap_positions(walks[:1])  # one straight walk: every AP is flagged as mirror-ambiguous
    assert set(one.ambiguous) == set(one.ap_ids)
    wide = read_site_file(RAW / "CarPark__AP_idx.csv")
    assert wide["AP1"] == (30.84, 6.75) and wide["C"] == (-4.42, 4.55)


@needs_data
def test_a_site_file_resolves_one_walks_mirror_and_the_site_record_round_trips() -> None:
    from ingest.readers.ftm import recover_sites, site_files_near, site_from_message, site_message

    walks = [read_walk(RAW / f"{n}.csv") for n in CARPARK]
    near = site_files_near([RAW / "CarPark__5__524.csv"])
    assert [f.name for f in near["CarPark"]] == ["CarPark__AP_idx.csv", "CarPark__AP_idx_CarPark.csv"]
    full = recover_ap_positions(walks, near["CarPark"])
    alone = recover_ap_positions(walks[1:2], near["CarPark"])  # one straight walk + the site files
    assert alone.ambiguous == [] and alone.mirror_resolved == alone.ap_ids
    assert_allclose(alone.positions, full.positions, atol=1e-6)
    assert not np.allclose(recover_ap_positions(walks[1:2]).positions, full.positions, atol=1)  # unresolved
    msg = site_message(alone, ["CarPark__5__524"])
    assert msg["source"] == "recovered" and msg["walks"] == ["CarPark__5__524"]
    back = site_from_message(json.loads(json.dumps(msg)))
    assert np.array_equal(back.positions, alone.positions) and back.ap_ids == alone.ap_ids
    assert back.mirror_resolved == alone.ap_ids and back.residual_m == alone.residual_m
    phone = read_walk(RAW / "CarPark__5__13_17_06_22.csv")  # no ground truth, APs keyed by MAC
    sites, problems = recover_sites([phone, walks[1]], near)
    assert list(sites) == ["CarPark"] and problems == {}  # the phone log does not stop the scene
    sites, problems = recover_sites([phone], near)
    assert sites == {} and "no walk has true distances and ground truth" in problems["CarPark"]


def test_trilateration_is_exact_on_noise_free_ranges() -> None:
    from ingest.readers.ftm import FixTracker, SiteGeometry, Walk

    aps = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 8.0], [10.0, 8.0]])
    truth = np.column_stack([np.linspace(1, 9, 30), np.linspace(2, 6, 30)])
    dist = np.linalg.norm(truth[:, None] - aps[None], axis=2)
    ids = ["AP1", "AP2", "AP3", "AP4"]
    w = Walk("w", "s", "d", Path("w.csv"), "per_ap", np.arange(30) * 100.0, ids, dist, dist * 0, dist * 0, dist,
             np.zeros((30, 12)), truth)  # fmt: skip
    geo = SiteGeometry("s", ids, aps, {}, {}, "test")
    assert_allclose(trilaterate(w, geo), truth, atol=1e-4)
    tracker = FixTracker(geo)  # the live form: one {ap: rtt} row at a time, unknown APs ignored
    assert not tracker.fixed and np.allclose(tracker.est, aps.mean(axis=0))
    assert_allclose(tracker.update({"AP1": 3.0, "AP9": 1.0}), aps.mean(axis=0))  # < 3 known APs: held
    assert not tracker.fixed
    live = [tracker.update({**dict(zip(ids, row, strict=True)), "AP9": 5.0}).copy() for row in dist]
    assert tracker.fixed and np.array_equal(np.array(live), trilaterate(w, geo))


def test_pinhole_projection_geometry() -> None:
    cam = PinholeCamera((0.0, -10.0, 4.0), (0.0, 0.0, 0.0), focal_px=800.0)
    u, v, depth = cam.project(np.array([[0.0, 0.0, 0.0]]))
    assert_allclose([u[0], v[0]], [640.0, 360.0], atol=1e-9)  # the target is the image centre
    assert depth[0] == pytest.approx(np.hypot(10, 4))
    pts = np.array([[2.0, 3.0, 0.0], [-3.0, -2.0, 0.0], [1.0, 8.0, 0.0]])
    u, v, _ = cam.project(pts)
    assert_allclose(cam.ground_point(u, v), pts[:, :2], atol=1e-9)
    right = cam.project(np.array([[1.0, 0.0, 0.0]]))[0][0]
    assert right > 640.0  # +x is to the right when looking along +y
    near_h = cam.project(np.array([[0, 0, 1.7]]))[1][0] - 360.0
    far_h = cam.project(np.array([[0, 10, 1.7]]))[1][0] - cam.project(np.array([[0, 10, 0]]))[1][0]
    assert abs(near_h) > abs(far_h)  # a nearer person is taller in pixels


def test_simulated_detections_are_seeded_noisy_and_occluded() -> None:
    t = np.arange(0, 60_000, 300.0)
    gt = np.column_stack([np.linspace(-5, 25, len(t)), np.full(len(t), 8.0)])
    cam = camera_for_scene(gt)
    a = simulate_detections(t, gt, cam, seed=3)
    b = simulate_detections(t, gt, cam, seed=3)
    c = simulate_detections(
        t, gt, cam, seed=4, noise=VisionNoise(miss_prob=0.0, pillars=0, pixel_sigma=0.0, box_sigma_frac=0.0)
    )
    assert_allclose(a.obs, b.obs)
    assert len(a.t_ms) == 598 and a.obs.shape == (598, 5)  # 0 .. 59,700 ms at 10 fps
    det = a.obs[:, 4] > 0
    assert 0.7 < det.mean() < 0.99  # misses and occlusion take some frames
    assert (a.obs[~det, :4] == 0).all()
    assert c.obs[:, 4].all()  # in view all along, nothing removed
    assert_allclose(c.floor_xy, c.truth_xy, atol=1e-6)  # noise-free boxes back-project onto the track
    err = np.linalg.norm(a.floor_xy[det] - a.truth_xy[det], axis=1)
    assert 0.01 < np.median(err) < 2.0


@needs_data
def test_windows_are_aligned_and_mask_a_missing_modality() -> None:
    w = read_walk(RAW / "CarPark__5__524.csv")
    ends = grid_ends(w, 20, 5, 10)
    win = build_windows(w, w.ap_ids, ends, vision=None, fix=None)
    assert win.ftm.shape == (len(ends), 20, 26) and win.imu.shape == (len(ends), 20, 13)
    assert win.vision.shape == (len(ends), 20, 7) and not win.mask[:, 2].any()
    assert win.mask[:, 0].all() and win.mask[:, 1].all()
    assert win.future.shape == (len(ends), 10, 2) and np.isfinite(win.future).all()
    assert_allclose(win.pos[0, -1], [np.interp(ends[0], w.t_ms, w.gt[:, 0]), 4.55])  # type: ignore[index]


def _feats(n: int = 5, d: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("kind", FUSERS)
def test_every_fuser_gives_n_by_d_and_ignores_masked_modalities(kind: str) -> None:
    torch.manual_seed(0)
    fuser = make_fuser(kind, 3, 8)
    feats = _feats()
    mask = torch.tensor([[True, True, False]] * 5)
    out = fuser(feats, mask)
    assert out.shape == (5, 8) and torch.isfinite(out).all()
    changed = [feats[0], feats[1], feats[2] * 100 + 7]
    assert torch.allclose(fuser(changed, mask), out, atol=1e-6)  # a masked modality has no effect


def test_fixed_fusers_compute_what_they_say() -> None:
    f = _feats()
    full = torch.ones(5, 3, dtype=torch.bool)
    two = torch.tensor([[True, True, False]] * 5)
    assert torch.allclose(make_fuser("addition", 3, 8)(f, full), f[0] + f[1] + f[2])
    assert torch.allclose(make_fuser("average", 3, 8)(f, two), (f[0] + f[1]) / 2)
    assert torch.allclose(make_fuser("multiplication", 3, 8)(f, two), f[0] * f[1])
    assert torch.allclose(make_fuser("max", 3, 8)(f, two), torch.maximum(f[0], f[1]))
    assert torch.allclose(make_fuser("min", 3, 8)(f, full), torch.minimum(torch.minimum(f[0], f[1]), f[2]))
    gating = make_fuser("gating", 3, 8)
    with torch.no_grad():
        gating.w.weight.zero_()  # type: ignore[union-attr]
        gating.w.bias.zero_()  # type: ignore[union-attr]
    assert torch.allclose(gating(f, full), 0.5 * (f[0] + f[1] + f[2]))  # sigma(0) = 1/2 on every gate


def test_operations_reuse_frozen_parts_and_record_lineage() -> None:
    ch = {"ftm": 6, "imu": 13, "vision": 7}
    lengths = {"position": 20, "trajectory": 10, "tracking": 20}
    pos = new_twin("pos", "position", ["ftm"], ch, lengths, d=16)
    trk = new_twin("trk", "tracking", ["imu"], ch, lengths, d=16)
    x = {"ftm": torch.randn(4, 20, 6), "imu": torch.randn(4, 20, 13), "vision": torch.randn(4, 20, 7)}
    x["mask"] = torch.ones(4, 3, dtype=torch.bool)
    tr = transfer(pos, "traj", "trajectory", lengths)
    assert tr(x).shape == (4, 10, 2) and tr.lineage.sources == ["pos"] and tr.lineage.operation == "transfer"
    assert all(not p.requires_grad for p in tr.encoders.parameters())
    m = merge([pos, trk], "merged", "position", "gating", lengths)
    assert m(x).shape == (4, 20, 2) and m.lineage.modalities == ["ftm", "imu"] and m.lineage.fuser == "gating"
    assert m.encoders["ftm"] is pos.encoders["ftm"]
    parts = split(m, {"trajectory": "a", "tracking": "b"}, lengths)
    assert parts["tracking"](x).shape == (4, 20, 4) and parts["tracking"].lineage.operation == "split"
    assert all(not p.requires_grad for p in parts["tracking"].fuser.parameters())  # type: ignore[union-attr]
    y = np.random.default_rng(0).normal(size=(50, 2))
    assert nmse(y, y) == 0.0 and nmse(np.zeros_like(y) + y.mean(axis=0), y) == pytest.approx(1.0)


def _area(name: str, seed: int, scale: float = 1.0) -> Client:
    """A local-area twin with one window (so its local training does not depend on minibatch order)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 20, 6, generator=g)
    inputs = {"ftm": x, "imu": torch.zeros(1, 20, 13), "vision": torch.zeros(1, 20, 7)}
    inputs["mask"] = torch.tensor([[True, False, False]])
    return Client(name, inputs, {"position": x[..., :2].cumsum(dim=1) * scale})


def test_federated_training_goes_through_the_screening_defenses() -> None:
    ch = {"ftm": 6, "imu": 13, "vision": 7}
    lengths = {"position": 20, "trajectory": 10, "tracking": 20}
    a = _area("a", 1)
    areas = [a, a, a, _area("b", 2, -50.0), _area("c", 3, 50.0)]  # two areas far off
    val = _area("val", 4)
    params = {}
    for name, defense, clients in (
        ("mean of 5", "mean", areas),
        ("median of 5", "median", areas),
        ("a alone", "mean", [a]),
    ):
        twin = new_twin("p", "position", ["ftm"], ch, lengths, d=8)
        res = fed_train(twin, clients, val, FedConfig(rounds=1, seed=0, defense=defense))
        assert (res.defense, res.accepted, res.quarantined) == (defense, len(clients), 0)
        assert res.version == twin.lineage.version == 1
        params[name] = torch.cat([q.detach().reshape(-1) for q in twin.trainable()])
    # the coordinate-wise median of three equal updates and two others is the three's update; FedAvg moves
    assert torch.equal(params["median of 5"], params["a alone"])
    assert not torch.allclose(params["mean of 5"], params["a alone"], atol=1e-4)
    twin = new_twin("p", "position", ["ftm"], ch, lengths, d=8)
    res = fed_train(twin, areas[2:], val, FedConfig(rounds=2, seed=0))
    assert [(u.client, u.round, u.base_version, u.accepted) for u in res.uploads] == [
        (c.name, r, r - 1, True) for r in (1, 2) for c in areas[2:]
    ]  # every upload, with the version its client trained from
    assert all(u.norm > 0 and u.reason == "" for u in res.uploads)
    assert len({u.time_ns for u in res.uploads}) == len(res.uploads)  # distinct InfluxDB points
    bad = Upload("walk 1", 2, 1, False, 3.5, 9.0, "score above threshold", 1_000)
    (line,) = update_lines([("position", bad)])
    assert line == (
        r"update,cluster=position,decision=quarantined,entity=walk\ 1 norm=3.5,score=9.0,"
        r'reason="score above threshold",base_version=1i,seq=2i 1000'
    )
    twin = new_twin("p", "position", ["ftm"], ch, lengths, d=8)
    with pytest.raises(ValueError, match="unknown defense"):
        fed_train(twin, areas, val, FedConfig(rounds=1, defense="nope"))


def test_unified_model_shares_its_parts_across_directions_and_sums_the_three_operations() -> None:
    ch = {"ftm": 6, "imu": 13, "vision": 7}
    lengths = {"position": 20, "trajectory": 10, "tracking": 20}
    u = UnifiedTwin("unified.gating", ch, lengths, d=16, fuser="gating")
    n = 8
    x = {"ftm": torch.randn(n, 20, 6), "imu": torch.randn(n, 20, 13), "vision": torch.randn(n, 20, 7)}
    x["mask"] = torch.ones(n, 3, dtype=torch.bool)
    y = {
        "position": torch.randn(n, 20, 2),
        "trajectory": torch.randn(n, 10, 2),
        "tracking": torch.randn(n, 20, 4),
    }
    terms = u.terms(x, y)
    assert set(terms) == set(UNIFIED_DIRECTIONS)
    expected = (
        terms["transfer position->trajectory"]
        + (
            terms["merge trajectory+tracking->position"]
            + terms["merge position+tracking->position (FTM+IMU)"]
        )
        / 2
        + (terms["split position->trajectory"] + terms["split position->tracking"]) / 2
    )
    assert torch.allclose(u.local_loss((x, y), None), expected)
    m = u.view("merge position+tracking->position (FTM+IMU)", "m")
    s = u.view("split position->tracking", "s")
    assert m.encoders["ftm"] is s.encoders["ftm"] is u.encoders["ftm"] and m.decoder is u.decoders["position"]
    assert (m.lineage.operation, m.lineage.sources, m.lineage.model) == (
        "merge",
        ["position", "tracking"],
        "unified.gating",
    )
    with torch.no_grad():  # a view computes the unified model's direction; vision is masked out of it
        assert torch.allclose(
            m(x),
            u.decoders["position"](
                u.fuser(
                    [u.encoders[k](x[k]) for k in ("ftm", "imu", "vision")],
                    torch.tensor([[True, True, False]] * n),
                )
            ),
            atol=1e-6,
        )
        x2 = dict(x, vision=x["vision"] * 50)
        assert torch.allclose(m(x2), m(x), atol=1e-6)
    assert find_direction("split", ["position"], ["trajectory", "tracking"]) == [
        "split position->trajectory",
        "split position->tracking",
    ]
    assert find_direction("transfer", ["tracking"], ["position"]) == []


def test_a_stored_twin_is_reused_only_if_trained_with_the_same_settings(tmp_path: Path) -> None:
    from twin_store.services.twin import TwinStore

    ch, lengths = {"ftm": 6, "imu": 13, "vision": 7}, {"position": 20, "trajectory": 10, "tracking": 20}
    twin = new_twin("position", "position", ["ftm"], ch, lengths, d=8)
    twin.lineage.metrics = {"rounds": 5, "seed": 1, "defense": "mean", "data": ["d"]}
    store = TwinStore(tmp_path)
    store.save(twin)
    again = new_twin("position", "position", ["ftm"], ch, lengths, d=8)
    assert store.load_into(again, {"rounds": 5, "seed": 1, "defense": "mean", "data": ["d"]})
    assert not store.load_into(again, {"rounds": 20, "seed": 1, "defense": "mean", "data": ["d"]})


def test_early_stopping_ends_training_once_validation_stops_improving() -> None:
    """A validation client the training clients contradict (its targets are theirs negated): the validation
    loss gets worse from the start, so with patience 2 training stops after round 3 and keeps round 1."""
    ch = {"ftm": 6, "imu": 13, "vision": 7}
    lengths = {"position": 20, "trajectory": 10, "tracking": 20}
    a = _area("a", 1, 5.0)
    val = Client("val", a.inputs, {"position": -a.targets["position"]})
    full = fed_train(
        new_twin("p", "position", ["ftm"], ch, lengths, d=8), [a], val, FedConfig(rounds=8, seed=0)
    )
    assert len(full.val_curve) == 8 and full.best_round == 1
    twin = new_twin("p", "position", ["ftm"], ch, lengths, d=8)
    res = fed_train(twin, [a], val, FedConfig(rounds=8, seed=0, patience=2))
    assert len(res.val_curve) == 3 and res.best_round == 1 and res.val_curve == full.val_curve[:3]
    assert len(res.uploads) == 3  # rounds 4 to 8 were never trained: the saving
