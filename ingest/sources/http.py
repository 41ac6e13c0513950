"""``type = "http"``: records pushed over HTTP (aiohttp), answered only after Kafka acknowledged them.

- ``POST /v1/records``: one canonical JSON record, an array, JSON lines, or CSV (``Content-Type: text/csv``
  or ``?format=csv``) with a header line, read through ``[source.mapping]`` when given.
- ``POST /v1/write``: InfluxDB line protocol (``?precision=ns|us|ms|s``), so anything that writes to InfluxDB
  can write here; the entity is the ``entity_tag`` tag.
- ``GET /healthz``: 200 while Kafka writes succeed, else 503. ``GET /metrics``: Prometheus text, every
  source of the process.

Bearer token from ``token_env``; bodies above ``max_body_bytes`` get 413 (and a dead letter). Answers:
200 ``{"accepted", "refused", "request_id", "reasons"}`` once Kafka acknowledged the records and dead letters
(400 when nothing was accepted); 429 with ``Retry-After`` when too many records are waiting for Kafka; 503
with ``Retry-After`` when Kafka is failing or did not acknowledge within ``ack_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from ingest.errors import ServiceError
from ingest.settings import SourceSettings
from ingest.sources.base import Source, SourceContext, now_ms
from ingest.sources.lineprotocol import LineOptions, parse_lines
from ingest.sources.metrics import render
from ingest.sources.publisher import Submission
from ingest.sources.record import Parsed, Refusal, parse_payload

log = logging.getLogger("nettwin.attach.http")

ACK_TIMEOUT_S = 20.0
MAX_REASONS = 5


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host or "127.0.0.1", int(port)


class HttpServer:
    """An aiohttp application on its own event-loop thread (started and stopped from other threads)."""

    def __init__(self, app: web.Application, listen: str) -> None:
        self.app = app
        self.host, self.port = split_listen(listen)
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"http-{self.port}", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.ready.wait(10)
        if isinstance(self.error, OSError):
            raise ServiceError(
                f"cannot listen on {self.host}:{self.port} ({self.error.strerror or self.error}); "
                "another process holds the port or the address is not local: change listen"
            ) from self.error
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
            self.loop.run_until_complete(site.start())
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def stop(self, timeout_s: float) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout_s)


class HttpSource(Source):
    def __init__(self, cfg: SourceSettings, ctx: SourceContext) -> None:
        super().__init__(cfg, ctx)
        if not cfg.listen:
            raise ValueError(f"source {cfg.name}: type http needs listen = 'host:port'")
        self.token = os.environ.get(cfg.token_env) if cfg.token_env else None
        if cfg.token_env and not self.token:
            raise ValueError(
                f"source {cfg.name}: environment variable {cfg.token_env} (token_env) is not set"
            )
        app = web.Application(client_max_size=cfg.max_body_bytes)
        app.router.add_post("/v1/records", self._guarded(self.records))
        app.router.add_post("/v1/write", self._guarded(self.write))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.prometheus)
        self.server = HttpServer(app, cfg.listen)

    def start(self) -> None:
        self.server.start()
        log.info("source %s: http on %s:%d", self.name, self.server.host, self.server.port)

    def close(self, timeout_s: float) -> None:
        super().close(timeout_s)
        self.server.stop(timeout_s)

    # --- handlers
    def _guarded(
        self, handler: Callable[[web.Request, bytes, str], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def wrapped(request: web.Request) -> web.Response:
            rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
            if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.json_response({"error": "missing or wrong bearer token"}, status=401)
            if self.stopping.is_set():
                return _retry_later(503, "shutting down", 5)
            self.metrics.add(messages=1)
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                reason = f"body larger than max_body_bytes = {self.cfg.max_body_bytes}"
                refusal = Refusal(reason, f"request {rid}", b"")
                await self._publish(Parsed(refusals=[refusal]))
                return web.json_response({"error": reason, "request_id": rid}, status=413)
            publisher = self.ctx.publisher
            if not publisher.healthy:
                return _retry_later(503, f"Kafka is failing ({publisher.last_error})", 5)
            if not publisher.has_room():
                return _retry_later(429, "too many records waiting for Kafka", 1)
            return await handler(request, body, rid)

        return wrapped

    async def records(self, request: web.Request, body: bytes, rid: str) -> web.Response:
        fmt = request.query.get("format") or ("csv" if request.content_type == "text/csv" else "json")
        parsed = parse_payload(body, fmt, f"request {rid}", now_ms(), self.mapping, None, self.limits)
        return await self._answer(parsed, rid)

    async def write(self, request: web.Request, body: bytes, rid: str) -> web.Response:
        precision = request.query.get("precision", self.cfg.precision)
        if precision not in ("ns", "n", "us", "u", "ms", "s"):
            return web.json_response({"error": f"unknown precision {precision!r}"}, status=400)
        opts = LineOptions(self.cfg.entity_tag, self.cfg.metric_names, precision)
        parsed = parse_lines(body, f"request {rid}", now_ms(), opts, self.limits)
        return await self._answer(parsed, rid)

    async def _publish(self, parsed: Parsed) -> tuple[BaseException | None, Submission | None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[BaseException | None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if not fut.done():
                fut.set_result(exc)

        def done(exc: BaseException | None) -> None:
            loop.call_soon_threadsafe(settle, exc)

        sub = self.submission(parsed, done)
        try:
            self.ctx.publisher.submit(sub)
        except RuntimeError as exc:  # stopping
            return exc, None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), ACK_TIMEOUT_S), sub
        except TimeoutError as exc:
            return exc, sub

    async def _answer(self, parsed: Parsed, rid: str) -> web.Response:
        exc, sub = await self._publish(parsed)
        if exc is not None or sub is None:
            return _retry_later(503, f"Kafka did not acknowledge ({type(exc).__name__})", 5)
        # counted after publishing: the publisher may refuse more (entities not registered)
        accepted, refused = len(sub.records), len(sub.refusals)
        body = {
            "request_id": rid,
            "accepted": accepted,
            "refused": refused,
            "reasons": [f"{r.position}: {r.reason}" for r in sub.refusals[:MAX_REASONS]],
        }
        return web.json_response(body, status=200 if accepted or not refused else 400)

    async def healthz(self, request: web.Request) -> web.Response:
        publisher = self.ctx.publisher
        if publisher.healthy and not self.stopping.is_set():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "failing", "error": publisher.last_error}, status=503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(text=render(self.ctx.all_metrics), content_type="text/plain")


def _retry_later(status: int, reason: str, seconds: int) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers={"Retry-After": str(seconds)})
