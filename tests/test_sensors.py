"""Sensor telemetry: layouts and dead letters, the online screens, NAB scoring, and the live pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_array_equal

from bench.nab import scaled_sigmoid, score_flags
from ingest.errors import InputError
from ingest.readers.sensors import (
    INTEL_START_MS,
    INTEL_STEP_MS,
    read_csv_layout,
    read_sensor_files,
    source_id,
)
from ingest.schema import decode
from ingest.settings import NettwinSettings
from nettwin.cli.query import read_deadletters
from stream_processors.sensor_screening import SensorScreening
from tests.conftest import REPO, Pipeline, run_cli, wait_until
from tests.test_cli import assert_one_line_error, nettwin
from twin_store.adapters.influx import InfluxClient
from twin_store.models.telemetry_screen import SourceScreen, screen_series
from twin_store.services.store import wait_for_run

SENSORS = REPO.parent / "shared" / "data" / "sensors"
NAB = SENSORS / "nab"
INTEL = SENSORS / "intel_lab"
needs_data = pytest.mark.skipif(not NAB.is_dir() or not INTEL.is_dir(), reason=f"no data at {SENSORS}")


# --- layouts -----------------------------------------------------------------------------------------


@needs_data
def test_nab_layout_by_header() -> None:
    path = NAB / "ec2_cpu_utilization_24ae8d.csv"
    (table,) = read_sensor_files([path])
    raw = pd.read_csv(path)
    assert table.layout == "nab" and table.sources == ["ec2_cpu_utilization_24ae8d"]
    assert len(table) == len(raw) == table.lines and table.bad == []
    assert_array_equal(table.values, raw["value"].to_numpy())
    expected_ms = (
        pd.to_datetime(raw["timestamp"], utc=True).astype("datetime64[ns, UTC]").astype("int64") // 10**6
    )
    assert_array_equal(table.times_ms, expected_ms.to_numpy())


def test_named_time_column_epoch_ms_numeric_columns_and_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "plant.csv"
    path.write_text(
        "site,ts,temp,hum\n"
        "a,1700000000000,21.5,40\n"
        "\n"
        "a,1700000060000,abc,41\n"  # line 4: bad value
        "a,1700000120000,22.0\n"  # line 5: a field short
        "a,1700000180000,22.5,42\n"
        "a,not-a-time,23.0,43\n"  # line 7: bad time
    )
    table = read_csv_layout(path, time_column="ts")
    assert table.layout == "csv" and table.value_columns == ("temp", "hum")  # 'site' is not numeric
    assert table.sources == ["plant:temp", "plant:hum"]
    assert table.time_note == "epoch ms"
    assert_array_equal(table.times_ms, [1_700_000_000_000] * 2 + [1_700_000_180_000] * 2)
    assert_array_equal(table.values, [21.5, 40, 22.5, 42])
    assert [table.sources[i] for i in table.source_idx] == ["plant:temp", "plant:hum"] * 2
    assert [d.position for d in table.bad] == ["line 4", "line 5", "line 7"]
    assert "temp is not a finite number: 'abc'" in table.bad[0].reason
    assert "expected 4 comma-separated fields, got 3" in table.bad[1].reason
    assert "ts is not an ISO 8601 time or epoch number" in table.bad[2].reason
    assert table.bad[0].original == b"a,1700000060000,abc,41" and table.bad[0].stage == "producer"
    # named value columns and a source name
    only = read_csv_layout(path, time_column="ts", value_columns=["hum"], source="greenhouse")
    assert only.sources == ["greenhouse"] and only.value_columns == ("hum",)


def test_nan_text_and_implausible_times_are_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "plant.csv"
    path.write_text(
        "ts,temp\n"
        "1700000000000,21.5\n"
        "1700000060000,NaN\n"  # line 3: the text NaN is no reading
        "600000,22\n"  # line 4: 1970
        "9999999600000,22\n"  # line 5: 2286
        "1e30,22\n"  # line 6: beyond int64 milliseconds
        "1700000120000,23\n"
    )
    table = read_csv_layout(path, time_column="ts")
    assert_array_equal(table.values, [21.5, 23])
    assert [d.position for d in table.bad] == ["line 3", "line 4", "line 5", "line 6"]
    assert "temp is not a finite number: 'NaN'" in table.bad[0].reason
    assert all("outside 2000-01-01..2100-01-01" in d.reason for d in table.bad[1:])


def test_an_iso_column_with_a_year_nanoseconds_cannot_hold_is_a_dead_letter(tmp_path: Path) -> None:
    # found by tests/test_fuzz.py: pandas parsed "-5" as the year -5, then overflowed converting to ns
    path = tmp_path / "iso.csv"
    path.write_text("timestamp,v\n2020-01-01T00:00:00Z,1\n-5,2\n2020-01-01T00:10:00Z,3\n")
    table = read_csv_layout(path)
    assert_array_equal(table.values, [1, 3])
    assert [d.position for d in table.bad] == ["line 3"]
    assert "outside 2000-01-01..2100-01-01" in table.bad[0].reason


def test_iso_with_offsets_and_epoch_seconds(tmp_path: Path) -> None:
    iso = tmp_path / "iso.csv"
    iso.write_text("timestamp,v\n2020-01-01T01:00:00+01:00,1\n2020-01-01 00:30:00,2\n")
    t = read_csv_layout(iso)
    assert_array_equal(t.times_ms, [1_577_836_800_000, 1_577_838_600_000])
    secs = tmp_path / "secs.csv"
    secs.write_text("when,v\n1577836800,1\n1577836801.5,2\n")
    s = read_csv_layout(secs, time_column="when")
    assert s.time_note == "epoch s"
    assert_array_equal(s.times_ms, [1_577_836_800_000, 1_577_836_801_500])


@needs_data
def test_intel_matrices_synthesise_times_and_test_continues_train() -> None:
    files = [INTEL / "intelTemperatureTrain.csv", INTEL / "intelTemperatureTest.csv"]
    train, test = read_sensor_files(files)
    raw_train = np.loadtxt(files[0], delimiter=",")
    raw_test = np.loadtxt(files[1], delimiter=",")
    assert train.layout == test.layout == "intel"
    assert train.sources == [f"temperature:mote{i}" for i in range(1, 51)] == test.sources
    assert "synthesised" in train.time_note
    # step-major: every mote at step 0 first; Test step 0 comes right after Train's last step
    mote3 = train.source_idx == 2
    assert_array_equal(train.values[mote3], raw_train[2])
    assert train.times_ms[0] == INTEL_START_MS
    assert test.times_ms[0] == INTEL_START_MS + raw_train.shape[1] * INTEL_STEP_MS
    assert_array_equal(np.unique(np.diff(np.unique(np.r_[train.times_ms, test.times_ms]))), [INTEL_STEP_MS])
    assert_array_equal(test.values[test.source_idx == 49], raw_test[49])
    # Test alone starts at the given start
    (alone,) = read_sensor_files([files[1]], intel_start_ms=1_000_000_000_000)
    assert alone.times_ms[0] == 1_000_000_000_000
    with pytest.raises(InputError, match=r"outside 2000-01-01\.\.2100-01-01"):
        read_sensor_files([files[1]], intel_start_ms=0)


def test_intel_bad_row_is_a_dead_letter(tmp_path: Path) -> None:
    path = tmp_path / "intelHumidityTrain.csv"
    path.write_text("1,2,3\n4,x,6\n7,8\n9,10,11\n")
    (table,) = read_sensor_files([path])
    assert table.sources == ["humidity:mote1", "humidity:mote4"]
    assert [(d.position, d.reason) for d in table.bad] == [
        ("line 2", "column 2 is not a finite number: 'x'"),
        ("line 3", "expected 3 comma-separated values (one per half-hour step), got 2"),
    ]


def test_unusable_files_are_input_errors(tmp_path: Path) -> None:
    headerless = tmp_path / "matrix.csv"
    headerless.write_text("1,2,3\n4,5,6\n")
    binary = tmp_path / "blob.csv"
    binary.write_bytes(b"\x00\x01\x02timestamp,value\n")
    no_time = tmp_path / "notime.csv"
    no_time.write_text("a,b\n1,2\n")
    cases = {
        headerless: "no header line",
        binary: "not a text CSV",
        no_time: "--time-column",
        tmp_path: "is a directory",
        tmp_path / "missing.csv": "no such file",
    }
    for path, fragment in cases.items():
        with pytest.raises(InputError, match=fragment):
            read_sensor_files([path])


@pytest.mark.parametrize(
    ("make", "args", "fragments"),
    [
        (lambda d: d / "missing.csv", [], ["missing.csv", "no such file"]),
        (lambda d: d, [], ["is a directory"]),
        (lambda d: (d / "x.csv").write_text("a,b\n1,2\n") and d / "x.csv", [], ["x.csv:1", "--time-column"]),
        (
            lambda d: (d / "y.csv").write_text("t,v\n1,2\n") and d / "y.csv",
            ["--time-column", "t", "--value-columns", "w"],
            ["y.csv:1", "'w'"],
        ),
    ],
)
def test_cli_unreadable_file_is_one_line(tmp_path: Path, make, args, fragments) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    # files are read before any service is contacted: an unreachable broker does not mask the error
    res = nettwin("--bootstrap-servers", "127.0.0.1:1", "replay", "sensors", str(path), *args)
    assert_one_line_error(res, *fragments)


# --- detectors ---------------------------------------------------------------------------------------


def noisy(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 20 + 3 * np.sin(2 * np.pi * np.arange(n) / 144) + rng.normal(0, 0.5, n)


@pytest.mark.parametrize("method", ["robust", "hst", "zscore"])
def test_spikes_are_flagged_and_kept(method: str) -> None:
    x = noisy(2000, 1)
    spikes = [700, 1100, 1500, 1900]
    x[spikes] += np.array([12.0, -12.0, 12.0, -12.0])  # beyond the daily range (+-3) and noise (0.5)
    scores, flags = screen_series(x, method)
    assert scores.shape == flags.shape == x.shape  # marked, never dropped
    assert flags[spikes].all(), f"{method} missed spikes at {[s for s in spikes if not flags[s]]}"
    # spikes score above (almost) every ordinary point
    others = np.setdiff1d(np.arange(600, 2000), spikes)
    assert scores[spikes].min() > np.quantile(scores[others], 0.99)
    assert flags[others].mean() < 0.01


def test_hst_difference_feature_catches_spikes_inside_the_daily_range() -> None:
    x = noisy(2000, 1)
    spikes = [700, 1100, 1500, 1900]
    x[spikes] += np.array([8.0, -8.0, 8.0, -8.0])  # 1900 stays inside the daily range
    assert screen_series(x, "hst")[1][spikes].all()
    assert not screen_series(x, "hst", diff=False)[1][spikes].all()


def test_robust_rebaselines_after_a_level_shift() -> None:
    x = noisy(3000, 2)
    x[1500:] += 15.0
    _, robust = screen_series(x, "robust")
    _, fixed = screen_series(x, "robust", rebaseline=False)
    after = slice(1500, 1800)
    assert robust[1500] and fixed[1500]  # the shift itself is an anomaly
    last_robust = 1500 + int(np.flatnonzero(robust[after])[-1])
    last_fixed = 1500 + int(np.flatnonzero(fixed[after])[-1])
    assert last_robust < 1560, "robust should stop flagging the new level within ~60 points (ADWIN)"
    # without ADWIN the window keeps the old level longer: more flags, and later
    assert last_fixed > last_robust and fixed[after].sum() > robust[after].sum()
    assert not robust[1600:].any()
    # and the detector still works on the new level
    y = x.copy()
    y[2500] += 12.0
    assert screen_series(y, "robust")[1][2500]


@pytest.mark.parametrize("method", ["robust", "hst", "zscore"])
def test_screen_series_equals_point_by_point_and_is_deterministic(method: str) -> None:
    x = noisy(1500, 3)
    x[800:] -= 6.0
    x[[500, 1200]] += 9.0
    scores, flags = screen_series(x, method)
    screen = SourceScreen(method)
    seq = [screen.update(v, i * 1000) for i, v in enumerate(x.tolist())]
    assert_array_equal(scores, [s for s, _ in seq])
    assert_array_equal(flags, [f for _, f in seq])
    assert screen.points == 1500 and screen.flagged == int(flags.sum()) and screen.last_ms == 1_499_000
    again = screen_series(x, method)
    assert_array_equal(again[0], scores)  # (was `a and b`: b never ran, a returns None)
    assert_array_equal(again[1], flags)


def test_flat_and_quantised_signals_do_not_divide_by_zero() -> None:
    flat = np.full(500, 3.0)
    flat[400] = 3.5
    scores, flags = screen_series(flat, "robust", q=0)
    assert np.isfinite(scores).all() and flags[400] and flags.sum() == 1
    with pytest.raises(ValueError, match="unknown parameter"):
        screen_series(flat, "robust", windw=10)
    with pytest.raises(ValueError, match="unknown screening method"):
        SourceScreen("magic")


def test_sensor_screening_marks_batches_and_counts_per_source() -> None:
    from ingest.schema import RecordBatch

    x = noisy(400, 4)
    ids = {"a": source_id("a"), "b": source_id("b")}
    screening = SensorScreening("robust")
    outs = []
    for name, sid in ids.items():
        batch = RecordBatch(
            "sensor",
            ("value",),
            60,
            np.full(400, sid, np.uint32),
            np.arange(400, dtype=np.int64) * 60_000,
            x.reshape(-1, 1),
            run="r1",
            extra={"sources": {str(sid): name}},
        )
        outs.append(screening.on_message(batch.encode(), "t", 0, 0))
    marked = decode(outs[1].batches[0].encode())
    assert marked.kind == "screened" and marked.columns == ("value", "score", "flagged")
    expected_scores, expected_flags = screen_series(x, "robust")
    assert_array_equal(marked.values[:, 0], x)
    assert_array_equal(marked.values[:, 1], expected_scores)
    assert_array_equal(marked.values[:, 2] == 1, expected_flags)
    assert marked.extra["counts"] == {"b": [400, int(expected_flags.sum())]}
    bad = screening.on_message(b"garbage", "t", 2, 7)
    assert bad.batches == [] and bad.deadletters[0].position == "t[2]@7"


# --- NAB scoring -------------------------------------------------------------------------------------


def test_nab_scoring_null_perfect_and_false_positives() -> None:
    n, windows = 1000, [(400, 499), (700, 799)]
    none = score_flags(np.zeros(n, bool), windows).report()
    assert none["nab"] == 0.0 and none["tp"] == 0 and none["fn"] == 2 and none["recall"] == 0.0
    perfect = np.zeros(n, bool)
    perfect[[400, 700]] = True
    rep = score_flags(perfect, windows).report()
    assert rep["nab"] == 100.0 and rep["precision"] == 1.0 and rep["early"] == 0.0
    # a run of flags outside the windows is one false positive; before any window it costs A_FP
    late = np.zeros(n, bool)
    late[[499, 799]] = True
    late[200:210] = True
    s = score_flags(late, windows)
    assert s.fp == 1 and s.tp == 2 and s.report()["early"] == 1.0
    assert math.isclose(s.raw, 2 * scaled_sigmoid(0.0) - 0.11)
    # flags in the probationary first 15% do not count
    early = np.zeros(n, bool)
    early[:150] = True
    assert score_flags(early, windows).fp == 0


# --- real services -----------------------------------------------------------------------------------


@pytest.mark.integration
@needs_data
def test_bench_nab_reports_every_method_beside_the_baseline(isolated: NettwinSettings) -> None:
    res = run_cli(isolated, "bench", "nab", "--data", str(NAB), "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["baseline"] == "zscore"
    assert {f["file"] for f in report["files"]} == {p.name for p in NAB.glob("*.csv")}
    for m in ("hst", "robust", "zscore"):
        overall = report["overall"][m]
        assert overall["windows"] == 5 and overall["tp"] + overall["fn"] == 5
        for key in ("precision", "recall", "early", "nab", "fp", "seconds"):
            assert key in overall
    human = run_cli(isolated, "bench", "nab", "--data", str(NAB))
    assert human.returncode == 0 and "baseline" in human.stdout and "overall" in human.stdout


@pytest.mark.integration
def test_bad_rows_reach_the_dead_letter_topic(isolated: NettwinSettings, tmp_path: Path) -> None:
    path = tmp_path / "probe.csv"
    path.write_text("timestamp,value\n2020-01-01T00:00Z,1\n2020-01-01T00:05Z,oops\n2020-01-01T00:10Z,3\n")
    res = run_cli(isolated, "replay", "sensors", str(path), "--max", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["records"] == 2 and summary["malformed"] == 1
    assert summary["file_detail"][0]["layout"] == "nab"
    letters = read_deadletters(isolated, limit=10, timeout_s=3)
    assert [(d.position, d.source, d.original) for d in letters] == [
        ("line 3", str(path), b"2020-01-01T00:05Z,oops")
    ]
    # a file with no valid row: its dead letters are kept, and the command fails with one line
    all_bad = tmp_path / "all_bad.csv"
    all_bad.write_text("timestamp,value\nnope,1\n")
    res = run_cli(isolated, "replay", "sensors", str(all_bad))
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "no valid readings" in res.stderr
    assert len(read_deadletters(isolated, limit=10, timeout_s=3)) == 2


@pytest.mark.integration
@pytest.mark.slow
@needs_data
def test_replayed_nab_is_screened_live_and_stored(pipeline: Pipeline) -> None:
    path = NAB / "ec2_cpu_utilization_24ae8d.csv"
    n = 1500
    res = run_cli(
        pipeline.settings, "replay", "sensors", str(path), "--max", "--limit", str(n), "--run", "nab1"
    )
    assert res.returncode == 0, res.stderr
    with InfluxClient(pipeline.settings.influx) as influx:
        rows = wait_for_run(influx, "nab1", pipeline.settings.kafka.partitions, timeout_s=90)
        assert sum(int(r["sent"]) for r in rows) == sum(int(r["received"]) for r in rows) == n
        series = wait_until(
            lambda: influx.query('SELECT value, score, flagged, source FROM "sensor" ORDER BY time ASC'),
            30,
            "sensor rows",
        )
        counts = influx.query(
            'SELECT last(points) AS points, last(flagged) AS flagged FROM "sensor_screen" GROUP BY "source"'
        )
    pipeline.assert_running()
    got = series[0].rows()
    assert len(got) == n and {r["source"] for r in got} == {"ec2_cpu_utilization_24ae8d"}
    # the live marks equal the offline screen over the same readings: same detector, same order
    (table,) = read_sensor_files([path])
    scores, flags = screen_series(table.values[:n], "robust")
    assert_array_equal([r["time"] for r in got], table.times_ms[:n])
    assert_array_equal([r["value"] for r in got], table.values[:n])
    np.testing.assert_allclose([r["score"] for r in got], scores, rtol=1e-15)
    assert_array_equal([r["flagged"] for r in got], flags)
    assert flags.any()
    (count_row,) = counts[0].rows()
    assert count_row["source"] == "ec2_cpu_utilization_24ae8d"
    assert (count_row["points"], count_row["flagged"]) == (n, int(flags.sum()))
