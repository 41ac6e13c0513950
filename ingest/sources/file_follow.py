"""``type = "file"``: follow a growing CSV (header line first) or JSON-lines file like ``tail -F``.

Complete lines are read in chunks, published, and the position (inode, byte offset, line number, CSV header)
is saved to ``<state_dir>/sources/<name>.pos`` only after Kafka acknowledged them: a restart resumes there
(at least once). Rotation: when the path names a new file (other inode), the old file is read to its end
first, then the new one from its start; a file truncated below the saved offset is read again from its start.
A partial last line waits until its newline arrives.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from ingest.settings import SourceSettings
from ingest.sources.base import Source, SourceContext, now_ms
from ingest.sources.record import Parsed, parse_csv_payload, parse_json_payload

log = logging.getLogger("nettwin.attach.file")

CHUNK_BYTES = 4 << 20


@dataclass
class Position:
    inode: int = 0
    offset: int = 0
    line: int = 0
    header: list[str] | None = field(default=None)


class FileSource(Source):
    def __init__(self, cfg: SourceSettings, ctx: SourceContext) -> None:
        super().__init__(cfg, ctx)
        if cfg.path is None:
            raise ValueError(f"source {cfg.name}: type file needs path")
        self.path = Path(cfg.path)
        self.pos_file = ctx.state_dir / "sources" / f"{cfg.name}.pos"
        self.pos = self._load()
        self.thread = threading.Thread(target=self._loop, name=f"file-{cfg.name}", daemon=True)

    def _load(self) -> Position:
        try:
            return Position(**json.loads(self.pos_file.read_text()))
        except (OSError, ValueError, TypeError):
            return Position()

    def _save(self) -> None:
        self.pos_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pos_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.pos)))
        os.replace(tmp, self.pos_file)

    def start(self) -> None:
        self.thread.start()
        log.info("source %s: following %s from byte %d", self.name, self.path, self.pos.offset)

    def close(self, timeout_s: float) -> None:
        super().close(timeout_s)
        self.thread.join(timeout_s)

    def _rotated_copy(self) -> Path | None:
        """The file we were reading, renamed by a rotation while we were not looking, if it has more."""
        for candidate in self.path.parent.glob(self.path.name + "*"):
            try:
                st = candidate.stat()
            except OSError:
                continue
            if st.st_ino == self.pos.inode and st.st_size > self.pos.offset and candidate != self.path:
                return candidate
        return None

    def _open(self) -> IO[bytes] | None:
        path = self.path
        if self.pos.inode:
            try:
                current = os.stat(self.path).st_ino
            except OSError:
                current = None
            if current != self.pos.inode:
                path = self._rotated_copy() or self.path
        try:
            fh = open(path, "rb")  # noqa: SIM115 - kept open across polls, closed on rotation/stop
        except OSError:
            return None
        st = os.fstat(fh.fileno())
        if st.st_ino != self.pos.inode or st.st_size < self.pos.offset:
            self.pos = Position(inode=st.st_ino)
        fh.seek(self.pos.offset)
        return fh

    def _loop(self) -> None:
        fh: IO[bytes] | None = None
        try:
            while not self.stopping.is_set():
                if fh is None:
                    fh = self._open()
                    if fh is None:
                        self.stopping.wait(0.5)
                        continue
                if self._read_chunk(fh):
                    continue
                # at the end: rotated or truncated?
                try:
                    st = os.stat(self.path)
                except OSError:
                    st = None
                if st is not None and (st.st_ino != self.pos.inode or st.st_size < self.pos.offset):
                    if not self._read_chunk(fh):  # the old file's last lines first
                        fh.close()
                        fh = None
                    continue
                self.stopping.wait(0.2)
        finally:
            if fh is not None:
                fh.close()

    def _read_chunk(self, fh: IO[bytes]) -> bool:
        """Publish the complete lines available; False when there were none."""
        data = fh.read(CHUNK_BYTES)
        end = data.rfind(b"\n")
        if end < 0:
            fh.seek(self.pos.offset)
            return False
        data = data[: end + 1]
        fh.seek(self.pos.offset + len(data))
        lines = data.split(b"\n")[:-1]
        first_line = self.pos.line
        header = self.pos.header
        if self.cfg.format == "csv" and header is None and self.pos.line == 0:
            header = next(csv.reader([lines[0].decode("utf-8", "replace")]))
            lines = lines[1:]
            first_line += 1
        parsed = self._parse(lines, first_line, header)
        self.metrics.add(messages=len(lines))
        while True:
            exc = self.publish_and_wait(parsed, timeout_s=60)
            if exc is None:
                break
            if self.stopping.is_set():
                fh.seek(self.pos.offset)  # not acknowledged: read again after a restart
                return True
            log.warning("source %s: chunk not acknowledged (%s); retrying", self.name, exc)
        self.pos.offset += len(data)
        self.pos.line = first_line + len(lines)
        self.pos.header = header
        self._save()
        return True

    def _parse(self, lines: list[bytes], first_line: int, header: list[str] | None) -> Parsed:
        out = Parsed()
        where = str(self.path)
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            pos = f"{where}:{first_line + i + 1}"
            if self.cfg.format == "csv":
                part = parse_csv_payload(raw, pos, now_ms(), self.mapping, None, self.limits, header=header)
            else:
                part = parse_json_payload(raw, pos, now_ms(), self.mapping, None, self.limits)
            for r in part.refusals:
                out.refusals.append(type(r)(r.reason, pos, raw))
            out.records += part.records
        return out
