"""Known data sets as canonical-record files and sites files, for ``nettwin bench twins`` and the live twins.

- Milan hourly (``square_id,h0..hN``) -> CSV ``entity,time,activity`` (entity = the square number, time = the
  hour's start); its sites from the grid and OpenCellID files (``Sites.from_milan``).
- Intel Lab matrices (``intel{Temperature,Humidity}{Train,Test}.csv``, times synthesised at 30-minute steps
  by ``ingest/readers/sensors.py``) -> CSV ``entity,time,temperature`` (entity = ``mote<row>``); its sites from
  ``mote_locs.txt`` (``id x y`` in metres on the lab floor).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ingest.errors import InputError
from ingest.readers.milan import HOUR_MS, HOURLY_START_MS, read_hourly, read_raw
from ingest.readers.sensors import read_sensor_files
from twin_store.federation.plan import load_matrix
from twin_store.federation.sites import Sites


def _write_rows(out: Path, metric: str, rows: list[tuple[str, int, float]]) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["entity", "time", metric])
        w.writerows((e, t, repr(float(v))) for e, t, v in rows)
    return len(rows)


def milan_hourly_records(path: Path, out: Path, squares: int | None, seed: int) -> list[int]:
    """Write the hourly file (``squares`` drawn with ``seed`` exactly as ``bench vhtwin`` draws them, or all) as
    canonical CSV; returns the squares."""
    matrix, ids = load_matrix(path, squares, seed)
    rows = [
        (str(int(sq)), HOURLY_START_MS + h * HOUR_MS, float(matrix[i, h]))
        for i, sq in enumerate(ids.tolist())
        for h in range(matrix.shape[1])
    ]
    rows.sort(key=lambda r: (r[1], r[0]))
    _write_rows(out, "activity", rows)
    return [int(s) for s in ids.tolist()]


def intel_records(paths: list[Path], out: Path) -> list[str]:
    """Write Intel Lab matrices (Test continues Train) as canonical CSV; the metric is the file's kind."""
    rows: list[tuple[str, int, float]] = []
    metric = None
    for table in read_sensor_files(paths):
        if table.layout != "intel":
            raise InputError(f"{table.path}: not an Intel Lab matrix")
        for src, t, v in zip(
            table.source_idx.tolist(), table.times_ms.tolist(), table.values.tolist(), strict=True
        ):
            kind, mote = table.sources[src].split(":", 1)
            if metric not in (None, kind):
                raise InputError("give the matrices of one kind (temperature or humidity)")
            metric = kind
            rows.append((mote, int(t), float(v)))
    if metric is None:
        raise InputError("no readings")
    _write_rows(out, metric, rows)
    return sorted({r[0] for r in rows})


def intel_sites(locs: Path, out: Path) -> int:
    """``mote_locs.txt`` (``id x y``, metres) -> a sites file ``entity,x,y`` with entity ``mote<id>``."""
    entities, xs, ys = [], [], []
    for n, line in enumerate(locs.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            mote, x, y = int(parts[0]), float(parts[1]), float(parts[2])
        except (ValueError, IndexError) as exc:
            raise InputError(f"{locs}:{n}: expected 'id x y'") from exc
        entities.append(f"mote{mote}")
        xs.append(x)
        ys.append(y)
    Sites(tuple(entities), np.array(xs), np.array(ys), geo=False).to_frame().to_csv(out, index=False)
    return len(entities)


def milan_squares(path: Path) -> list[int]:
    """The squares of a Milan file: hourly (``.csv``) or an official raw day (anything else)."""
    table = read_hourly(path) if path.suffix == ".csv" else read_raw(path)
    return sorted({int(s) for s in table.squares.tolist()})


def milan_sites(milan_dir: Path, squares: list[int], out: Path, entity_format: str = "{square}") -> int:
    """Sites of Milan squares from the grid and OpenCellID files, entities named by ``entity_format`` (e.g.
    ``ManagedElement=milan,Square={square}`` for the PM files of ``nettwin data milan-to-pm``)."""
    sites = Sites.from_milan(milan_dir, squares)
    try:
        names = tuple(entity_format.format(square=s) for s in squares)
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"--entity-format {entity_format!r}: use {{square}} for the square number") from exc
    renamed = Sites(
        names, sites.a, sites.b, sites.geo, sites.n_base_stations, sites.bs_a, sites.bs_b, sites.bs_range_m
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    renamed.to_frame().to_csv(out, index=False)
    return len(names)
