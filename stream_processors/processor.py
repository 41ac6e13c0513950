"""Per-partition window processing: the whole worker logic, independent of Faust.

``PartitionProcessor.on_message`` takes one raw message of a partition and returns what to send:
feature batches for closed windows, dead letters for bad or late input, and the offset below which every
input message is fully reflected in sent output (safe to acknowledge/commit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ingest.deadletter import DeadLetter
from ingest.schema import MalformedMessage, RecordBatch, decode
from ingest.settings import WorkerSettings
from stream_processors.windows import TumblingWindows


@dataclass
class Output:
    features: list[RecordBatch] = field(default_factory=list)
    deadletters: list[DeadLetter] = field(default_factory=list)
    # every input offset below this is reflected in output already sent (None: nothing new)
    safe_offset: int | None = None


def decode_batch(value: bytes | None, kind: str) -> RecordBatch:
    """The record batch of one input message, or MalformedMessage saying why it is none."""
    if value is None:
        raise MalformedMessage("empty message value")
    batch = decode(value)
    if batch.kind != kind:
        raise MalformedMessage(f"expected kind {kind!r}, got {batch.kind!r}")
    return batch


def late_deadletter(
    late: RecordBatch, window: str, watermark_ms: int | None, topic: str, where: str
) -> DeadLetter:
    """The records of a message that arrived after their window (``window``, e.g. "600 s windows") closed."""
    reason = f"late: {len(late)} records for {window} already closed (watermark {watermark_ms})"
    return DeadLetter(reason, topic, where, late.encode(), "worker")


class PartitionProcessor:
    """Windows of one input partition. State: open windows per window length, watermark, run counters."""

    def __init__(self, topic: str, partition: int, settings: WorkerSettings) -> None:
        self.topic = topic
        self.partition = partition
        self.settings = settings
        self.windows: dict[int, TumblingWindows] = {}
        self.watermark_ms: int | None = None
        self.max_start_ms: int | None = None
        self.received: dict[str, int] = {}
        self.counters = {"messages": 0, "records": 0, "features": 0, "deadletters": 0, "late": 0}

    def _windows_for(self, batch: RecordBatch) -> list[TumblingWindows]:
        out = []
        for window_s in self.settings.windows_s:
            if window_s < batch.step_s or window_s % batch.step_s:
                continue  # e.g. hourly input has no 10-minute windows
            win = self.windows.get(window_s)
            if win is None or win.columns != batch.columns or win.step_s != batch.step_s:
                if win is not None and win.open:
                    raise MalformedMessage(
                        f"columns/step changed mid-stream ({win.columns}/{win.step_s}s -> "
                        f"{batch.columns}/{batch.step_s}s) while windows are open"
                    )
                win = self.windows[window_s] = TumblingWindows(window_s, batch.columns, batch.step_s)
            out.append(win)
        return out

    def on_message(self, value: bytes | None, offset: int) -> Output:
        out = Output()
        self.counters["messages"] += 1
        where = f"{self.topic}[{self.partition}]@{offset}"
        try:
            batch = decode_batch(value, "traffic")
            windows = self._windows_for(batch)
        except MalformedMessage as exc:
            out.deadletters.append(DeadLetter(str(exc), self.topic, where, value or b"", "worker"))
            self.counters["deadletters"] += 1
            out.safe_offset = self._safe_offset(offset + 1)
            return out

        self.counters["records"] += len(batch)
        if batch.run is not None:
            self.received[batch.run] = self.received.get(batch.run, 0) + len(batch)
        for win in windows:
            late = win.add(batch, offset)
            if late is not None:
                self.counters["late"] += len(late)
                out.deadletters.append(
                    late_deadletter(late, f"{win.window_s} s windows", self.watermark_ms, self.topic, where)
                )
        if len(batch):
            newest = int(batch.starts_ms.max())
            self.max_start_ms = newest if self.max_start_ms is None else max(self.max_start_ms, newest)
        self._advance_watermark(batch)
        for win in windows:
            closed = win.advance(self.watermark_ms) if self.watermark_ms is not None else None
            if closed is not None:
                closed.run = batch.run
                out.features.append(closed)
                self.counters["features"] += len(closed)
        if batch.final:
            # the run's last message on this partition: report what arrived beside what was sent
            marker = RecordBatch.empty(
                "features",
                batch.columns,
                batch.step_s,
                run=batch.run,
                final=True,
                sent=batch.sent,
                watermark_ms=self.watermark_ms,
                extra={"received": self.received.get(batch.run or "", 0)},
            )
            out.features.append(marker)
        out.safe_offset = self._safe_offset(offset + 1)
        return out

    def _advance_watermark(self, batch: RecordBatch) -> None:
        if batch.watermark_ms is not None:
            candidate = batch.watermark_ms
        elif self.max_start_ms is not None:
            # no explicit watermark: a window closes once a record of a later interval arrived
            candidate = self.max_start_ms - self.settings.allowed_lateness_s * 1000
        else:
            return
        self.watermark_ms = candidate if self.watermark_ms is None else max(self.watermark_ms, candidate)

    def _safe_offset(self, next_offset: int) -> int:
        opens = [o for w in self.windows.values() if (o := w.min_open_offset()) is not None]
        return min([next_offset, *opens])


def counters_total(processors: list[PartitionProcessor]) -> dict[str, int]:
    keys = ("messages", "records", "features", "deadletters", "late")
    return {k: int(np.sum([p.counters[k] for p in processors])) for k in keys}
