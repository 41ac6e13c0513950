"""``nettwin replay ftm``: replay FTM/IMU walks (+ SIMULATED vision detections) into Kafka.

Registered in ``nettwin/cli/replay.py`` with ``app.command("ftm")(replay_ftm.ftm)``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ingest.errors import InputError
from nettwin.cli.common import console, print_json, settings_of


def ftm(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., help="walk CSVs or folders of them (like ftm_imu/raw)"),
    speed: float | None = typer.Option(
        None, help="event time runs N x the recorded rate (default 1: recorded rate)"
    ),
    as_fast: bool = typer.Option(False, "--max", help="as fast as possible"),
    limit: int | None = typer.Option(
        None, min=1, help="stop after this many records (all topics, time order)"
    ),
    seed: int = typer.Option(1, help="seed of the SIMULATED camera detections"),
    run: str | None = typer.Option(None, help="run id (default: random), sent as the nettwin.run header"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as one JSON line"),
) -> None:
    """Publish FTM ranging, IMU and SIMULATED vision records, key = device/walk, at the recorded rates.

    First, each scene's AP positions (recovered from all the given walks of the scene, plus the site files
    in their folders) go to the compacted sites.ftm topic, key = scene."""
    from ingest.kafka import ensure_topics_exist, make_producer
    from ingest.topics import Topics
    from producers.ftm_replay import load_walks, replay_walks
    from producers.replay import ReplayClock

    if as_fast and speed is not None:
        raise InputError("give either --speed N or --max, not both")
    clock = ReplayClock(None if as_fast else (speed if speed is not None else 1.0))
    settings = settings_of(ctx)
    topics = Topics.from_settings(settings)
    walks, vision, skipped = load_walks(paths, seed)
    ensure_topics_exist(
        settings,
        [
            topics.sites_ftm,
            topics.telemetry_ftm,
            topics.telemetry_imu,
            topics.telemetry_vision_sim,
            topics.deadletter,
        ],
    )
    producer = make_producer(settings)
    try:
        with console.status("replaying walks"):
            summary = replay_walks(producer, topics, walks, vision, clock, limit, run)
    finally:
        producer.close()
    summary.skipped_files = skipped
    d = summary.as_dict()
    if json_out:
        print_json(d)
        return
    console.print(
        f"replayed {d['total']:,} records ({d['records']}; vision is SIMULATED) from {len(d['walks'])} walk(s), "
        f"{d['dead_letters']} bad row(s) -> {topics.deadletter}, in {d['seconds']} s, run {d['run']}"
    )
    for scene, site in d["sites"].items():
        flags = f", mirror-ambiguous: {','.join(site['ambiguous'])}" if site["ambiguous"] else ""
        left = site.get("left_out") or {}
        flags += "".join(f"; {ap} left out: {why}" for ap, why in left.items())
        console.print(
            f"site {scene}: {len(site['ap_ids'])} AP positions ({site['source']}{flags}) -> {topics.sites_ftm}"
        )
    for scene, reason in d["sites_undetermined"].items():
        console.print(f"site {scene}: AP positions not published: {reason}")
    for name, reason in skipped.items():
        console.print(f"skipped {name}: {reason}")
