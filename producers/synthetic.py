"""SYNTHETIC Milan-format traffic, for demos and benchmarks when the real files are not at hand.

Writes files in the official layout (tab-separated, no header, one row per square x interval x country
code, empty field = 0). Values follow a daily cycle with per-square scale and noise; they are made up and
labelled as such in file names (``synthetic-milan-format-YYYY-MM-DD.txt``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from ingest.readers.milan import HOURLY_START_MS, INTERVAL_MS

INTERVALS_PER_DAY = 144


def synthetic_day(
    dest: Path,
    day_index: int,
    squares: int,
    seed: int = 1,
    countries: tuple[int, ...] = (0, 39),
    first_square: int = 1,
) -> Path:
    """Write one synthetic day; returns its path. Deterministic for (squares, day_index, seed)."""
    rng = np.random.default_rng([seed, day_index])
    start = HOURLY_START_MS + day_index * 86_400_000
    date = (datetime.fromtimestamp(HOURLY_START_MS / 1000, UTC) + timedelta(days=day_index, hours=1)).date()
    path = dest / f"synthetic-milan-format-{date.isoformat()}.txt"
    sq = np.arange(first_square, first_square + squares)
    scale = rng.gamma(2.0, 5.0, squares)
    t = np.arange(INTERVALS_PER_DAY)
    daily = 1.2 + np.sin(2 * np.pi * (t - 36) / INTERVALS_PER_DAY)  # quiet at night, busy in the afternoon
    weights = np.array([0.05, 0.04, 0.06, 0.05, 1.0])
    n_c = len(countries)
    grid_sq = np.repeat(sq, INTERVALS_PER_DAY * n_c)
    grid_t = np.tile(np.repeat(t, n_c), squares)
    grid_c = np.tile(np.array(countries), squares * INTERVALS_PER_DAY)
    base = np.repeat(scale, INTERVALS_PER_DAY * n_c) * daily[grid_t]
    share = np.where(grid_c == 39, 0.9, 0.1)
    vals = (base * share)[:, None] * weights[None, :] * rng.lognormal(0, 0.3, (grid_sq.size, 5))
    vals[rng.random(vals.shape) < 0.15] = np.nan  # empty fields: no activity
    dest.mkdir(parents=True, exist_ok=True)
    times = start + grid_t.astype(np.int64) * INTERVAL_MS
    with open(path, "w") as fh:
        for s, ts, c, row in zip(
            grid_sq.tolist(), times.tolist(), grid_c.tolist(), vals.tolist(), strict=True
        ):
            fields = "\t".join("" if v != v else repr(v) for v in row)
            fh.write(f"{s}\t{ts}\t{c}\t{fields}\n")
    return path


def synthetic_hourly(dest: Path, squares: int, hours: int, seed: int = 1, first_square: int = 1) -> Path:
    """Write a SYNTHETIC hourly matrix in the layout of ``hourly_150squares_62days.csv`` (``square_id,h0..``):
    a daily and a weekly cycle per square with its own scale, phase and lognormal noise, as integer counts.
    Deterministic for (squares, hours, seed, first_square)."""
    rng = np.random.default_rng([seed, squares, hours])
    t = np.arange(hours)
    scale = rng.gamma(2.0, 200.0, (squares, 1))
    phase = rng.normal(0.0, 1.5, (squares, 1))
    daily = 1.2 + np.sin(2 * np.pi * (t[None, :] - 9 - phase) / 24)
    weekly = 1.0 - 0.25 * ((t[None, :] // 24) % 7 >= 5)  # quieter weekends
    values = np.rint(scale * daily * weekly * rng.lognormal(0.0, 0.15, (squares, hours)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w") as fh:
        fh.write("square_id," + ",".join(f"h{i}" for i in range(hours)) + "\n")
        for sq, row in zip(range(first_square, first_square + squares), values.astype(np.int64), strict=True):
            fh.write(f"{sq}," + ",".join(map(str, row.tolist())) + "\n")
    return dest
