"""Fault scenarios on the real processes: processes killed, stopped, added, InfluxDB down, topics fuzzed.

Each scenario runs on its own deployment (topic prefix, database, state folders): ``nettwin worker`` and
``nettwin store`` as child processes, the real 26-square Milan day tiled over ``days`` consecutive days
replayed at a pace that takes about ``replay_s`` seconds, and one fault injected once ``fault_at`` of the
rows are in InfluxDB. Afterwards ``traffic`` and ``traffic_hourly`` are compared with a pandas computation
straight from the file. Per scenario, one JSON object:

- ``traffic`` / ``traffic_hourly``: rows ``expected``, ``found`` (present with the right sums), ``missing``,
  ``extra``, ``wrong`` (present, other sums) and ``duplicated`` (present with sums or ``n_intervals`` above
  the file's: input counted twice; InfluxDB keeps one point per series and time, so a duplicate shows as
  an inflated row, not a second one),
- ``recover_s``: seconds from the end of the fault (process killed and restarted, worker added or killed,
  InfluxDB back) until every partition has written the interval the replay had published at that moment: the
  pipeline caught up again (``baseline``: the same measure at the same point without a fault, the normal lag),
- ``complete_s``: seconds from the end of the replay until every row was right (``baseline``: no fault),
- ``exited``: processes that ended by themselves, with their exit codes, and ``agent_crashes``: Faust agents
  that crashed inside a living worker (none expected).

``fuzz`` publishes ``fuzz_per_topic`` bad messages (truncated, bit-flipped, header-mutated, null, random)
into every topic the worker, the store and ``nettwin htwin`` consume, then replays the real day: every bad
message must come back as a dead letter (by topic, partition and offset) and the day must arrive complete.

Usage: .venv/bin/python bench/chaos.py [--days 20] [--replay-s 60] [--scenarios a,b] [--fuzz-per-topic 10000]
Needs the services of infra/up (the ``influx_stopped`` scenario stops and restarts that InfluxDB through its
pid file in ``--infra-state``/run). Figures measured on 2 shared cores are pessimistic.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# run as `python bench/chaos.py`, this file's folder is first on sys.path and bench/ingest.py would shadow
# the `ingest` package: drop the folder before importing the project
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from ingest.kafka import make_consumer, make_producer  # noqa: E402
from ingest.readers.milan import TrafficTable, read_raw  # noqa: E402
from ingest.schema import ACTIVITY_COLUMNS, N_INTERVALS, RecordBatch, decode  # noqa: E402
from ingest.settings import NettwinSettings, WorkerSettings, load_settings  # noqa: E402
from ingest.topics import Topics  # noqa: E402
from producers.replay import Replayer  # noqa: E402
from twin_store.adapters.influx import InfluxClient  # noqa: E402
from twin_store.adapters.provision import deprovision, provision  # noqa: E402
from twin_store.services.processes import settings_env, spawn_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MILAN = REPO.parent / "shared" / "data" / "milan"
DAY = MILAN / "raw_2013-11-01_26squares.txt"
HOURLY = MILAN / "hourly_150squares_62days.csv"
DAY_MS = 86_400_000
RAW_COLUMNS = ["square", "start", "country", *ACTIVITY_COLUMNS]
STOP_DEADLINE_S = 10.0  # the README's promise: a long-running command stops within 10 s of SIGTERM


# --------------------------------------------------------------------------------------------- deployment


# a Faust agent ("[^----Agent*: name]") or the app itself ("[^-App]", a timer) crashed
AGENT_CRASH = re.compile(r"\[\^-*(?:Agent\*: )?(?P<agent>.+?)\]: Crashed reason=(?P<reason>.*)$")


class Deployment:
    """One throwaway deployment (topic prefix, database, state folder) and the nettwin processes on it."""

    def __init__(self, base: NettwinSettings, workdir: Path, tag: str | None = None) -> None:
        tag = tag or uuid.uuid4().hex[:10]
        self.workdir = workdir
        self.settings = base.model_copy(
            update={
                "kafka": base.kafka.model_copy(update={"topic_prefix": f"c{tag}."}),
                "influx": base.influx.model_copy(update={"database": f"nettwin_c{tag}"}),
                "state_dir": workdir / "state",
            }
        )
        self.topics = Topics.from_settings(self.settings)
        self.logdir = workdir / "logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exited: dict[str, int] = {}  # processes that ended by themselves (a crash) -> exit code

    def __enter__(self) -> Deployment:
        provision(self.settings)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in list(self.procs):
            self.stop(name, deadline_s=5.0)
        deprovision(self.settings)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``nettwin <command> args``; ``name`` is ``command`` or ``command-<n>`` (own state folder)."""
        command = name.split("-")[0]
        env = settings_env(self.settings)
        env["NETTWIN_STATE_DIR"] = str(self.settings.state_dir / name)
        log = self.logdir / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:  # a restarted process appends to the same log
            fh.write(f"=== {time.strftime('%H:%M:%S')} nettwin {command} {' '.join(args)}\n")
        proc = spawn_cli([command, *args], log, env)
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop(self, name: str, deadline_s: float = STOP_DEADLINE_S) -> float | None:
        """SIGTERM; seconds it took to exit, or None if it had to be killed after ``deadline_s`` (or had
        exited already: see ``exited``)."""
        self.check_alive()
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(deadline_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
        return round(time.monotonic() - t0, 2)

    def check_alive(self) -> dict[str, int]:
        """Processes that exited by themselves since the last call are moved to ``exited``."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.exited[name] = int(proc.returncode)
                del self.procs[name]
        return self.exited

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Send an empty final marker to every telemetry partition and wait until the store reports it
        (worker and store consuming, the whole chain up); seconds waited. Writes no traffic rows."""
        from twin_store.services.store import wait_for_run

        t0 = time.monotonic()
        producer = make_producer(self.settings)
        run = f"ready-{uuid.uuid4().hex[:6]}"
        for p in range(self.settings.kafka.partitions):
            marker = RecordBatch.empty("traffic", ACTIVITY_COLUMNS, 600, run=run, final=True, sent=0)
            producer.send(self.topics.telemetry_milan, value=marker.encode(), partition=p)
        producer.flush()
        producer.close()
        with InfluxClient(self.settings.influx) as influx:
            wait_for_run(influx, run, self.settings.kafka.partitions, timeout_s)
        return round(time.monotonic() - t0, 2)

    def agent_crashes(self) -> dict[str, int]:
        """Faust agents that crashed (the worker process lives on, the agent's input stops): reason -> count."""
        found: Counter[str] = Counter()
        for path in sorted(self.logdir.glob("*.log")):
            for line in path.read_text(errors="replace").splitlines():
                crash = AGENT_CRASH.search(line)
                if crash is not None:
                    agent = crash["agent"].replace("[.]", ".")
                    found[f"{path.stem} {agent}: {crash['reason'].strip()[:150]}"] += 1
        return dict(found)

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for path in sorted(self.logdir.glob("*.log")):
            text = path.read_text(errors="replace")
            out.append(f"--- {path.name}\n{text[-chars:]}")
        return "\n".join(out)

    def run_cli(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nettwin.cli.main", *args],
            env=settings_env(self.settings),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


# ------------------------------------------------------------------------------------ expected and found


def tiled_day(src: Path, days: int, dest: Path) -> Path:
    """The real day repeated over ``days`` consecutive days (timestamps shifted), in the official layout."""
    if days == 1:
        return src
    text = src.read_text()
    rows = [line.split("\t", 2) for line in text.splitlines() if line.strip()]
    with open(dest, "w") as fh:
        for d in range(days):
            shift = d * DAY_MS
            fh.writelines(f"{sq}\t{int(t) + shift}\t{rest}\n" for sq, t, rest in rows)
    return dest


def expected_traffic(path: Path) -> pd.DataFrame:
    """Per-(square, interval) sums computed directly from the file, independent of ingest.readers.milan."""
    df = pd.read_csv(path, sep="\t", header=None, names=RAW_COLUMNS).fillna(0.0)
    return df.groupby(["square", "start"])[list(ACTIVITY_COLUMNS)].sum().sort_index()


def expected_hourly(traffic: pd.DataFrame) -> pd.DataFrame:
    flat = traffic.reset_index()
    flat["start"] = flat["start"] - flat["start"] % 3_600_000
    grouped = flat.groupby(["square", "start"])
    out = grouped[list(ACTIVITY_COLUMNS)].sum()
    out[N_INTERVALS] = grouped.size()
    return out.sort_index()


def influx_frame(influx: InfluxClient, measurement: str) -> pd.DataFrame:
    rows = [r for s in influx.query(f'SELECT * FROM "{measurement}"', epoch="ms") for r in s.rows()]
    if not rows:
        return pd.DataFrame(columns=["square", "start"]).set_index(["square", "start"])
    df = pd.DataFrame(rows)
    df["square"] = df["entity"].astype(int)  # the tag is `entity`; a Milan square's entity is its number
    df["start"] = df["time"].astype(np.int64)
    return df.set_index(["square", "start"]).sort_index()


def compare_rows(expected: pd.DataFrame, got: pd.DataFrame) -> dict[str, int]:
    """Rows expected, found right, missing, extra, wrong and duplicated (sums above the file's)."""
    common = expected.index.intersection(got.index)
    cols = list(expected.columns)
    exp = expected.loc[common, cols].to_numpy(np.float64)
    have = got.loc[common, cols].astype(np.float64).to_numpy() if len(common) else exp
    close = np.isclose(have, exp, rtol=1e-9, atol=1e-9).all(axis=1)
    above = (have > exp * (1 + 1e-9) + 1e-9).any(axis=1)
    return {
        "expected": len(expected),
        "found": int(close.sum()),
        "missing": len(expected.index.difference(got.index)),
        "extra": len(got.index.difference(expected.index)),
        "wrong": int((~close).sum()),
        "duplicated": int((~close & above).sum()),
    }


def row_count(influx: InfluxClient, measurement: str) -> int:
    try:
        series = influx.query(f'SELECT count("internet") FROM "{measurement}"')
    except Exception:  # InfluxDB down (a scenario stops it): no rows readable now
        return -1
    return int(series[0].values[0][1]) if series else 0


def check_traffic(settings: NettwinSettings, expected: pd.DataFrame) -> dict[str, dict[str, int]]:
    with InfluxClient(settings.influx) as influx:
        return {
            "traffic": compare_rows(expected, influx_frame(influx, "traffic")),
            "traffic_hourly": compare_rows(expected_hourly(expected), influx_frame(influx, "traffic_hourly")),
        }


# ------------------------------------------------------------------------------------------ paced replay


class PacedReplay(threading.Thread):
    """Replays a table in a thread, interval by interval, spread over about ``seconds`` of wall time."""

    def __init__(self, settings: NettwinSettings, table: TrafficTable, seconds: float, run: str) -> None:
        super().__init__(name="paced-replay", daemon=True)
        span_s = (int(table.starts_ms.max()) - int(table.starts_ms.min())) / 1000 + table.step_s
        self.speed = max(span_s / max(seconds, 0.1), 1.0)
        self.settings = settings
        self.table = table
        self.run_id = run
        self.error: BaseException | None = None
        self.started_at = time.monotonic()
        self.finished_at: float | None = None

    @property
    def step_ms(self) -> int:
        return self.table.step_s * 1000

    def published_ms(self, t: float) -> int:
        """Start of the newest interval the replay has published by wall time ``t`` (its clock's rule)."""
        step_ms = self.table.step_s * 1000
        first = int(self.table.starts_ms.min())
        return first + int((t - self.started_at) * self.speed * 1000 // step_ms) * step_ms

    def run(self) -> None:
        self.started_at = time.monotonic()
        producer = make_producer(self.settings)
        try:
            replayer = Replayer.for_settings(self.settings, producer, self.speed, run=self.run_id)
            replayer.publish_table(self.table)
            replayer.finish()
        except BaseException as exc:  # reported by the scenario
            self.error = exc
        finally:
            producer.close()
            self.finished_at = time.monotonic()


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic
    rows: int  # traffic rows, -1 while InfluxDB does not answer
    newest: dict[int, int]  # partition -> newest interval start written (ms)


class RowMonitor(threading.Thread):
    """Samples ``traffic`` twice a second: its row count and, per partition, the newest interval written."""

    def __init__(self, settings: NettwinSettings, last_ms: dict[int, int]) -> None:
        super().__init__(name="row-monitor", daemon=True)
        self.settings = settings
        self.last_ms = last_ms  # partition -> the last interval the data holds for it
        self.samples: list[Sample] = []
        self.stopping = False

    def run(self) -> None:
        parts = self.settings.kafka.partitions
        with InfluxClient(self.settings.influx) as influx:
            while not self.stopping:
                rows, newest = row_count(influx, "traffic"), dict[int, int]()
                try:
                    for series in influx.query('SELECT last("internet") FROM "traffic" GROUP BY "entity"'):
                        p = int(series.tags["entity"]) % parts
                        newest[p] = max(newest.get(p, 0), int(series.values[0][0]))
                except Exception:  # InfluxDB down: nothing known
                    rows, newest = -1, {}
                self.samples.append(Sample(time.monotonic(), rows, newest))
                time.sleep(0.5)

    def latest(self) -> int:
        return self.samples[-1].rows if self.samples else 0

    def sampled_since(self, t: float, timeout_s: float) -> None:
        """Wait (bounded) for a sample taken after ``t``: under load a query takes seconds, and the recovery
        time is read from the samples."""
        deadline = time.monotonic() + timeout_s
        while not (self.samples and self.samples[-1].t > t) and time.monotonic() < deadline:
            time.sleep(0.1)

    def caught_up_after(self, t: float, published_ms: int) -> float | None:
        """Seconds from ``t`` until every partition has written the interval the replay had published at
        ``t`` (or its last one): input sent after the fault's end is being processed and written again."""
        for s in self.samples:
            if s.t <= t or s.rows < 0:
                continue
            if all(s.newest.get(p, -1) >= min(published_ms, last) for p, last in self.last_ms.items()):
                return round(s.t - t, 2)
        return None


# ------------------------------------------------------------------------------------- fault scenarios


@dataclass
class ScenarioConfig:
    days: int = 1
    replay_s: float = 20.0  # wall time the paced replay takes
    fault_at: float = 0.3  # fraction of the rows in InfluxDB when the fault is injected
    timeout_s: float = 180.0  # after the replay ended, how long the pipeline has to complete
    influx_down_s: float = 10.0
    data: Path = DAY
    infra_state: Path = REPO / ".state"


@dataclass
class FaultContext:
    deployment: Deployment
    monitor: RowMonitor
    cfg: ScenarioConfig
    facts: dict[str, Any] = field(default_factory=dict)  # scenario-specific figures for the report
    recovered_at: float | None = None  # when the fault's effect ended (restart, InfluxDB back)


def fault_worker_kill9(ctx: FaultContext) -> None:
    ctx.deployment.kill("worker")
    ctx.deployment.start("worker")


def fault_store_kill9(ctx: FaultContext) -> None:
    ctx.deployment.kill("store")
    ctx.deployment.start("store")


def fault_one_of_two_workers_killed(ctx: FaultContext) -> None:
    ctx.deployment.kill("worker-2")


def fault_worker_added(ctx: FaultContext) -> None:
    ctx.deployment.start("worker-2")


def fault_worker_sigterm(ctx: FaultContext) -> None:
    took = ctx.deployment.stop("worker", deadline_s=STOP_DEADLINE_S)
    ctx.facts["sigterm_stop_s"] = took  # None: still running after 10 s, killed
    ctx.recovered_at = time.monotonic()
    ctx.deployment.start("worker")


def fault_influx_stopped(ctx: FaultContext) -> None:
    """Stop the InfluxDB of infra/up (its pid file) for ``influx_down_s``, sampling the store's memory
    meanwhile, then start it again with the same command line (the pid file names the new one)."""
    import psutil

    pid_file = ctx.cfg.infra_state / "run" / "influxd.pid"
    influxd = psutil.Process(int(pid_file.read_text()))
    cmdline = influxd.cmdline()
    store = psutil.Process(ctx.deployment.procs["store"].pid)
    rss = [store.memory_info().rss]
    influxd.terminate()
    try:
        influxd.wait(30)
        t_end = time.monotonic() + ctx.cfg.influx_down_s
        while time.monotonic() < t_end:
            time.sleep(0.5)
            rss.append(store.memory_info().rss)
    finally:  # whatever happened, InfluxDB comes back
        # started as infra/up starts it (nohup, in the background): not our child, infra/down stops it
        log = ctx.cfg.infra_state / "log" / "influxd.log"
        started = subprocess.run(
            ["sh", "-c", f'nohup "$@" >>"{log}" 2>&1 </dev/null & echo $!', "sh", *cmdline],
            capture_output=True,
            text=True,
            check=True,
        )
        pid_file.write_text(started.stdout.strip() + "\n")
        with InfluxClient(ctx.deployment.settings.influx) as influx:
            for _ in range(300):
                try:
                    influx.ping()
                    break
                except Exception:  # still starting
                    time.sleep(0.1)
    ctx.recovered_at = time.monotonic()
    ctx.facts["influx_down_s"] = ctx.cfg.influx_down_s
    ctx.facts["store_rss_mb"] = {"at_stop": round(rss[0] / 2**20, 1), "max_down": round(max(rss) / 2**20, 1)}


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Callable[[FaultContext], None] | None
    workers: int = 1


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("baseline", None),
        Scenario("worker_kill9", fault_worker_kill9),
        Scenario("store_kill9", fault_store_kill9),
        Scenario("two_workers_one_killed", fault_one_of_two_workers_killed, workers=2),
        Scenario("worker_added", fault_worker_added),
        Scenario("worker_sigterm", fault_worker_sigterm),
        Scenario("influx_stopped", fault_influx_stopped),
    )
}


def run_scenario(
    scenario: Scenario, base: NettwinSettings, cfg: ScenarioConfig, workdir: Path
) -> dict[str, Any]:
    """One scenario on a fresh deployment; the report of the module docstring (plus ``logs`` on failure)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = tiled_day(cfg.data, cfg.days, workdir / f"tiled_{cfg.days}days.txt")
    expected = expected_traffic(data)
    table = read_raw(data)
    report: dict[str, Any] = {"scenario": scenario.name, "records": len(expected)}
    with Deployment(base, workdir) as dep:
        for i in range(scenario.workers):
            dep.start("worker" if i == 0 else f"worker-{i + 1}")
        dep.start("store")
        report["ready_s"] = dep.wait_ready()
        parts = table.squares % dep.settings.kafka.partitions
        last_ms = {int(p): int(table.starts_ms[parts == p].max()) for p in np.unique(parts)}
        monitor = RowMonitor(dep.settings, last_ms)
        monitor.start()
        replay = PacedReplay(dep.settings, table, cfg.replay_s, run=scenario.name)
        ctx = FaultContext(dep, monitor, cfg)
        replay.start()
        try:
            t_fault = inject_fault(scenario.fault, ctx, replay, int(cfg.fault_at * len(expected)), report)
            replay.join(cfg.replay_s * 10 + 120)
            if replay.error is not None:
                raise RuntimeError(f"replay failed: {replay.error!r}")
            t_end = replay.finished_at or time.monotonic()
            report["replay_s"] = round(t_end - replay.started_at, 2)
            result, report["complete_s"] = wait_complete(dep, expected, t_end, cfg.timeout_s)
            monitor.sampled_since(time.monotonic(), 10.0)  # a sample at least as new as the completion
            t_back = ctx.recovered_at or t_fault
            report["recover_s"] = monitor.caught_up_after(
                t_back, replay.published_ms(t_back) - replay.step_ms
            )
            report.update(result)
            report.update(ctx.facts)
        finally:
            monitor.stopping = True
            report["exited"] = dict(dep.check_alive())
            report["agent_crashes"] = dep.agent_crashes()
            report["ok"] = (
                bool(_complete(report) and not report["exited"] and not report["agent_crashes"])
                and ctx.facts.get("sigterm_stop_s", 0.0) is not None
            )
            if not report["ok"]:
                report["logs"] = dep.log_tail()
    return report


def inject_fault(
    fault: Callable[[FaultContext], None] | None,
    ctx: FaultContext,
    replay: PacedReplay,
    rows: int,
    report: dict[str, Any],
) -> float:
    """Wait until ``rows`` traffic rows are in (bounded), then inject the fault (none: the baseline's
    moment of comparison); when it was injected."""
    deadline = replay.started_at + ctx.cfg.replay_s + ctx.cfg.timeout_s
    while ctx.monitor.latest() < rows and time.monotonic() < deadline:
        time.sleep(0.2)
    t_fault = time.monotonic()
    report["fault_at_rows"] = ctx.monitor.latest()
    report["fault_at_s"] = round(t_fault - replay.started_at, 2)
    report["fault_during_replay"] = replay.is_alive()
    if fault is not None:
        fault(ctx)
    return t_fault


def wait_complete(
    dep: Deployment, expected: pd.DataFrame, since: float, timeout_s: float
) -> tuple[dict[str, dict[str, int]], float | None]:
    """Compare InfluxDB with ``expected`` until every row is right or ``timeout_s`` after ``since``; the
    last comparison and the seconds from ``since`` to completion (None: never complete)."""
    result = check_traffic(dep.settings, expected)
    while not _complete(result) and time.monotonic() < since + timeout_s:
        dep.check_alive()
        time.sleep(1.0)
        result = check_traffic(dep.settings, expected)
    return result, round(time.monotonic() - since, 2) if _complete(result) else None


def _complete(result: dict[str, Any]) -> bool:
    return all(
        m in result and result[m]["found"] == result[m]["expected"] and result[m]["extra"] == 0
        for m in ("traffic", "traffic_hourly")
    )


# ------------------------------------------------------------------------------------------------- fuzz

WEIRD: list[Any] = [
    "abc",
    "",
    None,
    True,
    False,
    [],
    {},
    [1.0, 2.0],
    {"a": [1]},
    1.5,
    -1,
    0,
    10**30,
    -(10**30),
    2**64,
    10**400,
    1e308,
    -1e308,
    float("nan"),
    float("inf"),
    "1" * 300,
]
MUTATIONS = ("truncate", "bitflip", "random", "null", "fields", "fields", "fields")


def _weird(rng: np.random.Generator) -> Any:
    return WEIRD[int(rng.integers(len(WEIRD)))]


def mutate_fields(obj: Any, rng: np.random.Generator, known: tuple[str, ...] = ()) -> Any:
    """A copy of a JSON-like object with one field removed, retyped or set to an extreme (maybe nested)."""
    obj = copy.deepcopy(obj)
    if not isinstance(obj, dict) or rng.random() < 0.05:
        return _weird(rng)  # not an object at all
    target = obj
    nested = [k for k, v in obj.items() if isinstance(v, dict) and v]
    if nested and rng.random() < 0.4:
        target = obj[nested[int(rng.integers(len(nested)))]]
    keys = sorted(set(target) | set(known if target is obj else ()))
    if not keys:
        target["x"] = _weird(rng)
        return obj
    key = keys[int(rng.integers(len(keys)))]
    if rng.random() < 0.25:
        target.pop(key, None)
    elif isinstance(target.get(key), list) and target[key] and rng.random() < 0.5:
        items = list(target[key])
        items[int(rng.integers(len(items)))] = _weird(rng)
        target[key] = items
    else:
        target[key] = _weird(rng)
    return obj


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _framed(data: bytes) -> tuple[bytes, dict[str, Any], bytes] | None:
    """(magic, header, rest) of an NTB1/NTM1 message."""
    if len(data) < 8:
        return None
    hlen = int.from_bytes(data[4:8], "little")
    try:
        header = json.loads(data[8 : 8 + hlen])
    except ValueError:
        return None
    return (data[:4], header, data[8 + hlen :]) if isinstance(header, dict) else None


def _reframe(magic: bytes, header: Any, rest: bytes) -> bytes:
    raw = _dumps(header)
    if magic == b"NTB1":
        raw += b" " * ((-(8 + len(raw))) % 8)  # the batch body stays 8-byte aligned, as encode() does
    return magic + len(raw).to_bytes(4, "little") + raw + rest


def mutate_message(
    template: bytes, rng: np.random.Generator, json_record: bool, known: tuple[str, ...] = ()
) -> bytes | None:
    """One random mutation of a valid message: truncation, bit flips, random bytes, null, or its fields."""
    how = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    if how == "truncate":
        return template[: int(rng.integers(len(template)))]
    if how == "bitflip":
        out = bytearray(template)
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(out)))
            out[i] ^= 1 << int(rng.integers(8))
        return bytes(out)
    if how == "random":
        noise = rng.bytes(int(rng.integers(0, 256)))
        return template[:4] + noise if rng.random() < 0.5 else noise
    if how == "null":
        return None
    if json_record:
        r = rng.random()
        if r < 0.03:
            return b"[" * 100_000  # nesting deeper than any JSON parser recurses
        return _dumps(mutate_fields(json.loads(template), rng, known))
    framed = _framed(template)
    assert framed is not None
    magic, header, rest = framed
    if magic == b"NTB1" and rng.random() < 0.15:  # the record count disagrees with the body
        n = int(rng.choice([0, 1, 2**31, 2**32 - 1, int(rng.integers(1, 10_000))]))
        rest = n.to_bytes(4, "little") + rest[4:]
        return _reframe(magic, header, rest)
    return _reframe(magic, mutate_fields(header, rng, known), rest)


# --- what each consumer refuses: a message its consumer would refuse must come back as a dead letter


def worker_windows_refuses(value: bytes | None) -> bool:
    from stream_processors.processor import PartitionProcessor

    try:
        return bool(PartitionProcessor("fuzz", 0, WorkerSettings()).on_message(value, 0).deadletters)
    except Exception:  # a message that crashes the check crashes the worker: it is bad
        return True


def worker_sensors_refuses(value: bytes | None) -> bool:
    from stream_processors.sensor_screening import SensorScreening

    try:
        return bool(SensorScreening("robust").on_message(value, "fuzz", 0, 0).deadletters)
    except Exception:
        return True


STORE_KINDS = ("features", "forecast", "screened", "telemetry")  # what ``TwinStore.process`` accepts


def store_refuses(value: bytes | None) -> bool:
    """The store's checks (a copy of ``TwinStore.process``'s: keep them in step) and its point building."""
    from twin_store.adapters.sensors import sensor_points
    from twin_store.adapters.telemetry import telemetry_lines
    from twin_store.adapters.traffic import TwinRegistry, batch_points

    try:
        batch = decode(value or b"")
        if batch.kind not in STORE_KINDS:
            return True
        if batch.kind == "forecast" and "cluster" not in batch.columns:
            return True
        if batch.kind == "screened":
            sensor_points(batch, 0)
        elif batch.kind == "telemetry":
            telemetry_lines(batch)
        else:
            batch_points(batch, 0, TwinRegistry(set()), int(time.time() * 1000))
    except Exception:
        return True
    return False


def window_refuses(value: bytes | None) -> bool:
    """The store's check of a live multimodal window (``features.multimodal`` -> ``position``)."""
    from twin_store.adapters.positions import position_lines

    try:
        position_lines(value or b"")
    except Exception:
        return True
    return False


def multimodal_refuses(kind: str) -> Callable[[bytes | None], bool]:
    from stream_processors.multimodal_live import MultimodalWindower

    def refuses(value: bytes | None) -> bool:
        try:
            MultimodalWindower().on_record("fuzz/w", kind, json.loads(value), 0.0)  # type: ignore[arg-type]
        except Exception:
            return True
        return False

    return refuses


def site_refuses(value: bytes | None) -> bool:
    from ingest.readers.ftm import site_from_message

    if value is None:
        return False  # a tombstone: the scene's site is withdrawn
    try:
        site_from_message(json.loads(value))
    except Exception:
        return True
    return False


def twin_refuses(value: bytes | None) -> bool:
    from twin_store.federation.models_topic import decode_twin

    if value is None:
        return False  # a tombstone
    try:
        decode_twin(value)
    except Exception:
        return True
    return False


class UpdateCheck:
    """What ``nettwin htwin`` refuses on updates.local: the service's own decode and ``TwinState.apply``,
    run on a copy of its state (rebuilt from the same twin.models snapshot), so a refused message leaves
    the state as it was."""

    def __init__(self, settings: NettwinSettings) -> None:
        from twin_store.federation.screening import make_defense
        from twin_store.services.htwin import TwinState, read_latest_twins

        sec = settings.security
        self.state = TwinState.from_messages(
            read_latest_twins(settings), 0.0, None, None, None, make_defense(sec.defense), sec.max_staleness
        )

    def __call__(self, value: bytes | None) -> bool:
        from twin_store.federation.models_topic import decode_twin

        try:
            update = decode_twin(value or b"")
            if update.level != "bs":
                return True
            copy.deepcopy(self.state).apply(update)
        except Exception:
            return True
        return False


@dataclass
class FuzzTopic:
    topic: str
    templates: Sequence[tuple[bytes | None, bytes]]  # (key, valid value)
    refuses: Callable[[bytes | None], bool]
    json_record: bool = False
    known: tuple[str, ...] = ()  # header/record fields to try deleting or retyping even when absent
    snapshot: bool = False  # re-read from the start by every reader (twin.models, sites.ftm)


def _batch(kind: str, columns: tuple[str, ...], step_s: int, n: int, t0: int, **meta: Any) -> bytes:
    rng = np.random.default_rng(n)
    return RecordBatch(
        kind,
        columns,
        step_s,
        np.arange(20_001, 20_001 + n, dtype=np.uint32),
        np.full(n, t0, np.int64) + step_s * 1000 * np.arange(n) % (step_s * 1000 * 4),
        rng.uniform(0, 50, (n, len(columns))),
        **meta,
    ).encode()


BATCH_FIELDS = ("kind", "columns", "step_s", "watermark_ms", "closed_ms", "run", "final", "sent", "extra")
T_FUZZ = 1_420_070_400_000  # 2015-01-01: far from the replayed day


def fuzz_topics(settings: NettwinSettings) -> list[FuzzTopic]:
    """Every topic the worker, the store and ``nettwin htwin`` consume, with valid messages to mutate.

    twin.models must hold V-twinning's snapshot already (``nettwin vtwin``): its twins are the templates
    of twin.models and updates.local."""
    from stream_processors.bs_agents import FORECAST_COLUMNS, OUTCOME_COLUMNS
    from twin_store.federation.models_topic import TwinMessage
    from twin_store.services.htwin import read_latest_twins

    t = Topics.from_settings(settings)
    act = ACTIVITY_COLUMNS
    traffic = [
        _batch("traffic", act, 600, n, T_FUZZ, watermark_ms=T_FUZZ + 600_000, closed_ms=1, run="fz")
        for n in (1, 3, 40)
    ]
    traffic.append(_batch("traffic", act, 600, 0, T_FUZZ, run="fz", final=True, sent=5, watermark_ms=T_FUZZ))
    sources = {"extra": {"sources": {str(20_001 + i): f"fuzz-sensor-{i}" for i in range(40)}}}
    sensors = [_batch("sensor", ("value",), 60, n, T_FUZZ, run="fz", **sources) for n in (1, 3, 40)]
    features = [
        _batch("features", (*act, N_INTERVALS), step, n, T_FUZZ, run="fz", closed_ms=1)
        for step in (600, 3600)
        for n in (1, 3, 40)
    ]
    features.append(
        _batch("features", act, 600, 0, T_FUZZ, run="fz", final=True, sent=4, extra={"received": 4})
    )
    forecasts = [_batch("forecast", cols, 3600, 3, T_FUZZ) for cols in (FORECAST_COLUMNS, OUTCOME_COLUMNS)]
    screened = [_screened_batch()]
    telemetry = [_telemetry_batch(n) for n in (1, 4)]
    ftm = {
        "walk": "w",
        "device": "d",
        "scene": "fuzz",
        "t_ms": 1000.0,
        "line": 2,
        "aps": {"AP1": [3.2, 0.1, -60.0]},
    }
    imu = {
        "walk": "w", "device": "d", "t_ms": 1000.0, "line": 2, "acc": [0.1, 0.2, 9.8], "gyro": [0.0, 0.0, 0.1],
        "mag": [20.0, 1.0, -40.0], "azimuth": 10.0, "pitch": 1.0, "roll": 0.5,
    }  # fmt: skip
    vision = {
        "walk": "w", "device": "d", "t_ms": 1000.0, "simulated": True, "u": 320.0, "v": 240.0,
        "box_w": 40.0, "box_h": 90.0, "detected": True, "floor_x": 1.5, "floor_y": 2.5,
    }  # fmt: skip
    site = {
        "scene": "fuzz", "ap_ids": ["AP1", "AP2", "AP3"], "positions": [[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]],
        "residual_m": {"AP1": 0.1}, "n_obs": {"AP1": 30}, "source": "recovered", "site_file": None,
        "ambiguous": [], "mirror_resolved": [], "site_file_diff_m": {}, "walks": ["w"],
    }  # fmt: skip
    window = {
        "key": "d/w", "device": "d", "walk": "w", "end_ms": 2900.0, "step_ms": 100.0, "window": 2,
        "mask": {"ftm": True, "imu": True, "vision": False, "fix": True, "kf": True},
        "fix": [[1.0, 2.0], [1.1, 2.0]], "kf": [[1.0, 2.1], [1.05, 2.1]],
        "position": {"x": 1.2, "y": 2.2, "kf_x": 1.05, "kf_y": 2.1, "twin": "t", "version": 1, "alpha": 0.5},
    }  # fmt: skip
    twins = read_latest_twins(settings)
    if b"global:0" not in twins:
        raise RuntimeError("twin.models has no global twin: run `nettwin vtwin` before fuzzing")
    updates = []
    for twin in (twins[k] for k in sorted(twins)):
        if twin.level != "cluster":
            continue
        for s in twin.meta.get("members", [])[:3]:
            meta: dict[str, Any] = {"seq": 5, "hour": 30, "n_samples": 24, "loss": 0.5}
            meta["base_version"] = twin.version
            meta |= {"cluster": int(twin.twin_id), "profile": [0.5] * 24}
            upd = TwinMessage("bs", str(s), 1, twin.hidden, twin.params.copy(), meta)
            updates.append((upd.key, upd.encode()))
    twin_known = ("level", "twin_id", "version", "hidden", "n_params", "meta")
    meta_known = ("seq", "hour", "n_samples", "base_version", "cluster", "profile", "loss", "sig")
    models = [(b"fuzz:" + k, m.encode()) for k, m in sorted(twins.items())]
    return [
        FuzzTopic(
            t.telemetry_milan, [(None, v) for v in traffic], worker_windows_refuses, known=BATCH_FIELDS
        ),
        FuzzTopic(
            t.telemetry_sensors, [(b"fz", v) for v in sensors], worker_sensors_refuses, known=BATCH_FIELDS
        ),
        FuzzTopic(t.features_traffic, [(None, v) for v in features], store_refuses, known=BATCH_FIELDS),
        FuzzTopic(t.forecasts, [(None, v) for v in forecasts], store_refuses, known=BATCH_FIELDS),
        FuzzTopic(t.features_sensors, [(b"fz", v) for v in screened], store_refuses, known=BATCH_FIELDS),
        FuzzTopic(t.telemetry_records, [(b"fz", v) for v in telemetry], store_refuses, known=BATCH_FIELDS),
        FuzzTopic(t.telemetry_ftm, [(b"d/w", _dumps(ftm))], multimodal_refuses("ftm"), True, ("t_ms", "aps")),
        FuzzTopic(t.telemetry_imu, [(b"d/w", _dumps(imu))], multimodal_refuses("imu"), True, ("t_ms",)),
        FuzzTopic(
            t.telemetry_vision_sim, [(b"d/w", _dumps(vision))], multimodal_refuses("vision"), True, ("t_ms",)
        ),
        FuzzTopic(
            t.features_multimodal, [(b"d/w", _dumps(window))], window_refuses, True, ("key", "end_ms", "mask")
        ),
        FuzzTopic(t.sites_ftm, [(b"fuzz", _dumps(site))], site_refuses, True, ("scene",), snapshot=True),
        FuzzTopic(t.twin_models, models, twin_refuses, known=twin_known, snapshot=True),
        FuzzTopic(t.updates_local, updates, UpdateCheck(settings), known=twin_known + meta_known),
    ]


def _screened_batch() -> bytes:
    n = 3
    return RecordBatch(
        "screened",
        ("value", "score", "flagged"),
        60,
        np.arange(20_001, 20_001 + n, dtype=np.uint32),
        T_FUZZ + 1000 * np.arange(n, dtype=np.int64),
        np.array([[1.0, 0.1, 0.0], [2.0, 0.2, 1.0], [3.0, 0.3, 0.0]]),
        extra={"sources": {str(20_001 + i): f"fuzz-sensor-{i}" for i in range(n)}, "counts": {}},
    ).encode()


@dataclass
class FuzzPlan:
    """The bad messages of one topic and how many valid mutants were left out."""

    topic: str
    messages: list[tuple[bytes | None, bytes | None]]  # (key, value)
    skipped_valid: int = 0
    positions: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset) once published


def plan_fuzz(spec: FuzzTopic, n: int, rng: np.random.Generator) -> FuzzPlan:
    """``n`` mutants of the topic's valid messages that its consumer refuses; a mutant that happens to be
    valid (the consumer's own check accepts it) is counted in ``skipped_valid`` and not published."""
    plan = FuzzPlan(spec.topic, [])
    attempts = 0
    while len(plan.messages) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise RuntimeError(f"{spec.topic}: only {len(plan.messages)} refused mutants in {attempts} tries")
        key, template = spec.templates[int(rng.integers(len(spec.templates)))]
        value = mutate_message(template, rng, spec.json_record, spec.known)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # casts of extreme values: the consumers see them too
            refused = spec.refuses(value)
        if refused:
            plan.messages.append((key, value))
        else:
            plan.skipped_valid += 1
    return plan


def publish_fuzz(settings: NettwinSettings, plans: list[FuzzPlan], rng: np.random.Generator) -> float:
    """Publish every plan's messages interleaved across topics (random partitions); record positions."""
    partitions = {p.topic: _partitions(settings, p.topic) for p in plans}
    order = [(i, j) for i, p in enumerate(plans) for j in range(len(p.messages))]
    rng.shuffle(order)
    producer = make_producer(settings)
    futures: list[list[Any]] = [[None] * len(p.messages) for p in plans]
    t0 = time.monotonic()
    try:
        for i, j in order:
            plan = plans[i]
            key, value = plan.messages[j]
            if key is None and value is None:
                key = b"null"  # Kafka needs a key or a value
            part = int(rng.integers(partitions[plan.topic]))
            futures[i][j] = producer.send(plan.topic, key=key, value=value, partition=part)
        producer.flush()
        for plan, futs in zip(plans, futures, strict=True):
            plan.positions = [(md.partition, md.offset) for md in (f.get(timeout=30) for f in futs)]
    finally:
        producer.close()
    return time.monotonic() - t0


def _partitions(settings: NettwinSettings, topic: str) -> int:
    from ingest.topics import topic_specs

    return next(s.partitions for s in topic_specs(settings) if s.name == topic)


POSITION = re.compile(r"^(?P<topic>.+)\[(?P<partition>\d+)\]@(?P<offset>\d+)$")


class DeadLetterReader:
    """Follows the dead-letter topic from its start: (stage, source topic, partition, offset) per letter."""

    def __init__(self, settings: NettwinSettings) -> None:
        self.consumer = make_consumer(settings, Topics.from_settings(settings).deadletter, group_id=None)
        self.letters: list[tuple[str, str, int, int]] = []
        self.reasons: Counter[tuple[str, str]] = Counter()  # (source, reason prefix) -> letters

    def read(self, timeout_ms: int = 500) -> int:
        got = 0
        for records in self.consumer.poll(timeout_ms=timeout_ms, max_records=50_000).values():
            for m in records:
                h = {k: v.decode(errors="replace") for k, v in m.headers or []}
                where = POSITION.match(h.get("nettwin.position", ""))
                source = h.get("nettwin.source", "?")
                if where is None:
                    self.letters.append((h.get("nettwin.stage", "?"), source, -1, -1))
                else:
                    self.letters.append(
                        (
                            h.get("nettwin.stage", "?"),
                            where["topic"],
                            int(where["partition"]),
                            int(where["offset"]),
                        )
                    )
                self.reasons[(source, h.get("nettwin.reason", "?")[:60])] += 1
                got += 1
        return got

    def wait_for(
        self,
        n: int,
        timeout_s: float,
        quiet_s: float = 3.0,
        stall_s: float = 30.0,
        alive: Callable[[], object] = lambda: None,
    ) -> float:
        """Read until ``n`` letters arrived and none for ``quiet_s`` (or none at all for ``stall_s``: a
        consumer stopped), or ``timeout_s``; seconds waited."""
        t0 = last = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.read():
                last = time.monotonic()
            else:
                idle = time.monotonic() - last
                if idle >= stall_s or (len(self.letters) >= n and idle >= quiet_s):
                    break
            alive()
        return time.monotonic() - t0

    def close(self) -> None:
        self.consumer.close()


def judge_deadletters(
    plans: list[FuzzPlan], specs: list[FuzzTopic], letters: list[tuple[str, str, int, int]]
) -> dict[str, dict[str, Any]]:
    """Per topic: bad messages published, dead-lettered (distinct positions), missed, extra (a position
    that was not published as bad: good input lost) and repeated (one stage dead-lettering one position
    twice, allowed only on the snapshot topics every reader re-reads from the start)."""
    by_topic: dict[str, Counter[tuple[str, int, int]]] = {}
    for stage, topic, part, off in letters:
        by_topic.setdefault(topic, Counter())[(stage, part, off)] += 1
    out: dict[str, dict[str, Any]] = {}
    for plan, spec in zip(plans, specs, strict=True):
        seen = by_topic.get(plan.topic, Counter())
        positions = {(p, o) for _, p, o in seen}
        bad = set(plan.positions)
        repeated = sum(c - 1 for c in seen.values() if c > 1)
        out[plan.topic] = {
            "published": len(plan.positions),
            "skipped_valid": plan.skipped_valid,
            "deadlettered": len(positions & bad),
            "missed": len(bad - positions),
            "extra": len(positions - bad),
            "repeated": repeated,
            "stages": sorted({s for s, _, _ in seen}),
            "missed_examples": [
                f"[{p}]@{o}: {_show(plan.messages[plan.positions.index((p, o))][1])}"
                for p, o in sorted(bad - positions)[:3]
            ],
            "ok": positions == bad and (spec.snapshot or repeated == 0),
        }
    return out


def _show(value: bytes | None) -> str:
    return (
        "null"
        if value is None
        else repr(value[:120]) + (f" ({len(value)} bytes)" if len(value) > 120 else "")
    )


@dataclass
class FuzzConfig:
    per_topic: int = 1000
    seed: int = 0
    deadletter_timeout_s: float = 240.0
    replay_timeout_s: float = 120.0
    data: Path = DAY
    hourly: Path = HOURLY


def bootstrap_twins(dep: Deployment, hourly: Path) -> None:
    """``nettwin vtwin`` on 6 real squares: the global and cluster twins ``nettwin htwin`` starts from."""
    args = ["vtwin", "--data", str(hourly), "--squares", "6", "--rounds", "2", "--clusters", "2", "--json"]
    res = dep.run_cli(*args, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"nettwin vtwin failed: {res.stderr[-2000:]}")


def run_fuzz(base: NettwinSettings, cfg: FuzzConfig, workdir: Path) -> dict[str, Any]:
    """Worker, store and htwin running; bad messages into every topic they consume; then the real day.

    Report: per topic the dead-letter accounting of ``judge_deadletters``, processes that exited, the
    ``traffic``/``traffic_hourly`` comparison of the day replayed afterwards, and timings."""
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    report: dict[str, Any] = {"scenario": "fuzz", "per_topic": cfg.per_topic}
    with Deployment(base, workdir) as dep:
        bootstrap_twins(dep, cfg.hourly)
        dep.start("worker")
        dep.start("store")
        dep.start("htwin")
        report["ready_s"] = dep.wait_ready()
        t0 = time.monotonic()
        specs = fuzz_topics(dep.settings)
        plans = [plan_fuzz(spec, cfg.per_topic, rng) for spec in specs]
        report["generate_s"] = round(time.monotonic() - t0, 2)
        reader = DeadLetterReader(dep.settings)
        try:
            report["publish_s"] = round(publish_fuzz(dep.settings, plans, rng), 2)
            total = sum(len(p.positions) for p in plans)
            report["published"] = total
            report["deadletter_wait_s"] = round(
                reader.wait_for(total, cfg.deadletter_timeout_s, alive=dep.check_alive), 2
            )
            # htwin re-reads twin.models (now holding the bad twins) when it starts: restart it
            report["htwin_sigterm_stop_s"] = dep.stop("htwin")
            dep.start("htwin")
            # the good traffic after the bad: the real day, as fast as possible
            expected = expected_traffic(cfg.data)
            producer = make_producer(dep.settings)
            replayer = Replayer.for_settings(dep.settings, producer, None, run="after-fuzz")
            replayer.publish_table(read_raw(cfg.data))
            replayer.finish()
            producer.close()
            result, report["complete_s"] = wait_complete(
                dep, expected, time.monotonic(), cfg.replay_timeout_s
            )
            report.update(result)
            time.sleep(3.0)  # the restarted htwin has read twin.models by now, or died of it
            reader.wait_for(total, 10.0, alive=dep.check_alive)
            prefix = dep.settings.kafka.topic_prefix
            judged = judge_deadletters(plans, specs, reader.letters)
            report["topics"] = {t.removeprefix(prefix): v for t, v in judged.items()}
            report["deadletters"] = len(reader.letters)
        finally:
            reader.close()
            report["exited"] = dict(dep.check_alive())
            report["agent_crashes"] = dep.agent_crashes()
            report["ok"] = bool(
                _complete(report)
                and not report["exited"]
                and not report["agent_crashes"]
                and all(t["ok"] for t in report.get("topics", {}).values())
            )
            if not report["ok"]:
                report["logs"] = dep.log_tail()
    return report


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/chaos.py", description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=int, default=20, help="the real day tiled over this many days")
    ap.add_argument("--replay-s", type=float, default=60.0, help="wall time of the paced replay")
    ap.add_argument("--fault-at", type=float, default=0.3, help="fraction of rows in when the fault hits")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="time to complete after the replay")
    ap.add_argument("--influx-down-s", type=float, default=60.0)
    ap.add_argument("--fuzz-per-topic", type=int, default=10_000)
    ap.add_argument("--scenarios", default=",".join([*SCENARIOS, "fuzz"]))
    ap.add_argument("--infra-state", type=Path, default=REPO / ".state")
    ap.add_argument("--keep-logs", action="store_true", help="print process log tails of failed scenarios")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS and n != "fuzz"]
    if unknown:
        print(
            f"bench/chaos.py: error: unknown scenario(s) {unknown}; choose from {[*SCENARIOS, 'fuzz']}",
            file=sys.stderr,
        )
        return 1
    base = load_settings()
    cfg = ScenarioConfig(
        days=args.days,
        replay_s=args.replay_s,
        fault_at=args.fault_at,
        timeout_s=args.timeout_s,
        influx_down_s=args.influx_down_s,
        infra_state=args.infra_state,
    )
    out: dict[str, Any] = {"bench": "chaos", "days": args.days, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="nettwin-chaos-") as tmp:
        for name in names:
            work = Path(tmp) / name
            try:
                if name == "fuzz":
                    rep = run_fuzz(base, FuzzConfig(per_topic=args.fuzz_per_topic), work)
                else:
                    rep = run_scenario(SCENARIOS[name], base, cfg, work)
            except Exception as exc:  # one scenario that cannot run (e.g. the chain never came up)
                rep = {"scenario": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            logs = rep.pop("logs", None)
            if logs and args.keep_logs:
                print(f"=== {name} (failed) ===\n{logs}", file=sys.stderr)
            out["scenarios"][name] = rep
    print(json.dumps(out, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _telemetry_batch(n: int) -> bytes:
    """Records of an attached source (``ingest/sources``): two metrics, one missing (NaN) on some records."""
    values = np.column_stack([np.arange(n) * 10.0, np.where(np.arange(n) % 2, np.nan, 1.5)])
    return RecordBatch(
        "telemetry",
        ("rx_bytes", "cpu"),
        60,
        np.arange(1, n + 1, dtype=np.uint32),
        T_FUZZ + 1000 * np.arange(n, dtype=np.int64),
        values,
        extra={"entities": {str(i): f"fuzz-cell-{i}" for i in range(1, n + 1)}, "source": "fuzz"},
    ).encode()
