"""The HTTP server: Starlette routes over the wire stage.

One family is served at `/`; several are served each under `/<family>/`
(a single family is also reachable under its own prefix). Models load in a
background thread so health answers 503 while loading; inference runs in a
worker thread so the event loop keeps accepting requests.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import RequestError
from .families import Family
from .service import Limits, VaeService
from .wire import HttpCall, answer

log = logging.getLogger("remote_vae")


@dataclass
class Slot:
    """A family being served: its service once loaded, or why it is not ready."""

    family: Family
    service: VaeService | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        return "ready" if self.service else ("failed" if self.error else "loading")


@dataclass
class Registry:
    slots: dict[str, Slot]
    limits: Limits = field(default_factory=Limits)

    def ready(self) -> bool:
        return all(slot.service for slot in self.slots.values())


def load_in_background(registry: Registry, load: Callable[[Family], VaeService], on_failure: Callable[[str], None]) -> threading.Thread:
    def run():
        for slot in registry.slots.values():
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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing one over `limit` bytes before reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise RequestError(f"body is {declared} bytes; this server accepts at most {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body is over {limit} bytes; this server accepts at most {limit}", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def health_response(slots: list[Slot]) -> JSONResponse:
    statuses = {slot.family.name: slot.status for slot in slots}
    ready = all(status == "ready" for status in statuses.values())
    body = {"status": "ok" if ready else "loading", "families": statuses}
    return JSONResponse(body, status_code=200 if ready else 503)


def family_routes(prefix: str, slot: Slot, limits: Limits) -> list[Route]:
    async def health(request: Request) -> Response:
        return health_response([slot])

    def predict(operation: str | None):
        async def endpoint(request: Request) -> Response:
            if slot.service is None:
                return json_error(503, f"{slot.family.name} is {slot.status}; retry when GET {prefix or '/'} answers 200", {"Retry-After": "5"})
            try:
                body = await read_body(request, limits.max_body_bytes)
            except RequestError as exc:
                return json_error(exc.status, exc.message)
            except ClientDisconnect:
                return Response(status_code=400)
            call = HttpCall(
                body=body,
                query=request.url.query,
                content_type=request.headers.get("content-type", ""),
                accept=request.headers.get("accept", ""),
                operation=operation,
            )
            reply = await run_in_threadpool(answer, slot.service, call)
            return Response(reply.body, status_code=reply.status, media_type=reply.media_type, headers=reply.headers)

        return endpoint

    either = predict(None)
    routes = [
        Route(f"{prefix}/health", health, methods=["GET"]),
        Route(f"{prefix}/predict", either, methods=["POST"]),
        Route(f"{prefix}/decode", predict("decode"), methods=["POST"]),
        Route(f"{prefix}/encode", predict("encode"), methods=["POST"]),
    ]
    # The family's root, with and without the trailing slash (no redirect for POST bodies).
    for root in {f"{prefix}/", prefix or "/"}:
        routes += [Route(root, health, methods=["GET"]), Route(root, either, methods=["POST"])]
    return routes


def create_app(registry: Registry) -> Starlette:
    slots = list(registry.slots.values())
    routes: list[Route] = []
    if len(slots) == 1:
        routes += family_routes("", slots[0], registry.limits)
    else:

        async def index(request: Request) -> Response:
            ready = registry.ready()
            families = {slot.family.name: {"path": f"/{slot.family.name}/", "status": slot.status, "operations": list(slot.family.operations)} for slot in slots}
            return JSONResponse({"status": "ok" if ready else "loading", "families": families}, status_code=200 if ready else 503)

        routes += [Route("/", index, methods=["GET"]), Route("/health", index, methods=["GET"])]
    for slot in slots:
        routes += family_routes(f"/{slot.family.name}", slot, registry.limits)

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

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
