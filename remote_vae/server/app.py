"""The HTTP server: Starlette routes over the wire stage.

One family is served at `/`; several are served each under `/<family>/`
(a single family is also reachable under its own prefix). Models load in a
background thread so health answers 503 while loading. Each POST goes down
pipeline.py's path; around it all, every request gets an id, an access-log line
and its metrics (observability.py), and connections themselves are capped and
timed by connections.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..families import Family
from ..memory import MemoryBudget, auto_budget, release_free_memory
from ..service import VaeService
from ..settings import Settings
from ..vocabulary import Packing
from . import openapi
from .admission import WorkQueue
from .auth import ApiKeyMiddleware
from .connections import ConnectionStats
from .observability import Metrics, RequestLog
from .pipeline import PostPipeline, json_error

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
        link_sounds(registry)
        log.info("ready: %s", ", ".join(registry.slots))

    thread = threading.Thread(target=run, name="model-loader", daemon=True)
    thread.start()
    return thread


def link_sounds(registry: Registry) -> None:
    """A video family's sound decodes through its sound family's service, where both are served (LTX-2's audio)."""
    for slot in registry.slots.values():
        sound = registry.slots.get(slot.family.sound or "")
        if slot.service is not None and sound is not None and sound.service is not None:
            slot.service.sound = sound.service


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
    """A served family as a client needs it: where to send, what latents it takes, the scaling to send with a pipeline's
    latents."""
    family, layout = slot.family, slot.family.layout
    return {
        "path": path,
        "status": slot.status,
        **({"error": slot.error} if slot.error else {}),
        "operations": list(family.operations),
        "video": family.is_video,
        "kind": family.kind,  # image, video or audio
        # An audio family's sound: sampling_rate (Hz), channels, hop_length (samples per latent step)
        **({"audio": {k: v for k, v in asdict(family.audio).items() if v is not None}} if family.audio else {}),
        "description": family.description,
        "weights": slot.service.vae.source if slot.service else family.hub_id,
        "latents": layout.describe(),
        "latent_channels": layout.pipeline_channels,
        "spatial_compression": family.spatial_compression,
        "temporal_compression": family.temporal_compression,
        "pixel_channels": family.pixel_channels,  # 3 (RGB) or 4 (RGBA images in and out)
        # The family that decodes this one's sound in the same request (audio_latents), where it has one and it serves
        **(
            {"sound": family.sound, "sound_served": slot.service.sound is not None}
            if family.sound and slot.service
            else {}
        ),
        "packed": layout.packing != Packing.NONE,
        "scaling": family.client_scaling(),
        "comfyui": family.comfyui_parameters(),  # what a ComfyUI LATENT needs sent (families.py, `comfyui`)
        "pipelines": list(family.pipelines),
        "hub_repos": [family.hub_repo, *family.hub_repos],
        # Once loaded: the model's class, config and normalisation buffers, for a drop-in VAE in a pipeline
        **({"model": slot.service.vae.description} if slot.service else {}),
        # Whether tiling=exact is there to ask for (known once loaded: it is the model's)
        "exact_tiling": slot.service.vae.exact_tiling if slot.service else None,
    }


def family_routes(prefix: str, slot: Slot, pipeline: PostPipeline) -> list[Route]:
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
            return await pipeline.serve(request, slot.service, operation)

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


def create_app(registry: Registry, options: Settings | None = None, connections: ConnectionStats | None = None):
    """The ASGI app: request log and metrics outermost, then CORS, then the API key check, then the routes.

    CORS sits outside the key check so that browsers' preflight requests (which carry no key)
    are answered, and a 401 still reaches the page readably. `connections` are the server's
    connection counters (connections.py), for /metrics; None where the app runs behind another server.
    """
    options = options or Settings()
    queue = WorkQueue(options.queue)
    memory = MemoryBudget(options.memory_budget or auto_budget(), retry_after=queue.retry_after)
    memory.when_idle(release_free_memory)
    metrics = Metrics(queue, registry.vaes, memory, connections)
    pipeline = PostPipeline(queue, memory, metrics, options)
    slots = list(registry.slots.values())
    routes = status_routes(slots, metrics)
    if len(slots) == 1:
        routes += family_routes("", slots[0], pipeline)
    for slot in slots:
        routes += family_routes(f"/{slot.family.name}", slot, pipeline)
    routes += api_description_routes(routes, {slot.family.name: slot.family for slot in slots}, bool(options.api_keys))
    app = Starlette(routes=routes, exception_handlers=error_handlers(slots))
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


def status_routes(slots: list[Slot], metrics: Metrics) -> list[Route]:
    """/metrics, /families, and with several families the index's health at / and /health (one family's are its own
    routes')."""

    async def metrics_endpoint(request: Request) -> Response:
        request.state.operation = "metrics"
        return Response(metrics.render(), media_type=metrics.content_type)

    async def families_endpoint(request: Request) -> Response:
        request.state.operation = "families"
        prefix = "" if len(slots) == 1 else "{}/"
        documents = {slot.family.name: family_document(slot, prefix.format(slot.family.name)) for slot in slots}
        return JSONResponse({"families": documents})

    async def index(request: Request) -> Response:
        request.state.operation = "health"
        families = {
            slot.family.name: {
                "path": f"/{slot.family.name}/",
                "status": slot.status,
                "operations": list(slot.family.operations),
            }
            | ({"error": slot.error} if slot.error else {})
            for slot in slots
        }
        return health_reply(health_status(slots), families)

    routes = [
        Route("/metrics", metrics_endpoint, methods=["GET"], name="metrics"),
        Route("/families", families_endpoint, methods=["GET"], name="families"),
    ]
    if len(slots) > 1:
        routes += [
            Route("/", index, methods=["GET"], name="health"),
            Route("/health", index, methods=["GET"], name="health"),
        ]
    return routes


def error_handlers(slots: list[Slot]) -> dict:
    """404 and 405 that say which routes there are, and a 500 that hides what went wrong (it is in the log)."""
    if len(slots) == 1:
        routes_hint = "POST / (or /predict, /decode, /encode)"
    else:
        routes_hint = "POST /<family>/ for " + ", ".join(f"/{slot.family.name}/" for slot in slots)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        messages = {
            404: f"no route {request.method} {request.url.path}; this server answers {routes_hint}",
            405: f"{request.method} is not allowed on {request.url.path}; this server answers {routes_hint}",
        }
        return json_error(exc.status_code, messages.get(exc.status_code, exc.detail), getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error", exc_info=exc)
        return json_error(500, "internal error while processing the request; see the server log")

    return {HTTPException: http_error, Exception: server_error}
