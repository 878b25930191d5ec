"""Starting the server: the services the settings (settings.py) describe, and uvicorn.

The command line (cli.py) imports this only for `serve` and `download`, so its other
commands and --help answer without loading torch.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import uvicorn

from . import families
from .audio_service import AudioService
from .decoders import guard_decompression_bombs
from .device import BatchBudget, DevicePath
from .families import Family, FamilyError
from .memory import limit_heaps
from .server import Registry, Slot, create_app, load_in_background
from .server.connections import ConnectionStats, connection_limit, limit_log_floods, protocol_class
from .service import VaeService
from .settings import Settings, warmup_sizes_for
from .vae import default_source, download_weights, load_vae, network_failure, resolve_device, resolve_dtype, unsupported

log = logging.getLogger("remote_vae")


def load_service(family: Family, source: str, settings: Settings) -> VaeService:
    """A family's service as the settings (flags or their environment variables) describe it."""
    model = settings.model
    device = resolve_device(model.device)
    limits = settings.limits_for(device.type)
    guard_decompression_bombs(max(limits.max_pixels, limits.max_video_pixels))
    limit_heaps()  # handler.py and the Ray deployment start here, not in serve()
    dtype = resolve_dtype(model.dtype, family, device)
    path = DevicePath.default(device, compile=model.compile, channels_last=model.channels_last)
    # Compiled, a batch of one and a batch of several are two graphs: warm both when requests may be batched.
    batches = (1, 2) if model.compile and settings.batching.max_images_per_call > 1 else (1,)
    vae = load_vae(
        family,
        source,
        device,
        dtype,
        random_weights=model.random_weights,
        tile_above_pixels=model.tile_above_pixels,
        path=path,
        budget=BatchBudget(pixels=model.batch_pixel_budget),
        warmup_sizes=warmup_sizes_for(family, model.warmup_sizes),
        warmup_batches=batches,
        band_pixels=model.tile_band_pixels,
        store_bytes=model.tile_store_bytes,
    )
    service = AudioService if family.is_audio else VaeService
    return service(vae, limits, png_compression=settings.png_compression)


def plan(settings: Settings) -> tuple[Registry, Callable[[Family], VaeService]]:
    """What `serve` serves, checked before anything loads: the families' slots, and how a family loads.

    `serve` loads in the background behind uvicorn; a Ray Serve replica (ray_serve.py) loads before it answers.
    """
    served = settings.served
    loaded = served.families
    # A family the installed diffusers cannot build is unavailable, by name, from the start; the others still serve.
    registry = Registry(
        {
            family.name: Slot(family, error=why, unavailable=True) if (why := unsupported(family)) else Slot(family)
            for family in loaded
        }
    )
    if all(slot.unavailable for slot in registry.slots.values()):
        raise FamilyError("; ".join(slot.error for slot in registry.slots.values()))
    for slot in registry.slots.values():
        if slot.unavailable:
            log.error("cannot serve %s: %s", slot.family.name, slot.error)
    model_dirs = [os.environ.get("HF_MODEL_DIR"), settings.weights_dir]

    def load(family: Family) -> VaeService:
        source = served.sources.get(family.name) or default_source(family, model_dirs, several=served.named > 1)
        return load_service(family, source, settings)

    return registry, load


def serve(settings: Settings) -> int:
    limit_heaps()  # before any of the server's threads makes a heap of its own
    registry, load = plan(settings)
    options = settings
    limit_log_floods()
    stats = ConnectionStats(options.connections, limit=connection_limit(options.connections))
    config = uvicorn.Config(
        create_app(registry, options, stats),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # observability.RequestLog writes one line per request, with its id
        # h11 (connections.py's protocol is uvicorn's h11 one with the connection rules) and asyncio, whatever else is
        # installed (Ray brings httptools and uvloop): what h11 cannot parse is answered in JSON there too.
        http=protocol_class(stats),
        loop="asyncio",
        timeout_keep_alive=options.connections.idle_timeout,
        timeout_graceful_shutdown=settings.graceful_timeout,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )
    server = uvicorn.Server(config)
    log.info(
        "API key %s; %s",
        "required on POST" if options.api_keys else "not required",
        "HTTPS" if settings.ssl_certfile else "plain HTTP",
    )
    if not options.api_keys and not is_loopback(settings.host):
        log.warning(
            "serving on %s without an API key: anyone who can reach this address can run work on this machine; "
            "set --api-key (or REMOTE_VAE_API_KEY), or listen on 127.0.0.1 behind your own gateway",
            settings.host,
        )

    def on_failure(message: str) -> None:
        server.should_exit = True

    load_in_background(registry, load, on_failure)
    # uvicorn re-raises the SIGTERM / SIGINT that stopped it, once its graceful shutdown is done, to the handlers in
    # place before it ran: these let that clean shutdown end the process with 0, which orchestrators do not read as
    # a crash (the default handler's 143 they do).
    previous = {signum: signal.signal(signum, _after_graceful_shutdown) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    failed = [slot for slot in registry.slots.values() if slot.status == "failed"]
    return 1 if failed else 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost
        return False


def download(names: list[str], target: Path) -> int:
    """Bake weights: each family's VAE files into target/<family>/."""
    for family in [families.load_family(name) for name in names]:
        try:
            print(download_weights(family, target / family.name))
        except OSError as exc:  # the Hub's HTTP errors and cache misses are OSErrors
            unreachable = network_failure(exc)
            why = (
                f"the Hugging Face Hub could not be reached ({type(unreachable).__name__}: {unreachable})"
                if unreachable
                else str(exc)
            )
            print(f"error: cannot download {family.name}'s weights from {family.hub_id}: {why}", file=sys.stderr)
            return 1
    return 0


def _after_graceful_shutdown(signum: int, frame) -> None:
    log.info("stopped by signal %d after a graceful shutdown", signum)
