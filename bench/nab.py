"""Score the telemetry screens on NAB files with labelled anomaly windows (``nettwin bench nab``).

Each file's values are streamed through every method in time order (``screen_series``: online, each point
judged on the points before it). The first 15% of a file's rows is NAB's probationary period: no detection
there counts, and a window that ends inside it is not scored.

Detections: a run of consecutive flags is one detection, at its first point; a run that crosses a window
boundary is split there (so a flag run entering a window detects it at the window's first flagged row).

Figures, per file and overall:
- window level: ``tp`` (windows with a detection), ``fn``, ``fp`` (detections outside every window),
  ``precision = tp / (tp + fp)``, ``recall = tp / windows``;
- ``early``: mean position of the first detection inside each detected window (0 = window start, 1 = end);
- ``nab``: NAB's standard profile (A_TP = 1, A_FP = -0.11, A_FN = -1) with the scaled sigmoid
  ``2 / (1 + exp(5 y)) - 1``: a window's first detection at relative position y (-1 at its start, 0 at its
  end) scores ``A_TP * sigmoid(y)``; a detection outside windows scores ``|A_FP| * sigmoid(y)`` with y its
  distance after the preceding window's end in window lengths (capped at -1 beyond 3), or ``A_FP`` when no
  window precedes it; a missed window scores ``A_FN``. Normalised to 0 for the null detector (no detections)
  and 100 for the perfect one (a detection at every window start); overall sums before normalising;
- ``seconds`` the method spent on the file.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ingest.errors import InputError
from ingest.readers.sensors import iso_to_ms, read_csv_layout
from twin_store.models.telemetry_screen import make_params, screen_series

METHODS = ("hst", "robust", "zscore")  # zscore: the baseline (rolling mean/std, |z| > 3, no drift handling)
PROBATION = 0.15
A_TP, A_FP, A_FN = 1.0, -0.11, -1.0


def scaled_sigmoid(y: float) -> float:
    if y > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


@dataclass
class FileScore:
    windows: int = 0
    tp: int = 0
    fp: int = 0
    early_sum: float = 0.0
    raw: float = 0.0
    null: float = 0.0
    perfect: float = 0.0
    flagged: int = 0
    points: int = 0
    seconds: float = 0.0

    def __iadd__(self, other: FileScore) -> FileScore:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    def report(self) -> dict[str, Any]:
        det = self.tp + self.fp
        span = self.perfect - self.null
        return {
            "windows": self.windows,
            "tp": self.tp,
            "fn": self.windows - self.tp,
            "fp": self.fp,
            "precision": round(self.tp / det, 3) if det else None,
            "recall": round(self.tp / self.windows, 3) if self.windows else None,
            "early": round(self.early_sum / self.tp, 3) if self.tp else None,
            "nab": round(100.0 * (self.raw - self.null) / span, 1) if span > 0 else None,
            "flagged": self.flagged,
            "points": self.points,
            "seconds": round(self.seconds, 3),
        }


def window_rows(times_ms: np.ndarray, windows_ms: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each (start, end) time window as inclusive row indices (windows with no row are dropped)."""
    out = []
    for a, b in windows_ms:
        s = int(np.searchsorted(times_ms, a, "left"))
        e = int(np.searchsorted(times_ms, b, "right")) - 1
        if e >= s:
            out.append((s, e))
    return out


def score_flags(flags: np.ndarray, windows: list[tuple[int, int]]) -> FileScore:
    """Window-level and NAB figures of one method's flags on one file (windows: inclusive row ranges)."""
    n = flags.shape[0]
    probation = math.floor(PROBATION * n)
    region = np.zeros(n, np.int64)  # changes at every window boundary
    inside = np.full(n, -1, np.int64)
    for k, (s, e) in enumerate(windows):
        region[s] += 1
        if e + 1 < n:
            region[e + 1] += 1
        inside[s : e + 1] = k
    region = np.cumsum(region)
    prev_flag = np.r_[False, flags[:-1]]
    prev_region = np.r_[-1, region[:-1]]
    detections = flags & (~prev_flag | (region != prev_region))
    detections[:probation] = False
    out = FileScore(points=n, flagged=int(flags[probation:].sum()))
    scored = [(k, s, e) for k, (s, e) in enumerate(windows) if e >= probation]
    out.windows = len(scored)
    for _k, s, e in scored:
        length = e - s + 1
        out.null += A_FN
        out.perfect += A_TP * scaled_sigmoid((s - e) / length)
        hits = np.flatnonzero(detections[max(s, probation) : e + 1])
        if hits.shape[0]:
            i = max(s, probation) + int(hits[0])
            out.tp += 1
            out.early_sum += (i - s) / max(1, e - s)
            out.raw += A_TP * scaled_sigmoid((i - e) / length)
        else:
            out.raw += A_FN
    ends = [(e, e - s + 1) for s, e in windows]
    for i in np.flatnonzero(detections & (inside < 0)).tolist():
        out.fp += 1
        before = [(e, length) for e, length in ends if e < i]
        if before:
            e, length = before[-1]
            out.raw += abs(A_FP) * scaled_sigmoid((i - e) / length)
        else:
            out.raw += A_FP
    return out


def load_labels(data: Path) -> dict[str, list[tuple[int, int]]]:
    labels_path = data / "labels_windows.json"
    try:
        labels = json.loads(labels_path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{labels_path}: no such file (NAB's labelled windows)") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{labels_path}: cannot read as JSON ({exc})") from exc
    if not isinstance(labels, dict):
        raise InputError(f"{labels_path}: expected an object of 'realX/file.csv': [[start, end], ...]")
    out: dict[str, list[tuple[int, int]]] = {}
    for key, wins in labels.items():
        try:
            out[Path(key).name] = [(iso_to_ms(a, key), iso_to_ms(b, key)) for a, b in wins]
        except (TypeError, ValueError) as exc:
            raise InputError(f"{labels_path}: windows of {key!r} are not [[start, end], ...] pairs") from exc
    return out


def run(data: Path, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Score every labelled NAB CSV of ``data``; returns per-file and overall figures per method."""
    if not data.is_dir():
        raise InputError(f"{data}: no such directory")
    labels = load_labels(data)
    files = sorted(p for p in data.glob("*.csv") if p.name in labels)
    if not files:
        raise InputError(f"{data}: no CSV file named in labels_windows.json")
    started = time.perf_counter()
    per_file = []
    totals = {m: FileScore() for m in methods}
    for path in files:
        table = read_csv_layout(path, "timestamp", ["value"])
        order = np.argsort(table.times_ms, kind="stable")
        times, values = table.times_ms[order], table.values[order]
        windows = window_rows(times, labels[path.name])
        row: dict[str, Any] = {"file": path.name, "points": len(values), "malformed": len(table.bad)}
        for m in methods:
            t0 = time.perf_counter()
            _, flags = screen_series(values, m)
            score = score_flags(flags, windows)
            score.seconds = time.perf_counter() - t0
            totals[m] += score
            row[m] = score.report()
        per_file.append(row)
    return {
        "data": str(data),
        "files": per_file,
        "overall": {m: totals[m].report() for m in methods},
        "params": {m: asdict(make_params(m)) for m in methods},
        "baseline": "zscore",
        "probation": PROBATION,
        "wall_s": round(time.perf_counter() - started, 3),
    }
