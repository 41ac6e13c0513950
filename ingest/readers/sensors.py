"""Read sensor CSVs into (source, time, value) readings, keeping every bad row as a dead letter.

Layouts, recognised by the header (never by guessing column positions):

- ``nab``: Numenta Anomaly Benchmark files, header ``timestamp,value``; source = the file stem.
- ``csv``: any CSV with a header and a time column (``--time-column``, default ``timestamp`` when the header
  has it). Values: the ``--value-columns`` given, or every other column whose non-empty cells are mostly
  numbers. Times: ISO 8601 (no offset means UTC) or epoch seconds/milliseconds (a numeric column whose
  median magnitude is above 1e11 is read as milliseconds). Source = the file stem (or ``--source``), with
  ``:<column>`` appended when there are several value columns.
- ``intel``: the Intel Berkeley Lab matrices ``intel{Temperature,Humidity}{Train,Test}.csv``: no header,
  one row per mote, one column per half-hour step. Source = ``temperature:mote<i>`` (``i`` = row number,
  1-based). The files carry no times: they are **synthesised** at 30-minute steps from ``intel_start_ms``,
  and a Test file continues after the Train file of the same kind when both are given.

A row that cannot be used becomes a ``DeadLetter`` (original bytes, reason, ``line N``): a value that is not a
finite number (the text ``NaN`` included) or a time outside 2000-01-01..2100-01-01 UTC (``PLAUSIBLE_MS``). A
file that cannot be read at all raises ``InputError`` saying what and where.
"""

from __future__ import annotations

import csv
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ingest.deadletter import DeadLetter
from ingest.errors import InputError
from ingest.schema import PLAUSIBLE_MS

INTEL_NAME = re.compile(r"^intel(Temperature|Humidity)(Train|Test)\.csv$")
INTEL_STEP_MS = 1_800_000
# 2004-02-28T00:00:00Z, the first day of the Intel Berkeley Lab deployment; the matrices carry no times
INTEL_START_MS = 1_077_926_400_000
EPOCH_MS_ABOVE = 1e11  # a numeric time column with median magnitude above this is epoch ms, else seconds


@dataclass
class SensorTable:
    """Readings of one file: ``source_idx`` indexes ``sources``; rows in file order."""

    path: str
    layout: str  # nab | csv | intel
    sources: list[str]
    source_idx: np.ndarray  # int64 [n]
    times_ms: np.ndarray  # int64 [n]
    values: np.ndarray  # float64 [n]
    lines: int = 0  # data lines read (good + bad)
    bad: list[DeadLetter] = field(default_factory=list)
    value_columns: tuple[str, ...] = ()
    time_note: str = ""

    def __len__(self) -> int:
        return int(self.values.shape[0])


def source_id(name: str) -> int:
    """Stable id of a source name on the wire (CRC-32); partition = id % partitions."""
    return zlib.crc32(name.encode())


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a CSV file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _lines(raw: bytes, path: Path) -> list[tuple[int, bytes]]:
    """Non-blank lines with their 1-based line numbers; a file that is not text is an InputError."""
    if b"\0" in raw[:4096]:
        raise InputError(f"{path}: not a text CSV file (binary content)")
    out = []
    for no, line in enumerate(raw.split(b"\n"), start=1):
        text = line.rstrip(b"\r")
        if text.strip():
            out.append((no, text))
    return out


def _split(line: bytes) -> list[str]:
    if b'"' not in line:
        return [f.strip() for f in line.decode("utf-8", errors="replace").split(",")]
    return [f.strip() for f in next(csv.reader([line.decode("utf-8", errors="replace")]))]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _to_float(cells: pd.Series) -> np.ndarray:
    return pd.to_numeric(cells, errors="coerce").to_numpy(np.float64)


def _times_ms(cells: pd.Series) -> tuple[np.ndarray, np.ndarray, str]:
    """Epoch ms per cell and a validity mask; ISO 8601 or epoch seconds/ms, decided per column."""
    nums = _to_float(cells)
    filled = cells != ""
    if filled.any() and np.isfinite(nums[filled.to_numpy()]).mean() > 0.5:
        unit_ms = float(np.nanmedian(np.abs(nums))) > EPOCH_MS_ABOVE
        ms = np.round(nums * (1 if unit_ms else 1000))
        ok = np.isfinite(ms)
        # far outside int64 is as implausible as 1970: -1 keeps the cast defined and fails the range check
        ms = np.where(ok & (np.abs(ms) < 2**62), ms, -1)
        return np.where(ok, ms, 0).astype(np.int64), ok, "epoch ms" if unit_ms else "epoch s"
    try:
        parsed = pd.to_datetime(cells, format="ISO8601", utc=True, errors="coerce")
    except (ValueError, OverflowError):  # pandas raises OutOfBoundsDatetime ("-5" as a year) despite coerce
        parsed = pd.Series([_one_time(c) for c in cells], index=cells.index, dtype="datetime64[ns, UTC]")
    ok = parsed.notna().to_numpy()
    # epoch ms in the resolution pandas chose (seconds for a year like -5): converting to another resolution
    # first would overflow; NaT becomes the minimum int64 and is masked by ``ok``
    unit = str(getattr(parsed.dt, "unit", "ns"))
    raw = parsed.dt.tz_localize(None).to_numpy(dtype=f"datetime64[{unit}]").astype(np.int64)
    ms = raw * 1000 if unit == "s" else raw // {"ms": 1, "us": 1000, "ns": 1_000_000}[unit]
    return np.where(ok, ms, 0).astype(np.int64), ok, "ISO 8601 (UTC when no offset)"


def _one_time(cell: str) -> pd.Timestamp:
    """One ISO cell at nanosecond resolution, or NaT (also for years nanoseconds cannot hold)."""
    try:
        return pd.Timestamp(pd.to_datetime(cell, format="ISO8601", utc=True)).as_unit("ns")
    except (ValueError, OverflowError):
        return pd.NaT


def read_csv_layout(
    path: Path,
    time_column: str | None = None,
    value_columns: list[str] | None = None,
    source: str | None = None,
) -> SensorTable:
    """A CSV with a header: NAB (``timestamp,value``) or any file with a named time column."""
    raw = _read_bytes(path)
    lines = _lines(raw, path)
    if not lines:
        raise InputError(f"{path}: empty file (expected a header line)")
    header_no, header_line = lines[0]
    header = _split(header_line)
    if all(_is_number(h) for h in header):
        raise InputError(
            f"{path}:{header_no}: no header line; only the Intel Lab matrices "
            "intel{Temperature,Humidity}{Train,Test}.csv are read without a header"
        )
    if len(set(header)) != len(header):
        raise InputError(f"{path}:{header_no}: duplicate column names in header {header}")
    tcol = time_column or ("timestamp" if "timestamp" in header else None)
    if tcol is None or tcol not in header:
        what = f"time column {tcol!r} not in header" if tcol else "no 'timestamp' column"
        raise InputError(f"{path}:{header_no}: {what} {header}; name it with --time-column")
    body = lines[1:]
    rows = [_split(text) for _, text in body]
    width = len(header)
    bad: list[DeadLetter] = []
    keep = []
    for i, ((no, text), fields) in enumerate(zip(body, rows, strict=True)):
        if len(fields) != width:
            reason = f"expected {width} comma-separated fields, got {len(fields)}"
            bad.append(DeadLetter(reason, str(path), f"line {no}", text, "producer"))
        else:
            keep.append(i)
    frame = pd.DataFrame([rows[i] for i in keep], columns=header, dtype=str)
    if value_columns:
        missing = [c for c in value_columns if c not in header]
        if missing:
            raise InputError(f"{path}:{header_no}: value column(s) {missing} not in header {header}")
        if tcol in value_columns:
            raise InputError(f"{path}: --value-columns must not include the time column {tcol!r}")
        vcols = list(value_columns)
    else:
        vcols = []
        for c in header:
            if c == tcol:
                continue
            cells = frame[c]
            filled = (cells != "").to_numpy()
            if filled.any() and np.isfinite(_to_float(cells)[filled]).mean() > 0.5:
                vcols.append(c)
        if not vcols:
            raise InputError(f"{path}: no numeric value column besides {tcol!r} in header {header}")
    times, time_ok, note = _times_ms(frame[tcol])
    values = (
        np.column_stack([_to_float(frame[c]) for c in vcols]) if len(frame) else np.empty((0, len(vcols)))
    )
    reasons: list[str | None] = [None] * len(frame)
    for j, c in reversed(list(enumerate(vcols))):  # report the first bad column of a row
        for r in np.flatnonzero(~np.isfinite(values[:, j])).tolist():
            cell = frame[c].iat[r]
            reasons[r] = f"{c} is empty" if cell == "" else f"{c} is not a finite number: {cell[:40]!r}"
    implausible = time_ok & ((times < PLAUSIBLE_MS[0]) | (times >= PLAUSIBLE_MS[1]))
    for r in np.flatnonzero(implausible).tolist():
        cell = frame[tcol].iat[r]
        reasons[r] = f"{tcol} {cell[:40]!r} is outside 2000-01-01..2100-01-01 UTC ({note})"
    for r in np.flatnonzero(~time_ok).tolist():
        cell = frame[tcol].iat[r]
        reasons[r] = f"{tcol} is not an ISO 8601 time or epoch number: {cell[:40]!r}"
    good = np.array([r is None for r in reasons], bool)
    for r in np.flatnonzero(~good).tolist():
        no, text = body[keep[r]]
        bad.append(DeadLetter(str(reasons[r]), str(path), f"line {no}", text, "producer"))
    bad.sort(key=lambda d: int(d.position.split()[1]))
    base = source or path.stem
    names = [base] if len(vcols) == 1 else [f"{base}:{c}" for c in vcols]
    n_good, k = int(good.sum()), len(vcols)
    layout = "nab" if header == ["timestamp", "value"] and tcol == "timestamp" else "csv"
    return SensorTable(
        path=str(path),
        layout=layout,
        sources=names,
        # row-major: each good row gives one reading per value column
        source_idx=np.tile(np.arange(k, dtype=np.int64), n_good),
        times_ms=np.repeat(times[good], k),
        values=values[good].reshape(-1),
        lines=len(body),
        bad=bad,
        value_columns=tuple(vcols),
        time_note=note,
    )


def read_intel(path: Path, start_ms: int = INTEL_START_MS, first_step: int = 0) -> SensorTable:
    """An Intel Lab matrix (one row per mote, one column per half-hour step); times are synthesised."""
    m = INTEL_NAME.match(path.name)
    if not m:
        raise InputError(
            f"{path}: not an Intel Lab matrix name (intel{{Temperature,Humidity}}{{Train,Test}}.csv)"
        )
    kind = m.group(1).lower()
    lines = _lines(_read_bytes(path), path)
    if not lines:
        raise InputError(f"{path}: empty file")
    first = _split(lines[0][1])
    if not all(_is_number(c) for c in first):
        raise InputError(f"{path}:{lines[0][0]}: expected a headerless numeric matrix (one row per mote)")
    steps = len(first)
    bad: list[DeadLetter] = []
    motes: list[int] = []
    rows: list[np.ndarray] = []
    for no, text in lines:
        fields = _split(text)
        reason = None
        if len(fields) != steps:
            reason = f"expected {steps} comma-separated values (one per half-hour step), got {len(fields)}"
        else:
            vals = _to_float(pd.Series(fields, dtype=str))
            bad_cols = np.flatnonzero(~np.isfinite(vals))
            if bad_cols.shape[0]:
                j = int(bad_cols[0])
                reason = f"column {j + 1} is not a finite number: {fields[j][:40]!r}"
        if reason:
            bad.append(DeadLetter(reason, str(path), f"line {no}", text, "producer"))
            continue
        motes.append(no)
        rows.append(vals)
    mat = np.array(rows, np.float64).reshape(len(rows), steps)
    times = start_ms + INTEL_STEP_MS * (first_step + np.arange(steps, dtype=np.int64))
    if steps and (times[0] < PLAUSIBLE_MS[0] or times[-1] >= PLAUSIBLE_MS[1]):
        raise InputError(f"{path}: synthesised times fall outside 2000-01-01..2100-01-01 UTC (--intel-start)")
    n = len(motes)
    return SensorTable(
        path=str(path),
        layout="intel",
        sources=[f"{kind}:mote{no}" for no in motes],
        # step-major: every mote's reading of step 0, then step 1, ...
        source_idx=np.tile(np.arange(n, dtype=np.int64), steps),
        times_ms=np.repeat(times, n),
        values=mat.T.reshape(-1),
        lines=len(lines),
        bad=bad,
        value_columns=(kind,),
        time_note=f"synthesised: 30-minute steps from step {first_step}",
    )


def read_sensor_files(
    paths: list[Path],
    time_column: str | None = None,
    value_columns: list[str] | None = None,
    source: str | None = None,
    intel_start_ms: int = INTEL_START_MS,
) -> list[SensorTable]:
    """Read every file (Intel Lab matrices by name, everything else by header); Test continues Train."""
    intel = [p for p in paths if INTEL_NAME.match(p.name)]
    if source is not None and (len(paths) > 1 or intel):
        raise InputError("--source names the source of a single CSV file; it cannot be used here")
    train_steps: dict[str, int] = {}
    for p in intel:
        m = INTEL_NAME.match(p.name)
        assert m is not None
        if m.group(2) == "Train":
            lines = _lines(_read_bytes(p), p)
            train_steps[m.group(1)] = len(_split(lines[0][1])) if lines else 0
    tables = []
    for p in paths:
        m = INTEL_NAME.match(p.name)
        if m:
            offset = train_steps.get(m.group(1), 0) if m.group(2) == "Test" else 0
            tables.append(read_intel(p, intel_start_ms, offset))
        else:
            tables.append(read_csv_layout(p, time_column, value_columns, source))
    return tables


def iso_to_ms(value: str, option: str) -> int:
    """An ISO 8601 time option (UTC unless it has an offset) as epoch ms."""
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{option} {value!r}: expected an ISO date/time such as 2004-02-28T00:00Z") from exc
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return int(ts.value // 1_000_000)
