"""The steps of ``nettwin demo`` (the command is ``nettwin/cli/demo.py``): the whole twin lifecycle on the
embedded data, the ingestion-only demo and the VH-Twin benchmark's protocol run live.

Everything runs in the demo's own topics (prefix ``demo.``) and database (``<database>_demo``), fresh on every
run. Heavy libraries are imported here, which the command imports only when it runs (CLI start-up time).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ingest.errors import InputError, NettwinError, ServiceError
from ingest.kafka import make_producer
from ingest.settings import NettwinSettings
from nettwin.cli.common import console, print_json, print_table
from nettwin.cli.query import twin_rows
from nettwin.cli.services import REPO_ROOT, ensure_services
from producers.replay import Replayer, load_table
from producers.synthetic import synthetic_day
from twin_store.adapters.influx import InfluxClient
from twin_store.adapters.provision import provision
from twin_store.services.processes import settings_env, spawn_cli, stop_process
from twin_store.services.store import wait_for_run

if TYPE_CHECKING:
    from bench.live_vhtwin import LiveConfig

SHARED_MILAN = REPO_ROOT.parent / "shared" / "data" / "milan"
SHARED_DAY = SHARED_MILAN / "raw_2013-11-01_26squares.txt"
FAKE_BS = 90001  # the id a fake BS claims in the demo's poisoning attempt


# --- the lifecycle -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LifecycleConfig:
    data: Path
    squares: int = 12
    seed: int = 1
    psi: float = 0.01
    stream_hours: int = 72  # hours streamed after the history; each BS updates once a day
    recluster_every: int = 12  # accepted updates between re-clusterings: a few re-clusterings per run
    speed: float = 36_000.0
    timeout_s: float = 600.0


def fresh_demo_settings(settings: NettwinSettings) -> NettwinSettings:
    """The demo's own topics (prefix ``demo.``) and database (``<database>_demo``), emptied and created."""
    from twin_store.adapters.provision import deprovision

    demo_settings = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"topic_prefix": settings.kafka.topic_prefix + "demo."}
            ),
            "influx": settings.influx.model_copy(update={"database": settings.influx.database + "_demo"}),
        }
    )
    deprovision(demo_settings)
    provision(demo_settings)
    return demo_settings


def with_keys(settings: NettwinSettings, squares: np.ndarray, **security: Any) -> NettwinSettings:
    """Give every BS a key (agents sign, the store verifies): a fresh registry under the state dir."""
    from twin_store.federation.keys import KeyRegistry

    keys_file = (settings.state_dir / "demo" / "bs-keys.json").resolve()
    KeyRegistry.create(str(s) for s in squares.tolist()).save(keys_file)
    update = {"keys_file": keys_file, **security}
    return settings.model_copy(update={"security": settings.security.model_copy(update=update)})


class Pipeline:
    """Worker, store and ``nettwin htwin`` as child processes with one settings; stopped on ``stop``."""

    def __init__(self, settings: NettwinSettings, htwin_args: list[str], log_prefix: str) -> None:
        env = settings_env(settings)
        self.logs = settings.state_dir / "log"
        self.procs = {
            "worker": spawn_cli(["worker"], self.logs / f"{log_prefix}-worker.log", env),
            "store": spawn_cli(["store"], self.logs / f"{log_prefix}-store.log", env),
            "htwin": spawn_cli(["htwin", *htwin_args], self.logs / f"{log_prefix}-htwin.log", env),
        }

    def alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ServiceError(f"{name} exited early (code {p.returncode}); see {self.logs}")

    def stop(self) -> None:
        for p in self.procs.values():
            stop_process(p)


class Lifecycle:
    """The default demo's steps, each a method: V-twinning, live stream, poisoning, twin state."""

    def __init__(self, settings: NettwinSettings, cfg: LifecycleConfig, quiet: bool = False) -> None:
        if not cfg.data.is_file():
            raise InputError(f"{cfg.data}: no such file (the demo's default data lives in ../shared)")
        self.base = settings
        self.settings = settings
        self.cfg = cfg
        self.quiet = quiet
        self.ui: subprocess.Popen[bytes] | None = None

    def say(self, text: str) -> None:
        if not self.quiet:
            console.print(text)

    def run(self, ui: tuple[str, int] | None) -> dict[str, Any]:
        from bench.live_vhtwin import subset_file, wait_for_forecasts

        ensure_services(self.base)
        self.settings = fresh_demo_settings(self.base)
        if ui is not None:
            self.start_ui(*ui)
        cfg = self.cfg
        subset, series, picked = subset_file(
            cfg.data,
            cfg.squares,
            cfg.seed,
            self.base.state_dir / "demo" / f"hourly_{cfg.squares}sq_seed{cfg.seed}.csv",
        )
        train_hours = self.v_twinning(subset)
        end_hour = min(train_hours + cfg.stream_hours, series.shape[1])
        self.settings = with_keys(self.settings, picked)
        started = time.monotonic()
        pipeline = Pipeline(self.settings, ["--psi", repr(cfg.psi)], "demo")
        try:
            self.stream(subset, train_hours, end_hour)
            with InfluxClient(self.settings.influx) as influx:
                live = wait_for_forecasts(
                    influx, len(picked), train_hours, end_hour - 1, cfg.timeout_s, pipeline.alive
                )
            self.say(f"live: {len(live):,} forecasts with outcomes for hours {train_hours}..{end_hour - 1}")
            refused = self.poison(picked, pipeline.alive)
        finally:
            pipeline.stop()
        report = self.twin_state(live, series, picked, train_hours)
        report |= refused | {"live_seconds": round(time.monotonic() - started, 1)}
        return report

    def start_ui(self, host: str, port: int) -> None:
        log = self.base.state_dir / "log" / "demo-ui.log"
        self.ui = spawn_cli(["ui", "--host", host, "--port", str(port)], log, settings_env(self.settings))
        time.sleep(0.5)
        if self.ui.poll() is not None:
            raise ServiceError(f"the web view did not start (port {port} taken?); see {log}")
        self.say(f"web view (live while the demo runs): http://{host}:{port}/")

    def v_twinning(self, subset: Path) -> int:
        from bench.live_vhtwin import LiveConfig, vtwin_job
        from twin_store.services.vtwin import run_vtwin

        cfg = self.cfg
        live = LiveConfig(cfg.data, cfg.squares, cfg.seed, psi=cfg.psi, recluster_every=cfg.recluster_every)
        job = vtwin_job(live, subset)
        with console.status("V-twinning on the history"):
            vt = run_vtwin(self.settings, job)
        self.say(
            f"V-twinning: {vt['squares']} BSs in clusters {vt['clusters']}, {vt['rounds']} rounds on "
            f"{vt['train_hours']} hours ({vt['seconds']} s)"
        )
        return int(vt["train_hours"])

    def stream(self, subset: Path, train_hours: int, end_hour: int) -> None:
        from bench.live_vhtwin import replay_split

        cfg = self.cfg
        with console.status(
            f"replaying {train_hours} history hours packed, then {end_hour - train_hours} hours at "
            f"{cfg.speed:g}x: BS agents forecast and update, H-twinning merges, DCS re-clusters"
        ):
            replay_split(self.settings, subset, train_hours, cfg.speed, cfg.timeout_s, end_hour)

    def poison(self, picked: np.ndarray, alive: Callable[[], None]) -> dict[str, Any]:
        """A fake BS (no key) and a compromised BS (its stolen key, a boosted update) attack the live twins.

        Returns every refused update (``rejected``, ``quarantined``: the screen may also have refused honest
        ones) and, under ``attack``, the store's decision on each of the two attack updates.
        """
        from nettwin.cli.security import send_attack
        from producers.attacks import AttackConfig
        from twin_store.federation.keys import KeyRegistry

        keys_file = self.settings.security.keys_file
        assert keys_file is not None, "with_keys set the registry"
        victim = self.victim(picked)
        fake = send_attack(self.settings, "mpaf", [FAKE_BS], None, None, self.cfg.seed, AttackConfig())
        stolen = KeyRegistry.load(keys_file)
        comp = send_attack(self.settings, "scale", [victim], None, stolen, self.cfg.seed, AttackConfig())
        wanted = {(FAKE_BS, fake["seq"][0]): "fake_bs", (victim, comp["seq"][0]): "compromised_bs"}
        deadline = time.monotonic() + 60.0
        with InfluxClient(self.settings.influx) as influx:
            while True:
                alive()
                refused = refused_updates(influx)
                decided = {
                    wanted[(r["square"], r["seq"])]: r
                    for rows in refused.values()
                    for r in rows
                    if (r["square"], r["seq"]) in wanted
                }
                accepted = attack_accepted(influx, wanted)
                if len(decided) + len(accepted) == len(wanted):
                    break
                if time.monotonic() > deadline:
                    raise ServiceError(f"the attack was not decided on within 60 s: {decided}")
                time.sleep(0.5)
        attack = {name: {"square": sq, "decision": "accepted", "reason": ""} for name, sq in accepted.items()}
        for name, r in decided.items():
            attack[name] = {"square": r["square"], "decision": r["decision"], "reason": r["reason"]}
        self.say(
            f"poisoning: fake BS {FAKE_BS} {attack['fake_bs']['decision']} ({attack['fake_bs']['reason']}); "
            f"compromised BS {victim} {attack['compromised_bs']['decision']} "
            f"({attack['compromised_bs']['reason']})"
        )
        return {"rejected": refused["rejected"], "quarantined": refused["quarantined"], "attack": attack}

    def victim(self, picked: np.ndarray) -> int:
        """The BS an attacker compromises: one whose latest update was accepted, in the largest cluster."""
        from twin_store.services.htwin import read_latest_twins

        latest = read_latest_twins(self.settings)
        members = {
            int(m.twin_id): len(m.meta.get("members") or []) for m in latest.values() if m.level == "cluster"
        }
        candidates = [
            (members.get(int(m.meta.get("cluster", -1)), 0), int(m.twin_id))
            for m in latest.values()
            if m.level == "bs" and int(m.meta.get("seq", -1)) >= 0 and not m.meta.get("evicted")
        ]
        return max(candidates)[1] if candidates else int(picked[0])

    def twin_state(
        self,
        live: dict[tuple[int, int], dict[str, Any]],
        series: np.ndarray,
        picked: np.ndarray,
        train_hours: int,
    ) -> dict[str, Any]:
        from bench.live_vhtwin import z_scales

        scales = z_scales(series, picked, train_hours)
        row_of = {int(s): i for i, s in enumerate(picked.tolist())}
        model, persistence = [], []
        for (square, hour), r in live.items():
            if r.get("actual") is None or r.get("predicted") is None:
                continue
            std = scales[square][1]
            actual = float(r["actual"])
            model.append(((float(r["predicted"]) - actual) / std) ** 2)
            persistence.append(((float(series[row_of[square], hour - 1]) - actual) / std) ** 2)
        with InfluxClient(self.settings.influx) as influx:
            state = twin_summary(influx)
        return state | {
            "squares": len(picked),
            "forecasts": len(model),
            "mse": round(float(np.mean(model)), 5),
            "persistence_mse": round(float(np.mean(persistence)), 5),
            "database": self.settings.influx.database,
            "topic_prefix": self.settings.kafka.topic_prefix,
        }

    def stop_ui(self) -> None:
        if self.ui is not None:
            stop_process(self.ui)

    def serve_until_interrupted(self, url: str) -> None:
        if self.ui is None:
            return
        console.print(f"serving the web view at {url} (Ctrl-C to stop)")
        try:
            while self.ui.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            stop_process(self.ui)
        if self.ui.returncode not in (0, -15, None):
            raise ServiceError(f"the web view exited (code {self.ui.returncode}); see .state/log/demo-ui.log")


def interrupt(*_: Any) -> None:
    """SIGTERM as Ctrl-C: ``finally`` blocks stop the children."""
    raise KeyboardInterrupt


def refused_updates(influx: InfluxClient) -> dict[str, list[dict[str, Any]]]:
    """The store's refused updates (oldest first) by decision: ``rejected`` and ``quarantined``."""
    out: dict[str, list[dict[str, Any]]] = {"rejected": [], "quarantined": []}
    for decision in out:
        q = f'SELECT "reason", "score", "seq" FROM "update" WHERE "decision" = \'{decision}\' GROUP BY "entity"'
        for s in influx.query(q):
            for r in s.rows():
                out[decision].append(
                    {
                        "square": int(s.tags["entity"]),
                        "seq": int(r["seq"]),
                        "decision": decision,
                        "reason": r["reason"],
                        "score": r["score"],
                        "time": int(r["time"]),
                    }
                )
        out[decision].sort(key=lambda r: r["time"])
    return out


def attack_accepted(influx: InfluxClient, wanted: dict[tuple[int, int], str]) -> dict[str, int]:
    """Which of the attack updates the store accepted (the demo reports it if a defense let one in)."""
    out = {}
    for (square, seq), name in wanted.items():
        q = (
            f'SELECT count("seq") FROM "update" WHERE "decision" = \'accepted\' '
            f'AND "entity" = \'{int(square)}\' AND "seq" = {int(seq)}'
        )
        if influx.query(q):
            out[name] = square
    return out


def twin_summary(influx: InfluxClient) -> dict[str, Any]:
    """Versions, H-twinning syncs against offers, re-clusterings and update decisions, from InfluxDB."""
    twins = twin_rows(influx, None)
    glob = next((t for t in twins if t["level"] == "global"), {})
    clusters = {str(t["twin_id"]): int(t["version"]) for t in twins if t["level"] == "cluster"}
    offers = influx.query('SELECT max("n_offers") FROM "twin"')
    syncs = influx.query('SELECT count("version") FROM "twin" WHERE "level" = \'global\'')
    epochs = influx.query('SELECT max("epoch") FROM "membership"')
    decisions = influx.query('SELECT count("seq") FROM "update" GROUP BY "decision"')
    return {
        "global_version": int(glob.get("version", 0)),
        "cluster_versions": clusters,
        # V-twinning wrote the first global row; every later one is a live merge (a sync)
        "global_syncs": int(syncs[0].values[0][1]) - 1 if syncs else 0,
        "sync_offers": int(offers[0].values[0][1] or 0) if offers else 0,
        "membership_epochs": int(epochs[0].values[0][1]) + 1 if epochs else 0,
        "bs_twins_updated": sum(1 for t in twins if t["level"] == "bs" and int(t.get("version") or 0) > 0),
        "updates": {str(d.tags.get("decision")): int(d.values[0][1]) for d in decisions},
    }


def print_report(report: dict[str, Any], settings: NettwinSettings) -> None:
    saved = report["sync_offers"] - report["global_syncs"]
    attack = report["attack"]
    clusters = ", ".join(f"{k}: v{v}" for k, v in sorted(report["cluster_versions"].items()))
    console.print(
        "\n[bold]twin state[/bold]\n"
        f"  global twin: version {report['global_version']} (1 after V-twinning)\n"
        f"  cluster twins: {clusters}\n"
        f"  H-twinning: {report['global_syncs']} global syncs for {report['sync_offers']} offers "
        f"(psi saved {saved})\n"
        f"  membership epochs: {report['membership_epochs']} (V-twinning + {report['membership_epochs'] - 1} "
        "live re-clusterings)\n"
        f"  BS updates: {json.dumps(report['updates'])}; {report['bs_twins_updated']} BS twins moved\n"
        f"  forecasts: {report['forecasts']:,} with outcomes, MSE {report['mse']:.4f} (z-units) vs "
        f"persistence {report['persistence_mse']:.4f}\n"
        f"  poisoning: fake BS {attack['fake_bs']['square']} {attack['fake_bs']['decision']} "
        f"({attack['fake_bs']['reason']}); compromised BS {attack['compromised_bs']['square']} "
        f"{attack['compromised_bs']['decision']} ({attack['compromised_bs']['reason']})\n"
        f"  refused in all: {len(report['rejected'])} rejected, {len(report['quarantined'])} quarantined "
        "(the screen may also refuse honest updates)\n"
        f"look next: NETTWIN_INFLUX__DATABASE={settings.influx.database} nettwin query updates; "
        f"web view {report['url']}"
    )


# --- ``--ingest-only``: one real Milan day through worker and store ----------------------------------


def demo_ingest(settings: NettwinSettings, speed: float | None, timeout: float) -> None:
    """Start the services if needed, replay one real day, wait until it is in InfluxDB, show the twins."""
    ensure_services(settings)
    provision(settings)

    if SHARED_DAY.is_file():
        source, label = SHARED_DAY, "real Telecom Italia data (ODbL), 26 squares, 2013-11-01"
    else:
        source = synthetic_day(settings.state_dir / "demo", 0, squares=26)
        label = "SYNTHETIC Milan-format day (the real sample file was not found)"
    console.print(f"replaying {source.name}: {label}")

    env = settings_env(settings)
    logs = settings.state_dir / "log"
    procs = [
        spawn_cli(["worker"], logs / "demo-worker.log", env),
        spawn_cli(["store"], logs / "demo-store.log", env),
    ]
    try:
        producer = make_producer(settings)
        try:
            replayer = Replayer.for_settings(settings, producer, speed)
            replayer.publish_table(load_table(source, "raw"))
            summary = replayer.finish()
        finally:
            producer.close()
        console.print(
            f"published {summary.records:,} records in {summary.messages} messages; waiting for the pipeline"
        )
        with InfluxClient(settings.influx) as influx:
            for p in procs:
                if p.poll() is not None:
                    raise ServiceError(f"a pipeline process exited early (code {p.returncode}); see {logs}")
            rows = wait_for_run(influx, summary.run, settings.kafka.partitions, timeout)
            received = sum(int(r["received"]) for r in rows)
            twins = twin_rows(influx, "bs")
    finally:
        for p in procs:
            stop_process(p)
    print_table(
        "twin state (nettwin query twins --level bs)",
        twins[:10],
        ["level", "twin_id", "version", "n_updates", "n_members", "time"],
    )
    if len(twins) > 10:
        console.print(f"... {len(twins) - 10} more")
    counts = {}
    with InfluxClient(settings.influx) as influx:
        for measurement in ("traffic", "traffic_hourly"):
            q = (
                f'SELECT count("internet") FROM "{measurement}" '
                f"WHERE time >= {summary.first_ms}ms AND time <= {summary.last_ms}ms"
            )
            series = influx.query(q)
            counts[measurement] = int(series[0].values[0][1]) if series else 0
    console.print(
        f"run {summary.run}: sent {summary.records:,} records, worker received {received:,}, "
        f"{summary.malformed} malformed lines dead-lettered\n"
        f"InfluxDB '{settings.influx.database}': {counts['traffic']:,} rows in traffic (10 min), "
        f"{counts['traffic_hourly']:,} in traffic_hourly, {len(twins)} BS twins\n"
        "look next:\n"
        "  nettwin query traffic --square 1 --resolution 1h\n"
        "  nettwin query twins --json\n"
        "  nettwin query deadletters\n"
        "worker and store stopped; the services keep running (stop them with infra/down)"
    )
    if received != summary.records:
        raise NettwinError(f"worker received {received} of {summary.records} records; see {logs}")


# --- ``--hourly FILE``: the VH-Twin benchmark's protocol, live -----------------------------------------


def demo_hourly(settings: NettwinSettings, cfg: LiveConfig, compare: bool, json_out: bool) -> None:
    """``nettwin demo --hourly``: its own topics (prefix ``demo.``) and database, fresh on every run."""
    from bench.live_vhtwin import (
        agreement,
        check_data,
        live_test_mse,
        offline_config,
        replay_split,
        subset_file,
        test_span,
        vtwin_job,
        wait_for_forecasts,
        z_scales,
    )
    from bench.vhtwin import run as run_offline
    from twin_store.services.vtwin import run_vtwin

    check_data(cfg)
    ensure_services(settings)
    demo_settings = fresh_demo_settings(settings)
    subset, series, picked = subset_file(
        cfg.data,
        cfg.squares,
        cfg.seed,
        settings.state_dir / "demo" / f"hourly_{cfg.squares}sq_seed{cfg.seed}.csv",
    )
    first_test, last_test = test_span(series.shape[1])
    with console.status("V-twinning on the training hours"):
        vt = run_vtwin(demo_settings, vtwin_job(cfg, subset))
    console.print(
        f"V-twinning: {vt['squares']} BSs, clusters {vt['clusters']}, {vt['rounds']} rounds on "
        f"{vt['train_hours']} hours ({vt['seconds']} s)"
    )
    # no traffic screening: the demo reproduces `nettwin bench vhtwin`, which trains on every hour
    demo_settings = with_keys(demo_settings, picked, screen_traffic=False)
    # FedAvg, unscreened: the aggregation of `nettwin bench vhtwin`, which this demo reproduces
    pipeline = Pipeline(demo_settings, ["--psi", repr(cfg.psi), "--defense", "mean"], "demo-hourly")
    started = time.monotonic()
    try:
        with console.status(
            f"replaying {subset.name}: {vt['train_hours']} history hours packed, then "
            f"{series.shape[1] - vt['train_hours']} hours at {cfg.speed:g}x"
        ):
            replay_split(demo_settings, subset, vt["train_hours"], cfg.speed, cfg.timeout_s)
            with InfluxClient(demo_settings.influx) as influx:
                live = wait_for_forecasts(
                    influx, len(picked), first_test, last_test, cfg.timeout_s, pipeline.alive
                )
                twins = twin_rows(influx, None)
                decisions = influx.query('SELECT count("seq") FROM "update" GROUP BY "decision"')
    finally:
        pipeline.stop()
    live_s = time.monotonic() - started
    scales = z_scales(series, picked, vt["train_hours"])
    live_mse = live_test_mse(live, scales)
    levels = {lv: [t for t in twins if t["level"] == lv] for lv in ("global", "cluster", "bs")}
    glob = levels["global"][0] if levels["global"] else {}
    console.print(
        f"live run: {len(live):,} test-hour forecasts with outcomes, test MSE (z-scored) "
        f"{live_mse:.5f}; global twin version {glob.get('version')}, "
        f"{len(levels['cluster'])} cluster twins, {len(levels['bs'])} BS twins ({live_s:.0f} s)"
    )
    report: dict[str, Any] = {
        "squares": len(picked),
        "test_forecasts": len(live),
        "live_test_mse": round(live_mse, 5),
        "live_seconds": round(live_s, 1),
        "global_version": glob.get("version"),
        "clusters": len(levels["cluster"]),
        # the store's decisions on the agents' signed updates
        "updates": {str(d.tags.get("decision")): int(d.values[0][1]) for d in decisions},
        "database": demo_settings.influx.database,
        "topic_prefix": demo_settings.kafka.topic_prefix,
    }
    if compare:
        with console.status("offline benchmark on the same data (same seed and psi)"):
            _, rows = run_offline(cfg.data, offline_config(cfg))
        report["agreement"] = agreement(live, rows, scales)
        if not json_out:
            console.print(f"live vs offline vhtwin forecasts: {json.dumps(report['agreement'])}")
    if json_out:
        print_json(report)
        return
    db = demo_settings.influx.database
    console.print(
        "look next (the demo's own topics and database):\n"
        f"  NETTWIN_INFLUX__DATABASE={db} nettwin query twins\n"
        f"  curl -sG http://127.0.0.1:8086/query --data-urlencode db={db} --data-urlencode "
        "'q=SELECT mean(abs_error) FROM forecast GROUP BY cluster'"
    )
