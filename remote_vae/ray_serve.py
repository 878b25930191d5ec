"""remote-vae on Ray Serve: each family a Serve application of its own replicas, behind Ray's HTTP proxy.

A family's replica runs the same ASGI app as `remote-vae serve FAMILY` (server.create_app:
wire, limits, API keys, the bounded queue, dynamic batching, metrics, /docs), built from
the same options, so the protocol, the routes and the errors are one implementation.
Ray adds what one process cannot: replicas on many machines and GPUs (fractional
`num_gpus` lets small VAEs share one), autoscaling on ongoing requests, restarts of
replicas that die, and one HTTP entry point that routes `/<family>/...` to the family's
replicas. The index application at `/` answers `GET /`, `/health` and `/families` for
all of them, as the multi-family server does.

In a Serve config file (deploy/ray/serve.yaml):

    applications:
      - name: sd15
        route_prefix: /sd15
        import_path: remote_vae.ray_serve:family_app
        args: {family: sd15, options: ["--max-batch-images", "8"]}   # any `remote-vae serve` option
        deployments:
          - name: sd15
            autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 2}
            ray_actor_options: {num_gpus: 0.5}
      - name: index
        route_prefix: /
        import_path: remote_vae.ray_serve:index_app
        args: {families: [sd15]}

Batching stays the project's own (server/batching.py) inside each replica, not Ray's
`@serve.batch`: it groups requests by family, operation and shape under a pixel budget
and keeps every request's exact answer; `@serve.batch` batches by count alone.
Ray is an optional dependency (`pip install 'remote-vae[ray]'`); nothing else imports this module.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import families
from .families import FamilyError
from .settings import Settings, read_settings

# In a replica's own process: the registry its app serves, for the index's questions (set by the ingress builder).
_registry = None


def parse_options(family: str, options: list[str]) -> Settings:
    """`remote-vae serve FAMILY OPTIONS...` read as the command line would (REMOTE_VAE_* variables included)."""
    return read_settings([family, *options])


def replica_app(family: str, options: list[str]):
    """The ASGI app one replica serves: the family loaded (before the replica answers), behind server.create_app."""
    global _registry
    from . import launch
    from .server import create_app

    settings = parse_options(family, options)
    registry, load = launch.plan(settings)
    for slot in registry.slots.values():
        slot.service = load(slot.family)
    _registry = registry
    return create_app(registry, settings)


class FamilyReplica:
    """A replica's Ray-side methods, beside its HTTP app: what the index asks it."""

    def document(self) -> dict:
        from .server import family_document

        slot = next(iter(_registry.slots.values()))
        return family_document(slot, f"{slot.family.name}/")


def family_app(args: dict[str, Any]) -> Application:
    """A Serve application for one family; args: family, options (serve options), and optionally deployment (Ray
    options)."""
    from . import launch

    name, options = args["family"], list(args.get("options", []))
    launch.plan(
        parse_options(name, options)
    )  # refuses bad options and unknown families now, on the driver, not in every replica
    ingress = serve.ingress(lambda: replica_app(name, options))(FamilyReplica)
    return serve.deployment(name=name, **args.get("deployment", {}))(ingress).bind()


class _Index:
    """The index deployment's class: its HTTP app is all it has."""


def index_app(args: dict[str, Any]) -> Application:
    """GET /, /health and /families for the family applications named in args["families"] (each at /<family>)."""
    names = [families.load_family(name).name for name in args["families"]]
    if not names:
        raise FamilyError("index_app needs the families it indexes")

    from .server import health_reply

    def build() -> Starlette:
        async def documents() -> dict[str, dict]:
            found = {}
            for name in names:
                try:
                    found[name] = await serve.get_app_handle(name).document.remote()
                except Exception as exc:  # not deployed yet, or no replica alive: reported, not raised
                    found[name] = {"path": f"{name}/", "status": "loading", "error": type(exc).__name__}
            return found

        async def health(request: Request) -> JSONResponse:
            found = await documents()
            ready = all(document["status"] == "ready" for document in found.values())
            families = {
                name: {"path": f"/{name}/", "status": document["status"], "operations": document.get("operations", [])}
                for name, document in found.items()
            }
            return health_reply("ok" if ready else "loading", families)

        async def described(request: Request) -> JSONResponse:
            return JSONResponse({"families": await documents()})

        return Starlette(routes=[Route("/", health), Route("/health", health), Route("/families", described)])

    return serve.deployment(name="index", **args.get("deployment", {}))(serve.ingress(build)(_Index)).bind()
