"""The web view's pure parts: parameter parsers, the twin.models header reader, dead-letter grouping, the grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nettwin.web.grid import load_grid
from nettwin.web.kafka_view import reason_class, twin_header
from nettwin.web.server import layer_name, square_id
from twin_store.federation.models_topic import TwinMessage


@pytest.mark.parametrize("bad", ["", "0", "-1", "1.5", "1e3", "①", "1 ", " 1", "99999999999", "x", "1;2"])
def test_square_id_rejects_anything_but_a_plain_positive_id(bad: str) -> None:
    with pytest.raises(ValueError):
        square_id(bad)


def test_square_id_and_layer_accept_good_values() -> None:
    assert square_id("10000") == 10000
    assert layer_name("cluster") == "cluster"
    with pytest.raises(ValueError, match="choose one of"):
        layer_name("traffic; DROP DATABASE x")


def test_twin_header_reads_the_header_without_the_parameters() -> None:
    msg = TwinMessage("cluster", "3", 7, 32, np.arange(10, dtype=np.float32), {"members": [1, 2], "epoch": 2})
    header = twin_header(msg.encode())
    assert header is not None and header["version"] == 7 and header["meta"]["members"] == [1, 2]
    assert twin_header(b"junk") is None and twin_header(b"NTM1\x05\x00\x00\x00{nope") is None


def test_reasons_group_with_numbers_blanked() -> None:
    assert (
        reason_class("line 12: not a number")
        == reason_class("line 40: not a number")
        == "line #: not a number"
    )


def test_grid_from_geojson_and_without_it(tmp_path: Path) -> None:
    cells = []
    for cid, (x, y) in enumerate([(9.0, 45.0), (9.01, 45.0), (9.0, 45.01)], start=1):
        ring = [[x, y], [x + 0.01, y], [x + 0.01, y + 0.01], [x, y + 0.01], [x, y]]
        cells.append({"type": "Feature", "properties": {"cellId": cid}, "geometry": {"coordinates": [ring]}})
    cells.append({"type": "Feature", "properties": {}, "geometry": None})  # skipped, not a crash
    path = tmp_path / "grid.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": cells}))
    grid = load_grid(path)
    assert grid["ids"] == [1, 2, 3] and len(grid["boxes"]) == 12
    x0, _, _, y1 = grid["boxes"][8:12]  # cell 3 is north of cell 1: drawn above it (smaller y)
    assert y1 <= grid["boxes"][1] and x0 == 0
    synthetic = load_grid(None)
    assert len(synthetic["ids"]) == 10_000
