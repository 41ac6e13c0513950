"""ingest.readers.ftm on every file layout of the RTT indoor localization data set (haiyaoyu/RTT-Indoor-
localization-data-set, MIT), built from the data set's header lines with made-up rows (issue 9, finding 9).

The per-AP walk files put the ground truth in one ``M1 Ground Truth`` column holding ``"[x, y]"`` (CarPark,
Canteen, Library, Conference Room) or in two columns ``M1 Ground Truth_x`` and ``M1 Ground Truth_y`` followed by
``user,circle`` (Laboratory, Shopping Mall). The files of a scene list APs that may never be ranged (all zeros).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

from ingest.errors import InputError
from ingest.readers.ftm import (
    discover,
    kind_of,
    read_site_file,
    read_walk,
    recover_ap_positions,
    site_from_message,
    site_message,
)

IMU = "AccX,AccY,AccZ,GyroX,GyroY,GyroZ,MagX,MagY,MagZ,Azimuth,Pitch,Roll"
PHONE_IMU = "Accx,Accy,Accz,Gyrox,Gyroy,Gyroz,Magx,Magy,Magz,Azimuth,Pitch,Roll"


def per_ap_header(device: str, n_ap: int, ground_truth: str) -> str:
    aps = ",".join(
        f"AP{k} True Distance (m),AP{k} RTT Distance (m),AP{k} RTT std (m),AP{k} RSS (dBm)"
        for k in range(1, n_ap + 1)
    )
    return f"{device} Time Stamp (ms),{aps},{IMU},{ground_truth}"


# the header lines of the data set's per-AP walk files
CARPARK = per_ap_header("M1", 6, "M1 Ground Truth")
LABORATORY = per_ap_header("M1", 8, "M1 Ground Truth_x,M1 Ground Truth_y,user,circle")
# its phone logs (raw RTT results per MAC address)
PHONE_LOGS = {
    "plain": f"Number,RTT_TIMESTAMP,RTT_RESULT,IMU_TIMESTAMP,{PHONE_IMU}",
    "points": f"Number,RTT_TIMESTAMP,RTT_RESULT,IMU_TIMESTAMP,{PHONE_IMU},Points,",
    "points_xy": f"Number,RTT_TIMESTAMP,RTT_RESULT,IMU_TIMESTAMP,{PHONE_IMU},Points,x,y,",
    "points_unnamed": f"Number,RTT_TIMESTAMP,RTT_RESULT,IMU_TIMESTAMP,{PHONE_IMU},Points,,",
}
PEER = "Time Stamp (ms),M1-M2 RTT Distance (m),RTT std (m),RSS (dBm)"

APS = {1: (0.0, 0.0), 2: (12.0, 0.0), 3: (12.0, 9.0), 4: (0.0, 9.0), 5: (6.0, -3.0), 6: (-3.0, 4.0)}
APS |= {7: (15.0, 4.0), 8: (6.0, 12.0)}


def walk_rows(n_ap: int, never: set[int], xy_pair: bool, path_offset: float = 0.0) -> list[list[str]]:
    """An L-shaped walk (not one straight line, so no AP is mirror-ambiguous); APs in ``never`` are zeros."""
    leg = np.linspace(0, 1, 20)
    pts = np.concatenate([np.c_[2 + 8 * leg, 2 + 0 * leg], np.c_[10 + 0 * leg, 2 + 5 * leg]])
    pts = pts + path_offset
    rows = []
    for i, (x, y) in enumerate(pts):
        row = [f"{i * 200:.1f}"]
        for k in range(1, n_ap + 1):
            if k in never:
                row += ["0", "0", "0", "0"]
            else:
                d = math.dist((x, y), APS[k])
                row += [f"{d:.9f}", f"{d + 0.3:.9f}", "0.1", "-60"]
        row += ["0.5"] * 12
        row += [f"{x:.6f}", f"{y:.6f}", "1", "1"] if xy_pair else [f"[{x:.6f}, {y:.6f}]"]
        rows.append(row)
    return rows


def write(path: Path, header: str, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        fh.write(header + "\n")
        csv.writer(fh).writerows(rows)
    return path


def test_ground_truth_in_two_columns_is_read_as_one_position(tmp_path: Path) -> None:
    rows = walk_rows(8, set(), xy_pair=True)
    walk = read_walk(write(tmp_path / "Laboratory__1__113.csv", LABORATORY, rows))
    assert walk.layout == "per_ap" and walk.device == "M1" and walk.scene == "Laboratory"
    assert walk.ap_ids == [f"AP{k}" for k in range(1, 9)] and walk.bad_rows == []
    assert walk.gt is not None and walk.true_dist is not None
    assert_allclose(walk.gt, [[float(r[-4]), float(r[-3])] for r in rows])


def test_ground_truth_in_one_bracketed_column_still_reads(tmp_path: Path) -> None:
    rows = walk_rows(6, set(), xy_pair=False)
    walk = read_walk(write(tmp_path / "CarPark__5__513.csv", CARPARK, rows))
    assert walk.gt is not None
    assert_allclose(walk.gt[:, 0], [float(r[-1].strip("[]").split(",")[0]) for r in rows])


@pytest.mark.parametrize(("header", "n_ap", "xy"), [(LABORATORY, 8, True), (CARPARK, 6, False)])
def test_aps_never_ranged_are_left_out_and_named(tmp_path: Path, header: str, n_ap: int, xy: bool) -> None:
    never = {3} if n_ap == 6 else {3, 8}
    walks = [
        read_walk(write(tmp_path / f"Scene__{i}__13.csv", header, walk_rows(n_ap, never, xy, 0.7 * i)))
        for i in range(2)
    ]
    geo = recover_ap_positions(walks)
    ranged = [f"AP{k}" for k in range(1, n_ap + 1) if k not in never]
    assert geo.ap_ids == ranged
    assert geo.left_out == {f"AP{k}": "never ranged in any walk of the scene" for k in sorted(never)}
    for ap in ranged:
        assert_allclose(geo.position(ap), APS[int(ap[2:])], atol=1e-6)
    msg = site_message(geo, [w.name for w in walks])
    assert msg["left_out"] == geo.left_out and "AP3" not in msg["ap_ids"]
    back = site_from_message(msg)
    assert back.left_out == geo.left_out and back.ap_ids == geo.ap_ids


def test_an_ap_ranged_twice_is_left_out_with_its_count(tmp_path: Path) -> None:
    rows = walk_rows(6, set(), xy_pair=False)
    for row in rows[2:]:
        row[1 + 4 * 3 : 1 + 4 * 4] = ["0", "0", "0", "0"]  # AP4: only the first two rows
    geo = recover_ap_positions([read_walk(write(tmp_path / "S__1__13.csv", CARPARK, rows))])
    assert geo.left_out == {"AP4": "2 true-distance observations, need 3"}
    assert "AP4" not in geo.ap_ids and len(geo.ap_ids) == 5


def test_a_scene_where_no_ap_was_ever_ranged_is_one_clear_error(tmp_path: Path) -> None:
    rows = walk_rows(6, set(range(1, 7)), xy_pair=False)
    walk = read_walk(write(tmp_path / "Empty__1__13.csv", CARPARK, rows))
    with pytest.raises(InputError, match=r"scene Empty: .*never ranged"):
        recover_ap_positions([walk])


@pytest.mark.parametrize("layout", sorted(PHONE_LOGS))
def test_every_phone_log_layout_reads(tmp_path: Path, layout: str) -> None:
    header = PHONE_LOGS[layout]
    trailing = {"plain": [], "points": ["0", ""], "points_xy": ["0", "22.1", "15.3", "0.01"]}
    trailing["points_unnamed"] = ["0", "22.1", "15.3"]
    rows = []
    for i in range(5):
        result = f"[14:22:3b:2a:86:f5, {13000 + i}, 93, -57, b0:e4:d5:39:26:89, 0, 0, -80]"
        rows.append([str(i), str(83894304868 + i * 10**8), result, str(83979713314 + i * 10**8)])
        rows[-1] += ["0.1"] * 12 + trailing[layout]
    path = write(tmp_path / "Laboratory__1__ranging_data_13.csv", header, rows)
    assert kind_of(path) == "walk"
    walk = read_walk(path)
    assert walk.layout == "phone_log" and len(walk) == 5 and walk.bad_rows == []
    assert walk.ap_ids == ["14:22:3b:2a:86:f5"]  # the MAC ranged at 0 mm was not ranged
    assert_allclose(walk.rtt[:, 0], [13.0 + i / 1000 for i in range(5)])


def test_peer_logs_and_site_files_are_told_apart(tmp_path: Path) -> None:
    peer = write(
        tmp_path / "Laboratory__1__rtt-log-Nov-22-2022-4-28-14-PM.csv", PEER, [["0", "28.9", "0", "-70"]]
    )
    site = tmp_path / "Laboratory__AP_idx_Laboratory.csv"
    site.write_text("\ufeff,x,y\nAP1,0.495,15.47\nAP2,0.495,20.607\n", encoding="utf-8")
    walk = write(tmp_path / "Laboratory__1__113.csv", LABORATORY, walk_rows(8, set(), xy_pair=True))
    found = discover([tmp_path])
    assert found.walks == [walk] and found.site_files == {"Laboratory": [site]}
    assert "phone-to-phone" in found.skipped[peer]
    assert read_site_file(site) == {"AP1": (0.495, 15.47), "AP2": (0.495, 20.607)}
