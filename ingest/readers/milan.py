"""Read Milan traffic files into per-(square, interval) records, keeping every bad line as a dead letter.

Two layouts:
- ``raw``: the official Telecom Italia daily files (``.txt`` or ``.gz``): tab-separated, no header,
  ``square_id, time_interval (epoch ms), country_code, sms_in, sms_out, call_in, call_out, internet``;
  an empty field means no activity (0). One row per country code: summed per (square, interval).
- ``hourly``: ``square_id,h0..hN`` with one activity count per hour (the VH-Twin preprocessing);
  ``h0`` is ``hourly_start_ms`` (default 2013-11-01 00:00 Milan time, the data set's first hour).

Parsing is vectorised per chunk (field counts with numpy, numbers with pandas' C parser); only a chunk
that contains a non-numeric field falls back to line-by-line parsing to pinpoint the bad lines. Lines holding
a letter ``n`` (``NaN``, ``inf``) are always parsed one by one: an empty field means 0, the text ``NaN`` is
refused.

Every record must be plausible before it reaches Kafka: times from 2000-01-01 to 2100-01-01 (UTC,
``PLAUSIBLE_MS``), finite non-negative activity, and sums that stay finite after the country codes are
added up. A (square, interval) whose sum overflows is dropped with every line that fed it, each a dead
letter; the other records of the file are kept.
"""

from __future__ import annotations

import gzip
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ingest.deadletter import DeadLetter
from ingest.errors import InputError
from ingest.schema import ACTIVITY_COLUMNS, PLAUSIBLE_MS

RAW_FIELDS = ("square_id", "time_interval", "country_code", *ACTIVITY_COLUMNS)
INTERVAL_MS = 600_000
HOUR_MS = 3_600_000
# 2013-11-01T00:00:00+01:00, the first hour of the data set (time_interval 1383260400000)
HOURLY_START_MS = 1_383_260_400_000
CHUNK_BYTES = 32 << 20


@dataclass
class TrafficTable:
    """Aggregated records of one file, sorted by (start, square)."""

    source: str
    columns: tuple[str, ...]
    step_s: int
    squares: np.ndarray  # uint32
    starts_ms: np.ndarray  # int64
    values: np.ndarray  # float64 [n, k]
    lines: int = 0  # data lines read (good + bad)
    bad: list[DeadLetter] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.squares.shape[0])


def _open_bytes(path: Path) -> io.BufferedIOBase:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - returned to the caller, closed there
        if fh.read(2) == b"\x1f\x8b":
            fh.close()
            return gzip.open(path, "rb")
        fh.seek(0)
        return fh
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from exc


def _chunks(path: Path) -> Iterator[bytes]:
    """Newline-aligned chunks of the (decompressed) file; the last one gets a newline if it lacks one."""
    tail = b""
    with _open_bytes(path) as fh:
        while True:
            try:
                block = fh.read(CHUNK_BYTES)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise InputError(f"{path}: cannot read ({exc})") from exc
            if not block:
                break
            block = tail + block
            cut = block.rfind(b"\n") + 1
            tail = block[cut:]
            if cut:
                yield block[:cut]
    if tail:
        yield tail + b"\n"


def _line_bounds(chunk: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, end (exclusive, without newline) and tab count of every line in a newline-terminated chunk."""
    arr = np.frombuffer(chunk, np.uint8)
    ends = np.flatnonzero(arr == 10)
    starts = np.concatenate([[0], ends[:-1] + 1])
    # tabs per line from the sorted tab positions (a per-byte cumsum would allocate 8 bytes per input byte)
    tab_pos = np.flatnonzero(arr == 9)
    tabs = np.searchsorted(tab_pos, ends) - np.searchsorted(tab_pos, starts)
    return starts, ends, tabs


def _parse_line(line: bytes) -> tuple[list[float], str | None]:
    fields = line.rstrip(b"\r").split(b"\t")
    if len(fields) != len(RAW_FIELDS):
        return [], f"expected {len(RAW_FIELDS)} tab-separated fields, got {len(fields)}"
    out: list[float] = []
    for name, raw in zip(RAW_FIELDS, fields, strict=True):
        text = raw.strip()
        if not text:
            if name in ("square_id", "time_interval"):
                return [], f"{name} is empty"
            out.append(0.0)
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isnan(value):  # the text "NaN" is not an empty field
            return [], f"{name} is not a number: {text[:40].decode(errors='replace')!r}"
        out.append(value)
    return out, None


def _numbers(good: bytes) -> np.ndarray | None:
    """Fast path: all fields of newline-terminated lines as float64 [n, 8]; None if any is not numeric."""
    try:
        df = pd.read_csv(
            io.BytesIO(good),
            sep="\t",
            header=None,
            names=list(RAW_FIELDS),
            dtype=np.float64,
            na_values=[""],
            keep_default_na=False,
            engine="c",
        )
    except (ValueError, pd.errors.ParserError):
        return None
    return df.to_numpy(np.float64)


def _lines_with_letter_n(chunk: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Mask of the lines holding ``n``/``N`` (``NaN``, ``inf``): digits-only lines never do."""
    arr = np.frombuffer(chunk, np.uint8)
    pos = np.flatnonzero((arr == ord("n")) | (arr == ord("N")))
    mask = np.zeros(starts.shape[0], bool)
    if pos.shape[0]:
        mask[np.searchsorted(ends, pos)] = True
    return mask


def read_raw(path: Path) -> TrafficTable:
    """Parse an official daily file; bad lines become dead letters with line numbers."""
    source = str(path)
    parts: list[pd.DataFrame] = []
    bad: list[DeadLetter] = []
    first_line = 1
    total_lines = 0
    for chunk in _chunks(path):
        starts, ends, tabs = _line_bounds(chunk)
        blank = ends - starts <= 1
        # refine the short-line candidates in place (their count differs from the number of lines)
        blank[blank] = [not chunk[s:e].strip() for s, e in zip(starts[blank], ends[blank], strict=True)]
        line_no = first_line + np.arange(starts.shape[0])
        first_line += starts.shape[0]
        total_lines += int((~blank).sum())

        def reject(
            i: int,
            reason: str,
            s: np.ndarray = starts,
            e: np.ndarray = ends,
            n: np.ndarray = line_no,
            c: bytes = chunk,
        ) -> None:
            bad.append(DeadLetter(reason, source, f"line {n[i]}", c[s[i] : e[i]], "producer"))

        def parse_one_by_one(
            lines: list[int], s: np.ndarray = starts, e: np.ndarray = ends, c: bytes = chunk
        ) -> tuple[np.ndarray, np.ndarray]:
            rows, kept = [], []
            for i in lines:
                vals, reason = _parse_line(c[s[i] : e[i]])
                if reason:
                    reject(i, reason)
                else:
                    rows.append(vals)
                    kept.append(i)
            return np.array(rows, np.float64).reshape(-1, len(RAW_FIELDS)), np.array(kept, np.int64)

        wrong_count = (tabs != len(RAW_FIELDS) - 1) & ~blank
        for i in np.flatnonzero(wrong_count).tolist():
            reject(i, f"expected {len(RAW_FIELDS)} tab-separated fields, got {tabs[i] + 1}")
        lettered = _lines_with_letter_n(chunk, starts, ends) & ~wrong_count & ~blank
        keep = np.flatnonzero(~wrong_count & ~blank & ~lettered)
        if keep.shape[0] == starts.shape[0]:
            good = chunk
        else:
            good = b"".join(chunk[starts[i] : ends[i] + 1] for i in keep.tolist())
        nums = _numbers(good) if keep.shape[0] else np.empty((0, len(RAW_FIELDS)))
        if nums is None or nums.shape[0] != keep.shape[0]:
            nums, keep = parse_one_by_one(keep.tolist())
        if lettered.any():
            slow, slow_keep = parse_one_by_one(np.flatnonzero(lettered).tolist())
            nums, keep = np.vstack([nums, slow]), np.concatenate([keep, slow_keep])
        # semantic checks, vectorised; each bad row is reported with its first problem
        # empty (NaN) activity means 0; +-inf must stay infinite so the finiteness check below sees it
        act = np.nan_to_num(nums[:, 3:], nan=0.0, posinf=np.inf, neginf=-np.inf)
        sq, ts, cc = nums[:, 0], nums[:, 1], nums[:, 2]
        checks = [
            (np.isnan(sq) | np.isnan(ts), "square_id or time_interval is empty"),
            ((sq < 1) | (sq != np.floor(sq)) | (sq >= 2**32), "square_id must be a positive integer"),
            (
                (ts <= 0) | (np.nan_to_num(ts) % INTERVAL_MS != 0),
                "time_interval must be epoch ms on a 10-minute boundary",
            ),
            (
                (ts < PLAUSIBLE_MS[0]) | (ts >= PLAUSIBLE_MS[1]),
                "time_interval outside 2000-01-01..2100-01-01 UTC",
            ),
            (
                ~np.isnan(cc) & ((cc < 0) | (cc != np.floor(cc))),
                "country_code must be a non-negative integer",
            ),
            (~np.isfinite(act).all(axis=1), "activity value is not finite"),
            ((act < 0).any(axis=1), "activity value is negative"),
        ]
        invalid = np.zeros(nums.shape[0], bool)
        for mask, reason in checks:
            new = mask & ~invalid
            for j in np.flatnonzero(new).tolist():
                reject(int(keep[j]), reason)
            invalid |= mask
        ok = ~invalid
        parts.append(
            pd.DataFrame(act[ok], columns=list(ACTIVITY_COLUMNS)).assign(
                square=sq[ok].astype(np.uint32),
                start=ts[ok].astype(np.int64),
                line=line_no[keep[ok]].astype(np.int64),
            )
        )
    frame = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["square", "start", "line", *ACTIVITY_COLUMNS])
    )
    agg = frame.groupby(["start", "square"], sort=True)[list(ACTIVITY_COLUMNS)].sum()
    values = agg.to_numpy(np.float64)
    overflow = ~np.isfinite(values).all(axis=1)
    if overflow.any():
        bad.extend(_overflow_letters(path, frame, agg.index[overflow]))
        agg, values = agg[~overflow], values[~overflow]
    bad.sort(key=lambda d: int(d.position.split()[1]))
    return TrafficTable(
        source=source,
        columns=ACTIVITY_COLUMNS,
        step_s=INTERVAL_MS // 1000,
        squares=agg.index.get_level_values("square").to_numpy(np.uint32),
        starts_ms=agg.index.get_level_values("start").to_numpy(np.int64),
        values=values,
        lines=total_lines,
        bad=bad,
    )


def _overflow_letters(path: Path, frame: pd.DataFrame, records: pd.MultiIndex) -> list[DeadLetter]:
    """Dead letters for every line of the records whose sum over country codes is not finite."""
    keys = frame.set_index(["start", "square"]).index
    rows = frame[keys.isin(records)]
    wanted = {
        int(n): (int(s), int(q)) for n, s, q in zip(rows["line"], rows["start"], rows["square"], strict=True)
    }
    letters = []
    for no, chunk_line in _numbered_lines(path, set(wanted)):
        start, square = wanted[no]
        reason = f"sum of square {square} at time_interval {start} is not finite (too large)"
        letters.append(DeadLetter(reason, str(path), f"line {no}", chunk_line, "producer"))
    return letters


def _numbered_lines(path: Path, numbers: set[int]) -> Iterator[tuple[int, bytes]]:
    """The lines with the given 1-based numbers, as read (without the newline)."""
    no = 0
    for chunk in _chunks(path):
        for line in chunk.split(b"\n")[:-1]:
            no += 1
            if no in numbers:
                yield no, line


def check_file(path: Path) -> None:
    """One clear line for a path that is not a readable file (missing, a directory)."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a file")
    if not path.exists():
        raise InputError(f"{path}: no such file")


def check_layout(path: Path, fmt: str) -> None:
    """Cheap look at the first line, so a wrong --format is refused before any service is contacted."""
    check_file(path)
    try:
        with _open_bytes(path) as fh:
            first = fh.readline(1 << 16).rstrip(b"\r\n")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc
    hourly_header = first.split(b",", 1)[0].strip() == b"square_id"
    if fmt == "hourly" and first and not hourly_header:
        raise InputError(
            f"{path}:1: not an hourly file (expected header square_id,h0,h1,...); use --format raw"
        )
    if fmt == "raw" and hourly_header:
        raise InputError(f"{path}:1: an hourly file (header square_id,h0,...); use --format hourly")


def read_hourly(path: Path, start_ms: int = HOURLY_START_MS) -> TrafficTable:
    """Parse ``square_id,h0..hN``; a row with a bad value becomes one dead letter (the whole line)."""
    source = str(path)
    try:
        raw = b"".join(_chunks(path))
    except InputError:
        raise
    lines = raw.split(b"\n")
    header = lines[0].rstrip(b"\r").split(b",")
    if (
        not header
        or header[0].strip() != b"square_id"
        or not all(h.strip().startswith(b"h") for h in header[1:])
    ):
        raise InputError(f"{path}:1: not an hourly file (expected header square_id,h0,h1,...)")
    hours = len(header) - 1
    end_ms = start_ms + HOUR_MS * hours
    if start_ms < PLAUSIBLE_MS[0] or end_ms > PLAUSIBLE_MS[1]:
        raise InputError(
            f"{path}: its {hours} hours from epoch ms {start_ms} fall outside 2000-01-01..2100-01-01 UTC"
        )
    bad: list[DeadLetter] = []
    first_seen: dict[int, int] = {}
    squares: list[int] = []
    rows: list[np.ndarray] = []
    n_lines = 0
    for no, line in enumerate(lines[1:], start=2):
        text = line.rstrip(b"\r")
        if not text.strip():
            continue
        n_lines += 1
        fields = text.split(b",")
        reason = None
        if len(fields) != hours + 1:
            reason = f"expected {hours + 1} comma-separated fields, got {len(fields)}"
        else:
            try:
                vals = np.array([float(f) if f.strip() else 0.0 for f in fields[1:]], np.float64)
                sq = int(fields[0])
            except ValueError as exc:
                reason = f"not a number ({exc})"
            else:
                if sq < 1 or sq >= 2**32:
                    reason = "square_id must be a positive integer below 2**32"
                elif not np.isfinite(vals).all() or (vals < 0).any():
                    reason = "hourly value is negative or not finite"
                elif sq in first_seen:
                    reason = f"square_id {sq} repeats line {first_seen[sq]}"
        if reason:
            bad.append(DeadLetter(reason, source, f"line {no}", text, "producer"))
            continue
        first_seen[sq] = no
        squares.append(sq)
        rows.append(vals)
    n_sq = len(squares)
    mat = np.array(rows, np.float64).reshape(n_sq, hours)
    order = np.argsort(np.array(squares, np.int64), kind="stable")
    sq_sorted = np.array(squares, np.uint32)[order]
    # hour-major: all squares of hour 0, then hour 1, ...
    values = mat[order].T.reshape(-1, 1)
    return TrafficTable(
        source=source,
        columns=("activity",),
        step_s=HOUR_MS // 1000,
        squares=np.tile(sq_sorted, hours),
        starts_ms=np.repeat(start_ms + HOUR_MS * np.arange(hours, dtype=np.int64), n_sq),
        values=values,
        lines=n_lines,
        bad=bad,
    )
