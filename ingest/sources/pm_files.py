"""``type = "pm-files"``: watch a directory for 3GPP PM XML files and publish each file once.

A file is read when its size and modification time have not changed for ``settle_s`` seconds (a file still
being written is left alone; names starting with ``.`` or ending in ``.tmp``/``.part`` are never read) or
when a "file ready" notification names it: ``POST /v1/file-ready`` on ``listen`` with ``{"path": ...}`` or a
3GPP-style ``{"fileInfoList": [{"fileLocation": ...}]}`` (paths resolved inside ``directory``).

Each published file is appended to a ledger (``<state_dir>/sources/<name>.done``: name, size, mtime) *after*
Kafka acknowledged its records and dead letters, so a restart does not publish it again (a crash between the
acknowledgement and the ledger write re-publishes that one file: at least once). A file rewritten with new
content (other size or mtime) is read again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

from aiohttp import web

from ingest.settings import SourceSettings
from ingest.sources.base import Source, SourceContext, now_ms
from ingest.sources.http import HttpServer
from ingest.sources.pm_xml import parse_pm_file

log = logging.getLogger("nettwin.attach.pm")

SKIP_SUFFIXES = (".tmp", ".part", ".partial")


class Ledger:
    """Files already published, as ``name|size|mtime_ns`` identities in an append-only JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.done.add(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a crash: that file is read again

    @staticmethod
    def identity(path: Path, st: os.stat_result) -> str:
        return f"{path.name}|{st.st_size}|{st.st_mtime_ns}"

    def __contains__(self, ident: str) -> bool:
        return ident in self.done

    def add(self, ident: str) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"id": ident, "at": now_ms()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done.add(ident)


class PmFilesSource(Source):
    def __init__(self, cfg: SourceSettings, ctx: SourceContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.directory is None:
            raise ValueError(f"source {cfg.name}: type pm-files needs directory")
        self.directory = Path(cfg.directory).resolve()
        self.ledger = Ledger(ctx.state_dir / "sources" / f"{cfg.name}.done")
        self.seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, first seen unchanged)
        self.notified: queue.Queue[Path] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=f"pm-{cfg.name}", daemon=True)
        self.server: HttpServer | None = None
        if cfg.listen:
            app = web.Application()
            app.router.add_post("/v1/file-ready", self._file_ready)
            self.server = HttpServer(app, cfg.listen)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.thread.start()
        if self.server is not None:
            self.server.start()
        log.info("source %s: watching %s for %s", self.name, self.directory, self.cfg.pattern)

    def close(self, timeout_s: float) -> None:
        super().close(timeout_s)
        if self.server is not None:
            self.server.stop(timeout_s)
        self.thread.join(timeout_s)

    async def _file_ready(self, request: web.Request) -> web.Response:
        try:
            doc = await request.json()
            names = [doc["path"]] if "path" in doc else [f["fileLocation"] for f in doc["fileInfoList"]]
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"error": "expected {path} or {fileInfoList: [{fileLocation}]}"}, status=400
            )
        paths = []
        for name in names:
            path = (self.directory / str(name).removeprefix("file://")).resolve()
            if not path.is_relative_to(self.directory) or not path.is_file():
                return web.json_response(
                    {"error": f"{name}: no such file in the watched directory"}, status=404
                )
            paths.append(path)
        for path in paths:
            self.notified.put(path)
        return web.json_response({"queued": len(paths)}, status=202)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                while True:
                    self._publish_file(self.notified.get_nowait())
            except queue.Empty:
                pass
            for path in self._ready_files():
                if self.stopping.is_set():
                    return
                self._publish_file(path)
            self.stopping.wait(self.cfg.poll_s)

    def _ready_files(self) -> list[Path]:
        """Files unchanged for ``settle_s`` and not yet published, oldest first."""
        now = time.monotonic()
        ready: list[tuple[int, Path]] = []
        try:
            candidates = sorted(self.directory.glob(self.cfg.pattern))
        except OSError as exc:
            log.warning("source %s: cannot list %s: %s", self.name, self.directory, exc)
            return []
        for path in candidates:
            if path.name.startswith(".") or path.name.endswith(SKIP_SUFFIXES) or not path.is_file():
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            if Ledger.identity(path, st) in self.ledger:
                continue
            prev = self.seen.get(path.name)
            if prev is None or prev[:2] != (st.st_size, st.st_mtime_ns):
                self.seen[path.name] = (st.st_size, st.st_mtime_ns, now)
                if self.cfg.settle_s > 0:
                    continue
            elif now - prev[2] < self.cfg.settle_s:
                continue
            ready.append((st.st_mtime_ns, path))
        return [p for _, p in sorted(ready)]

    def _publish_file(self, path: Path) -> None:
        try:
            st = path.stat()
            data = path.read_bytes()
        except OSError as exc:
            log.warning("source %s: cannot read %s: %s", self.name, path, exc)
            return
        ident = Ledger.identity(path, st)
        if ident in self.ledger:
            return
        self.metrics.add(messages=1)
        parsed = parse_pm_file(data, path.name, now_ms(), self.limits)
        while not self.stopping.is_set():
            error = self.publish_and_wait(parsed, timeout_s=60)
            if error is None:
                self.ledger.add(ident)
                self.seen.pop(path.name, None)
                log.info(
                    "source %s: %s -> %d records, %d refused",
                    self.name,
                    path.name,
                    len(parsed.records),
                    len(parsed.refusals),
                )
                return
            log.warning("source %s: %s not acknowledged (%s); retrying", self.name, path.name, error)
