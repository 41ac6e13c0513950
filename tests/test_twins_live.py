"""Any network, live (issue 12): a [twins] deployment attaches its own entities, the worker windows them to the
twins' cadence, the twins bootstrap from that history in InfluxDB, and forecasts arrive as ``forecast`` rows
(tags ``entity``, ``metric``) for every entity, late joiners included. On the real services."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingest.settings import NettwinSettings, TwinsSettings
from tests.conftest import REPO, wait_until
from twin_store.adapters.influx import InfluxClient
from twin_store.services.processes import settings_env

pytestmark = pytest.mark.integration

INTEL = REPO.parent / "shared" / "data" / "sensors" / "intel_lab"
SHARED_MILAN = REPO.parent / "shared" / "data" / "milan"
INTEL_START_MS = 1_077_926_400_000  # 2004-02-28T00:00Z, as ingest/readers/sensors.py synthesises them
HALF_HOUR_MS = 1_800_000


class Deployment:
    """attach (with the config's sources), store, worker and htwin as subprocesses of one test."""

    def __init__(self, settings: NettwinSettings, tmp: Path, config: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.config = config
        self.env = settings_env(settings)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *parts: str) -> None:
        for name in parts:
            args = ["attach", "--config", str(self.config)] if name == "attach" else [name]
            with open(self.tmp / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "nettwin.cli.main", *args],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-5000:]}" for p in sorted(self.tmp.glob("*.log")))

    def query(self, q: str) -> list[Any]:
        with InfluxClient(self.settings.influx) as influx:
            try:
                return influx.query(q)
            except Exception:
                return []

    def assert_running(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}\n{self.logs()}"


@pytest.fixture
def deploy(isolated: NettwinSettings, tmp_path: Path) -> Iterator[Any]:
    made: list[Deployment] = []

    def make(twins: TwinsSettings, sources: str) -> Deployment:
        config = tmp_path / "deploy.toml"
        config.write_text(sources)
        d = Deployment(isolated.model_copy(update={"twins": twins}), tmp_path, config)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
        sys.stderr.write(d.logs())


def write_records(path: Path, rows: list[tuple[str, int, dict[str, float]]]) -> None:
    with path.open("a") as fh:
        for entity, t, metrics in rows:
            fh.write(json.dumps({"entity": entity, "time": t, "metrics": metrics}) + "\n")


def forecast_rows(d: Deployment, metric: str) -> dict[str, list[dict[str, Any]]]:
    q = f'SELECT "predicted", "actual" FROM "forecast" WHERE "metric" = \'{metric}\' GROUP BY "entity"'
    return {s.tags["entity"]: s.rows() for s in d.query(q)}


def global_twins(d: Deployment) -> int:
    series = d.query('SELECT count("version") FROM "twin" WHERE "level" = \'global\'')
    return int(series[0].values[0][1]) if series and series[0].values else 0


def intel_temperatures() -> np.ndarray:
    train = np.loadtxt(INTEL / "intelTemperatureTrain.csv", delimiter=",")
    test = np.loadtxt(INTEL / "intelTemperatureTest.csv", delimiter=",")
    return np.hstack([train, test])  # [49 motes, 240 half-hour steps]


def intel_sites(path: Path, motes: int) -> Path:
    """mote_locs.txt gives metres in the lab (mote i = row i of the matrices): placed around Berkeley so
    DCS measures great-circle distances between them."""
    locs = {int(r[0]): (r[1], r[2]) for r in np.loadtxt(INTEL / "mote_locs.txt")}
    lat0, lon0 = 37.8703, -122.2680
    lines = ["entity,lat,lon"]
    for i in range(1, motes + 1):
        x, y = locs[i]
        lines.append(
            f"mote-{i},{lat0 + y / 111_320:.8f},{lon0 + x / (111_320 * math.cos(math.radians(lat0))):.8f}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def mse(pairs: list[tuple[float, float]]) -> float:
    return float(np.mean([(a - b) ** 2 for a, b in pairs]))


@pytest.mark.skipif(not INTEL.is_dir(), reason="the Intel Lab data is not in ../shared/data/sensors")
def test_intel_lab_motes_bootstrap_and_forecast(deploy: Any, tmp_path: Path) -> None:
    """49 motes' temperature at 30-minute steps (two raw readings per step, averaged), a file source. The
    twins bootstrap once 40 motes have 120 steps; the rest of the stream is forecast live. The last mote joins
    late (after the bootstrap): it gets a scaler, a cluster by position, forecasts and is counted."""
    temps = intel_temperatures()
    motes, steps = temps.shape
    data = tmp_path / "motes.jsonl"
    sites = intel_sites(tmp_path / "sites.csv", motes)

    def rows(lo: int, hi: int, who: range) -> list[tuple[str, int, dict[str, float]]]:
        out = []
        for k in range(lo, hi):
            t = INTEL_START_MS + k * HALF_HOUR_MS
            for i in who:
                # two readings a quarter-hour apart with the step's value as their mean
                v = float(temps[i, min(k, steps - 1)])
                out.append((f"mote-{i + 1}", t + 60_000, {"temperature": v - 0.05}))
                out.append((f"mote-{i + 1}", t + 960_000, {"temperature": v + 0.05}))
        return out

    history = 150
    write_records(data, rows(0, history, range(motes - 1)))
    twins = TwinsSettings(
        target="temperature",
        cadence="30m",
        aggregate="mean",
        sites=sites,
        bootstrap_entities=40,
        bootstrap_steps=120,
        clusters=3,
        recluster_every=40,  # DCS re-clusters the live motes (positions and reported profiles) a few times
    )
    d = deploy(
        twins,
        f'[[source]]\nname = "motes"\ntype = "file"\npath = "{data}"\nformat = "json"\n',
    )
    d.start("store", "worker", "attach", "htwin")
    wait_until(lambda: global_twins(d) > 0 or d.assert_running(), 300, "the bootstrap V-twinning")
    steps_in = d.query('SELECT count("value") FROM "twin_input" WHERE "metric" = \'temperature\'')
    assert steps_in and steps_in[0].values[0][1] >= 40 * 120
    means = d.query(
        'SELECT "value", "n_values" FROM "twin_input" WHERE "entity" = \'mote-3\' ORDER BY time ASC LIMIT 5'
    )[0].rows()
    assert [r["value"] for r in means] == pytest.approx(temps[2, :5].tolist()) and {
        r["n_values"] for r in means
    } == {2}

    # the stream goes on: the remaining steps, mote 49 joining with them, one more step to close the last
    write_records(data, rows(history, steps, range(motes)) + rows(steps, steps + 1, range(motes)))
    expected_steps = (
        steps - history - 2
    )  # forecasts begin after the bootstrap's history and the step it is in

    def enough() -> dict[str, list[dict[str, Any]]] | None:
        d.assert_running()
        got = forecast_rows(d, "temperature")
        scored = [r for rs in got.values() for r in rs if r.get("actual") is not None]
        return got if len(got) == motes and len(scored) >= (motes - 1) * expected_steps * 0.9 else None

    got = wait_until(enough, 300, "forecasts with outcomes for every mote", interval=2.0)
    pairs = [(r["predicted"], r["actual"]) for rs in got.values() for r in rs if r.get("actual") is not None]
    late = f"mote-{motes}"  # joined after the bootstrap
    assert late in got and any(r.get("actual") is not None for r in got[late])
    err = mse(pairs)
    spread = float(np.var(temps[:, history:]))
    # persistence on the same scored steps: the step before, as the mote reported it
    persistence = mse(
        [
            (
                float(temps[int(e.split("-")[1]) - 1, (int(r["time"]) - INTEL_START_MS) // HALF_HOUR_MS - 1]),
                r["actual"],
            )
            for e, rs in got.items()
            for r in rs
            if r.get("actual") is not None
        ]
    )
    sys.stderr.write(
        f"intel lab live: {len(pairs)} scored forecasts, MSE {err:.4f} (persistence {persistence:.4f}, "
        f"variance {spread:.4f})\n"
    )
    assert err < 0.5 * spread

    def reclustered() -> set[str]:
        found = d.query('SELECT last("cluster") FROM "membership" WHERE "epoch" >= 1 GROUP BY "entity"')
        return {str(sr.tags["entity"]) for sr in found}

    # local updates trail the forecasts (the stream came in one burst): the store re-clusters once 40 of them
    # were accepted and one of a later step arrives
    members = wait_until(
        lambda: reclustered() or None, 240, "membership rows of a re-clustering", interval=2.0
    )
    assert members <= {f"mote-{i + 1}" for i in range(motes)} and len(members) >= 40


def test_milan_day_as_pm_files_at_30_minutes(deploy: Any, tmp_path: Path) -> None:
    """The real Milan day (26 squares) attached as 3GPP PM files, one per 10-minute interval, twinned at 30
    minutes on the internet counter (sum of three intervals). The twins bootstrap on the first 16 hours; the
    rest of the day is forecast live, per square, with the metric tag."""
    from producers.pm_export import write_pm_files
    from producers.replay import load_table

    day = SHARED_MILAN / "raw_2013-11-01_26squares.txt"
    if not day.is_file():
        pytest.skip("the real Milan sample day is not in ../shared/data/milan")
    table = load_table(day, "raw")
    staged, watched = tmp_path / "staged", tmp_path / "pm"
    files = write_pm_files(table, staged)
    watched.mkdir()
    first = 96  # 16 hours: 32 steps of 30 minutes, the last still open
    for f in files[:first]:
        f.rename(watched / f.name)
    # clusters = 0: as many as Louvain finds (the global twin then says how many it found)
    twins = TwinsSettings(
        target="internet",
        cadence="30m",
        aggregate="sum",
        bootstrap_entities=20,
        bootstrap_steps=30,
        clusters=0,
    )
    d = deploy(
        twins,
        f'[[source]]\nname = "milan-pm"\ntype = "pm-files"\ndirectory = "{watched}"\nsettle_s = 0.0\npoll_s = 0.2\n',
    )
    d.start("store", "worker", "attach", "htwin")
    wait_until(lambda: global_twins(d) > 0 or d.assert_running(), 300, "the bootstrap V-twinning")
    # the steps are the sums of three 10-minute counters, per square
    j = table.columns.index("internet")
    sq = int(table.squares[0])
    mask = table.squares == sq
    per_step: dict[int, float] = {}
    for t, v in zip(table.starts_ms[mask].tolist(), table.values[mask, j].tolist(), strict=True):
        per_step[t - t % HALF_HOUR_MS] = per_step.get(t - t % HALF_HOUR_MS, 0.0) + v
    entity = f"ManagedElement=milan,Square={sq}"
    stored = d.query(f'SELECT "value", "n_values" FROM "twin_input" WHERE "entity" = \'{entity}\'')[0].rows()
    assert {int(r["time"]): r["value"] for r in stored[:10]} == pytest.approx(
        {t: per_step[t] for t in sorted(per_step)[:10]}
    )
    for f in files[first:]:
        f.rename(watched / f.name)
    # every square twinned at the bootstrap (30 steps or more) is forecast; one reporting a few steps only
    # waits to join (counted by the agents), it is not forecast from too little data
    counts = d.query('SELECT count("value") FROM "twin_input" GROUP BY "entity"')
    entities = {c.tags["entity"] for c in counts if c.values[0][1] >= 30}
    assert len(entities) >= 20
    squares = len(entities)

    def enough() -> dict[str, list[dict[str, Any]]] | None:
        d.assert_running()
        got = forecast_rows(d, "internet")
        scored = [r for e, rs in got.items() if e in entities for r in rs if r.get("actual") is not None]
        return got if entities <= set(got) and len(scored) >= squares * 10 else None

    got = wait_until(enough, 300, "forecasts with outcomes for every square", interval=2.0)
    assert set(got) == entities
    pairs = [(r["predicted"], r["actual"]) for rs in got.values() for r in rs if r.get("actual") is not None]
    # persistence on the same scored steps: the step before, from twin_input
    steps = {
        (c.tags["entity"], int(r["time"])): r["value"]
        for c in d.query('SELECT "value" FROM "twin_input" GROUP BY "entity"')
        for r in c.rows()
    }
    persistence = [
        (steps[(e, int(r["time"]) - HALF_HOUR_MS)], r["actual"])
        for e, rs in got.items()
        for r in rs
        if r.get("actual") is not None and (e, int(r["time"]) - HALF_HOUR_MS) in steps
    ]
    sys.stderr.write(f"milan pm persistence: MSE {mse(persistence):.4g} on {len(persistence)}\n")
    sys.stderr.write(f"milan pm live: {len(pairs)} scored forecasts, MSE {mse(pairs):.4g}\n")
    assert all(math.isfinite(p) for p, _ in pairs)


def test_htwin_stops_within_10_s_during_the_bootstrap(deploy: Any) -> None:
    """SIGTERM while the bootstrap V-twins 1,500 entities (minutes of work: the sparse DCS, then V-twinning):
    htwin leaves within 10 s, and no twin of the bootstrap is published: on twin.models only the roster (with the
    plan: sent before the training, for the BS agents to record their kept steps), no twin or membership rows.
    Its history is written straight as twin_input rows (what the store writes)."""
    from twin_store.federation.models_topic import ROSTER_KEY
    from twin_store.services.htwin import read_latest_twins

    entities, steps = 1500, 60
    rng = np.random.default_rng(0)
    t0 = 1_700_000_000 - 1_700_000_000 % 86_400  # seconds, a UTC midnight
    lines = [
        f"twin_input,entity=e{i},metric=v value={100 + 10 * math.sin(k / 7 + i) + rng.normal():.4f},"
        f"n_values=1i,key={i + 1}i {t0 + 60 * k}"
        for i in range(entities)
        for k in range(steps)
    ]
    d = deploy(
        TwinsSettings(target="v", cadence="1m", bootstrap_entities=entities, bootstrap_steps=45, clusters=0),
        "",
    )
    with InfluxClient(d.settings.influx) as influx:
        for lo in range(0, len(lines), 20_000):
            influx.write("\n".join(lines[lo : lo + 20_000]).encode(), precision="s")
    d.start("htwin")
    log = d.tmp / "htwin.log"
    wait_until(
        lambda: "V-twinning 1500 entities" in log.read_text() or d.assert_running(),
        300,
        "V-twinning to start",
    )
    time.sleep(1.0)  # inside the training rounds
    proc = d.procs["htwin"]
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"htwin still running 30 s after SIGTERM\n{d.logs()}") from None
    took = time.monotonic() - sent
    assert took < 10.0, f"htwin took {took:.1f} s to stop\n{d.logs()}"
    assert proc.returncode == 0, d.logs()
    assert "bootstrap stopped" in log.read_text()
    latest = read_latest_twins(d.settings)  # twin.models: not one twin of the bootstrap
    assert list(latest) == [ROSTER_KEY] and len(latest[ROSTER_KEY].meta["members"]) == entities
    assert latest[ROSTER_KEY].meta["plan"]["start_hour"] == steps
    assert d.query('SELECT count("version") FROM "twin"') == []
    assert d.query('SELECT count("cluster") FROM "membership"') == []


def test_bootstrap_readiness_counts_steps_without_reading_the_history(isolated: NettwinSettings) -> None:
    """htwin asks every 5 s whether the history is enough: the answer (and how many entities have enough)
    comes from a count per entity, never the history's rows (500,000 at 10,000 entities)."""
    from twin_store.services.vtwin import bootstrap_ready

    settings = isolated.model_copy(
        update={"twins": TwinsSettings(target="v", cadence="1m", bootstrap_entities=2, bootstrap_steps=10)}
    )
    with InfluxClient(settings.influx) as influx:
        assert bootstrap_ready(settings, influx) == (False, 0)
        lines = [
            f"twin_input,entity={e},metric=v value={k}.5,n_values=1i,key={key}i {60 * k}"
            for key, (e, steps) in enumerate((("a", 5), ("b", 10), ("c", 12)), start=1)
            for k in range(steps)
        ]
        influx.write(
            "\n".join(lines).encode() + b"\ntwin_input,entity=d,metric=w value=1,n_values=1i,key=9i 0"
        )
        assert bootstrap_ready(settings, influx) == (True, 2)
        more = settings.model_copy(
            update={"twins": settings.twins.model_copy(update={"bootstrap_entities": 3})}
        )
        assert bootstrap_ready(more, influx) == (False, 2)


def test_a_twins_worker_imports_torch_before_the_first_twin(deploy: Any) -> None:
    """A [twins] worker imports torch and the twin models while it waits for the bootstrap (a thread at
    start), not on the first step after it: that import (~3 s under load) was most of the first live step's
    close -> forecast time."""
    d = deploy(TwinsSettings(target="v", cadence="1m"), "")
    d.start("worker")
    maps = Path(f"/proc/{d.procs['worker'].pid}/maps")
    wait_until(lambda: "libtorch" in maps.read_text() or d.assert_running(), 60, "torch in the worker")
