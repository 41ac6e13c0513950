"""Milan as PM files at a coarser granularity: counters summed per period, read back equal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ingest.readers.milan import read_raw
from ingest.sources.pm_xml import parse_pm_file
from producers.pm_export import coarsen, write_pm_files
from tests.conftest import SHARED_MILAN

DAY = SHARED_MILAN / "raw_2013-11-01_26squares.txt"


@pytest.mark.skipif(not DAY.exists(), reason="needs ../shared/data/milan")
def test_thirty_minute_files_sum_the_ten_minute_intervals(tmp_path: Path) -> None:
    table = read_raw(DAY)
    files = write_pm_files(table, tmp_path, 1800)
    assert len(files) == 48
    records = [r for p in files for r in parse_pm_file(p.read_bytes(), p.name, 2**62).records]
    assert {r.time_ms % 1_800_000 for r in records} == {0}
    total = sum(r.metrics["internet"] for r in records)
    assert total == pytest.approx(table.values[:, table.columns.index("internet")].sum())
    per_square = {int(r.entity.rsplit("=", 1)[1]) for r in records}
    assert per_square == set(np.unique(table.squares).tolist())
    with pytest.raises(ValueError):
        coarsen(table, 900)  # not a multiple of 10 minutes
