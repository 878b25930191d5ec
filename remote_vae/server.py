"""The HTTP server: Starlette routes over the wire stage.

One family is served at `/`; several are served each under `/<family>/`
(a single family is also reachable under its own prefix). Models load in a
background thread so health answers 503 while loading.

A POST goes: API key (auth.py) -> read the body at a minimum rate, each chunk
reserved from the memory budget as it arrives (memory.py) -> a place in the
bounded queue (admission.py) -> parse and check it from its numbers and headers,
reserve what it will hold, decode its file or build its latents (a worker
thread; if its memory is not free at once, it waits for it between the check and
the decode) -> wait for the device, perhaps joined by other
requests for one model call (batching.py) -> the model and on-device
postprocessing (a worker thread) -> media encoding (a worker thread) -> leave
the queue -> send the reply, a chunk at a time, then release its memory. Only
the model step is serialised, so a bad request is answered at once and MP4 /
PNG encoding overlaps the next model call. Around it all, every request gets
an id, an access-log line and its metrics (observability.py). Connections
themselves are capped and timed by connections.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from . import openapi
from .admission import ClientGone, WorkQueue
from .auth import ApiKeyMiddleware
from .batching import Batcher
from .connections import ConnectionStats
from .errors import ERROR_MEDIA_TYPE, RequestError, error_body
from .families import Family
from .memory import BODY_COST, JSON_BODY_COST, MemoryBudget, Reservation, auto_budget, release_free_memory
from .observability import Metrics, RequestLog, StageTimer
from .service import VaeService
from .settings import Limits, Settings
from .vocabulary import Packing
from .wire import (
    JSON_TYPES,
    HttpCall,
    HttpReply,
    Inspected,
    Prepared,
    failure_reply,
    inspect_call,
    json_too_large,
    media_type,
    prepare_inspected,
    render,
)

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


REPLY_CHUNK = 256 * 1024  # a reply is written this much at a time, so the connection's buffer never holds a whole copy


# Reply headers a browser page may read: tensor shape and dtype, counts, the request id, Retry-After.
CORS_EXPOSED_HEADERS = ["shape", "dtype", "image-count", "video-count", "frame-count", "x-request-id", "retry-after"]


def load_in_background(
    registry: Registry, load: Callable[[Family], VaeService], on_failure: Callable[[str], None]
) -> threading.Thread:
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


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status, headers, media_type=ERROR_MEDIA_TYPE)


class ReplyResponse(Response):
    """A reply written REPLY_CHUNK bytes at a time (uvicorn waits for each to drain), calling `sent()` when done or abandoned."""

    def __init__(self, reply: HttpReply, sent: Callable[[], None]):
        super().__init__(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)
        self.sent = sent

    async def __call__(self, scope, receive, send) -> None:
        body, self.body = self.body, b""  # bytes, as ASGI requires (Ray Serve pickles each message)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for start in range(0, max(1, len(body)), REPLY_CHUNK):  # a chunk's slice is a copy of the chunk only
                more = start + REPLY_CHUNK < len(body)
                await send({"type": "http.response.body", "body": body[start : start + REPLY_CHUNK], "more_body": more})
        finally:
            del body  # freed before its memory is released, so the allocator can hand it back
            self.sent()


async def read_body(request: Request, limits: Limits, options: Settings, reservation: Reservation) -> bytes:
    """The body, each chunk reserved from the memory budget as it arrives. 413 past the body limit (JSON bodies: their
    own, smaller one), from Content-Length before reading; 408 if it arrives slower than the minimum rate after the grace
    period, or not within the body timeout. Waiting for memory does not count against the client."""
    json_body = media_type(request.headers.get("content-type")) in JSON_TYPES
    limit, cost = (limits.max_json_bytes, JSON_BODY_COST) if json_body else (limits.max_body_bytes, BODY_COST)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise (
                json_too_large(declared, limits)
                if json_body
                else RequestError(f"body is {declared} bytes; this server accepts at most {limit}", status=413)
            )
    rate, grace, total = options.connections.min_rate, options.connections.rate_grace, options.body_timeout
    chunks, size, waited = [], 0, 0.0
    started = time.monotonic()
    stream = request.stream()
    while True:
        elapsed = time.monotonic() - started - waited
        by_rate = grace + size / rate - elapsed if rate else float("inf")
        left = min(total - elapsed, by_rate)
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), left)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            if by_rate < total - elapsed:
                raise RequestError(
                    f"the body arrived at {size / max(elapsed, 1e-9):.0f} bytes/s ({size} bytes in {elapsed:.1f} s); this server "
                    f"needs at least {rate} bytes/s after the first {grace:g} s",
                    status=408,
                ) from None
            raise RequestError(f"the body did not arrive within {total:g} s", status=408) from None
        size += len(chunk)
        if size > limit:
            raise (
                json_too_large(f"over {limit}", limits)
                if json_body
                else RequestError(f"body is over {limit} bytes; this server accepts at most {limit}", status=413)
            )
        if chunk:
            before = time.monotonic()
            await reservation.grow(len(chunk) * cost, max(0.0, total - elapsed), "its body")
            waited += time.monotonic() - before
            chunks.append(chunk)
    return b"".join(chunks)


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


def health_reply(status: str, families: dict[str, Any], errors: dict[str, str] | None = None) -> JSONResponse:
    """The health document, whichever server answers it (one family, several, the Ray index): the overall status
    and each family's; 200 when the status is ok, else 503."""
    body = {"status": status, "families": families} | ({"errors": errors} if errors else {})
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


def health_response(slots: list[Slot]) -> JSONResponse:
    errors = {slot.family.name: slot.error for slot in slots if slot.error}
    return health_reply(health_status(slots), {slot.family.name: slot.status for slot in slots}, errors)


def family_document(slot: Slot, path: str) -> dict:
    """A served family as a client needs it: where to send, what latents it takes, the scaling to send with a pipeline's latents."""
    family, layout = slot.family, slot.family.layout
    return {
        "path": path,
        "status": slot.status,
        **({"error": slot.error} if slot.error else {}),
        "operations": list(family.operations),
        "video": family.is_video,
        "description": family.description,
        "weights": slot.service.vae.source if slot.service else family.hub_id,
        "latents": layout.describe(),
        "latent_channels": layout.pipeline_channels,
        "spatial_compression": family.spatial_compression,
        "temporal_compression": family.temporal_compression,
        "packed": layout.packing != Packing.NONE,
        "scaling": family.client_scaling(),
    }


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
                return json_error(
                    503,
                    f"{slot.family.name} is {slot.status}; retry when GET {prefix or '/'} answers 200",
                    {"Retry-After": "5"},
                )
            return await guard.serve(request, slot.service, operation)

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
        routes += [
            Route(root, health, methods=["GET"], name="health"),
            Route(root, either, methods=["POST"], name="predict"),
        ]
    return routes


class Guard:
    """One POST through the memory budget, the queue, its family's batcher and the steps of wire.py, each step timed."""

    def __init__(self, queue: WorkQueue, memory: MemoryBudget, metrics: Metrics, options: Settings):
        self.queue = queue
        self.memory = memory
        self.metrics = metrics
        self.options = options
        self.batchers: dict[str, Batcher] = {}

    def batcher(self, service: VaeService) -> Batcher:
        name = service.family.name
        if name not in self.batchers:
            self.batchers[name] = Batcher(service, self.queue, self.options.batching, self.metrics)
        return self.batchers[name]

    async def serve(self, request: Request, service: VaeService, operation: str | None) -> Response:
        """The reply; the request's memory stays reserved until it has been sent (or abandoned)."""
        reservation = self.memory.reservation()
        try:
            reply = await self._answer(request, service, operation, reservation)
        except ClientGone:
            reservation.release()
            return Response(status_code=499)  # nginx's "client closed request": for the log and metrics only
        except ClientDisconnect:
            reservation.release()
            return Response(status_code=400)
        except Exception as exc:
            reply = failure_reply(exc)
        except BaseException:  # cancelled (shutdown): nothing left to send
            reservation.release()
            raise
        reservation.shrink_to(len(reply.body))  # what is left of the request now: its reply
        return ReplyResponse(reply, sent=reservation.release)

    async def _answer(
        self, request: Request, service: VaeService, operation: str | None, reservation: Reservation
    ) -> HttpReply:
        timer = StageTimer(self.metrics, service.family.name)
        batcher = self.batcher(service)
        started = time.monotonic()
        with ExitStack() as arriving:  # a forming batch may wait for this request until it is prepared
            arriving.enter_context(batcher.arrival())
            self.queue.receiving += 1
            try:
                body = await read_body(request, service.limits, self.options, reservation)
            finally:
                self.queue.receiving -= 1
            call = HttpCall(
                body,
                request.url.query,
                request.headers.get("content-type", ""),
                request.headers.get("accept", ""),
                operation,
            )
            del body
            async with self.queue.place():
                inspected, prepared = await run_in_threadpool(prepare_if_memory_is_free, service, call, reservation)
                del call
                request.state.operation = inspected.operation
                try:
                    if prepared is None:  # wait for its memory, then decode
                        await reservation.grow(
                            inspected.checked.hold_bytes, self.queue.settings.wait_timeout, inspected.checked.purpose
                        )
                        prepared = await run_in_threadpool(prepare_inspected, service, inspected)
                finally:
                    inspected.close()
                arriving.close()
                timer.observe("parse", started)
                result = await batcher.run(
                    prepared.job, until_disconnected(request)
                )  # times the queue and inference stages
                started = time.monotonic()
                reply = await run_in_threadpool(render, prepared, result)
                timer.observe("media", started)
                return reply


def prepare_if_memory_is_free(
    service: VaeService, call: HttpCall, reservation: Reservation
) -> tuple[Inspected, Prepared | None]:
    """In a worker thread: check the request, and if what it will hold can be reserved at once, decode it too."""
    inspected = inspect_call(service, call)
    try:
        if reservation.try_grow(inspected.checked.hold_bytes, inspected.checked.purpose):
            return inspected, prepare_inspected(service, inspected)
    except BaseException:
        inspected.close()
        raise
    return inspected, None


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

    return [
        Route("/openapi.json", openapi_endpoint, methods=["GET"], name="openapi"),
        Route("/docs", docs, methods=["GET"], name="docs"),
    ] + [
        Route(f"/docs/{name}", asset(name), methods=["GET"], name="docs")
        for name in ("swagger-ui.css", "swagger-ui-bundle.js")
    ]


def create_app(registry: Registry, options: Settings = Settings(), connections: ConnectionStats | None = None):
    """The ASGI app: request log and metrics outermost, then CORS, then the API key check, then the routes.

    CORS sits outside the key check so that browsers' preflight requests (which carry no key)
    are answered, and a 401 still reaches the page readably. `connections` are the server's
    connection counters (connections.py), for /metrics; None where the app runs behind another server.
    """
    queue = WorkQueue(options.queue)
    memory = MemoryBudget(options.memory_budget or auto_budget(), retry_after=queue.retry_after)
    memory.when_idle(release_free_memory)
    metrics = Metrics(queue, registry.vaes, memory, connections)
    guard = Guard(queue, memory, metrics, options)
    slots = list(registry.slots.values())

    async def metrics_endpoint(request: Request) -> Response:
        request.state.operation = "metrics"
        return Response(metrics.render(), media_type=metrics.content_type)

    async def families_endpoint(request: Request) -> Response:
        request.state.operation = "families"
        prefix = "" if len(slots) == 1 else "{}/"
        return JSONResponse(
            {"families": {slot.family.name: family_document(slot, prefix.format(slot.family.name)) for slot in slots}}
        )

    routes: list[Route] = [
        Route("/metrics", metrics_endpoint, methods=["GET"], name="metrics"),
        Route("/families", families_endpoint, methods=["GET"], name="families"),
    ]
    if len(slots) == 1:
        routes += family_routes("", slots[0], guard)
    else:

        async def index(request: Request) -> Response:
            request.state.operation = "health"
            status = health_status(slots)
            families = {
                slot.family.name: {
                    "path": f"/{slot.family.name}/",
                    "status": slot.status,
                    "operations": list(slot.family.operations),
                }
                | ({"error": slot.error} if slot.error else {})
                for slot in slots
            }
            return health_reply(status, families)

        routes += [
            Route("/", index, methods=["GET"], name="health"),
            Route("/health", index, methods=["GET"], name="health"),
        ]
    for slot in slots:
        routes += family_routes(f"/{slot.family.name}", slot, guard)
    routes += api_description_routes(routes, {slot.family.name: slot.family for slot in slots}, bool(options.api_keys))

    routes_hint = (
        "POST / (or /predict, /decode, /encode)"
        if len(slots) == 1
        else "POST /<family>/ for " + ", ".join(f"/{s.family.name}/" for s in slots)
    )

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
            app,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=3600,
        )
    return RequestLog(app, metrics)
