"""The [twins] steps from raw records (stream_processors/twin_windows.py) and the settings that shape them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.errors import ConfigError
from ingest.schema import decode
from ingest.settings import cadence_seconds, load_settings
from ingest.sources.record import Record
from ingest.sources.wire import encode_records
from stream_processors.twin_windows import TwinWindows

MIN = 60_000


def message(records: list[Record]) -> bytes:
    keys = {r.entity: ord(r.entity[0]) for r in records}  # the same key in every message
    return encode_records(records, keys, "src").encode()


def closed(windows: TwinWindows, *messages: bytes) -> list[tuple[str, int, float, int]]:
    rows = []
    for offset, value in enumerate(messages):
        for batch in windows.on_message(value, offset).features:
            names = batch.extra["entities"]
            for k, t, (v, n) in zip(
                batch.squares.tolist(), batch.starts_ms.tolist(), batch.values.tolist(), strict=True
            ):
                rows.append((names[str(k)], t, v, int(n)))
    return rows


@pytest.mark.parametrize(
    ("aggregate", "expected"), [("sum", 6.0), ("mean", 2.0), ("max", 3.0), ("last", 1.0)]
)
def test_aggregates_of_one_step(aggregate: str, expected: float) -> None:
    w = TwinWindows("t", 0, "down", 600, aggregate)
    recs = [
        Record("a", 0 * MIN, {"down": 2.0}),
        Record("a", 9 * MIN, {"down": 1.0}),
        Record("a", 5 * MIN, {"down": 3.0}),
    ]
    # the step closes only once a record at or past its end arrived
    assert closed(w, message(recs)) == []
    assert closed(w, message([Record("b", 10 * MIN, {"down": 7.0})])) == [("a", 0, expected, 3)]


@pytest.mark.parametrize("aggregate", ["sum", "mean", "max", "last"])
def test_same_time_twice_is_one_measurement_the_last_arrival(aggregate: str) -> None:
    w = TwinWindows("t", 0, "down", 600, aggregate)
    recs = [
        Record("a", 4 * MIN, {"down": 9.0}),
        Record("a", 4 * MIN, {"down": 5.0}),
        Record("a", 2 * MIN, {"down": 1.0}),
    ]
    expected = {"sum": 6.0, "mean": 3.0, "max": 5.0, "last": 5.0}[aggregate]
    assert closed(w, message(recs), message([Record("a", 11 * MIN, {"down": 0.0})])) == [
        ("a", 0, expected, 2)
    ]


def test_last_keeps_the_latest_time_and_among_ties_the_last_arrival() -> None:
    w = TwinWindows("t", 0, "down", 600, "last")
    recs = [
        Record("a", 4 * MIN, {"down": 1.0}),
        Record("a", 4 * MIN, {"down": 5.0}),
        Record("a", 2 * MIN, {"down": 9.0}),
    ]
    assert closed(w, message(recs), message([Record("a", 11 * MIN, {"down": 0.0})])) == [("a", 0, 5.0, 2)]


def test_late_records_are_dead_letters_and_other_metrics_are_not_counted() -> None:
    w = TwinWindows("t", 0, "down", 600, "sum")
    first = message([Record("a", 1 * MIN, {"down": 1.0}), Record("a", 2 * MIN, {"up": 4.0})])
    later = message([Record("a", 21 * MIN, {"down": 2.0})])
    assert closed(w, first, later) == [("a", 0, 1.0, 1)]
    out = w.on_message(message([Record("a", 3 * MIN, {"down": 5.0})]), 2)
    assert out.features == [] and len(out.deadletters) == 1 and "late" in out.deadletters[0].reason
    assert w.counters["late"] == 1 and w.counters["without_metric"] == 1
    assert decode(out.deadletters[0].original).values[0, 0] == 5.0


def test_open_steps_hold_back_their_input_offsets() -> None:
    w = TwinWindows("t", 0, "down", 600, "mean")
    assert w.on_message(message([Record("a", 1 * MIN, {"down": 1.0})]), 7).safe_offset == 7
    assert w.on_message(message([Record("a", 12 * MIN, {"down": 1.0})]), 8).safe_offset == 8
    assert w.on_message(b"junk", 9).safe_offset == 8  # the junk is a dead letter; step 10..20 still open


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 200), st.floats(-1e6, 1e6)), min_size=1, max_size=60
    ),
    st.integers(1, 7),
)
def test_steps_equal_a_groupby_whatever_the_message_split(
    rows: list[tuple[str, int, float]], parts: int
) -> None:
    """Records in time order (one record per minute slot per entity) split over messages: each closed step
    is the mean of its records, as a plain group-by computes it."""
    rows = sorted({(e, t): (e, t, v) for e, t, v in rows}.values(), key=lambda r: r[1])
    recs = [Record(e, t * MIN, {"down": v}) for e, t, v in rows]
    w = TwinWindows("t", 0, "down", 600, "mean")
    keys = {e: i + 1 for i, e in enumerate("abc")}
    chunks = np.array_split(np.arange(len(recs)), parts)
    got = []
    for offset, idx in enumerate(chunks):
        if len(idx):
            out = w.on_message(encode_records([recs[i] for i in idx], keys, "s").encode(), offset)
            assert not out.deadletters
            for b in out.features:
                got += [
                    (b.extra["entities"][str(k)], t, v)
                    for k, t, (v, _) in zip(
                        b.squares.tolist(), b.starts_ms.tolist(), b.values.tolist(), strict=True
                    )
                ]
    newest_step = (rows[-1][1] // 10) * 10 * MIN
    expected: dict[tuple[str, int], list[float]] = {}
    for e, t, v in rows:
        if (t // 10) * 10 * MIN < newest_step:
            expected.setdefault((e, (t // 10) * 10 * MIN), []).append(v)
    assert sorted((e, t) for e, t, _ in got) == sorted(expected)
    for e, t, v in got:
        assert v == pytest.approx(float(np.mean(expected[(e, t)])), rel=1e-9, abs=1e-6)


def test_cadence_parsing() -> None:
    assert cadence_seconds("10m") == 600 and cadence_seconds("1d") == 86_400 and cadence_seconds("2m") == 120
    for bad in ("30s", "2d", "7m", "ten", "5"):
        with pytest.raises(ValueError):
            cadence_seconds(bad)


def test_twins_table_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    for body, expected in [
        (
            '[twins]\ntarget = "down"\ncadence = "7m"\n',
            "setting twins.cadence: Value error, cadence '7m': must divide a day",
        ),
        (
            '[twins]\ntarget = "down"\naggregate = "median"\n',
            "setting twins.aggregate: Input should be 'sum', 'mean', 'last' or 'max'",
        ),
        (
            '[twins]\ntarget = "down"\nhorizon = 0\n',
            "setting twins.horizon: Input should be greater than or equal to 1",
        ),
        ('[twins]\ntarget = "down"\nsteps = 3\n', "setting twins.steps: Extra inputs are not permitted"),
    ]:
        config.write_text(body)
        monkeypatch.setenv("NETTWIN_CONFIG", str(config))
        with pytest.raises(ConfigError) as err:
            load_settings()
        assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    config.write_text(
        '[twins]\ntarget = "DRB.UEThpDl"\ncadence = "30m"\naggregate = "sum"\nhorizon = 2\nsites = "s.csv"\n'
    )
    twins = load_settings().twins
    assert (twins.target, twins.cadence_s, twins.aggregate, twins.horizon, str(twins.sites)) == (
        "DRB.UEThpDl",
        1800,
        "sum",
        2,
        "s.csv",
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 60), st.integers(-50, 50)), min_size=2, max_size=80
    ),
    st.sampled_from(["sum", "mean", "max", "last"]),
    st.integers(1, 5),
)
def test_live_steps_equal_the_offline_series_builder(
    rows: list[tuple[str, int, int]], aggregate: str, parts: int
) -> None:
    """The worker's steps and ``federation/series.build_series`` (what bootstrap and ``bench twins`` use) agree
    on every closed step, duplicates included, for records arriving in time order."""
    from twin_store.federation.series import build_series

    rows = sorted(rows, key=lambda r: r[1])
    keys = {e: i + 1 for i, e in enumerate("abc")}
    w = TwinWindows("t", 0, "down", 600, aggregate)
    live: dict[tuple[str, int], tuple[float, int]] = {}
    for offset, idx in enumerate(np.array_split(np.arange(len(rows)), parts)):
        recs = [Record(rows[i][0], rows[i][1] * MIN, {"down": float(rows[i][2])}) for i in idx]
        if not recs:
            continue
        for b in w.on_message(encode_records(recs, keys, "s").encode(), offset).features:
            for k, t, (v, n) in zip(b.squares.tolist(), b.starts_ms.tolist(), b.values.tolist(), strict=True):
                live[(b.extra["entities"][str(k)], t)] = (v, int(n))
    closed_until = (rows[-1][1] // 10) * 10 * MIN  # the newest record's step is still open
    offline = build_series(
        [r[0] for r in rows], [r[1] * MIN for r in rows], [float(r[2]) for r in rows], 600_000, aggregate,
        start_ms=0, until_ms=closed_until,
    )  # fmt: skip
    expected = {
        (e, int(offline.time_of(k))): (float(offline.values[i, k]), int(offline.counts[i, k]))
        for i, e in enumerate(offline.entities)
        for k in range(offline.steps)
        if np.isfinite(offline.values[i, k])
    }
    assert live.keys() == expected.keys()
    for key, (v, n) in live.items():
        assert v == pytest.approx(expected[key][0]) and n == expected[key][1]
