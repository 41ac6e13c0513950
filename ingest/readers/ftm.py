"""Readers for WiFi FTM (RTT) + RSS + IMU walk files, site files, and AP-position recovery.

Two walk layouts are read, both by their headers (column order does not matter):

* **per-AP columns** (the cleaned CarPark walks): a ``... Time Stamp (ms)`` column, ``APk True Distance (m)``,
  ``APk RTT Distance (m)``, ``APk RTT std (m)``, ``APk RSS (dBm)`` per AP, IMU columns (``AccX`` ...
  ``Roll``) and the ground truth either as one ``... Ground Truth`` column holding ``"[x, y]"`` or as two
  columns whose names end in ``_x`` / ``_y``. An AP whose RTT distance is 0 was not ranged in that row.
* **phone logs** (``RTT_TIMESTAMP`` in ns, ``RTT_RESULT`` = ``[mac, dist_mm, std_mm, rss, mac, ...]``,
  ``IMU_TIMESTAMP`` in ns, IMU columns): no ground truth and no true distance. APs are keyed by MAC address.

A phone-to-phone RTT log (``M1-M2 RTT Distance``) and a site file (``*AP_idx*``) are not walks:
:func:`discover` lists them separately. A file that matches no layout, or has no readable row, raises
:class:`~ingest.errors.InputError` with one line saying why; a single unreadable row is skipped and kept in
``Walk.bad_rows`` (line number, reason, original text) so a replay can dead-letter it.
"""

from __future__ import annotations

import csv
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ingest.errors import InputError

IMU_CHANNELS = (
    "acc_x",
    "acc_y",
    "acc_z",
    "gyro_x",
    "gyro_y",
    "gyro_z",
    "mag_x",
    "mag_y",
    "mag_z",
    "azimuth",
    "pitch",
    "roll",
)
_IMU_KEYS = {
    "accx": 0,
    "accy": 1,
    "accz": 2,
    "gyrox": 3,
    "gyroy": 4,
    "gyroz": 5,
    "magx": 6,
    "magy": 7,
    "magz": 8,
    "azimuth": 9,
    "pitch": 10,
    "roll": 11,
}
_AP_FIELD = re.compile(
    r"^\s*(AP\w*?)\s+(true distance|rtt distance|rtt std|rss)\b", re.IGNORECASE
)  # "AP3 RTT std (m)"
_FIELD_INDEX = {"true distance": 0, "rtt distance": 1, "rtt std": 2, "rss": 3}


@dataclass
class Walk:
    """One walk of one device. Arrays are row-aligned; an absent AP reading is 0 (``present`` says which)."""

    name: str
    scene: str
    device: str
    source: Path
    layout: str
    t_ms: np.ndarray  # (n,) float64, increasing
    ap_ids: list[str]
    rtt: np.ndarray  # (n, A) metres
    std: np.ndarray  # (n, A) metres
    rss: np.ndarray  # (n, A) dBm
    true_dist: np.ndarray | None  # (n, A) metres
    imu: np.ndarray  # (n, 12) in IMU_CHANNELS order
    gt: np.ndarray | None  # (n, 2) metres
    t_raw: list[str] = field(default_factory=list)  # the timestamp column's text, per row
    lines: list[int] = field(default_factory=list)  # 1-based file line per row
    bad_rows: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def present(self) -> np.ndarray:
        return self.rtt > 0

    def __len__(self) -> int:
        return len(self.t_ms)


@dataclass(frozen=True)
class DataDir:
    walks: list[Path]
    site_files: dict[str, list[Path]]  # scene -> site files
    skipped: dict[Path, str]  # not walks, with the reason


def scene_of(path: Path) -> str:
    stem = path.stem
    return stem.split("__", 1)[0] if "__" in stem else "default"


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", unicodedata.normalize("NFKC", name).lower())


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str], str]]]:
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a walk file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    lines = text.splitlines()
    if not lines:
        raise InputError(f"{path}: empty file")
    header = next(csv.reader([lines[0]]))
    rows: list[tuple[int, list[str], str]] = []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip() or not line.strip(", "):
            continue
        rows.append((i, next(csv.reader([line])), line))
    return [h.strip() for h in header], rows


def _float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"non-finite value {s!r}")
    return v


def _parse_xy(s: str) -> tuple[float, float]:
    nums = re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", unicodedata.normalize("NFKC", s))
    if len(nums) != 2:
        raise ValueError(f"ground truth {s!r} is not '[x, y]'")
    return float(nums[0]), float(nums[1])


def kind_of(path: Path) -> str:
    """``walk``, ``site`` (AP positions), ``peer`` (phone-to-phone RTT log) or ``unknown``, from the header."""
    if "ap_idx" in path.stem.lower():
        return "site"
    try:
        with open(path, encoding="utf-8-sig") as fh:
            head = fh.readline()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    names = [_norm(h) for h in next(csv.reader([head]), [])]
    if "rttresult" in names or any(_AP_FIELD.match(h) for h in next(csv.reader([head]), [])):
        return "walk"
    if any(re.match(r"m\d+m\d+rttdistance", n) for n in names):
        return "peer"
    return "unknown"


def discover(paths: list[Path]) -> DataDir:
    """Sort files (or the CSVs of folders) into walks, per-scene site files and skipped files."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(p.glob("*.csv")))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    walks: list[Path] = []
    sites: dict[str, list[Path]] = {}
    skipped: dict[Path, str] = {}
    for f in files:
        kind = kind_of(f)
        if kind == "walk":
            walks.append(f)
        elif kind == "site":
            sites.setdefault(scene_of(f), []).append(f)
        elif kind == "peer":
            skipped[f] = "phone-to-phone RTT log (no AP ranging, no IMU)"
        else:
            skipped[f] = "header matches no walk layout"
    if not walks:
        raise InputError(f"{', '.join(map(str, paths))}: no FTM/IMU walk file found")
    return DataDir(walks, sites, skipped)


def read_walk(path: Path) -> Walk:
    """Read one walk file by its header (see the module docstring for the layouts)."""
    header, rows = _read_rows(path)
    names = [_norm(h) for h in header]
    if "rttresult" in names:
        return _read_phone_log(path, header, names, rows)
    if any(_AP_FIELD.match(h) for h in header):
        return _read_per_ap(path, header, names, rows)
    if any(re.match(r"m\d+m\d+rttdistance", n) for n in names):
        raise InputError(f"{path}: a phone-to-phone RTT log (no AP ranging, no IMU), not a walk")
    raise InputError(
        f"{path}: not an FTM/IMU walk file (the header has neither 'APk RTT Distance' columns nor RTT_RESULT)"
    )


def _ground_truth_columns(header: list[str], names: list[str]) -> tuple[int, int, int]:
    """``(gt, x, y)`` column indexes (-1: absent): one ``M1 Ground Truth`` column holding ``"[x, y]"`` (CarPark,
    Canteen, Library, Conference Room), or a pair ``M1 Ground Truth_x`` / ``M1 Ground Truth_y`` (Laboratory,
    Shopping Mall), or else any pair ending in ``_x`` / ``_y`` (``true_x``), or else ``x`` and ``y``."""
    whole = next((j for j, n in enumerate(names) if n.endswith("groundtruth")), -1)
    if whole >= 0:
        return whole, -1, -1

    def pair(suffix: str) -> int:
        ends = [j for j, h in enumerate(header) if h.strip().lower().endswith(suffix)]
        named = [j for j in ends if "groundtruth" in names[j]]
        plain = [j for j, h in enumerate(header) if h.strip().lower() == suffix[-1]]
        return (named or ends or plain or [-1])[0]

    return -1, pair("_x"), pair("_y")


def _imu_columns(path: Path, names: list[str]) -> list[int]:
    cols = [-1] * len(IMU_CHANNELS)
    for j, n in enumerate(names):
        if n in _IMU_KEYS:
            cols[_IMU_KEYS[n]] = j
    missing = [IMU_CHANNELS[i] for i, c in enumerate(cols) if c < 0]
    if missing:
        raise InputError(f"{path}: IMU columns missing from the header: {', '.join(missing)}")
    return cols


def _empty_walk(path: Path, layout: str, device: str, ap_ids: list[str]) -> Walk:
    e = np.empty(0)
    return Walk(path.stem, scene_of(path), device, path, layout, e, ap_ids, e, e, e, None, e, None)


def _finish(path: Path, walk: Walk) -> Walk:
    if len(walk) == 0:
        reason = walk.bad_rows[0][1] if walk.bad_rows else "no data rows"
        raise InputError(f"{path}: no readable row ({reason})")
    order = np.argsort(walk.t_ms, kind="stable")
    if np.any(order != np.arange(len(order))):
        for name in ("t_ms", "rtt", "std", "rss", "true_dist", "imu", "gt"):
            arr = getattr(walk, name)
            if arr is not None:
                setattr(walk, name, arr[order])
        walk.t_raw = [walk.t_raw[i] for i in order]
        walk.lines = [walk.lines[i] for i in order]
    return walk


def _read_per_ap(
    path: Path, header: list[str], names: list[str], rows: list[tuple[int, list[str], str]]
) -> Walk:
    ap_cols: dict[str, list[int]] = {}
    for j, h in enumerate(header):
        m = _AP_FIELD.match(h)
        if m:
            ap_cols.setdefault(m.group(1).upper(), [-1, -1, -1, -1])[_FIELD_INDEX[m.group(2).lower()]] = j
    ap_ids = sorted(ap_cols, key=lambda a: (len(a), a))
    for a in ap_ids:
        if ap_cols[a][1] < 0:
            raise InputError(f"{path}: {a} has no 'RTT Distance' column")
    t_col = next((j for j, n in enumerate(names) if "timestamp" in n), -1)
    if t_col < 0:
        raise InputError(f"{path}: no time stamp column (expected e.g. 'M1 Time Stamp (ms)')")
    device_m = re.match(r"\s*(\S+)\s+time\s*stamp", header[t_col], re.IGNORECASE)
    device = device_m.group(1) if device_m else path.stem
    gt_col, gx, gy = _ground_truth_columns(header, names)
    has_gt = gt_col >= 0 or (gx >= 0 and gy >= 0)
    has_true = all(ap_cols[a][0] >= 0 for a in ap_ids)
    imu_cols = _imu_columns(path, names)
    n_ap = len(ap_ids)
    t, rtt, std, rss, td, imu, gt = [], [], [], [], [], [], []
    walk = _empty_walk(path, "per_ap", device, ap_ids)
    for line_no, row, raw in rows:
        try:
            if len(row) < len(header) - 1:
                raise ValueError(f"{len(row)} fields, the header has {len(header)}")
            vals = np.zeros((4, n_ap))
            for k, a in enumerate(ap_ids):
                for f, c in enumerate(ap_cols[a]):
                    if c >= 0 and row[c].strip():
                        vals[f, k] = _float(row[c])
            xy = (
                _parse_xy(row[gt_col]) if gt_col >= 0 else (_float(row[gx]), _float(row[gy]))
            ) if has_gt else (math.nan, math.nan)  # fmt: skip
            imu_row = [_float(row[c]) for c in imu_cols]
            t_val = _float(row[t_col])
        except (ValueError, IndexError) as exc:
            walk.bad_rows.append((line_no, str(exc), raw))
            continue
        bad = vals[1] < 0
        vals[:3, bad] = 0.0  # a negative RTT distance is a failed ranging
        t.append(t_val)
        td.append(vals[0])
        rtt.append(vals[1])
        std.append(vals[2])
        rss.append(vals[3])
        imu.append(imu_row)
        gt.append(xy)
        walk.t_raw.append(row[t_col].strip())
        walk.lines.append(line_no)
    walk.t_ms = np.asarray(t, dtype=np.float64)
    walk.rtt = np.asarray(rtt).reshape(-1, n_ap)
    walk.std = np.asarray(std).reshape(-1, n_ap)
    walk.rss = np.asarray(rss).reshape(-1, n_ap)
    walk.true_dist = np.asarray(td).reshape(-1, n_ap) if has_true else None
    walk.imu = np.asarray(imu, dtype=np.float64).reshape(-1, len(IMU_CHANNELS))
    walk.gt = np.asarray(gt, dtype=np.float64).reshape(-1, 2) if has_gt else None
    return _finish(path, walk)


def _read_phone_log(
    path: Path, header: list[str], names: list[str], rows: list[tuple[int, list[str], str]]
) -> Walk:
    try:
        names.index("rtttimestamp")  # required, though rows are timed by IMU_TIMESTAMP
        c_res, c_imu_t = (
            names.index("rttresult"),
            names.index("imutimestamp"),
        )
    except ValueError as exc:
        raise InputError(f"{path}: phone log without RTT_TIMESTAMP / IMU_TIMESTAMP columns") from exc
    imu_cols = _imu_columns(path, names)
    parsed: list[tuple[int, str, float, dict[str, tuple[float, float, float]], list[float]]] = []
    walk = _empty_walk(path, "phone_log", path.stem, [])
    for line_no, row, raw in rows:
        try:
            t_ns = _float(row[c_imu_t])
            fields = [x.strip() for x in row[c_res].strip().strip("[]").split(",") if x.strip()]
            if len(fields) % 4:
                raise ValueError(f"RTT_RESULT has {len(fields)} fields, not a multiple of 4")
            res: dict[str, tuple[float, float, float]] = {}
            for k in range(0, len(fields), 4):
                mac = fields[k].lower()
                if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac):
                    raise ValueError(f"RTT_RESULT entry {fields[k]!r} is not a MAC address")
                dist_mm, std_mm, rss = _float(fields[k + 1]), _float(fields[k + 2]), _float(fields[k + 3])
                if dist_mm > 0:
                    res[mac] = (dist_mm / 1000.0, std_mm / 1000.0, rss)
            imu_row = [_float(row[c]) for c in imu_cols]
        except (ValueError, IndexError) as exc:
            walk.bad_rows.append((line_no, str(exc), raw))
            continue
        parsed.append((line_no, row[c_imu_t].strip(), t_ns / 1e6, res, imu_row))
    macs = sorted({m for p in parsed for m in p[3]})
    n, a = len(parsed), len(macs)
    walk.ap_ids = macs
    walk.t_ms = np.array([p[2] for p in parsed], dtype=np.float64)
    walk.rtt, walk.std, walk.rss = np.zeros((n, a)), np.zeros((n, a)), np.zeros((n, a))
    for i, p in enumerate(parsed):
        for mac, (d, s, r) in p[3].items():
            k = macs.index(mac)
            walk.rtt[i, k], walk.std[i, k], walk.rss[i, k] = d, s, r
    walk.imu = np.array([p[4] for p in parsed], dtype=np.float64).reshape(-1, len(IMU_CHANNELS))
    walk.t_raw = [p[1] for p in parsed]
    walk.lines = [p[0] for p in parsed]
    return _finish(path, walk)


def read_site_file(path: Path) -> dict[str, tuple[float, float]]:
    """AP (and landmark) positions of a site file: long (``,x,y`` / ``AP1,30.84,6.75``) or wide
    (names in the header, ``"(x,y)"`` cells in the row below; full-width brackets are accepted)."""
    header, rows = _read_rows(path)
    out: dict[str, tuple[float, float]] = {}
    low = [h.lower() for h in header]
    try:
        if "x" in low and "y" in low:
            ix, iy = low.index("x"), low.index("y")
            for _line, row, _raw in rows:
                if row and row[0].strip():
                    out[row[0].strip()] = (float(row[ix]), float(row[iy]))
        else:
            for _line, row, _raw in rows:
                for name, cell in zip(header, row, strict=False):
                    if name and cell.strip() and "mac" not in cell.lower():  # "AP1_Mac = ..." notes
                        out[name.strip()] = _parse_xy(cell)
    except (ValueError, IndexError) as exc:
        raise InputError(f"{path}: not a site file of AP positions ({exc})") from exc
    if not out:
        raise InputError(f"{path}: no AP position found")
    return out


@dataclass
class SiteGeometry:
    """AP positions of one scene, recovered from true distances + ground truth (or from a site file)."""

    scene: str
    ap_ids: list[str]
    positions: np.ndarray  # (A, 2)
    residual_m: dict[str, float]  # RMS of |p - a| - d per AP (recovered only)
    n_obs: dict[str, int]
    source: str  # "recovered" or the site file's path
    ambiguous: list[str] = field(default_factory=list)  # APs whose mirror image fits equally well
    site_check_m: dict[str, float] = field(default_factory=dict)  # distance to the nearest site-file point
    mirror_resolved: list[str] = field(default_factory=list)  # ambiguous APs a site file told apart
    # APs the walk files list but whose position the data cannot give (never ranged, too few ranges), with why
    left_out: dict[str, str] = field(default_factory=dict)

    def position(self, ap: str) -> np.ndarray:
        return self.positions[self.ap_ids.index(ap)]

    def as_dict(self) -> dict[str, object]:
        return {
            "scene": self.scene,
            "source": self.source,
            "aps": {
                a: {
                    "x": round(float(p[0]), 3),
                    "y": round(float(p[1]), 3),
                    "residual_m": round(self.residual_m.get(a, math.nan), 4),
                    "n_obs": self.n_obs.get(a, 0),
                    **(
                        {"site_file_diff_m": round(self.site_check_m[a], 3)} if a in self.site_check_m else {}
                    ),
                }
                for a, p in zip(self.ap_ids, self.positions, strict=True)
            },
            "ambiguous": self.ambiguous,
            **({"mirror_resolved": self.mirror_resolved} if self.mirror_resolved else {}),
            **({"left_out": self.left_out} if self.left_out else {}),
        }


def _solve_ap(p: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Least squares ``|p_i - a| = d_i``: linearised solve, then Gauss-Newton on the range residuals.

    Returns the position and, when the observations lie on one line, its mirror image across that line
    (which fits them equally well); None otherwise."""
    centre = p.mean(axis=0)
    q = p - centre
    a_mat = np.column_stack([-2 * q[:, 0], -2 * q[:, 1], np.ones(len(q))])
    b = d**2 - (q**2).sum(axis=1)
    sv = np.linalg.svd(a_mat[:, :2] - a_mat[:, :2].mean(axis=0), compute_uv=False)
    colinear = sv[-1] < 1e-6 * max(sv[0], 1e-12) or sv[-1] < 1e-3 * math.sqrt(len(q))
    if colinear:  # one straight line: fit along the line and take the mirror-free perpendicular offset
        u = (q[-1] - q[0]) / max(np.linalg.norm(q[-1] - q[0]), 1e-9)
        nrm = np.array([-u[1], u[0]])
        s = q @ u
        sol, *_ = np.linalg.lstsq(np.column_stack([-2 * s, np.ones(len(s))]), d**2 - s**2, rcond=None)
        perp2 = max(sol[1] - sol[0] ** 2, 0.0)
        a = sol[0] * u + math.sqrt(perp2) * nrm
    else:
        sol, *_ = np.linalg.lstsq(a_mat, b, rcond=None)
        a = sol[:2]
    for _ in range(20):
        diff = a - q
        r = np.linalg.norm(diff, axis=1)
        r = np.maximum(r, 1e-9)
        jac = diff / r[:, None]
        step, *_ = np.linalg.lstsq(jac, d - r, rcond=None)
        a = a + step
        if np.linalg.norm(step) < 1e-9:
            break
    if not colinear:
        return a + centre, None
    mirror = a - 2 * float(a @ nrm) * nrm  # reflected across the walk's line (through the centroid)
    return a + centre, mirror + centre


def recover_ap_positions(walks: list[Walk], site_files: list[Path] | None = None) -> SiteGeometry:
    """AP positions of one scene from all its walks' true distances and ground truth together.

    A single straight walk cannot tell an AP from its mirror image across the walk; walks on different
    lines resolve it. So does a site file: of the two images, the one nearer to a site-file point (of any
    name) is kept and the AP is listed in ``mirror_resolved``; APs left unresolved are listed in
    ``ambiguous``. Without true distances, the positions come from the first site file naming the walks' APs.
    An AP no walk ever ranged, or ranged fewer than 3 times with ground truth, is left out of the geometry and
    listed in ``left_out`` with the reason; only a scene without a single recoverable AP is an error.
    """
    if not walks:
        raise InputError("no walk to recover AP positions from")
    scene = walks[0].scene
    usable = [w for w in walks if w.true_dist is not None and w.gt is not None]
    ap_ids = sorted({a for w in (usable or walks) for a in w.ap_ids}, key=lambda a: (len(a), a))
    # an AP the files list but no walk ever ranged (all zeros) has no position to give: leave it out, say so
    never = [
        a for a in ap_ids if not any(a in w.ap_ids and (w.rtt[:, w.ap_ids.index(a)] > 0).any() for w in walks)
    ]
    if usable:  # ranged but without a single true distance is the same for recovery
        never = [a for a in ap_ids if a in never or _true_distances(usable, a)[0].shape[0] == 0]
    left_out = {a: "never ranged in any walk of the scene" for a in never}
    wanted = [a for a in ap_ids if a not in left_out]
    site_points: dict[str, tuple[float, float]] = {}
    site_src = ""
    for sf in site_files or []:
        pts = read_site_file(sf)
        if not site_src and wanted and all(a in pts for a in wanted):
            site_src = str(sf)
        site_points.update({k: v for k, v in pts.items() if k not in site_points})
    if not usable:
        if not site_src:
            raise InputError(
                f"scene {scene}: no walk has true distances and ground truth, and no site file names its APs"
                + (f" (never ranged, left out: {', '.join(never)})" if never else "")
            )
        pts = read_site_file(Path(site_src))
        geo = SiteGeometry(scene, wanted, np.array([pts[a] for a in wanted]), {}, {}, site_src)
        geo.left_out = left_out
        return geo
    pts_arr = np.array(list(site_points.values())) if site_points else np.empty((0, 2))
    kept, positions, residual, n_obs, ambiguous, resolved = [], [], {}, {}, [], []
    for a in wanted:
        p, d = _true_distances(usable, a)
        if len(p) < 3:
            left_out[a] = f"{len(p)} true-distance observations, need 3"
            continue
        pos, mirror = _solve_ap(p, d)
        if mirror is not None:
            near = [float(np.min(np.linalg.norm(pts_arr - x, axis=1))) if len(pts_arr) else 0.0
                    for x in (pos, mirror)]  # fmt: skip
            if abs(near[0] - near[1]) > 0.5:  # the site file tells the two images apart
                pos = pos if near[0] < near[1] else mirror
                resolved.append(a)
            else:
                ambiguous.append(a)
        kept.append(a)
        positions.append(pos)
        residual[a] = float(np.sqrt(np.mean((np.linalg.norm(p - pos, axis=1) - d) ** 2)))
        n_obs[a] = len(p)
    if not kept:
        why = "; ".join(f"{a}: {r}" for a, r in left_out.items())
        raise InputError(f"scene {scene}: no AP position can be recovered ({why})")
    geo = SiteGeometry(scene, kept, np.array(positions), residual, n_obs, "recovered", ambiguous)
    geo.mirror_resolved = resolved
    geo.left_out = left_out
    if site_points:
        for a, pos in zip(kept, geo.positions, strict=True):
            geo.site_check_m[a] = float(np.min(np.linalg.norm(pts_arr - pos, axis=1)))
    return geo


def _true_distances(walks: list[Walk], ap: str) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth positions and true distances of every row (of all walks) in which ``ap`` was ranged."""
    ps, ds = [np.empty((0, 2))], [np.empty(0)]
    for w in walks:
        if ap in w.ap_ids and w.true_dist is not None and w.gt is not None:
            k = w.ap_ids.index(ap)
            ok = (w.true_dist[:, k] > 0) & np.isfinite(w.gt).all(axis=1)
            ps.append(w.gt[ok])
            ds.append(w.true_dist[ok, k])
    return np.concatenate(ps), np.concatenate(ds)


def _lstsq2(j: np.ndarray, res: np.ndarray) -> np.ndarray:
    """Least-squares ``step`` minimising ``|j @ step - res|`` for a ``(k, 2)`` ``j``: the normal equations in
    closed form (much faster than ``np.linalg.lstsq`` per row); a rank-deficient ``j`` falls back to it."""
    a, b, c = float(j[:, 0] @ j[:, 0]), float(j[:, 0] @ j[:, 1]), float(j[:, 1] @ j[:, 1])
    det = a * c - b * b
    if det <= 1e-12 * max(a * c, 1e-300):
        return np.linalg.lstsq(j, res, rcond=None)[0]
    u, v = float(j[:, 0] @ res), float(j[:, 1] @ res)
    return np.array([(c * u - b * v) / det, (a * v - b * u) / det])


class FixTracker:
    """The least-squares FTM fix, one ranging row at a time (what :func:`trilaterate` does per row), so the
    live windows compute the fix the offline windows have.

    ``ap_ids`` (default: the site's APs) fixes the starting point (their centroid) and the bounding box.
    ``fixed`` tells whether any row has been ranged by >= 3 known APs yet (before that ``est`` is the
    centroid)."""

    def __init__(self, geo: SiteGeometry, ap_ids: list[str] | None = None, margin_m: float = 10.0) -> None:
        ids = list(geo.ap_ids if ap_ids is None else ap_ids)
        self.index = {a: k for k, a in enumerate(ids)}
        self.aps = np.array(
            [geo.position(a) if a in geo.ap_ids else [np.nan, np.nan] for a in ids], dtype=np.float64
        ).reshape(-1, 2)
        self.est = np.nanmean(self.aps, axis=0)
        self.lo = np.nanmin(self.aps, axis=0) - margin_m
        self.hi = np.nanmax(self.aps, axis=0) + margin_m
        self.fixed = False

    def update_row(self, rtt: np.ndarray) -> np.ndarray:
        """One row of RTT distances in ``ap_ids`` order (0: not ranged); returns the fix after it."""
        ok = (rtt > 0) & np.isfinite(self.aps[:, 0])
        if ok.sum() >= 3:
            a, d = self.aps[ok], rtt[ok]
            x = self.est.copy()
            for _ in range(15):
                diff = x - a
                r = np.maximum(np.sqrt((diff**2).sum(axis=1)), 1e-6)
                step = _lstsq2(diff / r[:, None], d - r)
                x = x + step
                if step[0] ** 2 + step[1] ** 2 < 1e-12:
                    break
            if np.all(np.isfinite(x)) and np.all(x >= self.lo) and np.all(x <= self.hi):
                self.est = x
                self.fixed = True
        return self.est

    def update(self, ranged: dict[str, float]) -> np.ndarray:
        """One row as ``{ap: rtt_m}`` (APs the site does not know are ignored)."""
        rtt = np.zeros(len(self.index))
        for a, d in ranged.items():
            k = self.index.get(a)
            if k is not None:
                rtt[k] = d
        return self.update_row(rtt)


def trilaterate(walk: Walk, geo: SiteGeometry, margin_m: float = 10.0) -> np.ndarray:
    """Least-squares position per row from the raw RTT distances of the APs ranged in that row (>= 3 APs;
    otherwise the previous fix is held). Gauss-Newton from the previous fix (first: the APs' centroid); a
    fix more than ``margin_m`` outside the APs' bounding box is discarded and the previous one held."""
    tracker = FixTracker(geo, walk.ap_ids, margin_m)
    out = np.zeros((len(walk), 2))
    for i in range(len(walk)):
        out[i] = tracker.update_row(walk.rtt[i])
    return out


def site_message(geo: SiteGeometry, walks: list[str]) -> dict[str, Any]:
    """The ``sites.ftm`` record of a scene (key = scene): full-precision positions, so a consumer's fix
    equals one computed from the recovered geometry itself."""
    recovered = geo.source == "recovered"
    return {
        "scene": geo.scene,
        "ap_ids": list(geo.ap_ids),
        "positions": [[float(x), float(y)] for x, y in geo.positions],
        "residual_m": {a: geo.residual_m[a] for a in geo.ap_ids if a in geo.residual_m},
        "n_obs": {a: geo.n_obs[a] for a in geo.ap_ids if a in geo.n_obs},
        "source": "recovered" if recovered else "site-file",
        "site_file": None if recovered else Path(geo.source).name,
        "ambiguous": list(geo.ambiguous),
        "mirror_resolved": list(geo.mirror_resolved),
        "left_out": dict(geo.left_out),
        "site_file_diff_m": dict(geo.site_check_m),
        "walks": sorted(walks),
    }


def site_from_message(msg: dict[str, Any]) -> SiteGeometry:
    """Inverse of :func:`site_message`; KeyError/ValueError/TypeError on a malformed record (a number too large
    for a float, e.g. ``1e400`` written as an integer, is a ValueError too, not an OverflowError)."""
    try:
        return _site_from_message(msg)
    except OverflowError as exc:
        raise ValueError(f"site record holds a number out of range: {exc}") from exc


def _site_from_message(msg: dict[str, Any]) -> SiteGeometry:
    ids = [str(a) for a in msg["ap_ids"]]
    pos = np.asarray(msg["positions"], dtype=np.float64).reshape(-1, 2)
    if len(pos) != len(ids) or not np.all(np.isfinite(pos)):
        raise ValueError("positions do not match ap_ids")
    return SiteGeometry(
        str(msg["scene"]),
        ids,
        pos,
        {str(k): float(v) for k, v in msg.get("residual_m", {}).items()},
        {str(k): int(v) for k, v in msg.get("n_obs", {}).items()},
        str(msg.get("site_file") or msg.get("source", "recovered")),
        [str(a) for a in msg.get("ambiguous", [])],
        {str(k): float(v) for k, v in msg.get("site_file_diff_m", {}).items()},
        [str(a) for a in msg.get("mirror_resolved", [])],
        {str(k): str(v) for k, v in msg.get("left_out", {}).items()},
    )


def site_files_near(walk_paths: list[Path]) -> dict[str, list[Path]]:
    """Site files (``<scene>__*AP_idx*.csv``) in the folders of the given walk files, per scene."""
    out: dict[str, list[Path]] = {}
    for folder in sorted({p.resolve().parent for p in walk_paths}):
        for f in sorted(folder.glob("*.csv")):
            if kind_of(f) == "site":
                out.setdefault(scene_of(f), []).append(f)
    return out


def recover_sites(
    walks: list[Walk], site_files: dict[str, list[Path]]
) -> tuple[dict[str, SiteGeometry], dict[str, str]]:
    """AP positions per scene from all of that scene's walks together (plus its site files); the scenes
    whose positions the walks cannot determine come back in the second dict with the reason."""
    sites: dict[str, SiteGeometry] = {}
    problems: dict[str, str] = {}
    for scene in sorted({w.scene for w in walks}):
        try:
            sites[scene] = recover_ap_positions([w for w in walks if w.scene == scene], site_files.get(scene))
        except InputError as exc:
            problems[scene] = str(exc)
    return sites, problems
