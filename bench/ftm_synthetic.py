"""A SYNTHETIC scene in the layout of the RTT indoor localisation data set (haiyaoyu/RTT-Indoor-localization-
data-set, MIT): "another scene of the same public data set" that the shared data does not hold.

The shared data has ground truth for one scene only (CarPark, 6 APs). The data set's other per-AP scenes
(Laboratory, Shopping Mall) list 8 APs, some never ranged, and put the ground truth in ``M1 Ground Truth_x`` /
``M1 Ground Truth_y`` followed by ``user,circle``. This module writes such a scene from made-up but physical
walks so the benchmark is tried on a layout it was not built on:

* 8 APs in a 26 x 18 m room, AP7 and AP8 listed but never ranged (all zeros);
* two phones (M1 at ~3.3 rows/s, M2 at ~2.3 rows/s) walking two circles each: loops with turns and stops;
* ranges = true distance + 0.8 m + 2.5 m behind each of two walls (non line of sight) + noise, 4% outliers;
  ranging is sparse (each AP answers a row with probability 0.5, 0.35 on the second circle: sparser on the
  test walks), with the RTT std and an RSS that falls with distance and walls;
* IMU from the motion: step oscillation while walking, gyro = turn rate, magnetometer and azimuth from the
  heading, with noise.

Files: ``<scene>__<circle>__<circle><device>3.csv`` (as ``CarPark__5__513``) and a site file
``<scene>__AP_idx_<scene>.csv``. Run ``python -m bench.ftm_synthetic OUT_DIR``.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np

APS = {
    "AP1": (0.0, 0.0),
    "AP2": (13.0, -1.0),
    "AP3": (26.0, 0.0),
    "AP4": (26.5, 18.0),
    "AP5": (13.0, 19.0),
    "AP6": (-0.5, 18.0),
    "AP7": (8.0, 9.0),
    "AP8": (19.0, 9.0),
}
NEVER = ("AP7", "AP8")
WALLS = (((9.0, 4.0), (9.0, 14.0)), ((17.0, 6.0), (24.0, 6.0)))  # segments that add NLOS excess
IMU_HEADER = "AccX,AccY,AccZ,GyroX,GyroY,GyroZ,MagX,MagY,MagZ,Azimuth,Pitch,Roll"
LOOPS: dict[tuple[int, int], list[tuple[float, float]]] = {  # (circle, device) -> corners of the loop walked
    (1, 1): [(3, 3), (22, 3), (22, 15), (3, 15)],
    (1, 2): [(5, 5), (20, 5), (20, 12), (5, 12)],
    (2, 1): [(4, 4), (23, 4), (23, 14), (4, 14)],
    (2, 2): [(3, 6), (21, 6), (21, 13), (3, 13)],
}


def _crosses(p: np.ndarray, q: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> bool:
    def side(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> float:
        return float((v[0] - u[0]) * (w[1] - u[1]) - (v[1] - u[1]) * (w[0] - u[0]))

    a_, b_ = np.asarray(a), np.asarray(b)
    return side(p, q, a_) * side(p, q, b_) < 0 and side(a_, b_, p) * side(a_, b_, q) < 0


def walk_path(
    corners: list[tuple[float, float]], rng: np.random.Generator, laps: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """10 Hz ground truth (t_s, xy) around the loop at ~1.1 m/s with a 2-4 s stop at every other corner."""
    pts = [np.asarray(c, float) for c in corners] * laps + [np.asarray(corners[0], float)]
    t, xy, now = [0.0], [pts[0]], 0.0
    for k in range(1, len(pts)):
        a, b = pts[k - 1], pts[k]
        speed = rng.uniform(0.9, 1.3)
        n = max(int(np.linalg.norm(b - a) / speed / 0.1), 1)
        for j in range(1, n + 1):
            now += 0.1
            t.append(now)
            xy.append(a + (b - a) * j / n)
        if k % 2 == 0:
            for _ in range(int(rng.uniform(20, 40))):
                now += 0.1
                t.append(now)
                xy.append(b.copy())
    return np.asarray(t), np.asarray(xy)


def write_walk(path: Path, device: int, circle: int, rng: np.random.Generator, p_range: float) -> None:
    t, xy = walk_path(LOOPS[(circle, device)], rng)
    period = 0.3 if device == 1 else 0.43
    rows_t = [0.0]
    while rows_t[-1] < t[-1] - period:
        rows_t.append(rows_t[-1] + period * rng.uniform(0.7, 1.3))
    rt = np.asarray(rows_t)
    gx, gy = np.interp(rt, t, xy[:, 0]), np.interp(rt, t, xy[:, 1])
    vel = np.gradient(np.column_stack([gx, gy]), rt, axis=0)
    speed = np.linalg.norm(vel, axis=1)
    heading = np.unwrap(np.arctan2(vel[:, 1], vel[:, 0]))
    for i in range(1, len(heading)):  # hold the heading while standing
        if speed[i] < 0.2:
            heading[i] = heading[i - 1]
    turn = np.gradient(heading, rt)
    names = list(APS)
    head = [f"M{device} Time Stamp (ms)"]
    for a in names:
        head += [f"{a} True Distance (m)", f"{a} RTT Distance (m)", f"{a} RTT std (m)", f"{a} RSS (dBm)"]
    head += [
        *IMU_HEADER.split(","),
        f"M{device} Ground Truth_x",
        f"M{device} Ground Truth_y",
        "user",
        "circle",
    ]
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(head)
        for i, ti in enumerate(rt):
            p = np.array([gx[i], gy[i]])
            row: list[object] = [f"{1000 * ti:.0f}"]
            for a in names:
                if a in NEVER or rng.random() > p_range:
                    row += [0, 0, 0, 0]
                    continue
                ap = np.asarray(APS[a])
                d = float(np.linalg.norm(p - ap))
                walls = sum(_crosses(p, ap, *w) for w in WALLS)
                rng_m = d + 0.8 + 2.5 * walls + rng.normal(0, 0.5 + 0.02 * d)
                if rng.random() < 0.04:
                    rng_m += rng.uniform(3, 10)
                rss = -35 - 20 * math.log10(max(d, 1.0)) - 6 * walls + rng.normal(0, 2)
                row += [
                    f"{d:.6f}",
                    f"{max(rng_m, 0.1):.6f}",
                    f"{abs(rng.normal(0.3, 0.2)):.3f}",
                    f"{rss:.0f}",
                ]
            walking = speed[i] > 0.2
            osc = 1.5 * math.sin(2 * math.pi * 1.8 * ti) if walking else 0.0
            acc = [rng.normal(0, 0.3) + 0.3 * osc, rng.normal(0, 0.3), 9.81 + osc + rng.normal(0, 0.2)]
            gyro = [rng.normal(0, 0.02), rng.normal(0, 0.02), turn[i] + rng.normal(0, 0.05)]
            h = heading[i]
            mag = [30 * math.cos(h) + rng.normal(0, 1), -30 * math.sin(h) + rng.normal(0, 1), -40.0]
            az = math.atan2(math.sin(h + rng.normal(0, 0.1)), math.cos(h + rng.normal(0, 0.1)))
            row += [f"{v:.5f}" for v in (*acc, *gyro, *mag, az, rng.normal(0, 0.05), rng.normal(0, 0.05))]
            row += [f"{gx[i]:.4f}", f"{gy[i]:.4f}", device, circle]
            out.writerow(row)


def write_scene(out: Path, scene: str = "Laboratory", seed: int = 7) -> list[Path]:
    """Writes the scene's four walks and its site file into ``out``; returns the walk paths."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for circle in (1, 2):
        for device in (1, 2):
            path = out / f"{scene}__{circle}__{circle}{device}3.csv"
            write_walk(path, device, circle, rng, 0.5 if circle == 1 else 0.35)
            paths.append(path)
    with open(out / f"{scene}__AP_idx_{scene}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "x", "y"])
        w.writerows([a, x, y] for a, (x, y) in APS.items())
    return paths


if __name__ == "__main__":
    for p in write_scene(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("synthetic_scene")):
        print(p)
