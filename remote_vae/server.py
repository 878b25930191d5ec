"""The HTTP server: Starlette routes over the wire stage.

One family is served at `/`; several are served each under `/<family>/`
(a single family is also reachable under its own prefix). Models load in a
background thread so health answers 503 while loading.

A POST goes: API key (auth.py) -> a place in the bounded queue, before the
body is read (admission.py) -> read the body -> parse and check it (a worker
thread) -> wait for the device, perhaps joined by other requests for one model
call (batching.py) -> the model and on-device postprocessing (a worker thread)
-> media encoding (a worker thread) -> reply. Only the model step is
serialised, so a bad request is answered at once and MP4 / PNG encoding
overlaps the next model call. Around it all, every request gets an id, an
access-log line and its metrics (observability.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from . import openapi
from .admission import ClientGone, QueueSettings, WorkQueue
from .auth import ApiKeyMiddleware
from .batching import Batcher, BatchSettings
from .errors import RequestError
from .families import Family
from .latents import LatentLayout
from .observability import Metrics, RequestLog, StageTimer
from .service import VaeService
from .wire import HttpCall, HttpReply, failure_reply, prepare_call, render

log = logging.getLogger("remote_vae")


@dataclass
class Slot:
    """A family being served: its service once loaded, or why it is not ready."""

    family: Family
    service: VaeService | None = None
    error: str | None = None
    unavailable: bool = False  # this installation cannot serve it (`error` says why); the server's other families serve

    @property
    def status(self) -> str:
        return "ready" if self.service else "unavailable" if self.unavailable else "failed" if self.error else "loading"


@dataclass
class Registry:
    slots: dict[str, Slot]

    def vaes(self):
        return [slot.service.vae for slot in self.slots.values() if slot.service]


@dataclass(frozen=True)
class ServeOptions:
    """How the HTTP layer guards the service."""

    queue: QueueSettings = field(default_factory=QueueSettings)
    batching: BatchSettings = field(default_factory=BatchSettings)
    body_timeout: float = 120.0  # seconds to receive a whole body; slower gets 408
    api_keys: tuple[str, ...] = ()  # none: no key needed
    cors_origins: tuple[str, ...] = ()  # web pages on these origins may call the API from a browser; none: no CORS


# Reply headers a browser page may read: tensor shape and dtype, counts, the request id, Retry-After.
CORS_EXPOSED_HEADERS = ["shape", "dtype", "image-count", "video-count", "frame-count", "x-request-id", "retry-after"]


def load_in_background(registry: Registry, load: Callable[[Family], VaeService], on_failure: Callable[[str], None]) -> threading.Thread:
    def run():
        for slot in registry.slots.values():
            if slot.unavailable:
                continue
            try:
                slot.service = load(slot.family)
            except Exception as exc:  # reported, then the process exits: a half-loaded server is no use
                slot.error = str(exc)
                log.error("cannot serve %s: %s", slot.family.name, exc)
                on_failure(slot.error)
                return
        log.info("ready: %s", ", ".join(registry.slots))

    thread = threading.Thread(target=run, name="model-loader", daemon=True)
    thread.start()
    return thread


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def http_response(reply: HttpReply) -> Response:
    return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refusing one over `limit` bytes before reading the rest, or one slower than `timeout` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise RequestError(f"body is {declared} bytes; this server accepts at most {limit}", status=413)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"body is over {limit} bytes; this server accepts at most {limit}", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise RequestError(f"the body did not arrive within {timeout:g} s", status=408) from None


def until_disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """A waiter that returns once the client has closed its connection (the body already read)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # nothing else should arrive; never spin if it does

    return wait


def serving(slots: list[Slot]) -> bool:
    """Every family loaded but those this installation cannot serve, and at least one."""
    return all(slot.service or slot.unavailable for slot in slots) and any(slot.service for slot in slots)


def health_status(slots: list[Slot]) -> str:
    return "ok" if serving(slots) else "unavailable" if all(slot.unavailable for slot in slots) else "loading"


def health_response(slots: list[Slot]) -> JSONResponse:
    status = health_status(slots)
    body = {"status": status, "families": {slot.family.name: slot.status for slot in slots}}
    if errors := {slot.family.name: slot.error for slot in slots if slot.error}:
        body["errors"] = errors
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


def family_document(slot: Slot, path: str) -> dict:
    """A served family as a client needs it: where to send, what latents it takes, the scaling to send with a pipeline's latents."""
    family, layout = slot.family, LatentLayout.of(slot.family)
    return {"path": path, "status": slot.status, **({"error": slot.error} if slot.error else {}),
            "operations": list(family.operations), "video": family.is_video,
            "description": family.description, "weights": slot.service.vae.source if slot.service else family.hub_id, "latents": layout.describe(),
            "latent_channels": layout.pipeline_channels, "spatial_compression": family.spatial_compression,
            "temporal_compression": family.temporal_compression, "packed": layout.packing != "none",
            "scaling": family.client_scaling()}


def family_routes(prefix: str, slot: Slot, guard: Guard) -> list[Route]:
    async def health(request: Request) -> Response:
        request.state.family, request.state.operation = slot.family.name, "health"
        return health_response([slot])

    async def described(request: Request) -> Response:
        request.state.family, request.state.operation = slot.family.name, "families"
        return JSONResponse({"families": {slot.family.name: family_document(slot, "")}})

    def predict(operation: str | None):
        async def endpoint(request: Request) -> Response:
            request.state.family, request.state.operation = slot.family.name, operation or "-"
            if slot.unavailable:
                return json_error(501, slot.error)
            if slot.service is None:
                return json_error(503, f"{slot.family.name} is {slot.status}; retry when GET {prefix or '/'} answers 200", {"Retry-After": "5"})
            try:
                return http_response(await guard.serve(request, slot.service, operation))
            except ClientGone:
                return Response(status_code=499)  # nginx's "client closed request": for the log and metrics only
            except ClientDisconnect:
                return Response(status_code=400)

        return endpoint

    either = predict(None)
    routes = [
        Route(f"{prefix}/health", health, methods=["GET"], name="health"),
        Route(f"{prefix}/predict", either, methods=["POST"], name="predict"),
        Route(f"{prefix}/decode", predict("decode"), methods=["POST"], name="decode"),
        Route(f"{prefix}/encode", predict("encode"), methods=["POST"], name="encode"),
    ]
    if prefix:  # served alone, the server's own /families describes it
        routes.append(Route(f"{prefix}/families", described, methods=["GET"], name="families"))
    # The family's root, with and without the trailing slash (no redirect for POST bodies).
    for root in sorted({f"{prefix}/", prefix or "/"}):
        routes += [Route(root, health, methods=["GET"], name="health"), Route(root, either, methods=["POST"], name="predict")]
    return routes


class Guard:
    """One POST through the queue, its family's batcher and the three steps of wire.py, each step timed."""

    def __init__(self, queue: WorkQueue, metrics: Metrics, options: ServeOptions):
        self.queue = queue
        self.metrics = metrics
        self.options = options
        self.batchers: dict[str, Batcher] = {}

    def batcher(self, service: VaeService) -> Batcher:
        name = service.family.name
        if name not in self.batchers:
            self.batchers[name] = Batcher(service, self.queue, self.options.batching, self.metrics)
        return self.batchers[name]

    async def serve(self, request: Request, service: VaeService, operation: str | None) -> HttpReply:
        timer = StageTimer(self.metrics, service.family.name)
        batcher = self.batcher(service)
        try:
            async with self.queue.place():
                started = time.monotonic()
                with batcher.arrival():
                    body = await read_body(request, service.limits.max_body_bytes, self.options.body_timeout)
                    call = HttpCall(body, request.url.query, request.headers.get("content-type", ""), request.headers.get("accept", ""), operation)
                    prepared = await run_in_threadpool(prepare_call, service, call)
                request.state.operation = "encode" if prepared.form == "latents" else "decode"
                timer.observe("parse", started)
                result = await batcher.run(prepared.job, until_disconnected(request))  # times the queue and inference stages
                started = time.monotonic()
                reply = await run_in_threadpool(render, prepared, result)
                timer.observe("media", started)
                return reply
        except (ClientGone, ClientDisconnect):
            raise
        except Exception as exc:
            return failure_reply(exc)


def api_description_routes(routes: list[Route], families: dict[str, Family], api_keys: bool) -> list[Route]:
    """GET /openapi.json, describing `routes` and itself, and GET /docs, Swagger UI rendering it from bundled files."""
    described = [(route.path, method, route.name) for route in routes for method in sorted(route.methods - {"HEAD"})]
    described += [("/openapi.json", "GET", "openapi"), ("/docs", "GET", "docs")]
    schema = openapi.document(described, families, api_keys)
    files = openapi.swagger_ui_files()

    async def openapi_endpoint(request: Request) -> Response:
        request.state.operation = "openapi"
        return JSONResponse(schema)

    async def docs(request: Request) -> Response:
        request.state.operation = "docs"
        return HTMLResponse(openapi.DOCS_PAGE)

    def asset(name: str):
        async def endpoint(request: Request) -> Response:
            request.state.operation = "docs"
            return FileResponse(files / name)
        return endpoint

    return [Route("/openapi.json", openapi_endpoint, methods=["GET"], name="openapi"), Route("/docs", docs, methods=["GET"], name="docs")] + [
        Route(f"/docs/{name}", asset(name), methods=["GET"], name="docs") for name in ("swagger-ui.css", "swagger-ui-bundle.js")]


def create_app(registry: Registry, options: ServeOptions = ServeOptions()):
    """The ASGI app: request log and metrics outermost, then CORS, then the API key check, then the routes.

    CORS sits outside the key check so that browsers' preflight requests (which carry no key)
    are answered, and a 401 still reaches the page readably.
    """
    queue = WorkQueue(options.queue)
    metrics = Metrics(queue, registry.vaes)
    guard = Guard(queue, metrics, options)
    slots = list(registry.slots.values())

    async def metrics_endpoint(request: Request) -> Response:
        request.state.operation = "metrics"
        return Response(metrics.render(), media_type=metrics.content_type)

    async def families_endpoint(request: Request) -> Response:
        request.state.operation = "families"
        prefix = "" if len(slots) == 1 else "{}/"
        return JSONResponse({"families": {slot.family.name: family_document(slot, prefix.format(slot.family.name)) for slot in slots}})

    routes: list[Route] = [Route("/metrics", metrics_endpoint, methods=["GET"], name="metrics"),
                           Route("/families", families_endpoint, methods=["GET"], name="families")]
    if len(slots) == 1:
        routes += family_routes("", slots[0], guard)
    else:

        async def index(request: Request) -> Response:
            request.state.operation = "health"
            status = health_status(slots)
            families = {slot.family.name: {"path": f"/{slot.family.name}/", "status": slot.status, "operations": list(slot.family.operations)}
                        | ({"error": slot.error} if slot.error else {}) for slot in slots}
            return JSONResponse({"status": status, "families": families}, status_code=200 if status == "ok" else 503)

        routes += [Route("/", index, methods=["GET"], name="health"), Route("/health", index, methods=["GET"], name="health")]
    for slot in slots:
        routes += family_routes(f"/{slot.family.name}", slot, guard)
    routes += api_description_routes(routes, {slot.family.name: slot.family for slot in slots}, bool(options.api_keys))

    routes_hint = "POST / (or /predict, /decode, /encode)" if len(slots) == 1 else "POST /<family>/ for " + ", ".join(f"/{s.family.name}/" for s in slots)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        messages = {
            404: f"no route {request.method} {request.url.path}; this server answers {routes_hint}",
            405: f"{request.method} is not allowed on {request.url.path}; this server answers {routes_hint}",
        }
        return json_error(exc.status_code, messages.get(exc.status_code, exc.detail), getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error", exc_info=exc)
        return json_error(500, "internal error while processing the request; see the server log")

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    if options.api_keys:
        app = ApiKeyMiddleware(app, options.api_keys)
    if options.cors_origins:
        app = CORSMiddleware(
            app, allow_origins=list(options.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"], expose_headers=CORS_EXPOSED_HEADERS, max_age=3600,
        )
    return RequestLog(app, metrics)
