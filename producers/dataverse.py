"""Download the Telecom Italia Milan daily files from Harvard Dataverse: resumable, size- and MD5-verified.

Files are fetched by id through the access API (``{base_url}/api/access/datafile/{id}``) into
``DEST/<filename>.part`` and renamed to ``DEST/<filename>`` only once size and MD5 match the table, so a
final name always means a verified file. Re-running after an interruption resumes the ``.part`` with an HTTP
``Range`` request.

The id table (``producers/milan_files.json``) ships with the package; a table in the same format can be
passed instead (tests, mirrors).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import requests

from ingest.errors import InputError, ServiceError

DEFAULT_BASE_URL = "https://dataverse.harvard.edu"
CHUNK_SIZE = 1 << 20
# (connect, read) seconds; the read timeout bounds a stall between chunks, not the whole transfer
DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 60.0)
PART_SUFFIX = ".part"

Status = Literal["downloaded", "resumed", "present"]
ProgressCallback = Callable[[int], None]

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class FileEntry:
    """One daily file as Dataverse describes it."""

    date: date
    filename: str
    id: int
    filesize: int
    md5: str


@dataclass(frozen=True)
class FileTable:
    files: tuple[FileEntry, ...]
    doi: str | None = None
    licence: str | None = None
    attribution: str | None = None


@dataclass(frozen=True)
class FetchResult:
    filename: str
    path: Path
    # bytes received over the network in this run (0 when the file was already there)
    bytes_downloaded: int
    status: Status


def parse_table(raw: Any, source: str = "file table") -> FileTable:
    """Validate a table in the ``milan_files.json`` format; any defect is an InputError naming ``source``."""
    try:
        files = tuple(_parse_entry(item) for item in raw["files"])
        meta = {k: raw.get(k) for k in ("doi", "licence", "attribution")}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{source}: not a valid file table ({type(exc).__name__}: {exc})") from exc
    if not files:
        raise InputError(f"{source}: the file table lists no files")
    dates = [e.date for e in files]
    if len(set(dates)) != len(dates):
        raise InputError(f"{source}: the file table lists a day more than once")
    return FileTable(files=tuple(sorted(files, key=lambda e: e.date)), **meta)


def _parse_entry(item: Any) -> FileEntry:
    filename = str(item["filename"])
    # the name becomes a path under DEST, so a custom table must not be able to point elsewhere
    if not filename or Path(filename).name != filename or filename in (".", ".."):
        raise ValueError(f"filename {filename!r} is not a plain file name")
    md5 = str(item["md5"]).lower()
    if not re.fullmatch(r"[0-9a-f]{32}", md5):
        raise ValueError(f"md5 {md5!r} of {filename} is not 32 hex digits")
    filesize = int(item["filesize"])
    if filesize < 0:
        raise ValueError(f"filesize of {filename} is negative")
    return FileEntry(
        date=date.fromisoformat(str(item["date"])),
        filename=filename,
        id=int(item["id"]),
        filesize=filesize,
        md5=md5,
    )


def load_table(path: Path | None = None) -> FileTable:
    """The bundled Milan id table, or the table in ``path``."""
    try:
        if path is None:
            source = "producers/milan_files.json"
            text = resources.files("producers").joinpath("milan_files.json").read_text(encoding="utf-8")
        else:
            source = str(path)
            text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read file table {source}: {exc.strerror or exc}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"file table {source} is not valid JSON ({exc})") from exc
    return parse_table(raw, source)


def parse_days(spec: str) -> tuple[date, date]:
    """``YYYY-MM-DD..YYYY-MM-DD`` (inclusive) or a single ``YYYY-MM-DD``, as (first, last)."""
    parts = spec.strip().split("..")
    if len(parts) > 2:
        raise InputError(f"day range {spec!r}: expected YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD")
    try:
        first = date.fromisoformat(parts[0].strip())
        last = date.fromisoformat(parts[-1].strip())
    except ValueError as exc:
        raise InputError(f"day range {spec!r}: expected YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD") from exc
    if last < first:
        raise InputError(f"day range {spec!r}: end {last} is before start {first}")
    return first, last


def select_days(entries: Sequence[FileEntry], spec: str) -> list[FileEntry]:
    """The entries for every day of ``spec``; every day must be in the table."""
    first, last = parse_days(spec)
    by_day = {e.date: e for e in entries}
    if not by_day:
        raise InputError("the file table lists no files")
    lo, hi = min(by_day), max(by_day)
    if first < lo or last > hi:
        raise InputError(f"day range {spec!r} is outside the available days {lo}..{hi}")
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    missing = [d for d in days if d not in by_day]
    if missing:
        shown = ", ".join(str(d) for d in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"day range {spec!r}: the file table has no file for {shown}")
    return [by_day[d] for d in days]


def datafile_url(entry: FileEntry, base_url: str = DEFAULT_BASE_URL) -> str:
    return f"{base_url.rstrip('/')}/api/access/datafile/{entry.id}"


def pending_bytes(entries: Iterable[FileEntry], dest: Path) -> int:
    """Bytes still to transfer (for a progress total): sizes minus verified-looking finals and .part prefixes.

    An estimate: a final file of the right size whose MD5 turns out wrong, or a server that ignores Range,
    makes the transfer larger than this.
    """
    total = 0
    for entry in entries:
        final = dest / entry.filename
        if _size(final) == entry.filesize:
            continue
        part_size = _size(_part_path(final)) or 0
        total += entry.filesize - part_size if part_size <= entry.filesize else entry.filesize
    return total


def ensure_dest(dest: Path) -> None:
    """Create ``dest`` if missing; an InputError if it cannot be created or written."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create destination {dest}: {exc.strerror or exc}") from exc
    if not os.access(dest, os.W_OK | os.X_OK):
        raise InputError(f"destination {dest} is not writable")


def fetch_files(
    entries: Iterable[FileEntry],
    dest: Path,
    *,
    base_url: str = DEFAULT_BASE_URL,
    progress: ProgressCallback | None = None,
    on_file: Callable[[FileEntry], None] | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
) -> list[FetchResult]:
    """Fetch every entry into ``dest`` in order over one HTTP session; stops at the first failure.

    ``on_file`` is called before each file starts, ``progress`` with each chunk's size as it is written.
    """
    ensure_dest(dest)
    results: list[FetchResult] = []
    with requests.Session() as session:
        session.headers["User-Agent"] = "nettwin-data-fetch"
        for entry in entries:
            if on_file is not None:
                on_file(entry)
            results.append(
                fetch_file(
                    entry, dest, base_url=base_url, session=session, progress=progress, timeout=timeout
                )
            )
    return results


def fetch_file(
    entry: FileEntry,
    dest: Path,
    *,
    base_url: str = DEFAULT_BASE_URL,
    session: requests.Session | None = None,
    progress: ProgressCallback | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
) -> FetchResult:
    """Fetch one file to ``dest/entry.filename`` (resuming a ``.part``), verified before it gets its name."""
    final = dest / entry.filename
    if _size(final) == entry.filesize and _md5_of(final) == entry.md5:
        return FetchResult(entry.filename, final, 0, "present")
    # a wrong final file is left alone until a verified replacement exists; os.replace then overwrites it
    if session is None:
        with requests.Session() as own:
            return _transfer(entry, final, own, base_url, progress, timeout)
    return _transfer(entry, final, session, base_url, progress, timeout)


def _transfer(
    entry: FileEntry,
    final: Path,
    session: requests.Session,
    base_url: str,
    progress: ProgressCallback | None,
    timeout: float | tuple[float, float],
) -> FetchResult:
    part = _part_path(final)
    url = datafile_url(entry, base_url)
    offset = _size(part) or 0
    if offset > entry.filesize:
        # longer than the file can be: not a prefix of it, so resuming would only fail verification later
        _unlink(part)
        offset = 0
    # identity: a compressed transfer would make Range offsets and byte counts refer to the encoded stream
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    hasher = hashlib.md5(usedforsecurity=False)
    received = 0
    resumed = False
    try:
        with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
            status = response.status_code
            if status == 416 and offset == entry.filesize:
                # nothing past our prefix because the .part already is the whole file
                resumed = True
                _hash_into(hasher, part)
            elif status == 416 and offset:
                # the server's file is shorter than our prefix: the .part cannot be resumed
                _unlink(part)
                raise ServiceError(
                    f"GET {url} answered HTTP 416 to a resume from byte {offset} of {entry.filename} "
                    f"(expected {entry.filesize} bytes); removed the partial file, re-run to start over"
                )
            elif status in (200, 206):
                if status == 206 and offset:
                    _check_content_range(response, offset, url)
                    resumed = True
                    # hash the kept prefix now so the finished file is not read a second time
                    _hash_into(hasher, part)
                    mode = "ab"
                else:
                    # a 200 to a Range request is the whole file: start over rather than append
                    mode = "wb"
                received = _stream_to(response, part, mode, hasher, progress)
            else:
                raise ServiceError(
                    f"GET {url} answered HTTP {status} {response.reason or ''}".rstrip()
                    + f" for {entry.filename}; re-run the command to resume"
                )
    except requests.RequestException as exc:
        raise ServiceError(
            f"GET {url} failed for {entry.filename} ({type(exc).__name__}: {exc}); "
            "re-run the command to resume"
        ) from exc
    _verify(entry, part, hasher.hexdigest())
    try:
        os.replace(part, final)
    except OSError as exc:
        raise InputError(f"cannot rename {part} to {final.name}: {exc.strerror or exc}") from exc
    return FetchResult(entry.filename, final, received, "resumed" if resumed else "downloaded")


def _stream_to(
    response: requests.Response,
    part: Path,
    mode: str,
    hasher: hashlib._Hash,
    progress: ProgressCallback | None,
) -> int:
    received = 0
    try:
        with open(part, mode) as fh:
            for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
                fh.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(len(chunk))
    except requests.RequestException:
        # requests' errors are OSErrors too; these are network failures, reported by the caller
        raise
    except OSError as exc:
        raise InputError(f"cannot write {part}: {exc.strerror or exc}") from exc
    return received


def _check_content_range(response: requests.Response, offset: int, url: str) -> None:
    header = response.headers.get("Content-Range")
    if header is None:
        return
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None or int(match.group(1)) != offset:
        # appending bytes from another offset would corrupt the .part
        raise ServiceError(f"GET {url}: asked for bytes from {offset}, server sent Content-Range {header!r}")


def _verify(entry: FileEntry, part: Path, md5: str) -> None:
    size = _size(part) or 0
    if size < entry.filesize:
        # a short read keeps its prefix: the next run resumes from here
        raise ServiceError(
            f"{entry.filename}: transfer ended early, expected {entry.filesize} bytes, got {size}; "
            "re-run the command to resume"
        )
    if size > entry.filesize:
        _unlink(part)
        raise ServiceError(f"{entry.filename}: size mismatch, expected {entry.filesize} bytes, got {size}")
    if md5 != entry.md5:
        _unlink(part)
        raise ServiceError(f"{entry.filename}: MD5 mismatch, expected {entry.md5}, got {md5}")


def _part_path(final: Path) -> Path:
    return final.with_name(final.name + PART_SUFFIX)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _hash_into(hasher: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            hasher.update(chunk)


def _md5_of(path: Path) -> str:
    hasher = hashlib.md5(usedforsecurity=False)
    _hash_into(hasher, path)
    return hasher.hexdigest()
