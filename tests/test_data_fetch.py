"""``nettwin data fetch milan`` against a real local HTTP server speaking the Dataverse access API."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ingest.errors import InputError, ServiceError
from producers import dataverse
from producers.dataverse import FileEntry

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "milan" / "raw_sample_square1.txt"
FILE_ID = 4242


class _Handler(BaseHTTPRequestHandler):
    server: _DataverseServer

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        match = re.fullmatch(r"/api/access/datafile/(\d+)", self.path)
        body = srv.files.get(int(match.group(1))) if match else None
        if body is None:
            self.send_error(404, "file not found")
            return
        start = 0
        range_header = self.headers.get("Range")
        if srv.honour_range and range_header:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))  # type: ignore[union-attr]
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


class _DataverseServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[int, bytes] = {}
        self.honour_range = True
        self.requests: list[tuple[str, str | None]] = []

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


@pytest.fixture(scope="module")
def sample() -> bytes:
    return SAMPLE.read_bytes()


@pytest.fixture
def entry(sample: bytes) -> FileEntry:
    return FileEntry(
        date=date(2013, 11, 1),
        filename="sms-call-internet-mi-2013-11-01.txt",
        id=FILE_ID,
        filesize=len(sample),
        md5=hashlib.md5(sample).hexdigest(),
    )


@pytest.fixture
def server(sample: bytes) -> Iterator[_DataverseServer]:
    srv = _DataverseServer()
    srv.files[FILE_ID] = sample
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _part(dest: Path, entry: FileEntry) -> Path:
    return dest / (entry.filename + ".part")


def test_full_download_verifies(server: _DataverseServer, entry: FileEntry, sample: bytes, tmp_path: Path):
    advanced: list[int] = []
    [result] = dataverse.fetch_files(
        [entry], tmp_path / "new", base_url=server.base_url, progress=advanced.append
    )
    assert result.status == "downloaded"
    assert result.bytes_downloaded == len(sample) == sum(advanced)
    assert result.path.read_bytes() == sample
    assert not _part(tmp_path / "new", entry).exists()
    assert server.requests == [(f"/api/access/datafile/{FILE_ID}", None)]

    # a verified file is not fetched again
    [again] = dataverse.fetch_files([entry], tmp_path / "new", base_url=server.base_url)
    assert (again.status, again.bytes_downloaded) == ("present", 0)
    assert len(server.requests) == 1


def test_resume_sends_range(server: _DataverseServer, entry: FileEntry, sample: bytes, tmp_path: Path):
    _part(tmp_path, entry).write_bytes(sample[:4000])
    assert dataverse.pending_bytes([entry], tmp_path) == len(sample) - 4000
    [result] = dataverse.fetch_files([entry], tmp_path, base_url=server.base_url)
    assert server.requests == [(f"/api/access/datafile/{FILE_ID}", "bytes=4000-")]
    assert (result.status, result.bytes_downloaded) == ("resumed", len(sample) - 4000)
    assert (tmp_path / entry.filename).read_bytes() == sample
    assert not _part(tmp_path, entry).exists()


def test_complete_part_416(server: _DataverseServer, entry: FileEntry, sample: bytes, tmp_path: Path):
    _part(tmp_path, entry).write_bytes(sample)
    [result] = dataverse.fetch_files([entry], tmp_path, base_url=server.base_url)
    assert server.requests[0][1] == f"bytes={len(sample)}-"
    assert (result.status, result.bytes_downloaded) == ("resumed", 0)
    assert (tmp_path / entry.filename).read_bytes() == sample


def test_server_ignoring_range_restarts(
    server: _DataverseServer, entry: FileEntry, sample: bytes, tmp_path: Path
):
    server.honour_range = False
    # a wrong prefix would corrupt the result if the 200 body were appended to it
    _part(tmp_path, entry).write_bytes(b"x" * 4000)
    [result] = dataverse.fetch_files([entry], tmp_path, base_url=server.base_url)
    assert server.requests[0][1] == "bytes=4000-"
    assert (result.status, result.bytes_downloaded) == ("downloaded", len(sample))
    assert (tmp_path / entry.filename).read_bytes() == sample


def test_checksum_mismatch(server: _DataverseServer, entry: FileEntry, tmp_path: Path):
    bad = FileEntry(entry.date, entry.filename, entry.id, entry.filesize, "0" * 32)
    with pytest.raises(ServiceError, match=rf"{re.escape(entry.filename)}: MD5 mismatch, expected 0{{32}}"):
        dataverse.fetch_files([bad], tmp_path, base_url=server.base_url)
    assert not (tmp_path / entry.filename).exists()
    assert not _part(tmp_path, entry).exists()


def test_corrupt_prefix_fails_checksum(server: _DataverseServer, entry: FileEntry, tmp_path: Path):
    _part(tmp_path, entry).write_bytes(b"x" * 4000)
    with pytest.raises(ServiceError, match="MD5 mismatch"):
        dataverse.fetch_files([entry], tmp_path, base_url=server.base_url)
    # removed, so the next run starts clean instead of resuming the same bad prefix
    assert not _part(tmp_path, entry).exists()
    assert not (tmp_path / entry.filename).exists()


def test_http_error_names_url_and_status(server: _DataverseServer, entry: FileEntry, tmp_path: Path):
    missing = FileEntry(entry.date, entry.filename, 999, entry.filesize, entry.md5)
    with pytest.raises(ServiceError, match=r"/api/access/datafile/999 answered HTTP 404.*re-run") as err:
        dataverse.fetch_files([missing], tmp_path, base_url=server.base_url)
    assert server.base_url in str(err.value)


def test_unreachable_server(entry: FileEntry, tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # nothing listens on the port any more: connection refused
    with pytest.raises(ServiceError, match=rf"127\.0\.0\.1:{port}/api/access/datafile/{FILE_ID}.*re-run"):
        dataverse.fetch_files([entry], tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=5)


def test_bundled_table_and_day_ranges():
    table = dataverse.load_table()
    assert len(table.files) == 62 and table.doi == "doi:10.7910/DVN/EGZHFV"
    week = dataverse.select_days(table.files, "2013-11-01..2013-11-07")
    assert [e.date.day for e in week] == [1, 2, 3, 4, 5, 6, 7]
    assert week[0].id == 2674255 and week[0].md5 == "658c49f8e3c7910bd3bb2bafbf62cdce"
    [one] = dataverse.select_days(table.files, "2013-11-05")
    assert one.filename == "sms-call-internet-mi-2013-11-05.txt"
    assert dataverse.select_days(table.files, "2013-12-31..2014-01-01")[-1].date == date(2014, 1, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2013-11-07..2013-11-01", "before start"),
        ("2013-10-31..2013-11-02", "outside the available days"),
        ("2099-01-01", "outside the available days"),
        ("2013-11-1x", "expected YYYY-MM-DD"),
        ("2013-11-01..2013-11-02..2013-11-03", "expected YYYY-MM-DD"),
    ],
)
def test_bad_day_range(spec: str, message: str):
    with pytest.raises(InputError, match=message):
        dataverse.select_days(dataverse.load_table().files, spec)


def test_unwritable_dest(entry: FileEntry, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match="cannot create destination"):
        dataverse.fetch_files([entry], blocker / "sub", base_url="http://127.0.0.1:9")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NETTWIN_DATAVERSE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "nettwin.cli.main", "data", "fetch", "milan", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_bad_days_is_one_line(tmp_path: Path):
    proc = _cli("--days", "2099-01-01", "--dest", str(tmp_path / "d"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nettwin: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


def test_cli_fetch_with_table(server: _DataverseServer, entry: FileEntry, sample: bytes, tmp_path: Path):
    table = tmp_path / "table.json"
    table.write_text(
        json.dumps(
            {
                "doi": "doi:test",
                "licence": "ODbL 1.0",
                "attribution": "test",
                "files": [
                    {
                        "date": entry.date.isoformat(),
                        "filename": entry.filename,
                        "id": entry.id,
                        "filesize": entry.filesize,
                        "md5": entry.md5,
                    }
                ],
            }
        )
    )
    dest = tmp_path / "out" / "milan"
    args = ["--days", "2013-11-01", "--dest", str(dest), "--base-url", server.base_url]
    proc = _cli(*args, "--files-table", str(table), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["files"], summary["bytes"]) == (1, len(sample))
    assert summary["seconds"] >= 0
    assert summary["results"] == [{"filename": entry.filename, "status": "downloaded", "bytes": len(sample)}]
    assert (dest / entry.filename).read_bytes() == sample
