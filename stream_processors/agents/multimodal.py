"""``multimodal``: ``replay ftm``'s FTM, IMU and SIMULATED vision records (``telemetry.ftm``, ``.imu``,
``.vision_sim``) -> per-device time-aligned windows with a modality mask on ``features.multimodal``
(``stream_processors/multimodal_live.py``).

The three topics are keyed alike, so a device's records share a partition number, and Faust assigns the
same partition numbers of an agent's topics together: one windower per partition number. It follows
``sites.ftm`` (AP positions per scene) and adds the least-squares FTM fix to the windows of scenes whose site
it knows. Never commits: a worker given the partitions re-reads the topics and re-emits the windows (same
key and end_ms). A timer lets idle modalities and the grace period release windows.

Positioning: when ``<state_dir>/utt/positioning.json`` exists (``nettwin twin position``), the windowers run
the range Kalman filter with the stored twin's constants and each window carries the twin's ``position``. The
file is looked at again every 5 s, so a retrained twin is picked up without a restart.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ingest.deadletter import DeadLetter
from ingest.readers.ftm import SiteGeometry
from stream_processors.agents.context import WorkerContext
from stream_processors.followers import SiteFollower

GROUP = "multimodal"  # the state key's "topic": one windower per partition number of the three topics
log = logging.getLogger(__name__)


class LocatorFile:
    """The stored positioning twin, (re)loaded when its file appears or changes, looked at every ``every_s``."""

    def __init__(self, root: Path, every_s: float = 5.0) -> None:
        self.root, self.every_s = root, every_s
        self.locator: Any = None
        self.mtime = 0.0
        self.checked = -float("inf")

    def get(self) -> Any:
        now = time.monotonic()
        if now - self.checked < self.every_s:
            return self.locator
        self.checked = now
        try:
            mtime = (self.root / "positioning.json").stat().st_mtime
        except OSError:
            return self.locator
        if mtime != self.mtime:
            from twin_store.federation.utt_locator import Locator  # brings torch: only with a stored twin

            try:
                self.locator, self.mtime = Locator.load(self.root), mtime
                log.info("positioning twin loaded from %s", self.root)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                log.warning("positioning twin in %s not usable: %r", self.root, exc)
        return self.locator


def register(ctx: WorkerContext) -> Any:
    topics = ctx.topics
    kinds = {topics.telemetry_ftm: "ftm", topics.telemetry_imu: "imu", topics.telemetry_vision_sim: "vision"}
    source = ctx.topic(*kinds)
    sink = ctx.topic(topics.features_multimodal)
    sites: dict[str, SiteGeometry] = {}  # scene -> AP positions from sites.ftm, shared by the windowers
    follower = SiteFollower(ctx.settings)
    states = ctx.partition_states(aliases=dict.fromkeys(kinds, GROUP))
    ctx.reports["site follower"] = lambda: dict(follower.counters)
    locator = LocatorFile(Path(ctx.settings.state_dir).resolve() / "utt")

    async def send_windows(windows: list[dict[str, Any]], partition: int) -> None:
        from stream_processors.multimodal_live import encode_window

        for w in windows:
            await sink.send(key=w["key"].encode(), value=encode_window(w), partition=partition)

    @ctx.app.agent(source, name="multimodal")
    async def multimodal(stream: Any) -> None:
        async for event in stream.noack().events():
            msg = event.message
            ctx.start_thread(follower)  # with the first record: no multimodal input, no follower
            for letter in follower.drain_into(sites):
                await ctx.dead_letter(letter)
            windower = states.get(GROUP, msg.partition)
            if windower is None:
                # imported with the first record: a worker without multimodal input does not load it
                from stream_processors.multimodal_live import MultimodalWindower

                windower = MultimodalWindower(sites=sites, locator=locator.get())
                states.put(GROUP, msg.partition, windower, 0)
            key = msg.key.decode(errors="replace") if msg.key else ""
            where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
            try:
                rec = json.loads(event.value)
                windows, late = windower.on_record(key, kinds[msg.topic], rec, time.monotonic())
            except Exception as exc:  # bad records (and any bug they reveal) become dead letters
                reason = f"unreadable {kinds[msg.topic]} record: {exc!r}"
                windows, late = [], False
                await ctx.dead_letter(DeadLetter(reason, msg.topic, where, event.value or b"", "multimodal"))
            if late:
                reason = f"late: event time {rec['t_ms']} is not after the last emitted window of {key}"
                await ctx.dead_letter(DeadLetter(reason, msg.topic, where, event.value, "multimodal"))
            await send_windows(windows, msg.partition)

    @ctx.app.timer(interval=0.5)
    async def multimodal_idle() -> None:
        if not len(states):
            return  # nothing to release: costs nothing while there is no multimodal input
        for letter in follower.drain_into(sites):
            await ctx.dead_letter(letter)
        now = time.monotonic()
        current = locator.get()
        for (_, partition), windower in states.items():
            windower.locator = current
            await send_windows(windower.flush(now), partition)

    return multimodal
