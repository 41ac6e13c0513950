"""A small InfluxDB client over the v1 HTTP API: line protocol to /write, InfluxQL to /query.

InfluxDB 1.x, 2.x (v1 compatibility + DBRP mapping) and 3.x all serve these two endpoints, so the same
code runs against every version by configuration only. A client of our own is used because building
points from dicts in the stock v1 client runs at ~70k points/s here, below what the pipeline needs; we
build line protocol in bulk (twin_store.adapters.lineproto) and post bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import orjson
import requests

from ingest.errors import ConfigError, InputError, ServiceError
from ingest.settings import InfluxSettings


class InfluxRefused(ConfigError):
    """InfluxDB answered a request with a 4xx that retrying cannot change (wrong credentials, no such
    database, too large): the caller stops with this one line instead of retrying forever."""


@dataclass(frozen=True)
class Series:
    name: str
    tags: dict[str, str]
    columns: list[str]
    values: list[list[Any]]

    def rows(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, v, strict=True)) | self.tags for v in self.values]


class InfluxClient:
    def __init__(self, settings: InfluxSettings) -> None:
        self.settings = settings
        self.base = settings.url.rstrip("/")
        self.session = requests.Session()
        if settings.token is not None:
            self.session.headers["Authorization"] = f"Token {settings.token.get_secret_value()}"
        elif settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else ""
            self.session.auth = (settings.username, password)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> InfluxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self.base + path
        try:
            return self.session.request(method, url, timeout=self.settings.timeout_s, **kwargs)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            if isinstance(exc, requests.ConnectionError):
                reason = "connection refused or host unreachable"
            raise ServiceError(
                f"InfluxDB unreachable at {self.base} ({reason}); start it with infra/up or set NETTWIN_INFLUX__URL"
            ) from exc

    def _refused(self, resp: requests.Response, what: str) -> InfluxRefused:
        detail = _error_text(resp)
        if resp.status_code in (401, 403):
            hint = "check NETTWIN_INFLUX__USERNAME and NETTWIN_INFLUX__PASSWORD (or NETTWIN_INFLUX__TOKEN)"
        elif resp.status_code == 404:
            hint = f"check NETTWIN_INFLUX__URL and that database {self.settings.database!r} exists (infra/up)"
        else:
            hint = "retrying cannot help"
        return InfluxRefused(
            f"InfluxDB at {self.base} refused {what}: HTTP {resp.status_code} {detail}; {hint}"
        )

    def ping(self) -> str:
        """Return the server version; raise ServiceError when it does not answer."""
        resp = self._request("GET", "/ping")
        if resp.status_code not in (200, 204):
            raise ServiceError(f"InfluxDB at {self.base} answered /ping with HTTP {resp.status_code}")
        return resp.headers.get("X-Influxdb-Version", "unknown")

    def create_database(self, name: str | None = None) -> None:
        name = name or self.settings.database
        self.query(f'CREATE DATABASE "{_ident(name)}"', method="POST", database=None)

    def drop_database(self, name: str) -> None:
        self.query(f'DROP DATABASE "{_ident(name)}"', method="POST", database=None)

    def write(self, lines: bytes, precision: str = "s", database: str | None = None) -> None:
        """Write line protocol; raise InputError if the server rejects points, ServiceError if it fails."""
        if not lines:
            return
        params = {"db": database or self.settings.database, "precision": precision}
        if self.settings.retention_policy:
            params["rp"] = self.settings.retention_policy
        resp = self._request("POST", "/write", params=params, data=lines)
        if resp.status_code == 204:
            return
        detail = _error_text(resp)
        if resp.status_code == 400:
            raise InputError(f"InfluxDB rejected points written to {params['db']}: {detail}")
        if 400 < resp.status_code < 500 and resp.status_code not in (408, 429):  # 408/429: try again later
            raise self._refused(resp, f"a write to database {params['db']!r}")
        raise ServiceError(
            f"InfluxDB write to {self.base} db {params['db']} failed: HTTP {resp.status_code} {detail}"
        )

    def write_lines(
        self,
        lines: list[str],
        precision: str,
        should_stop: Callable[[], bool],
        on_retry: Callable[[ServiceError, float], None],
    ) -> None:
        """Write in ``batch_points`` chunks, retrying unavailability (connection errors, 5xx, 408, 429) with
        back-off from 0.5 s to 10 s until it works or ``should_stop()``; callers commit their input only
        after this returns. Rejected points (InputError) and refused requests (InfluxRefused: credentials,
        missing database) are not retried."""
        step = self.settings.batch_points
        for i in range(0, len(lines), step):
            payload = "\n".join(lines[i : i + step]).encode()
            delay = 0.5
            while True:
                try:
                    self.write(payload, precision=precision)
                    break
                except ServiceError as exc:
                    if should_stop():
                        raise
                    on_retry(exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)

    def query(
        self,
        q: str,
        *,
        database: str | None = "",
        method: str = "GET",
        epoch: str = "ms",
        packed: bool = False,
    ) -> list[Series]:
        """``packed``: the answer as MessagePack, uncompressed, for large answers on a near server: at 10,000
        rows InfluxDB 1.6 sent it in 16 ms against 100-140 ms as gzipped JSON (bench/twins_query.py)."""
        params: dict[str, str] = {"q": q, "epoch": epoch}
        db = self.settings.database if database == "" else database
        if db:
            params["db"] = db
        headers = {"Accept": "application/x-msgpack", "Accept-Encoding": "identity"} if packed else None
        if method == "POST":
            resp = self._request("POST", "/query", data=params, headers=headers)
        else:
            resp = self._request("GET", "/query", params=params, headers=headers)
        if resp.status_code >= 500:
            raise ServiceError(f"InfluxDB query failed: HTTP {resp.status_code} {_error_text(resp)}")
        if resp.status_code in (401, 403):
            raise self._refused(resp, "a query")
        try:
            if "msgpack" in resp.headers.get("Content-Type", ""):
                body = msgpack.unpackb(resp.content)
            else:  # orjson: 3x faster than the stdlib on 10,000 rows (bench/twins_query.py)
                body = orjson.loads(resp.content)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ServiceError(f"InfluxDB query returned non-JSON (HTTP {resp.status_code})") from exc
        return list(self._series(body, q))

    def query_chunks(self, q: str, chunk_size: int = 10_000, epoch: str = "ms") -> Iterator[Series]:
        """The answer to ``q`` a piece at a time: InfluxDB's chunked answer (at most ``chunk_size`` points a
        piece, MessagePack), read from the socket as it comes. A series longer than a piece comes in several
        ``Series`` of the same name and tags. For answers too large to hold as Python lists at once: the
        bootstrap's 500,000 history points at 10,000 entities took ~150 MB parsed whole."""
        params = {"q": q, "epoch": epoch, "chunked": "true", "chunk_size": str(chunk_size)}
        params["db"] = self.settings.database
        headers = {"Accept": "application/x-msgpack", "Accept-Encoding": "identity"}
        resp = self._request("POST", "/query", data=params, headers=headers, stream=True)
        with resp:
            if resp.status_code >= 500:
                raise ServiceError(f"InfluxDB query failed: HTTP {resp.status_code} {_error_text(resp)}")
            if resp.status_code in (401, 403):
                raise self._refused(resp, "a query")
            if "msgpack" not in resp.headers.get("Content-Type", ""):  # an error before the first piece
                yield from self._series(_json_body(resp), q)
                return
            unpacker = msgpack.Unpacker()
            try:
                for data in resp.iter_content(1 << 16):
                    unpacker.feed(data)
                    for body in unpacker:
                        yield from self._series(body, q)
            except (ValueError, msgpack.UnpackException) as exc:
                raise ServiceError(f"InfluxDB query returned a broken MessagePack answer: {exc}") from exc
            except requests.RequestException as exc:
                raise ServiceError(
                    f"InfluxDB at {self.base} broke off its answer ({type(exc).__name__})"
                ) from exc

    @staticmethod
    def _series(body: Any, q: str) -> Iterator[Series]:
        if "error" in body:
            raise _query_error(body["error"], q)
        for result in body.get("results", []):
            if "error" in result:
                raise _query_error(result["error"], q)
            for s in result.get("series", []):
                yield Series(s["name"], s.get("tags") or {}, s["columns"], s.get("values") or [])


def _json_body(resp: requests.Response) -> Any:
    try:
        return orjson.loads(resp.content)
    except ValueError as exc:
        raise ServiceError(f"InfluxDB query returned non-JSON (HTTP {resp.status_code})") from exc


def _query_error(message: str, q: str) -> Exception:
    if "database not found" in message:
        return InputError(f"InfluxDB: {message}; run infra/up or `nettwin infra init` to create it")
    return InputError(f"InfluxDB rejected query {q!r}: {message}")


def _error_text(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))[:300]
    except ValueError:
        return resp.text[:300]


def _ident(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', '\\"')
