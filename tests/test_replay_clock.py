"""producers.replay.ReplayClock (event time -> wall time) and producers.synthetic (made-up Milan-format days)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from ingest.errors import InputError
from ingest.readers.milan import HOURLY_START_MS, INTERVAL_MS, RAW_FIELDS, read_raw
from ingest.schema import ACTIVITY_COLUMNS
from producers import replay
from producers.replay import ReplayClock
from producers.synthetic import INTERVALS_PER_DAY, synthetic_day

T0 = 1_383_260_400_000


class FakeTime:
    """Wall clock that only moves when slept on (or when the test says work took time)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    clock = FakeTime()
    monkeypatch.setattr(replay, "time", types.SimpleNamespace(monotonic=clock.monotonic, time=lambda: 0.0))
    return clock


# --- ReplayClock ------------------------------------------------------------------------------------


def test_speed_none_never_sleeps(fake: FakeTime) -> None:
    clock = ReplayClock(None, sleep=fake.sleep)
    for i in range(50):
        clock.wait_until(T0 + i * INTERVAL_MS * 100)
    assert fake.sleeps == []


def test_speed_600_sleeps_event_delta_over_600(fake: FakeTime) -> None:
    clock = ReplayClock(600, sleep=fake.sleep)
    clock.wait_until(T0)  # the first event starts the clock
    assert fake.sleeps == []
    for i in range(1, 7):
        clock.wait_until(T0 + i * INTERVAL_MS)  # 10 minutes of event time = 1 s of wall time
    assert_allclose(fake.sleeps, [1.0] * 6)
    clock.wait_until(T0 + 6 * INTERVAL_MS + 3_600_000)  # one hour later: 6 s
    assert_allclose(fake.sleeps[-1], 6.0)


@pytest.mark.parametrize("speed", [1, 60, 600, 3600.0, 0.5])
def test_sleep_is_event_delta_over_speed(fake: FakeTime, speed: float) -> None:
    clock = ReplayClock(speed, sleep=fake.sleep)
    clock.wait_until(T0)
    clock.wait_until(T0 + 90_000)
    assert_allclose(fake.sleeps, [90.0 / speed])


def test_time_spent_working_is_subtracted_and_schedule_is_kept(fake: FakeTime) -> None:
    clock = ReplayClock(600, sleep=fake.sleep)
    clock.wait_until(T0)
    fake.now += 0.25  # publishing took a quarter of a second
    clock.wait_until(T0 + INTERVAL_MS)
    assert_allclose(fake.sleeps, [0.75])
    fake.now += 3.0  # fell behind by two intervals: no sleep, catch up
    clock.wait_until(T0 + 2 * INTERVAL_MS)
    clock.wait_until(T0 + 3 * INTERVAL_MS)
    assert_allclose(fake.sleeps, [0.75])
    clock.wait_until(T0 + 6 * INTERVAL_MS)  # due at start + 6 s, now start + 4 s
    assert_allclose(fake.sleeps, [0.75, 2.0])
    assert_allclose(fake.now, 1000.0 + 6.0)


def test_events_at_or_before_the_start_do_not_sleep(fake: FakeTime) -> None:
    clock = ReplayClock(600, sleep=fake.sleep)
    clock.wait_until(T0)
    clock.wait_until(T0)
    clock.wait_until(T0 - INTERVAL_MS)
    assert fake.sleeps == []


def test_default_sleep_is_time_sleep() -> None:
    import time

    assert ReplayClock(1.0).sleep is time.sleep


@pytest.mark.parametrize("speed", [0, -1, -600.0, 0.0])
def test_non_positive_speed_is_an_input_error(speed: float) -> None:
    with pytest.raises(InputError, match="--speed must be positive"):
        ReplayClock(speed)


# --- synthetic days ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("squares", "countries"), [(5, (0, 39)), (3, (0, 39, 33)), (2, (39,))])
def test_synthetic_day_has_the_official_layout(
    tmp_path: Path, squares: int, countries: tuple[int, ...]
) -> None:
    path = synthetic_day(tmp_path, 0, squares, seed=3, countries=countries)
    assert path.name == "synthetic-milan-format-2013-11-01.txt"
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    assert lines[-1] == b"", "newline-terminated"
    lines = lines[:-1]
    assert len(lines) == squares * INTERVALS_PER_DAY * len(countries)
    assert all(line.count(b"\t") == len(RAW_FIELDS) - 1 for line in lines)

    df = pd.read_csv(path, sep="\t", header=None, names=list(RAW_FIELDS))
    assert set(df["square_id"]) == set(range(1, squares + 1))
    assert set(df["country_code"]) == set(countries)
    times = df["time_interval"].to_numpy()
    assert_array_equal(np.unique(times), T0 + INTERVAL_MS * np.arange(INTERVALS_PER_DAY))
    activity = df[list(ACTIVITY_COLUMNS)].to_numpy()
    assert np.isnan(activity).any(), "some fields are empty (no activity)"
    assert (activity[~np.isnan(activity)] > 0).all()
    assert df.groupby(["square_id", "time_interval", "country_code"]).size().eq(1).all()

    table = read_raw(path)
    assert table.bad == []
    assert table.lines == len(lines)
    assert len(table) == squares * INTERVALS_PER_DAY
    expected = df.fillna(0.0).groupby(["time_interval", "square_id"], sort=True)[list(ACTIVITY_COLUMNS)].sum()
    assert_allclose(table.values, expected.to_numpy(), rtol=1e-13)
    assert_array_equal(table.squares, expected.index.get_level_values("square_id"))


def test_synthetic_day_index_and_first_square(tmp_path: Path) -> None:
    path = synthetic_day(tmp_path, 2, 4, first_square=101)
    assert path.name == "synthetic-milan-format-2013-11-03.txt"
    table = read_raw(path)
    assert_array_equal(np.unique(table.squares), [101, 102, 103, 104])
    assert table.starts_ms.min() == HOURLY_START_MS + 2 * 86_400_000
    assert table.starts_ms.max() == HOURLY_START_MS + 3 * 86_400_000 - INTERVAL_MS


def test_synthetic_day_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = synthetic_day(tmp_path / "a", 1, 6, seed=7).read_bytes()
    b = synthetic_day(tmp_path / "b", 1, 6, seed=7).read_bytes()
    c = synthetic_day(tmp_path / "c", 1, 6, seed=8).read_bytes()
    d = synthetic_day(tmp_path / "d", 2, 6, seed=7).read_bytes()
    assert a == b
    assert a != c, "another seed gives other values"
    assert len(a.splitlines()) == len(c.splitlines())
    table_a, table_d = (
        read_raw(tmp_path / "a" / "synthetic-milan-format-2013-11-02.txt"),
        read_raw(tmp_path / "d" / "synthetic-milan-format-2013-11-03.txt"),
    )
    assert not np.array_equal(table_a.values, table_d.values), "another day gives other values"
    assert d != a
