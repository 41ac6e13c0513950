"""Fault tests of the Faust worker on the real services: real processes, killed for real, bounded in time.

Each test replays the real 26-square day (per-interval messages, paced so that the faults land mid-replay)
and compares InfluxDB's ``traffic`` and ``traffic_hourly`` with sums computed directly from the file:
every row present once (InfluxDB keeps one point per series and time, so a re-emitted window overwrites an
identical point) with the right sums.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ingest.schema import ACTIVITY_COLUMNS
from ingest.settings import NettwinSettings
from tests.conftest import wait_until
from tests.processes import Processes, managed
from tests.test_e2e import DAY, expected_from_file, influx_frame
from twin_store.adapters.influx import InfluxClient
from twin_store.services.store import wait_for_run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not DAY.exists(), reason=f"real data not found at {DAY}"),
]

# the day's 144 intervals in about 24 s: long enough for a fault to land mid-replay
SPEED = 3600.0
STOP_WITHIN_S = 10.0


class WorkerProcesses(Processes):
    """Child processes, and what a Faust worker among them logs about its partitions."""

    def assigned(self, name: str) -> str:
        """The worker's latest partition assignment as Faust logs it ('' before the first)."""
        text = (self.logdir / f"{name}.log").read_text(errors="replace")
        _, found, table = text.rpartition("Setting newly assigned partitions")
        return table.split(" for group ", 1)[0] if found else ""

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        return self.start(name, "worker", "--loglevel", "info")

    def wait_assigned(self, name: str, topic: str = "telemetry.milan", timeout: float = 90) -> None:
        """Until the worker owns some partitions of ``topic`` (worker start-up takes seconds)."""
        wait_until(lambda: topic in self.assigned(name), timeout, f"{name} to be assigned {topic}")


@pytest.fixture
def procs(
    isolated: NettwinSettings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[WorkerProcesses]:
    yield from managed(WorkerProcesses(isolated, tmp_path / "logs"), request)


def traffic_rows(settings: NettwinSettings) -> int:
    with InfluxClient(settings.influx) as influx:
        series = influx.query('SELECT count("internet") FROM "traffic"')
    return int(series[0].values[0][1]) if series else 0


def assert_day_exact(settings: NettwinSettings, run: str, timeout_s: float) -> None:
    """The run completed on every partition and InfluxDB holds exactly the file's sums."""
    expected = expected_from_file(DAY)
    with InfluxClient(settings.influx) as influx:
        wait_for_run(influx, run, settings.kafka.partitions, timeout_s=timeout_s)
        got = influx_frame(influx, "traffic")
        hourly = influx_frame(influx, "traffic_hourly")
    assert got.index.equals(expected.index)
    np.testing.assert_allclose(got[list(ACTIVITY_COLUMNS)].to_numpy(), expected.to_numpy(), rtol=1e-12)
    flat = expected.reset_index()
    flat["start"] = flat["start"] - flat["start"] % 3_600_000
    hourly_expected = flat.groupby(["square", "start"])[list(ACTIVITY_COLUMNS)].agg(["sum", "count"])
    assert hourly.index.equals(hourly_expected.index)
    for col in ACTIVITY_COLUMNS:
        np.testing.assert_allclose(
            hourly[col].to_numpy(), hourly_expected[(col, "sum")].to_numpy(), rtol=1e-12
        )
    np.testing.assert_array_equal(
        hourly["n_intervals"].to_numpy(), hourly_expected[("internet", "count")].to_numpy()
    )


def start_replay(procs: WorkerProcesses, run: str, speed: float = SPEED) -> subprocess.Popen[bytes]:
    return procs.start("replay", "replay", "milan", str(DAY), "--speed", repr(speed), "--run", run)


def wait_mid_replay(procs: WorkerProcesses, settings: NettwinSettings, rows: int = 2_000) -> None:
    """Until the pipeline has written some rows while the replay is still publishing."""
    wait_until(lambda: traffic_rows(settings) >= rows, 60, f"{rows} traffic rows")
    assert procs.procs["replay"].poll() is None, "the replay ended before the fault: make it slower"


def test_sigterm_mid_replay_stops_in_time_and_a_restart_completes(
    isolated: NettwinSettings, procs: WorkerProcesses
) -> None:
    procs.start_worker("worker")
    procs.start("store", "store")
    procs.wait_assigned("worker")
    start_replay(procs, "sigterm")
    wait_mid_replay(procs, isolated)
    took = procs.signal("worker", signal.SIGTERM)
    assert took < STOP_WITHIN_S, f"worker took {took:.1f} s to stop on SIGTERM\n{procs.logs()}"
    procs.start_worker("worker2")
    assert procs.procs["replay"].wait(60) == 0
    assert_day_exact(isolated, "sigterm", timeout_s=60)
    procs.assert_running("worker2", "store")
    took = procs.signal("worker2", signal.SIGINT)  # Ctrl-C after the run: nothing left in flight
    assert took < STOP_WITHIN_S, f"worker took {took:.1f} s to stop on SIGINT\n{procs.logs()}"


def test_two_workers_one_killed_mid_replay(isolated: NettwinSettings, procs: WorkerProcesses) -> None:
    procs.start_worker("worker-a")
    procs.start_worker("worker-b")
    procs.start("store", "store")
    for name in ("worker-a", "worker-b"):  # both in the group before the replay: the partitions are shared
        procs.wait_assigned(name)
    start_replay(procs, "kill-one")
    wait_mid_replay(procs, isolated)
    procs.signal("worker-b", signal.SIGKILL)
    assert procs.procs["replay"].wait(60) == 0
    # the survivor takes the dead worker's partitions once its session times out (6 s locally)
    assert_day_exact(isolated, "kill-one", timeout_s=60)
    procs.assert_running("worker-a", "store")
    assert procs.signal("worker-a", signal.SIGTERM) < STOP_WITHIN_S


def test_second_worker_added_mid_replay(isolated: NettwinSettings, procs: WorkerProcesses) -> None:
    procs.start_worker("worker-a")
    procs.start("store", "store")
    procs.wait_assigned("worker-a")
    start_replay(procs, "scale-out", speed=SPEED / 3)  # slower: a worker takes seconds to start
    wait_mid_replay(procs, isolated, rows=500)
    procs.start_worker("worker-b")
    procs.wait_assigned("worker-b")  # the newcomer gets partitions while the replay goes on
    assert procs.procs["replay"].poll() is None, "the replay ended before worker-b joined: make it slower"
    assert "telemetry.milan" in procs.assigned("worker-a")  # and the first one keeps some
    assert procs.procs["replay"].wait(90) == 0
    assert_day_exact(isolated, "scale-out", timeout_s=60)
    procs.assert_running("worker-a", "worker-b", "store")
    for name in ("worker-a", "worker-b"):
        assert procs.signal(name, signal.SIGTERM) < STOP_WITHIN_S, procs.logs()


def test_poison_on_every_worker_topic_costs_that_message_only(
    isolated: NettwinSettings, procs: WorkerProcesses
) -> None:
    """Null values and wrong header types once crashed the agents (in a loop); now each is a dead letter."""
    from ingest.kafka import make_producer
    from ingest.schema import RecordBatch
    from ingest.topics import Topics
    from nettwin.cli.query import read_deadletters

    topics = Topics.from_settings(isolated)
    t0 = 1_383_260_400_000

    def traffic(step_s: int = 600, **meta: object) -> bytes:
        return RecordBatch(
            "traffic",
            ACTIVITY_COLUMNS,
            step_s,
            np.array([2, 6], np.uint32),
            np.full(2, t0, np.int64),
            np.ones((2, 5)),
            **meta,  # type: ignore[arg-type]
        ).encode()

    procs.start_worker("worker")
    procs.start("store", "store")
    procs.wait_assigned("worker")
    poison = [None, traffic(watermark_ms="abc"), traffic(run={"id": 1}), traffic(step_s=10**30)]
    producer = make_producer(isolated)
    for value in poison:  # a null value needs a key (a tombstone)
        producer.send(topics.telemetry_milan, value, key=b"x", partition=1)
    for topic in (topics.features_traffic, topics.telemetry_sensors, topics.telemetry_ftm):
        producer.send(topic, None, key=b"x", partition=0)
    producer.send(topics.telemetry_milan, traffic(watermark_ms=t0 + 600_000), partition=1)
    producer.flush()
    producer.close()
    wait_until(lambda: traffic_rows(isolated) == 2, 60, "the good message after the poison")

    def worker_letters() -> list[object]:
        letters = read_deadletters(isolated, 50, timeout_s=1)
        return [d for d in letters if d.stage in ("worker", "multimodal")]

    letters = wait_until(lambda: len(worker_letters()) >= 6 and worker_letters(), 30, "6 dead letters")
    milan = sorted((d.position, d.original) for d in letters if d.source == topics.telemetry_milan)
    assert milan == [(f"{topics.telemetry_milan}[1]@{i}", v or b"") for i, v in enumerate(poison)]
    assert {d.source for d in letters} == {
        topics.telemetry_milan,
        topics.telemetry_sensors,
        topics.telemetry_ftm,
    }
    procs.assert_running("worker", "store")
    log = (procs.logdir / "worker.log").read_text()
    assert "Traceback" not in log and "crashed" not in log.lower(), log[-3000:]
    assert procs.signal("worker", signal.SIGTERM) < STOP_WITHIN_S


HOURLY = DAY.parent / "hourly_150squares_62days.csv"


def accepted_updates(settings: NettwinSettings) -> list[tuple[int, int]]:
    """(square, seq) of every accepted ``update`` row: one row per decision, so a repeat would show."""
    with InfluxClient(settings.influx) as influx:
        series = influx.query('SELECT "seq" FROM "update" WHERE "decision" = \'accepted\' GROUP BY "entity"')
    return sorted((int(s.tags["entity"]), int(v[1])) for s in series for v in s.values)


def live_vhtwin(
    settings: NettwinSettings, logdir: Path, kill_after_updates: int | None
) -> list[tuple[int, int]]:
    """The live VH-Twin of ``nettwin demo --hourly`` on 6 squares; kill -9 the worker (which runs the BS
    agents) once the store accepted ``kill_after_updates`` updates, and start a new one. Returns the
    accepted updates once every test hour has its outcome and no update arrived for 10 s."""
    import threading

    from bench.live_vhtwin import (
        LiveConfig,
        replay_split,
        subset_file,
        test_span,
        vtwin_job,
        wait_for_forecasts,
    )
    from twin_store.services.vtwin import run_vtwin

    cfg = LiveConfig(HOURLY, squares=6, seed=1, psi=0.01, recluster_every=0)
    subset, series, picked = subset_file(cfg.data, cfg.squares, cfg.seed, logdir / "subset.csv")
    first_test, last_test = test_span(series.shape[1])
    vt = run_vtwin(settings, vtwin_job(cfg, subset))
    procs = WorkerProcesses(settings, logdir)
    try:
        procs.start_worker("worker")
        procs.start("store", "store")
        procs.start("htwin", "htwin", "--psi", repr(cfg.psi), "--defense", "mean")
        procs.wait_assigned("worker", "features.traffic")
        errors: list[BaseException] = []

        def replay() -> None:
            try:
                replay_split(settings, subset, vt["train_hours"], cfg.speed, 300)
            except BaseException as exc:  # re-raised by the test
                errors.append(exc)

        replayer = threading.Thread(target=replay)
        replayer.start()
        if kill_after_updates is not None:
            wait_until(lambda: len(accepted_updates(settings)) >= kill_after_updates, 240, "updates")
            procs.signal("worker", signal.SIGKILL)
            procs.start_worker("worker-restarted")
        replayer.join(300)
        assert not replayer.is_alive() and not errors, errors or "the replay did not finish"
        with InfluxClient(settings.influx) as influx:
            wait_for_forecasts(influx, len(picked), first_test, last_test, 240, lambda: None)
        seen: list[list[tuple[int, int]]] = []

        def settled() -> bool:
            seen.append(accepted_updates(settings))
            return len(seen) > 10 and seen[-1] == seen[-11]

        wait_until(settled, 120, "the accepted updates to settle", interval=1.0)
        return seen[-1]
    finally:
        procs.stop_all()


@pytest.mark.skipif(not HOURLY.exists(), reason=f"real data not found at {HOURLY}")
def test_bs_agents_worker_killed_mid_stream_loses_and_repeats_no_update(
    isolated: NettwinSettings, tmp_path: Path
) -> None:
    from twin_store.adapters.provision import deprovision, provision

    def variant(tag: str) -> NettwinSettings:
        kafka = isolated.kafka.model_copy(update={"topic_prefix": f"{isolated.kafka.topic_prefix}{tag}."})
        influx = isolated.influx.model_copy(update={"database": f"{isolated.influx.database}_{tag}"})
        return isolated.model_copy(update={"kafka": kafka, "influx": influx, "state_dir": tmp_path / tag})

    runs = {}
    for tag, kill in (("calm", None), ("killed", 40)):
        settings = variant(tag)
        provision(settings)
        try:
            (tmp_path / tag).mkdir()
            runs[tag] = live_vhtwin(settings, tmp_path / tag, kill)
        finally:
            deprovision(settings)
    assert len(runs["calm"]) > 60
    assert len(set(runs["killed"])) == len(runs["killed"]), "an update was applied twice"
    assert runs["killed"] == runs["calm"]
