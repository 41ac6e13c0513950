"""Replay FTM/IMU walks into Kafka at their recorded rates: FTM ranging, IMU, and SIMULATED vision.

Every walk starts at event time 0 (its first row) and all walks run side by side. Records go, in event-time
order, to three topics keyed by ``device/walk`` (so one walk stays in one partition, in order):

* ``telemetry.ftm``: one JSON record per row with at least one AP ranged: ``{walk, device, scene, t_ms,
  line, aps: {ap: [rtt_m, std_m, rss_dbm]}}``;
* ``telemetry.imu``: one per row: ``{walk, device, t_ms, line, acc, gyro, mag, azimuth, pitch, roll}``;
* ``telemetry.vision_sim``: the SIMULATED camera's detections at 10 fps for walks with ground truth
  (``simulated: true``, ``u, v, box_w, box_h, detected``, and ``floor_x, floor_y``: the box back-projected
  with the simulated camera's calibration, 0 when not detected).

Rows the reader could not parse go to the dead-letter topic with their original text, file and line.

Before the records, :func:`publish_sites` puts each scene's AP positions on the compacted ``sites.ftm``
topic (key = scene, JSON ``site_message``), recovered from all the given walks of the scene together plus
the site files in their folders; a scene the walks cannot determine gets nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ingest.deadletter import DeadLetter, DeadLetterSink
from ingest.readers.ftm import Walk, discover, read_walk, recover_sites, site_files_near, site_message
from ingest.readers.simulated_vision import (
    SimulatedDetections,
    camera_for_scene,
    seed_for,
    simulate_detections,
)
from ingest.topics import Topics
from producers.replay import ReplayClock

KINDS = ("ftm", "imu", "vision_sim")


@dataclass
class FtmReplaySummary:
    run: str
    walks: list[str]
    records: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    dead_letters: int = 0
    skipped_files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # scene -> the published site record
    sites_undetermined: dict[str, str] = field(default_factory=dict)  # scene -> why nothing was published

    def as_dict(self) -> dict[str, Any]:
        total = sum(self.records.values())
        return {
            "run": self.run,
            "walks": self.walks,
            "records": self.records,
            "total": total,
            "dead_letters": self.dead_letters,
            "skipped_files": self.skipped_files,
            "sites": self.sites,
            "sites_undetermined": self.sites_undetermined,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(total / self.seconds, 1) if self.seconds > 0 else None,
        }


def load_walks(
    paths: list[Path], seed: int
) -> tuple[list[Walk], dict[str, SimulatedDetections], dict[str, str]]:
    """Read the walks of ``paths`` (files or folders) and simulate each scene's camera from its tracks."""
    found = discover(paths)
    walks = [read_walk(p) for p in found.walks]
    vision: dict[str, SimulatedDetections] = {}
    for scene in sorted({w.scene for w in walks}):
        tracked = [w for w in walks if w.scene == scene and w.gt is not None]
        if not tracked:
            continue
        pts = np.concatenate([w.gt for w in tracked if w.gt is not None])
        cam = camera_for_scene(pts)
        for w in tracked:
            assert w.gt is not None
            vision[w.name] = simulate_detections(w.t_ms, w.gt, cam, seed_for(seed, w.name), scene_points=pts)
    return walks, vision, {p.name: r for p, r in found.skipped.items()}


def _events(walks: list[Walk], vision: dict[str, SimulatedDetections]) -> list[tuple[float, int, int, int]]:
    """(event_ms from the walk's start, kind index, walk index, row index), in event-time order."""
    out: list[tuple[float, int, int, int]] = []
    for wi, w in enumerate(walks):
        rel = w.t_ms - w.t_ms[0]
        ranged = [bool(x) for x in np.any(w.rtt > 0, axis=1)]
        out.extend((float(rel[i]), 0, wi, i) for i in range(len(w)) if ranged[i])
        out.extend((float(rel[i]), 1, wi, i) for i in range(len(w)))
        if w.name in vision:
            v = vision[w.name]
            out.extend((float(t - w.t_ms[0]), 2, wi, i) for i, t in enumerate(v.t_ms))
    out.sort()
    return out


def _record(kind: int, w: Walk, i: int, vision: dict[str, SimulatedDetections]) -> dict[str, Any]:
    if kind == 0:
        aps = {
            a: [round(float(w.rtt[i, k]), 4), round(float(w.std[i, k]), 4), float(w.rss[i, k])]
            for k, a in enumerate(w.ap_ids)
            if w.rtt[i, k] > 0
        }
        return {
            "walk": w.name,
            "device": w.device,
            "scene": w.scene,
            "t_ms": float(w.t_ms[i]),
            "line": w.lines[i],
            "aps": aps,
        }
    if kind == 1:
        m = w.imu[i]
        return {
            "walk": w.name, "device": w.device, "t_ms": float(w.t_ms[i]), "line": w.lines[i],
            "acc": m[0:3].tolist(), "gyro": m[3:6].tolist(), "mag": m[6:9].tolist(),
            "azimuth": float(m[9]), "pitch": float(m[10]), "roll": float(m[11]),
        }  # fmt: skip
    v = vision[w.name]
    o = v.obs[i]
    return {
        "walk": w.name, "device": w.device, "t_ms": float(v.t_ms[i]), "simulated": True,
        "u": round(float(o[0]), 2), "v": round(float(o[1]), 2), "box_w": round(float(o[2]), 2),
        "box_h": round(float(o[3]), 2), "detected": bool(o[4] > 0),
        "floor_x": round(float(v.floor_xy[i, 0]), 4), "floor_y": round(float(v.floor_xy[i, 1]), 4),
    }  # fmt: skip


def publish_sites(
    producer: Any, topics: Topics, walks: list[Walk], run: str = ""
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Recover each scene's AP positions from all its walks (plus the site files next to them) and publish
    them on ``sites.ftm`` (key = scene). Returns the published records and, per scene left out, why."""
    sites, problems = recover_sites(walks, site_files_near([w.source for w in walks]))
    published: dict[str, dict[str, Any]] = {}
    for scene, geo in sites.items():
        msg = site_message(geo, [w.name for w in walks if w.scene == scene])
        producer.send(
            topics.sites_ftm,
            key=scene.encode(),
            value=json.dumps(msg, separators=(",", ":")).encode(),
            headers=[("nettwin.run", run.encode())],
        )
        published[scene] = msg
    producer.flush()
    return published, problems


def replay_walks(
    producer: Any,
    topics: Topics,
    walks: list[Walk],
    vision: dict[str, SimulatedDetections],
    clock: ReplayClock,
    limit: int | None = None,
    run: str | None = None,
) -> FtmReplaySummary:
    """Publish the walks' records in event-time order (``limit``: at most that many records in all)."""
    summary = FtmReplaySummary(run or uuid.uuid4().hex[:12], [w.name for w in walks])
    summary.sites, summary.sites_undetermined = publish_sites(producer, topics, walks, summary.run)
    sink = DeadLetterSink(producer, topics.deadletter)
    for w in walks:
        for line, reason, raw in w.bad_rows:
            sink.send(DeadLetter(reason, str(w.source), f"line {line}", raw.encode(), "producer"))
    summary.dead_letters = sink.count
    names = {0: topics.telemetry_ftm, 1: topics.telemetry_imu, 2: topics.telemetry_vision_sim}
    t0 = time.perf_counter()
    for sent, (event_ms, kind, wi, i) in enumerate(_events(walks, vision)):
        if limit is not None and sent >= limit:
            break
        clock.wait_until(int(event_ms))
        w = walks[wi]
        rec = _record(kind, w, i, vision)
        producer.send(
            names[kind],
            key=f"{w.device}/{w.name}".encode(),
            value=json.dumps(rec, separators=(",", ":")).encode(),
            headers=[("nettwin.run", summary.run.encode())],
        )
        summary.records[KINDS[kind]] += 1
    producer.flush()
    summary.seconds = time.perf_counter() - t0
    return summary
