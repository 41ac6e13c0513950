"""The web view's HTTP server: static page, JSON reads, and server-sent events with the live state.

One poller reads InfluxDB every ``refresh_s`` and pushes the state to every open page when it changed;
the page then re-reads what it shows. InfluxDB or Kafka unreachable: the state says so and the poller
keeps trying, so the page recovers on its own. Every query parameter is checked; a bad one gets a 400 with
a message, and no request can take the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ingest.errors import InputError, ServiceError
from ingest.settings import NettwinSettings
from nettwin.web import queries
from nettwin.web.grid import load_grid
from nettwin.web.kafka_view import KafkaView
from twin_store.adapters.influx import InfluxClient

log = logging.getLogger("nettwin.web")
STATIC = Path(__file__).resolve().parent / "static"
MAX_SQUARE = 10**9
IDLE_POLL_S = 30.0  # seconds between reads of InfluxDB while no page is open


@dataclass(frozen=True)
class WebConfig:
    settings: NettwinSettings
    host: str = "127.0.0.1"
    port: int = 8080
    grid: Path | None = None
    refresh_s: float = 2.0


class BadRequest(Exception):
    """A request parameter that is not acceptable: 400 with this message."""


# --- parameter checks ------------------------------------------------------------------------------------


def check_params(request: web.Request, parsers: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """Parse the query string with one parser per known name; unknown names and bad values are a 400."""
    unknown = sorted(set(request.query) - set(parsers))
    if unknown:
        raise BadRequest(f"unknown parameter(s) {unknown}; this endpoint takes {sorted(parsers)}")
    out: dict[str, Any] = {}
    for name, parse in parsers.items():
        values = request.query.getall(name, [])
        if len(values) > 1:
            raise BadRequest(f"parameter {name!r} given {len(values)} times")
        if values:
            try:
                out[name] = parse(values[0])
            except (ValueError, TypeError) as exc:
                raise BadRequest(f"parameter {name}={values[0][:40]!r}: {exc}") from None
    return out


def square_id(value: str) -> int:
    if not value.isdigit() or len(value) > 10:
        raise ValueError("a square id is a positive integer")
    sq = int(value)
    if not 0 < sq <= MAX_SQUARE:
        raise ValueError(f"a square id is between 1 and {MAX_SQUARE}")
    return sq


def layer_name(value: str) -> str:
    if value not in queries.LAYERS:
        raise ValueError(f"choose one of {sorted(queries.LAYERS)}")
    return value


# --- the application ------------------------------------------------------------------------------------


class WebView:
    def __init__(self, cfg: WebConfig) -> None:
        self.cfg = cfg
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="influx")
        self.kafka = KafkaView(cfg.settings)
        self.grid_body: bytes | None = None
        self.layers: dict[str, tuple[str, bytes]] = {}  # layer -> (state stamp it was read at, JSON body)
        self.state: dict[str, Any] = {"stamp": "", "influx": {"ok": False, "error": "starting"}}
        self.subscribers: set[asyncio.Queue[str]] = set()
        self.closing = asyncio.Event()
        self.wake = asyncio.Event()  # set on shutdown and when a page subscribes
        self.poller: asyncio.Task[None] | None = None

    async def influx(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one InfluxDB read in the pool with its own client (requests sessions are not thread-safe)."""

        def call() -> Any:
            with InfluxClient(self.cfg.settings.influx) as client:
                return fn(client, *args)

        return await asyncio.get_running_loop().run_in_executor(self.pool, call)

    # --- lifecycle

    async def start(self, app: web.Application) -> None:
        self.kafka.start()
        self.poller = asyncio.create_task(self.poll_forever())
        await self.grid_json()  # the map's first request finds the grid ready

    async def grid_json(self) -> bytes:
        if self.grid_body is None:
            grid = await asyncio.get_running_loop().run_in_executor(self.pool, load_grid, self.cfg.grid)
            self.grid_body = json.dumps(grid, separators=(",", ":")).encode()
        return self.grid_body

    async def fresh_state(self) -> dict[str, Any]:
        """The state, read now if the poller (idle while no page is open) has not read it lately."""
        if time.time() * 1000 - int(self.state.get("time", 0)) > self.cfg.refresh_s * 1000:
            self.state = await self.read_state()
        return self.state

    async def layer_json(self, name: str) -> bytes:
        """A map layer, read again only when the state changed since it was last read (while no page is open
        the state is read every ``IDLE_POLL_S``: a layer is then at most that old)."""
        stamp = str(self.state.get("stamp", ""))
        cached = self.layers.get(name)
        if cached is not None and cached[0] == stamp and stamp:
            return cached[1]
        body = json.dumps(await self.influx(queries.layer, name), separators=(",", ":")).encode()
        self.layers[name] = (stamp, body)
        return body

    async def shutdown(self, app: web.Application) -> None:
        self.closing.set()
        self.wake.set()
        for q in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait("")

    async def cleanup(self, app: web.Application) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        self.kafka.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- the live state

    async def read_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "kafka": self.kafka.snapshot(),
            "database": self.cfg.settings.influx.database,
        }
        try:
            started = time.perf_counter()
            twins, forecasts, pipe = await asyncio.gather(
                self.influx(queries.twin_summary),
                self.influx(queries.forecast_counts),
                self.influx(queries.pipeline, False),
            )
            state |= {
                "influx": {"ok": True, "error": None, "ms": round((time.perf_counter() - started) * 1000)},
                "twins": twins,
                "forecasts": forecasts,
                "pipeline": pipe,
            }
        except Exception as exc:  # unreachable, or rejected: the page shows why and keeps the last numbers
            state |= {"influx": {"ok": False, "error": f"InfluxDB: {exc}"[:300]}}
            for key in ("twins", "forecasts", "pipeline"):
                if key in self.state:
                    state[key] = self.state[key]
        body = {k: v for k, v in state.items() if k not in ("stamp", "time")}
        body["influx"] = {k: v for k, v in state["influx"].items() if k != "ms"}
        state["stamp"] = hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]
        state["time"] = int(time.time() * 1000)
        return state

    async def poll_forever(self) -> None:
        while not self.closing.is_set():
            try:
                state = await self.read_state()
            except Exception:  # never let the poller die: log and try again next round
                log.exception("reading the state failed")
                await asyncio.sleep(self.cfg.refresh_s)
                continue
            changed = state["stamp"] != self.state.get("stamp")
            self.state = state
            if changed and state["influx"]["ok"]:
                with contextlib.suppress(Exception):  # the default layer, ready before a page asks
                    await self.layer_json("traffic")
            if changed:
                message = f"event: state\ndata: {json.dumps(state, default=str)}\n\n"
                for q in list(self.subscribers):
                    with contextlib.suppress(asyncio.QueueFull):  # a stalled page skips a state
                        q.put_nowait(message)
            # no page open: read rarely (CPU is shared); a page that connects wakes the poller at once
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.wake.wait(), self.cfg.refresh_s if self.subscribers else IDLE_POLL_S
                )

    # --- handlers

    async def index(self, request: web.Request) -> web.StreamResponse:
        check_params(request, {})
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def grid(self, request: web.Request) -> web.Response:
        check_params(request, {})
        resp = web.Response(body=await self.grid_json(), content_type="application/json")
        resp.headers["Cache-Control"] = "max-age=3600"
        resp.enable_compression()
        return resp

    async def layer(self, request: web.Request) -> web.Response:
        p = check_params(request, {"name": layer_name})
        resp = web.Response(
            body=await self.layer_json(p.get("name", "traffic")), content_type="application/json"
        )
        resp.headers["Cache-Control"] = "no-cache"
        resp.enable_compression()
        return resp

    async def state_handler(self, request: web.Request) -> web.Response:
        check_params(request, {})
        return json_response(await self.fresh_state())

    async def entity(self, request: web.Request) -> web.Response:
        p = check_params(request, {"square": square_id})
        if "square" not in p:
            raise BadRequest("parameter 'square' is required")
        return json_response(await self.influx(queries.entity, p["square"]))

    async def twins(self, request: web.Request) -> web.Response:
        check_params(request, {})
        data = await self.influx(queries.twin_history)
        data["kafka"] = self.kafka.snapshot()
        return json_response(data, compress=True)

    async def pipeline(self, request: web.Request) -> web.Response:
        check_params(request, {})
        data = await self.influx(queries.pipeline)
        kafka = self.kafka.snapshot()
        data["deadletters"] = kafka["deadletters"]
        data["deadletter_total"] = kafka["deadletter_total"]
        data["kafka"] = {"ok": kafka["ok"], "error": kafka["error"]}
        return json_response(data)

    async def events(self, request: web.Request) -> web.StreamResponse:
        check_params(request, {})
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=8)
        self.subscribers.add(queue)
        self.wake.set()
        try:
            await resp.write(b"retry: 2000\n\n")
            await resp.write(f"event: state\ndata: {json.dumps(self.state, default=str)}\n\n".encode())
            while not self.closing.is_set():
                try:
                    message = await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    message = ": keep-alive\n\n"
                if not message:
                    break
                await resp.write(message.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.subscribers.discard(queue)
        return resp


def json_response(data: Any, compress: bool = False) -> web.Response:
    resp = web.Response(
        body=json.dumps(data, default=str, separators=(",", ":")).encode(), content_type="application/json"
    )
    resp.headers["Cache-Control"] = "no-cache"
    if compress:
        resp.enable_compression()
    return resp


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """Every failure is a JSON answer: 400 bad parameter, 503 a service down, 500 a bug (logged)."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BadRequest as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except web.HTTPException:
        raise
    except ServiceError as exc:
        return web.json_response({"error": str(exc)}, status=503)
    except InputError as exc:  # InfluxDB refused a query: our bug or a schema it does not know
        return web.json_response({"error": str(exc)}, status=502)
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path_qs)
        return web.json_response({"error": f"internal error: {type(exc).__name__}"}, status=500)


def make_app(cfg: WebConfig) -> web.Application:
    view = WebView(cfg)
    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024)
    app.router.add_get("/", view.index)
    app.router.add_get("/api/grid", view.grid)
    app.router.add_get("/api/layer", view.layer)
    app.router.add_get("/api/state", view.state_handler)
    app.router.add_get("/api/entity", view.entity)
    app.router.add_get("/api/twins", view.twins)
    app.router.add_get("/api/pipeline", view.pipeline)
    app.router.add_get("/api/events", view.events)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    app.on_startup.append(view.start)
    app.on_shutdown.append(view.shutdown)
    app.on_cleanup.append(view.cleanup)
    return app


def serve(cfg: WebConfig, ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; ``ready`` gets the URL once the port is open."""
    url = f"http://{cfg.host}:{cfg.port}/"

    def printed(*_: Any) -> None:
        if ready is not None:
            ready(url)

    try:
        web.run_app(
            make_app(cfg),
            host=cfg.host,
            port=cfg.port,
            print=printed,
            shutdown_timeout=2.0,
            access_log=None,
            handle_signals=True,
        )
    except OSError as exc:
        raise ServiceError(f"cannot serve on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
