"""Starting the server: `remote-vae serve`'s options, the services they describe, and uvicorn.

The command line (cli.py) imports this only for `serve` and `download`, so its other
commands and --help answer without loading torch.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import uvicorn

from . import families
from .admission import QueueSettings
from .auth import ApiKeyError, load_api_keys
from .batching import BatchSettings
from .connections import ConnectionSettings, ConnectionStats, connection_limit, limit_log_floods, protocol_class
from .cli import ENV_PREFIX, SettingsError, byte_budget, default_port, env, env_flag, model_sources, pixel_budget, tile_threshold, warmup_size, warmup_sizes_for
from .device import BatchBudget, DevicePath
from .families import Family, FamilyError
from .decoders import DEFAULT_DECODE_CPU_SECONDS, guard_decompression_bombs
from .media import PNG_COMPRESSION
from .memory import auto_budget, size_text
from .server import BODY_COST, JSON_BODY_COST, Registry, ServeOptions, Slot, create_app, load_in_background
from .service import GPU_MAX_PIXELS, Limits, VaeService
from .vae import default_source, download_weights, load_vae, network_failure, resolve_device, resolve_dtype, unsupported

log = logging.getLogger("remote_vae")


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """`serve`'s options; each has a REMOTE_VAE_* environment variable, so a container is configured by its environment alone."""
    serve.add_argument("families", nargs="*", metavar="FAMILY", help=f"a name in configs/ ({', '.join(families.available())}) or a config file path [env {ENV_PREFIX}FAMILIES, space-separated]")
    serve.add_argument("--model", action="append", default=None, metavar="[FAMILY=]PATH_OR_HUB_ID", help="weights: a diffusers model directory or a Hub id org/name[/subfolder]; FAMILY= picks the family when serving several [env REMOTE_VAE_MODEL, space-separated]")
    serve.add_argument("--weights-dir", default=env("WEIGHTS_DIR"), metavar="DIR", help="weights baked into an image: DIR/<family>/ (see `download`); used when --model is not given and HF_MODEL_DIR holds none [env REMOTE_VAE_WEIGHTS_DIR]")
    serve.add_argument("--host", default=env("HOST", "0.0.0.0"), help="address to listen on [env REMOTE_VAE_HOST] (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=default_port(), help="port [env REMOTE_VAE_PORT or PORT] (default 8000)")
    serve.add_argument("--device", default=env("DEVICE", "auto"), help="auto, cuda, cuda:N or cpu [env REMOTE_VAE_DEVICE] (default auto)")
    serve.add_argument("--dtype", default=env("DTYPE", "auto"), choices=["auto", "float16", "bfloat16", "float32"], help="compute dtype; auto = the family's GPU dtype on CUDA, float32 on CPU [env REMOTE_VAE_DTYPE]")
    serve.add_argument("--random-weights", action="store_true", default=env_flag("RANDOM_WEIGHTS"), help="build the architecture with seeded random weights, no download (for trying it out) [env REMOTE_VAE_RANDOM_WEIGHTS=1]")
    serve.add_argument("--max-body-bytes", type=int, default=int(env("MAX_BODY_BYTES", Limits.max_body_bytes)), help=f"largest request body; larger gets 413 [env REMOTE_VAE_MAX_BODY_BYTES] (default {Limits.max_body_bytes})")
    serve.add_argument("--max-pixels", type=pixel_budget, default=pixel_budget(env("MAX_PIXELS", "auto")), metavar="N|auto", help=f"most pixels (over the batch) a decode returns or an encode takes; more gets 413 at once [env REMOTE_VAE_MAX_PIXELS] (default auto: {GPU_MAX_PIXELS} = 8192x8192 on a GPU, {Limits.max_pixels} on CPU)")
    serve.add_argument("--max-video-pixels", type=int, default=int(env("MAX_VIDEO_PIXELS", Limits.max_video_pixels)), help=f"the same for videos, counting every frame; more gets 413 [env REMOTE_VAE_MAX_VIDEO_PIXELS] (default {Limits.max_video_pixels}, room for 129 frames of 1280x720)")
    serve.add_argument("--max-batch", type=int, default=int(env("MAX_BATCH", Limits.max_batch)), help=f"most images or videos in one request; more gets 413 [env REMOTE_VAE_MAX_BATCH] (default {Limits.max_batch})")
    serve.add_argument("--max-queue", type=int, default=int(env("MAX_QUEUE", QueueSettings.max_waiting)), help=f"requests held beyond the one on the device, from when their body has been read until their reply is rendered; more get 503 with Retry-After, before anything is parsed or decoded [env REMOTE_VAE_MAX_QUEUE] (default {QueueSettings.max_waiting})")
    serve.add_argument("--queue-timeout", type=float, default=float(env("QUEUE_TIMEOUT", QueueSettings.wait_timeout)), help=f"seconds a request may wait for the device; longer gets 503 [env REMOTE_VAE_QUEUE_TIMEOUT] (default {QueueSettings.wait_timeout:g})")
    serve.add_argument("--body-timeout", type=float, default=float(env("BODY_TIMEOUT", ServeOptions.body_timeout)), help=f"seconds to receive a request body; slower gets 408 [env REMOTE_VAE_BODY_TIMEOUT] (default {ServeOptions.body_timeout:g})")
    connections = ConnectionSettings()
    serve.add_argument("--min-transfer-rate", type=int, default=int(env("MIN_TRANSFER_RATE", connections.min_rate)), metavar="BYTES_PER_S", help=f"a body must arrive, and a reply drain, at least this fast after the first --header-timeout seconds: a slower body gets 408, a slower reply is cut; 0 turns it off [env REMOTE_VAE_MIN_TRANSFER_RATE] (default {connections.min_rate})")
    serve.add_argument("--header-timeout", type=float, default=float(env("HEADER_TIMEOUT", connections.header_timeout)), metavar="S", help=f"seconds a connection has to send a request's head, after opening or after its last reply; then 408 and closed [env REMOTE_VAE_HEADER_TIMEOUT] (default {connections.header_timeout:g})")
    serve.add_argument("--idle-timeout", type=float, default=float(env("IDLE_TIMEOUT", connections.idle_timeout)), metavar="S", help=f"seconds an idle keep-alive connection stays open [env REMOTE_VAE_IDLE_TIMEOUT] (default {connections.idle_timeout:g})")
    serve.add_argument("--max-connections", type=int, default=int(env("MAX_CONNECTIONS", connections.max_connections)), metavar="N", help=f"open connections at once; past it the one idle longest is closed, or with none idle the new one gets 503 (lowered to fit the open-file limit) [env REMOTE_VAE_MAX_CONNECTIONS] (default {connections.max_connections})")
    serve.add_argument("--memory-budget", type=byte_budget, default=byte_budget(env("MEMORY_BUDGET", "auto")), metavar="BYTES|auto", help="host memory the requests in flight may hold at once (bodies, decoded pixels and frames, replies not yet sent), reserved before it is allocated; more waits, then gets 503 [env REMOTE_VAE_MEMORY_BUDGET] (default auto: 40%% of the machine's or the container's memory, at least 512 MiB)")
    serve.add_argument("--decode-cpu-seconds", type=float, default=float(env("DECODE_CPU_SECONDS", DEFAULT_DECODE_CPU_SECONDS)), metavar="S", help=f"most CPU one image or video file may take to decode (each gets 1 s plus 250 ns a pixel, up to this); more gets 413 [env REMOTE_VAE_DECODE_CPU_SECONDS] (default {DEFAULT_DECODE_CPU_SECONDS:g})")
    serve.add_argument("--api-key", default=env("API_KEY"), help="require 'Authorization: Bearer KEY' on every POST (health and /metrics stay open) [env REMOTE_VAE_API_KEY]")
    serve.add_argument("--api-key-file", default=env("API_KEY_FILE"), help="the same with keys read from a file, one per line (several for rotation) [env REMOTE_VAE_API_KEY_FILE]")
    serve.add_argument("--cors-origins", nargs="*", default=env("CORS_ORIGINS", "").split(), metavar="ORIGIN", help="let web pages on these origins call the API from a browser (e.g. https://app.example.com, or * for any) [env REMOTE_VAE_CORS_ORIGINS, space-separated]")
    serve.add_argument("--ssl-certfile", default=env("SSL_CERTFILE"), help="serve HTTPS with this PEM certificate (chain) [env REMOTE_VAE_SSL_CERTFILE]")
    serve.add_argument("--ssl-keyfile", default=env("SSL_KEYFILE"), help="the certificate's PEM private key [env REMOTE_VAE_SSL_KEYFILE]")
    serve.add_argument("--graceful-timeout", type=float, default=float(env("GRACEFUL_TIMEOUT", 30)), help="on SIGTERM, stop accepting and give in-flight requests this many seconds to finish, then exit 0 [env REMOTE_VAE_GRACEFUL_TIMEOUT] (default 30)")
    serve.add_argument("--max-batch-images", type=int, default=int(env("MAX_BATCH_IMAGES", BatchSettings.max_images)), metavar="N", help=f"coalesce concurrent requests of the same shape into one model call of up to N images or videos; 1 turns batching off [env REMOTE_VAE_MAX_BATCH_IMAGES] (default {BatchSettings.max_images})")
    serve.add_argument("--batch-wait-ms", type=float, default=float(env("BATCH_WAIT_MS", BatchSettings.wait * 1000)), metavar="MS", help=f"longest a request waits for others to join its model call, and only while more are arriving [env REMOTE_VAE_BATCH_WAIT_MS] (default {BatchSettings.wait * 1000:g})")
    serve.add_argument("--batch-pixel-budget", type=pixel_budget, default=pixel_budget(env("BATCH_PIXEL_BUDGET", "auto")), metavar="N|auto", help="pixels (batch x frames x height x width) one model call may take whole; a larger batch runs one sample at a time. auto: on CUDA what fits the free memory, on CPU 65536 (measured) [env REMOTE_VAE_BATCH_PIXEL_BUDGET]")
    serve.add_argument("--png-compression", type=int, choices=range(10), default=int(env("PNG_COMPRESSION", PNG_COMPRESSION)), metavar="0-9", help=f"zlib level of PNG replies unless a request sends png_compression; the pixels are the same at every level [env REMOTE_VAE_PNG_COMPRESSION] (default {PNG_COMPRESSION}: 3.3-4.6x faster than Pillow's 6 on photos for 7-10%% more bytes)")
    serve.add_argument("--compile", action="store_true", default=env_flag("COMPILE"), help="torch.compile the encoder and decoder; the --warmup-sizes are compiled at start-up, other sizes run eagerly [env REMOTE_VAE_COMPILE=1]")
    serve.add_argument("--warmup-sizes", nargs="*", type=warmup_size, default=[warmup_size(size) for size in env("WARMUP_SIZES", "").split()], metavar="WxH[xF]", help="sizes in pixels (and frames, for video families) to run once at start-up, before serving: compiles them with --compile, tunes cuDNN on CUDA [env REMOTE_VAE_WARMUP_SIZES, space-separated]")
    serve.add_argument("--channels-last", choices=["auto", "on", "off"], default=env("CHANNELS_LAST", "auto"), help="run convolutions in channels-last layout; auto = on for CUDA, off for the CPU (see docs/benchmarks.md) [env REMOTE_VAE_CHANNELS_LAST]")
    serve.add_argument("--tile-store-bytes", type=byte_budget, default=byte_budget(env("TILE_STORE_BYTES", "auto")), metavar="N|auto", help="host memory what one cut of the exact tiled path holds whole (an activation and the residuals across it) may take; past it, bands are recomputed instead, so memory stays flat as images grow, for time (default auto: 268435456; on a GPU activations stay on the device while they fit) [env REMOTE_VAE_TILE_STORE_BYTES]")
    serve.add_argument("--tile-band-pixels", type=pixel_budget, default=pixel_budget(env("TILE_BAND_PIXELS", "auto")), metavar="N|auto", help="output pixels per band of the exact tiled path, the device's work per step (default auto: 1048576 on a GPU, 65536 on CPU) [env REMOTE_VAE_TILE_BAND_PIXELS]")
    serve.add_argument("--tile-above-pixels", type=tile_threshold, default=tile_threshold(env("TILE_ABOVE_PIXELS", "family")), metavar="N|family|never", help="decode/encode in tiles when an image or frame has more than N pixels (0 = always); 'family' keeps each family's own setting (video: on above 512x512 / 1280x720, images: never) [env REMOTE_VAE_TILE_ABOVE_PIXELS]")
    serve.add_argument("--log-level", default=env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"], help="[env REMOTE_VAE_LOG_LEVEL]")


def limits_from(args: argparse.Namespace, device_type: str) -> Limits:
    """The request limits; --max-pixels auto takes 8192x8192 on a GPU, where the exact tiled path keeps such an image within memory."""
    max_pixels = args.max_pixels or (GPU_MAX_PIXELS if device_type == "cuda" else Limits.max_pixels)
    return Limits(max_body_bytes=args.max_body_bytes, max_pixels=max_pixels, max_video_pixels=args.max_video_pixels, max_batch=args.max_batch,
                  decode_cpu_seconds=args.decode_cpu_seconds)


def serve_options(args: argparse.Namespace) -> ServeOptions:
    for name in ("max_body_bytes", "max_video_pixels", "max_batch"):
        if getattr(args, name) < 1:
            raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_batch_images < 1 or not 0 <= args.batch_wait_ms <= 10_000:
        raise SettingsError("--max-batch-images must be at least 1 and --batch-wait-ms from 0 to 10000")
    if args.max_queue < 0 or args.queue_timeout <= 0 or args.body_timeout <= 0 or args.graceful_timeout < 0:
        raise SettingsError("--max-queue and --graceful-timeout must be 0 or more, --queue-timeout and --body-timeout above 0")
    if args.min_transfer_rate < 0 or args.header_timeout <= 0 or args.idle_timeout <= 0 or args.max_connections < 1 or args.decode_cpu_seconds <= 0:
        raise SettingsError("--min-transfer-rate must be 0 or more, --header-timeout, --idle-timeout and --decode-cpu-seconds above 0, "
                            "--max-connections at least 1")
    budget = args.memory_budget or auto_budget()
    largest = max(BODY_COST * args.max_body_bytes, JSON_BODY_COST * Limits(max_body_bytes=args.max_body_bytes).max_json_bytes)
    if budget < largest:
        raise SettingsError(f"--memory-budget ({size_text(budget)}) must hold the largest body a request may send: {size_text(largest)} "
                            f"({BODY_COST} x --max-body-bytes, as it is read and joined); raise it or lower --max-body-bytes")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise SettingsError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
    for path in filter(None, (args.ssl_certfile, args.ssl_keyfile)):
        if not os.path.isfile(path):
            raise SettingsError(f"{path} is not a file")
    try:
        keys = load_api_keys(args.api_key, args.api_key_file)
    except ApiKeyError as exc:
        raise SettingsError(str(exc)) from None
    queue = QueueSettings(max_waiting=args.max_queue, wait_timeout=args.queue_timeout)
    batching = BatchSettings(max_images=args.max_batch_images, wait=args.batch_wait_ms / 1000)
    connections = ConnectionSettings(max_connections=args.max_connections, header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                                     min_rate=args.min_transfer_rate)
    return ServeOptions(queue=queue, batching=batching, body_timeout=args.body_timeout, api_keys=keys, cors_origins=tuple(args.cors_origins),
                        memory_budget=budget, connections=connections)


def load_service(family: Family, source: str, args: argparse.Namespace) -> VaeService:
    """A family's service as the serve options (flags or their environment variables) describe it."""
    device = resolve_device(args.device)
    limits = limits_from(args, device.type)
    guard_decompression_bombs(max(limits.max_pixels, limits.max_video_pixels))
    dtype = resolve_dtype(args.dtype, family, device)
    path = DevicePath.default(device, compile=args.compile, channels_last=args.channels_last)
    # Compiled, a batch of one and a batch of several are two graphs: warm both when requests may be batched.
    batches = (1, 2) if args.compile and args.max_batch_images > 1 else (1,)
    vae = load_vae(family, source, device, dtype, random_weights=args.random_weights, tile_above_pixels=args.tile_above_pixels,
                   path=path, budget=BatchBudget(pixels=args.batch_pixel_budget), warmup_sizes=warmup_sizes_for(family, args.warmup_sizes),
                   warmup_batches=batches, band_pixels=args.tile_band_pixels,
                   store_bytes=args.tile_store_bytes)
    return VaeService(vae, limits, png_compression=args.png_compression)


def plan(args: argparse.Namespace) -> tuple[Registry, ServeOptions, Callable[[Family], VaeService]]:
    """What `serve` serves, checked before anything loads: the families' slots, the HTTP options, and how a family loads.

    `serve` loads in the background behind uvicorn; a Ray Serve replica (ray_serve.py) loads before it answers.
    """
    names = args.families or env("FAMILIES", "").split()
    if not names:
        raise FamilyError(f"name at least one family to serve: {', '.join(families.available())}")
    loaded: list[Family] = [families.load_family(name) for name in names]
    if len({family.name for family in loaded}) != len(loaded):
        raise FamilyError(f"a family is named twice in {names}")
    specs = args.model if args.model is not None else env("MODEL", "").split()
    sources = model_sources([family.name for family in loaded], specs)
    # A family the installed diffusers cannot build is unavailable, by name, from the start; the others still serve.
    registry = Registry({family.name: Slot(family, error=why, unavailable=True) if (why := unsupported(family)) else Slot(family)
                         for family in loaded})
    if all(slot.unavailable for slot in registry.slots.values()):
        raise FamilyError("; ".join(slot.error for slot in registry.slots.values()))
    for slot in registry.slots.values():
        if slot.unavailable:
            log.error("cannot serve %s: %s", slot.family.name, slot.error)
    options = serve_options(args)
    for family in loaded:
        warmup_sizes_for(family, args.warmup_sizes)  # refused now, not after the first model has loaded

    model_dirs = [os.environ.get("HF_MODEL_DIR"), args.weights_dir]

    def load(family: Family) -> VaeService:
        source = sources.get(family.name) or default_source(family, model_dirs, several=len(loaded) > 1)
        return load_service(family, source, args)

    return registry, options, load


def serve(args: argparse.Namespace) -> int:
    registry, options, load = plan(args)
    limit_log_floods()
    stats = ConnectionStats(options.connections, limit=connection_limit(options.connections))
    config = uvicorn.Config(
        create_app(registry, options, stats), host=args.host, port=args.port, log_level=args.log_level,
        access_log=False,  # observability.RequestLog writes one line per request, with its id
        # h11 (connections.py's protocol is uvicorn's h11 one with the connection rules) and asyncio, whatever else is
        # installed (Ray brings httptools and uvloop): what h11 cannot parse is answered in JSON there too.
        http=protocol_class(stats), loop="asyncio", timeout_keep_alive=options.connections.idle_timeout,
        timeout_graceful_shutdown=args.graceful_timeout, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
    )
    server = GracefulServer(config)
    log.info("API key %s; %s", "required on POST" if options.api_keys else "not required", "HTTPS" if args.ssl_certfile else "plain HTTP")
    if not options.api_keys and not is_loopback(args.host):
        log.warning("serving on %s without an API key: anyone who can reach this address can run work on this machine; "
                    "set --api-key (or REMOTE_VAE_API_KEY), or listen on 127.0.0.1 behind your own gateway", args.host)

    def on_failure(message: str) -> None:
        server.should_exit = True

    load_in_background(registry, load, on_failure)
    server.run()
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
            why = f"the Hugging Face Hub could not be reached ({type(unreachable).__name__}: {unreachable})" if unreachable else str(exc)
            print(f"error: cannot download {family.name}'s weights from {family.hub_id}: {why}", file=sys.stderr)
            return 1
    return 0


class GracefulServer(uvicorn.Server):
    """uvicorn, but a SIGTERM / SIGINT that shut the server down cleanly ends the process with 0.

    uvicorn re-raises the signal after its graceful shutdown, which makes the exit status 143;
    orchestrators read that as a crash.
    """

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()
