"""``nettwin worker``, ``nettwin store`` and ``nettwin demo``."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ingest.errors import NettwinError, ServiceError
from nettwin.cli.common import console, print_json, print_table, settings_of, setup_service_logging
from nettwin.cli.query import twin_rows

# kafka, requests, numpy, pandas and faust are imported inside the commands (CLI start-up time)
if TYPE_CHECKING:
    from bench.live_vhtwin import LiveConfig
    from ingest.settings import NettwinSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DAY = REPO_ROOT.parent / "shared" / "data" / "milan" / "raw_2013-11-01_26squares.txt"


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(store)
    app.command()(demo)


def worker(ctx: typer.Context, loglevel: str = typer.Option("warning", help="faust log level")) -> None:
    """Run the Faust worker: 10-minute and hourly windows per square -> feature records."""
    from ingest.kafka import ensure_kafka_reachable
    from stream_processors.app import run_worker

    settings = settings_of(ctx)
    ensure_kafka_reachable(settings)
    run_worker(settings, loglevel=loglevel)


def store(
    ctx: typer.Context,
    idle_exit: float | None = typer.Option(None, help="exit after this many seconds without input"),
    json_out: bool = typer.Option(False, "--json", help="print counters as JSON on exit"),
) -> None:
    """Run the twin store: features -> InfluxDB (traffic, traffic_hourly, twin), committing after each write."""
    from twin_store.services.store import TwinStore

    setup_service_logging()
    twin_store = TwinStore(settings_of(ctx))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(twin_store, "stopping", True))
    counters = twin_store.run(idle_exit_s=idle_exit)
    if json_out:
        print_json(counters.__dict__)


def services_up(settings: NettwinSettings) -> tuple[bool, bool]:
    from ingest.kafka import ensure_kafka_reachable
    from twin_store.adapters.influx import InfluxClient

    try:
        ensure_kafka_reachable(settings, timeout_s=1.0)
        kafka = True
    except ServiceError:
        kafka = False
    try:
        with InfluxClient(settings.influx) as influx:
            influx.ping()
        influx_ok = True
    except ServiceError:
        influx_ok = False
    return kafka, influx_ok


def ensure_services(settings: NettwinSettings) -> None:
    kafka_ok, influx_ok = services_up(settings)
    if not (kafka_ok and influx_ok):
        if settings.profile != "local":
            raise ServiceError("Kafka or InfluxDB unreachable and profile is external: start them yourself")
        console.print("starting local services (infra/up) ...")
        if subprocess.run([str(REPO_ROOT / "infra" / "up")], check=False).returncode != 0:
            raise ServiceError("infra/up failed; see .state/log/")


def demo(
    ctx: typer.Context,
    speed: float | None = typer.Option(
        None, help="replay speed (event time x N); default: as fast as possible (--hourly: 36000)"
    ),
    timeout: float = typer.Option(180.0, help="seconds to wait for the pipeline to finish"),
    hourly: Path | None = typer.Option(
        None, help="run the VH-Twin benchmark live on this hourly file (square_id,h0..hN)"
    ),
    squares: int = typer.Option(50, min=2, help="--hourly: squares drawn with --seed, as the benchmark"),
    seed: int = typer.Option(1, help="--hourly: seed, as the benchmark"),
    psi: float = typer.Option(0.01, min=0.0, help="--hourly: H-twinning threshold"),
    compare: bool = typer.Option(False, help="--hourly: also run the offline benchmark and compare"),
    recluster_every: int = typer.Option(
        500, min=0, help="--hourly: accepted updates between DCS re-clusterings (0: never)"
    ),
    json_out: bool = typer.Option(False, "--json", help="--hourly: print the report as one JSON line"),
) -> None:
    """Bring services up if needed, run worker + store, replay one real Milan day, show the twin state.

    With --hourly: V-twinning, BS agents, H-twinning and live forecasts on the benchmark's data.
    """
    settings = settings_of(ctx)
    if hourly is not None:
        from bench.live_vhtwin import LiveConfig

        cfg = LiveConfig(
            hourly,
            squares,
            seed,
            psi=psi,
            recluster_every=recluster_every,
            speed=speed or 36_000.0,
            timeout_s=max(timeout, 900.0),
        )
        demo_hourly(settings, cfg, compare, json_out)
        return
    from ingest.kafka import make_producer
    from producers.replay import Replayer, load_table
    from producers.synthetic import synthetic_day
    from twin_store.adapters.influx import InfluxClient
    from twin_store.adapters.provision import provision
    from twin_store.services.processes import settings_env, spawn_cli, stop_process
    from twin_store.services.store import wait_for_run

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
    from twin_store.adapters.influx import InfluxClient
    from twin_store.adapters.provision import deprovision, provision
    from twin_store.federation.keys import KeyRegistry
    from twin_store.services.processes import settings_env, spawn_cli, stop_process
    from twin_store.services.vtwin import run_vtwin

    check_data(cfg)
    ensure_services(settings)
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
    # every BS gets a key: the agents sign their updates and the store verifies each one
    keys_file = settings.state_dir / "demo" / "bs-keys.json"
    KeyRegistry.create(str(s) for s in picked).save(keys_file)
    # no traffic screening: the demo reproduces `nettwin bench vhtwin`, which trains on every hour
    security = {"keys_file": keys_file.resolve(), "screen_traffic": False}
    demo_settings = demo_settings.model_copy(
        update={"security": demo_settings.security.model_copy(update=security)}
    )
    env = settings_env(demo_settings)
    logs = settings.state_dir / "log"
    procs = {
        "worker": spawn_cli(["worker"], logs / "demo-hourly-worker.log", env),
        "store": spawn_cli(["store"], logs / "demo-hourly-store.log", env),
        # FedAvg, unscreened: the aggregation of `nettwin bench vhtwin`, which this demo reproduces
        "htwin": spawn_cli(
            ["htwin", "--psi", repr(cfg.psi), "--defense", "mean"], logs / "demo-hourly-htwin.log", env
        ),
    }

    def alive() -> None:
        for name, p in procs.items():
            if p.poll() is not None:
                raise ServiceError(f"{name} exited early (code {p.returncode}); see {logs}")

    started = time.monotonic()
    try:
        with console.status(
            f"replaying {subset.name}: {vt['train_hours']} history hours packed, then "
            f"{series.shape[1] - vt['train_hours']} hours at {cfg.speed:g}x"
        ):
            replay_split(demo_settings, subset, vt["train_hours"], cfg.speed, cfg.timeout_s)
            with InfluxClient(demo_settings.influx) as influx:
                live = wait_for_forecasts(influx, len(picked), first_test, last_test, cfg.timeout_s, alive)
                twins = twin_rows(influx, None)
                decisions = influx.query('SELECT count("seq") FROM "update" GROUP BY "decision"')
    finally:
        for p in procs.values():
            stop_process(p)
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
