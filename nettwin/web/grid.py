"""Where the map draws each entity: the Milan grid's cells (GeoJSON ``cellId`` polygons) as compact boxes.

The page gets flat arrays (ids and ``[x0, y0, x1, y1]`` in a local planar frame, metres-like units) so
10,000 cells arrive in one small response and draw on a canvas at once. Without a GeoJSON file (another
deployment), entities are laid out as a square grid by id: the same shape the Milan grid has.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ingest.errors import InputError

MILAN_SIDE = 100  # the Milan grid is 100 x 100 cells, cellId 1..10000 row by row from the south-west


def load_grid(path: Path | None) -> dict[str, Any]:
    """``{"ids": [...], "boxes": [x0, y0, x1, y1, ...], "source": ...}`` from a GeoJSON grid, or synthetic."""
    if path is None or not path.is_file():
        return synthetic_grid(MILAN_SIDE * MILAN_SIDE, "synthetic grid by id (no GeoJSON file)")
    try:
        data = json.loads(path.read_text())
        features = data["features"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a GeoJSON FeatureCollection ({exc})") from None
    cells: list[tuple[int, float, float, float, float]] = []
    for f in features:
        try:
            cid = int(f["properties"]["cellId"])
            ring = f["geometry"]["coordinates"][0]
            lons = [float(p[0]) for p in ring]
            lats = [float(p[1]) for p in ring]
        except (KeyError, TypeError, ValueError, IndexError):
            continue  # a feature without a cell id or polygon is not a cell we can draw
        cells.append((cid, min(lons), min(lats), max(lons), max(lats)))
    if not cells:
        raise InputError(f"{path}: no features with properties.cellId and a polygon")
    lat0 = sum(c[2] for c in cells) / len(cells)
    kx = 111_320.0 * math.cos(math.radians(lat0))  # metres per degree of longitude at the grid's latitude
    ky = 110_540.0
    lon_min = min(c[1] for c in cells)
    lat_max = max(c[4] for c in cells)
    ids: list[int] = []
    boxes: list[int] = []
    for cid, x0, y0, x1, y1 in sorted(cells):
        ids.append(cid)
        # y grows downwards (screen order): north at the top
        boxes += [
            round((x0 - lon_min) * kx),
            round((lat_max - y1) * ky),
            round((x1 - lon_min) * kx),
            round((lat_max - y0) * ky),
        ]
    return {"ids": ids, "boxes": boxes, "source": path.name}


def synthetic_grid(n: int, source: str) -> dict[str, Any]:
    side = max(1, math.ceil(math.sqrt(n)))
    ids = list(range(1, n + 1))
    boxes: list[int] = []
    for i in range(n):
        row, col = divmod(i, side)
        y = (side - 1 - row) * 10
        boxes += [col * 10, y, col * 10 + 10, y + 10]
    return {"ids": ids, "boxes": boxes, "source": source}
