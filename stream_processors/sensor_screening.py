"""Screen ``sensor`` batches per source, independent of Faust: raw readings in, marked readings out.

``SensorScreening.on_message`` decodes one message of ``telemetry.sensors`` and returns ``screened``
batches (columns ``value, score, flagged``; the same source ids, times and ``extra.sources``, plus
``extra.counts``: each source's cumulative ``[points, flagged]`` after this batch) and dead letters for
messages it cannot use. A run's final marker is forwarded with the number of readings received.

State is one ``SourceScreen`` per source name. The worker never acknowledges ``telemetry.sensors``: a
restarted worker re-reads it from the start and, the detectors being deterministic, re-emits the same
scores and counts (same points in InfluxDB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ingest.deadletter import DeadLetter
from ingest.schema import SCREENED_COLUMNS, MalformedMessage, RecordBatch, decode
from twin_store.models.telemetry_screen import SourceScreen


@dataclass
class ScreenOutput:
    batches: list[RecordBatch] = field(default_factory=list)
    deadletters: list[DeadLetter] = field(default_factory=list)


class SensorScreening:
    def __init__(self, method: str = "robust", **params: Any) -> None:
        SourceScreen(method, **params)  # fail early on a bad method or parameter
        self.method = method
        self.params = params
        self.screens: dict[str, SourceScreen] = {}
        self.received: dict[tuple[str, int], int] = {}  # readings per (run, partition)
        self.counters = {"messages": 0, "readings": 0, "flagged": 0, "deadletters": 0}

    def screen_for(self, name: str) -> SourceScreen:
        screen = self.screens.get(name)
        if screen is None:
            screen = self.screens[name] = SourceScreen(self.method, **self.params)
        return screen

    def on_message(self, value: bytes | None, topic: str, partition: int, offset: int) -> ScreenOutput:
        out = ScreenOutput()
        self.counters["messages"] += 1
        try:
            if value is None:
                raise MalformedMessage("empty message value")
            batch = decode(value)
            if batch.kind != "sensor" or batch.columns != ("value",):
                raise MalformedMessage(
                    f"expected a 'sensor' batch with one 'value' column, got {batch.kind!r}"
                )
        except MalformedMessage as exc:
            where = f"{topic}[{partition}]@{offset}"
            out.deadletters.append(DeadLetter(str(exc), topic, where, value or b"", "worker"))
            self.counters["deadletters"] += 1
            return out
        run_key = (batch.run or "", partition)
        self.received[run_key] = self.received.get(run_key, 0) + len(batch)
        if len(batch):
            out.batches.append(self._screen(batch))
        if batch.final:
            out.batches.append(
                RecordBatch.empty(
                    "screened",
                    SCREENED_COLUMNS,
                    batch.step_s,
                    run=batch.run,
                    final=True,
                    sent=batch.sent,
                    extra={"sources": {}, "received": self.received.get(run_key, 0)},
                )
            )
        return out

    def _screen(self, batch: RecordBatch) -> RecordBatch:
        names: dict[str, str] = batch.extra["sources"]
        n = len(batch)
        values = batch.values[:, 0]
        scores = np.zeros(n)
        flags = np.zeros(n, bool)
        counts: dict[str, list[int]] = {}
        for sid in np.unique(batch.squares).tolist():
            sel = np.flatnonzero(batch.squares == sid)
            name = names[str(sid)]
            screen = self.screen_for(name)
            scores[sel], flags[sel] = screen.update_many(values[sel], batch.starts_ms[sel])
            counts[name] = [screen.points, screen.flagged]
        self.counters["readings"] += n
        self.counters["flagged"] += int(flags.sum())
        return RecordBatch(
            kind="screened",
            columns=SCREENED_COLUMNS,
            step_s=batch.step_s,
            squares=batch.squares,
            starts_ms=batch.starts_ms,
            values=np.column_stack([values, scores, flags.astype(np.float64)]),
            run=batch.run,
            extra={"sources": names, "counts": counts},
        )
