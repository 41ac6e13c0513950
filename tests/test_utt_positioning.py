"""Positioning on unseen walks (issue 15): the range Kalman filter, AP-independent FTM features, AP dropout,
held-out validation walks and normalisation fitted on the fitting walks only, on a synthetic scene written in
the data set's Laboratory layout (8 APs, two never ranged)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from bench.ftm_synthetic import APS, NEVER, write_scene
from bench.utt_positioning import PositioningStudy
from ingest.readers.ftm import SiteGeometry, Walk, discover, read_walk, recover_ap_positions, trilaterate
from twin_store.federation.utt_data import Data, UttConfig, prepare, validation_walks
from twin_store.federation.utt_positioning import PositionData, PositioningConfig, eval_ends, tracks_of
from twin_store.models.ftm_features import drop_aps, feature_names, row_features
from twin_store.models.ftm_filter import FilterParams, kalman_track, motion_flags, range_bias, tune_filter
from twin_store.models.multimodal import build_windows, hold

SQUARE = {"A": (0.0, 0.0), "B": (20.0, 0.0), "C": (20.0, 15.0), "D": (0.0, 15.0)}


def line_walk(rng: np.random.Generator, n: int = 400, bias: float = 0.8, outliers: float = 0.05) -> Walk:
    """A walk back and forth along y = 6 at 1 m/s, 4 rows/s, ranged by four corner APs with noisy, long ranges."""
    t = np.arange(n) * 250.0
    x = 2 + 16 * np.abs(((t / 1000.0) / 16.0) % 2 - 1)
    gt = np.column_stack([x, np.full(n, 6.0)])
    aps = np.array(list(SQUARE.values()))
    true = np.linalg.norm(gt[:, None, :] - aps[None], axis=2)
    rtt = true + bias + rng.normal(0, 0.7, true.shape)
    rtt += (rng.random(true.shape) < outliers) * rng.uniform(4, 10, true.shape)
    rtt[rng.random(true.shape) < 0.2] = 0.0
    imu = np.zeros((n, 12))
    imu[:, 2] = 9.81 + 1.5 * np.sin(2 * math.pi * 1.8 * t / 1000.0)  # walking the whole time
    return Walk("S__1__113", "S", "M1", Path("x.csv"), "per_ap", t, list(SQUARE), rtt,
                np.full(true.shape, 0.2) * (rtt > 0), -60.0 * (rtt > 0), np.where(rtt > 0, true, 0.0), imu, gt)  # fmt: skip


def square_site() -> SiteGeometry:
    return SiteGeometry("S", list(SQUARE), np.array(list(SQUARE.values())), {}, {}, "test")


def median_error(pred: np.ndarray, walk: Walk) -> float:
    assert walk.gt is not None
    return float(np.median(np.linalg.norm(pred - walk.gt, axis=1)))


def test_the_filter_beats_trilateration_on_noisy_long_ranges_with_outliers() -> None:
    walk, geo = line_walk(np.random.default_rng(3)), square_site()
    tri = median_error(trilaterate(walk, geo), walk)
    kf = median_error(kalman_track(walk, geo, FilterParams(bias_m=0.8)), walk)
    assert kf < 0.6 * tri, (kf, tri)
    unbiased = median_error(kalman_track(walk, geo, FilterParams(bias_m=0.0)), walk)
    assert kf < unbiased  # subtracting the range bias helps


def test_the_filter_is_causal_and_starts_like_trilateration() -> None:
    walk, geo = line_walk(np.random.default_rng(4)), square_site()
    walk.rtt[:5, 1:] = 0.0  # the first five rows see one AP: no fix yet
    full = kalman_track(walk, geo)
    assert_allclose(full[:5], trilaterate(walk, geo)[:5])  # the APs' centroid, as trilateration holds
    assert_allclose(full[:5], np.tile(np.mean(list(SQUARE.values()), axis=0), (5, 1)))
    short = replace(walk, t_ms=walk.t_ms[:200], rtt=walk.rtt[:200], std=walk.std[:200], imu=walk.imu[:200])
    assert_allclose(kalman_track(short, geo), full[:200])  # a row sees only rows up to itself


def test_motion_flags_tell_standing_from_walking() -> None:
    t = np.arange(100) * 100.0
    imu = np.zeros((100, 12))
    imu[:, 2] = 9.81
    imu[50:, 2] += 1.5 * np.sin(2 * math.pi * 1.8 * t[50:] / 1000.0)
    moving = motion_flags(t, imu, 0.25)
    assert not moving[10:50].any() and moving[60:].all()


def test_tuning_takes_the_range_bias_from_training_walks_and_reports_the_grid() -> None:
    walk = line_walk(np.random.default_rng(5), bias=1.3, outliers=0.0)
    assert range_bias([walk]) == pytest.approx(1.3, abs=0.15)
    params, tried = tune_filter(
        [walk], {"S": square_site()}, {"range_sigma_m": (0.5, 2.0), "accel_sigma": (1.0,)}
    )
    assert params.bias_m == pytest.approx(1.3, abs=0.15) and len(tried) == 2
    assert min(tried.values()) == pytest.approx(
        median_error(kalman_track(walk, square_site(), params), walk), abs=1e-4
    )


def permuted(walk: Walk, order: list[int], extra: int) -> Walk:
    """The same walk with its AP columns reordered and ``extra`` never-ranged APs appended."""
    n = len(walk)

    def cols(a: np.ndarray) -> np.ndarray:
        return np.column_stack([a[:, order], np.zeros((n, extra))])

    ids = [walk.ap_ids[k] for k in order] + [f"X{k}" for k in range(extra)]
    return replace(walk, ap_ids=ids, rtt=cols(walk.rtt), std=cols(walk.std), rss=cols(walk.rss),
                   true_dist=None if walk.true_dist is None else cols(walk.true_dist))  # fmt: skip


@pytest.mark.parametrize(("order", "extra"), [([3, 2, 1, 0], 0), ([1, 3, 0, 2], 2), ([2, 0, 3, 1], 5)])
def test_ftm_features_do_not_depend_on_the_walks_ap_count_or_order(order: list[int], extra: int) -> None:
    walk, geo = line_walk(np.random.default_rng(6)), square_site()
    fix, kf = trilaterate(walk, geo), kalman_track(walk, geo)
    base = row_features(walk, geo, fix, kf)
    other = permuted(walk, order, extra)
    assert_allclose(trilaterate(other, geo), fix)
    assert_allclose(kalman_track(other, geo), kf)
    assert_allclose(row_features(other, geo, fix, kf), base, atol=1e-9)
    assert base.shape[1] == len(feature_names())


def test_ap_dropout_only_removes_readings_and_keeps_three_aps() -> None:
    walk = line_walk(np.random.default_rng(7))
    for seed in range(20):
        copy = drop_aps(walk, np.random.default_rng(seed), p_ap=0.9, p_reading=0.3)
        assert ((copy.rtt > 0) <= (walk.rtt > 0)).all()  # nothing ranged that was not
        assert_allclose(copy.rtt[copy.rtt > 0], walk.rtt[copy.rtt > 0])
        assert (copy.rtt > 0).any(axis=0).sum() >= 3
        assert copy.gt is walk.gt and copy.imu is walk.imu
    a = drop_aps(walk, np.random.default_rng(1))
    assert_allclose(a.rtt, drop_aps(walk, np.random.default_rng(1)).rtt)  # seeded
    assert 0.5 < (a.rtt > 0).sum() / (walk.rtt > 0).sum() < 0.8


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab")
    write_scene(out, seed=3)
    return out


def test_the_synthetic_scene_has_the_laboratory_layout(scene: Path) -> None:
    found = discover([scene])
    walks = [read_walk(p) for p in found.walks]
    assert [w.name for w in walks] == [f"Laboratory__{c}__{c}{d}3" for c in (1, 2) for d in (1, 2)]
    header = (scene / "Laboratory__1__113.csv").read_text().splitlines()[0]
    assert header.endswith("M1 Ground Truth_x,M1 Ground Truth_y,user,circle")
    assert all(w.ap_ids == list(APS) and w.gt is not None for w in walks)
    geo = recover_ap_positions(walks, found.site_files["Laboratory"])
    assert sorted(geo.left_out) == sorted(NEVER)
    for ap in geo.ap_ids:
        assert_allclose(geo.position(ap), APS[ap], atol=1e-3)
    ranged = {w.name: (w.rtt > 0).sum(axis=1).mean() for w in walks}
    assert ranged["Laboratory__2__213"] < 0.85 * ranged["Laboratory__1__113"]  # sparser on the test circle


def test_validation_is_a_held_out_walk_and_scalers_see_only_fitting_walks(scene: Path) -> None:
    prep = prepare([scene], UttConfig())
    assert prep.test == ["Laboratory__2__213", "Laboratory__2__223"]
    assert prep.val == ["Laboratory__1__123"] and prep.fit == ["Laboratory__1__113"]
    assert (
        validation_walks(prep.walks, ["Laboratory__1__113"]) == []
    )  # one training walk: nothing to hold out
    data = Data(prep)
    assert list(data.train) == prep.fit and set(data.val.walk) == set(prep.val)
    only_fit = Data(replace(prep, val=["Laboratory__1__123"]))
    assert_allclose(data.in_scalers["ftm"].mean, only_fit.in_scalers["ftm"].mean)
    blocks = Data(prepare([scene], UttConfig(validation="blocks")))
    assert set(blocks.val.walk) == {"Laboratory__1__113", "Laboratory__1__123"}  # the old rule, on request


@pytest.mark.slow
def test_position_data_normalises_on_fitting_walks_and_anchors_on_the_filter(scene: Path) -> None:
    prep = prepare([scene], UttConfig())
    filt = FilterParams(bias_m=0.8)
    tracks = {n: tracks_of(prep.walks[n], prep.geometry["Laboratory"], filt) for n in prep.train + prep.test}
    cfg = PositioningConfig(augment=1)
    a = PositionData(tracks, prep.geometry, filt, prep.fit, prep.val, cfg, seed=1)
    b = PositionData(tracks, prep.geometry, filt, prep.fit, prep.test, cfg, seed=1)  # other validation walks
    assert_allclose(a.in_scalers["ftm"].mean, b.in_scalers["ftm"].mean)
    assert_allclose(a.out_scalers["position"].std, b.out_scalers["position"].std)
    n = prep.test[0]
    w = a.windows_of(n)
    rows = a.windows_of(n, tracks[n].walk.t_ms[50:60])
    assert_allclose(rows.anchor, tracks[n].kf[50:60])  # a window ending at a row: that row's filter position
    assert_allclose(w.ftm[:, -1, 2:4], 0.0, atol=1e-9)  # the filter's last position is the anchor
    assert w.ftm.shape[-1] == len(feature_names()) + 1
    no_kf = PositionData(
        tracks, prep.geometry, filt, prep.fit, [], replace(cfg, groups=("fix", "quality")), 1
    )
    assert no_kf.windows_of(n).ftm.shape[-1] == len(feature_names(("fix", "quality"))) + 1
    assert len(a.fit_windows[prep.fit[0]]) == 2 * len(a.windows_of(prep.fit[0]))  # the walk and one copy


@pytest.mark.slow
def test_leave_one_walk_out_folds_hold_out_each_training_walk_once(scene: Path) -> None:
    prep = prepare([scene], UttConfig())
    study = PositioningStudy(prep, UttConfig())
    assert study.folds() == [
        (["Laboratory__1__123"], ["Laboratory__1__113"]),
        (["Laboratory__1__113"], ["Laboratory__1__123"]),
    ]
    assert study.filter.bias_m == pytest.approx(range_bias([prep.walks[n] for n in prep.train]), abs=1e-3)
    base = study.baselines(prep.test)["Laboratory"]
    assert 0 < base["kalman"] < base["trilateration"]


@pytest.mark.slow
def test_sparse_copies_of_the_validation_walks_are_sparser_seeded_and_scored_like_their_walk(
    scene: Path,
) -> None:
    prep = prepare([scene], UttConfig())
    study = PositioningStudy(prep, UttConfig())
    names = study.sparse_copies(prep.val, seed=1, k=2)
    assert len(names) == 2 * len(prep.val) and not set(names) & set(prep.walks)
    assert study.sparse_copies(prep.val, seed=1, k=2) == names  # cached: the same copies every call
    for key in names:
        walk, base = study.tracks[key].walk, prep.walks[key.split("~")[0]]
        assert 0 < (walk.rtt > 0).sum() < (base.rtt > 0).sum()  # sparser, never empty
        assert_allclose(study._truth([key]), study._truth([base.name]))  # the same rows and ground truth
    other = study.sparse_copies(prep.val, seed=2, k=1)
    assert not np.array_equal(study.tracks[other[0]].walk.rtt, study.tracks[names[0]].walk.rtt)
    base = study.baselines(prep.val)["Laboratory"]["kalman"]
    assert study.baselines(names)["Laboratory"]["kalman"] > base  # sparser ranging: the filter is worse


def test_the_shrink_is_chosen_for_the_worst_scene_and_falls_back_to_the_filter() -> None:
    from twin_store.federation.positioning_study import choose_shrink

    rng = np.random.default_rng(0)
    truth = {n: rng.normal(size=(200, 2)) * 5 for n in ("a1", "b1")}
    anchor = {n: t + rng.normal(size=t.shape) for n, t in truth.items()}  # the filter: ~1 m off
    scene_of = {"a1": "A", "b1": "B"}
    perfect = {n: truth[n] - anchor[n] for n in truth}
    alpha, curve = choose_shrink(anchor, perfect, truth, scene_of)
    assert alpha == 1.0 and curve["1.0"] == {"A": 0.0, "B": 0.0}
    noise = {n: rng.normal(size=(200, 2)) * 3 for n in truth}
    alpha, curve = choose_shrink(anchor, noise, truth, scene_of)
    assert alpha == 0.0  # the correction only hurts: the filter itself
    # right on scene A, three times too large on scene B (error x |1 - 3 alpha| there, |1 - alpha| on A):
    # the worst scene is best at alpha 0.5
    mixed = {"a1": perfect["a1"], "b1": 3 * perfect["b1"]}
    alpha, curve = choose_shrink(anchor, mixed, truth, scene_of)
    ratio = {a: max(v[s] / curve["0.0"][s] for s in v) for a, v in curve.items()}
    assert alpha == float(min(ratio, key=lambda a: ratio[a])) and ratio[str(alpha)] <= 1.0
    assert alpha == 0.5


@pytest.mark.slow
def test_every_run_of_a_seed_is_scored_on_its_own_twins_and_the_locator_positions_like_the_study(
    scene: Path, tmp_path: Path
) -> None:
    """The ablation runs a seed again with other inputs: its test figures must be its own twins' (they once
    came from the seed's first run). The stored locator positions the test rows as the study scored them,
    a seed ensemble (two members, each with its own encoders) included."""
    from twin_store.federation.utt_locator import Locator

    prep = prepare([scene], UttConfig())
    pcfg = PositioningConfig(rounds=1, augment=0, fusers=("gating",), members=2)
    study = PositioningStudy(prep, UttConfig(), pcfg)
    first = study.run_seed(1)
    assert first["members"] == [1, 2]
    assert any("~sparse1." in n for n in study.tracks)  # alpha was also chosen on sparse validation copies
    other = study.run_seed(1, replace(pcfg, groups=("kf", "quality")))
    key = "merged (unshrunk, alpha 1)"
    assert first["test_median_m"][key] != other["test_median_m"][key]
    assert first["test_median_m"]["position"] != other["test_median_m"]["position"]
    loc = study.locators[1]
    assert loc.alpha == first["alpha"] and loc.groups == pcfg.groups  # the first run's twin is the one kept
    assert len(loc.twins) == 2 and loc.arch["members"] == 2  # one merged twin per member
    loc.save(tmp_path)
    back = Locator.load(tmp_path)
    n = prep.test[0]
    walk = prep.walks[n]
    ends = eval_ends(walk)[:40]
    feats, ok = hold(walk.t_ms, study.tracks[n].feats, ends[:, None] + (np.arange(20) - 19) * 100.0, 1000.0)
    win = build_windows(walk, walk.ap_ids, ends, None, None)
    pos, _ = back.locate(feats, ok, win.imu, win.mask)
    assert_allclose(pos, study.predictions[1][n]["merged"][:40], atol=1e-5)
    back.alpha = 1.0  # the whole correction: the members' mean, whatever alpha validation chose
    pos, _ = back.locate(feats, ok, win.imu, win.mask)
    assert_allclose(pos, study.predictions[1][n]["merged_unshrunk"][:40], atol=1e-5)
