"""The settings themselves: one frozen `Settings`, a group per stage, each default defined here once, and the checks
of values that must fit together."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from ..errors import RequestError
from ..families import Family, FamilyError, available, load_family
from ..latents import check_frame_count, check_sides
from .api_keys import ApiKeyError, load_api_keys

ENV_PREFIX = "REMOTE_VAE_"


class SettingsError(ValueError):
    """Serve options that do not fit together; reported, then exit 2."""


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def env_flag(name: str) -> bool:
    return str(env(name, "")).strip().lower() in ("1", "true", "yes", "on")


# -- each stage's settings; their defaults are defined here and nowhere else ------------------------------------

# --max-pixels on a GPU by default: one 8192x8192 image, which the exact tiled path decodes within memory.
GPU_MAX_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more gets 413 before any work (service.py, latents/)."""

    max_body_bytes: int = 256 * 1024 * 1024
    # Pixels over the whole batch, of a decode's output or an encode's input (on CPU; a GPU's is GPU_MAX_PIXELS).
    max_pixels: int = 4 * 2048 * 2048
    # The same over every frame of a video batch: 2^27 holds 129 frames of 1280x720.
    max_video_pixels: int = 1 << 27
    # Images or videos in one request.
    max_images_per_request: int = 64
    # CPU seconds any one image or video file may take to decode (each gets 1 s plus 250 ns a pixel, up to this).
    decode_cpu_seconds: float = 10.0

    @property
    def max_json_bytes(self) -> int:
        """A JSON body carries parameters and one base64 payload, and parsing it holds the GIL: an eighth of the body
        limit (32 MiB by default, 24 MiB of payload: any latent or image file a JSON client sends), at least 1 MiB."""
        return min(self.max_body_bytes, max(1 << 20, self.max_body_bytes // 8))


@dataclass(frozen=True)
class QueueSettings:
    """The bounded queue in front of the device (server/admission.py)."""

    max_waiting: int = 32  # admitted requests beyond the one on the device: decoding, waiting or rendering
    wait_timeout: float = 120.0  # seconds a request may wait for the device


@dataclass(frozen=True)
class BatchSettings:
    """Coalescing concurrent requests into one model call (server/batching.py)."""

    max_images_per_call: int = 8  # images or videos per model call; 1 turns batching off
    wait: float = 0.002  # seconds the oldest job may wait for more to join


@dataclass(frozen=True)
class ConnectionSettings:
    """The rules every connection lives by (server/connections.py)."""

    max_connections: int = 1000
    header_timeout: float = 10.0  # seconds for a request's head to arrive
    idle_timeout: float = 5.0  # seconds a keep-alive connection may sit idle (uvicorn's timeout_keep_alive)
    min_rate: int = 32 * 1024  # bytes a second a body must arrive at and a reply drain at; 0: no minimum

    @property
    def rate_grace(self) -> float:
        """Seconds before the rate applies, to a body from its start and to a reply from each stall: a body or a
        reply gets as long to get going as a request's head."""
        return self.header_timeout


@dataclass(frozen=True)
class ModelSettings:
    """How a family's model is loaded and run (vae/)."""

    device: str = "auto"
    dtype: str = "auto"
    random_weights: bool = False
    compile: bool = False
    warmup_sizes: tuple[tuple[int, ...], ...] = ()
    channels_last: str = "auto"
    tile_store_bytes: int | None = None  # None: vae.DEFAULT_STORE_BYTES
    tile_band_pixels: int | None = None  # None: by device
    tile_above_pixels: int | None | str = "family"  # "family": the config's; None: never
    batch_pixel_budget: int | None = None  # None: from the device


@dataclass(frozen=True)
class Settings:
    """Everything `remote-vae serve` was told, checked (`Settings.parse`)."""

    families: tuple[str, ...] = ()
    models: tuple[str, ...] = ()  # --model values: [FAMILY=]SOURCE
    weights_dir: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "info"
    graceful_timeout: float = 30.0
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    api_key: str | None = None
    api_key_file: str | None = None
    api_keys: tuple[str, ...] = ()  # read from the two above by parse(); none: no key needed
    cors_origins: tuple[str, ...] = ()  # web pages on these origins may call the API from a browser; none: no CORS
    body_timeout: float = 120.0  # seconds to receive a whole body; slower gets 408
    memory_budget: int | None = None  # host bytes the requests in flight may hold at once (memory.py); None: auto
    max_pixels: int | None = None  # None: Limits' on CPU, GPU_MAX_PIXELS on a GPU
    png_compression: int = 1  # zlib level of PNG replies; 1 is 3.3-4.6x faster than Pillow's 6 for 7-10% more bytes
    limits: Limits = field(default_factory=Limits)
    queue: QueueSettings = field(default_factory=QueueSettings)
    batching: BatchSettings = field(default_factory=BatchSettings)
    connections: ConnectionSettings = field(default_factory=ConnectionSettings)  # min_rate applies to bodies too
    model: ModelSettings = field(default_factory=ModelSettings)

    def limits_for(self, device_type: str) -> Limits:
        """The request limits on a device: --max-pixels auto takes 8192x8192 on a GPU, where the exact tiled path
        keeps such an image within memory."""
        if self.max_pixels is not None:
            return replace(self.limits, max_pixels=self.max_pixels)
        return replace(self.limits, max_pixels=GPU_MAX_PIXELS) if device_type == "cuda" else self.limits

    def checked(self) -> Settings:
        """These settings, API keys read and the memory budget resolved; SettingsError where they do not fit."""
        from ..memory import BODY_COST, JSON_BODY_COST, auto_budget, size_text

        limits, batching, queue, connections = self.limits, self.batching, self.queue, self.connections
        for flag, value in (
            ("--max-body-bytes", limits.max_body_bytes),
            ("--max-video-pixels", limits.max_video_pixels),
            ("--max-batch", limits.max_images_per_request),
        ):
            if value < 1:
                raise SettingsError(f"{flag} must be at least 1")
        if batching.max_images_per_call < 1 or not 0 <= batching.wait <= 10:
            raise SettingsError("--max-batch-images must be at least 1 and --batch-wait-ms from 0 to 10000")
        if queue.max_waiting < 0 or self.graceful_timeout < 0:
            raise SettingsError("--max-queue and --graceful-timeout must be 0 or more")
        if queue.wait_timeout <= 0 or self.body_timeout <= 0:
            raise SettingsError("--queue-timeout and --body-timeout must be above 0")
        if connections.min_rate < 0 or connections.max_connections < 1:
            raise SettingsError("--min-transfer-rate must be 0 or more, --max-connections at least 1")
        if min(connections.header_timeout, connections.idle_timeout, limits.decode_cpu_seconds) <= 0:
            raise SettingsError("--header-timeout, --idle-timeout and --decode-cpu-seconds must be above 0")
        budget = self.memory_budget or auto_budget()
        largest = max(BODY_COST * limits.max_body_bytes, JSON_BODY_COST * limits.max_json_bytes)
        if budget < largest:
            raise SettingsError(
                f"--memory-budget ({size_text(budget)}) must hold the largest body a request may send: "
                f"{size_text(largest)} ({BODY_COST} x --max-body-bytes, as it is read and joined); "
                "raise it or lower --max-body-bytes"
            )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise SettingsError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
        for path in filter(None, (self.ssl_certfile, self.ssl_keyfile)):
            if not os.path.isfile(path):
                raise SettingsError(f"{path} is not a file")
        try:
            keys = load_api_keys(self.api_key, self.api_key_file)
        except ApiKeyError as exc:
            raise SettingsError(str(exc)) from None
        return replace(self, api_keys=keys, memory_budget=budget)

    @cached_property
    def served(self) -> ServedFamilies:
        """The families to serve, read and checked against the other settings (FamilyError, SettingsError): before
        torch is imported, so a mistyped command fails in a fraction of a second, not after loading."""
        names = self.families
        if not names:
            raise FamilyError(f"name at least one family to serve: {', '.join(available())}")
        loaded = tuple(load_family(name) for name in names)
        if len({family.name for family in loaded}) != len(loaded):
            raise FamilyError(f"a family is named twice in {names}")
        for family in loaded:
            warmup_sizes_for(family, self.model.warmup_sizes)  # refused now, not after the first model has loaded
        # A video family's sound family is served beside it (LTX-2's audio VAE and vocoder), from the same pipeline
        # folder where its --model is one
        named = {family.name for family in loaded}
        sounds = {name: load_family(name) for family in loaded if (name := family.sound) and name not in named}
        sources = model_sources([family.name for family in loaded], self.models, list(sounds))
        for family in loaded:
            sound = sounds.get(family.sound or "")
            if sound is not None and family.name in sources:
                folder = sound_folder(sources[family.name], sound)
                if folder is not None:
                    sources.setdefault(sound.name, folder)
        return ServedFamilies(loaded + tuple(sounds.values()), sources, named=len(loaded))


@dataclass(frozen=True)
class ServedFamilies:
    """`Settings.served`: each family, and the --model source given for it (if any)."""

    families: tuple[Family, ...]
    sources: dict[str, str]
    named: int = 0  # of `families`, those named (the others are their sound families)


GROUPS = {
    "limits": Limits,
    "queue": QueueSettings,
    "batching": BatchSettings,
    "connections": ConnectionSettings,
    "model": ModelSettings,
}


# -- the settings against the families being served -------------------------------------------------------------


def warmup_sizes_for(family: Family, sizes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The warm-up sizes as the family takes them (a video's frames default to 1), or SettingsError."""
    fitted = []
    for size in sizes:
        if len(size) == 3 and not family.is_video:
            raise SettingsError(
                f"--warmup-sizes {'x'.join(map(str, size))}: {family.name} decodes images; give WIDTHxHEIGHT"
            )
        try:
            check_sides(size[1], size[0], family, "warm-up size")
            if family.is_video:
                size = size if len(size) == 3 else (*size, 1)
                check_frame_count(size[2], family)
        except RequestError as exc:
            raise SettingsError(f"--warmup-sizes for {family.name}: {exc.message}") from None
        fitted.append(size)
    return fitted


def sound_folder(source: str, sound: Family) -> str | None:
    """The pipeline folder a video family's --model lies in (itself, or the one its vae/ folder is in), where it also
    holds the sound family's weights; None where it does not."""
    path = Path(source)
    for folder in (path, path.parent):
        if sound.hub_subfolder and (folder / sound.hub_subfolder / "config.json").is_file():
            return str(folder)
    return None


def model_sources(names: Sequence[str], specs: Sequence[str], sounds: Sequence[str] = ()) -> dict[str, str]:
    """--model values by family: 'FAMILY=SOURCE', or a bare SOURCE when serving one family (`sounds`, the families
    served for their sound, take FAMILY=SOURCE only)."""
    sources: dict[str, str] = {}
    for spec in specs:
        family, sep, source = spec.partition("=")
        if not sep:
            if len(names) != 1:
                raise FamilyError(f"--model {spec!r} is ambiguous with several families; write --model FAMILY={spec}")
            family, source = names[0], spec
        if family not in (*names, *sounds):
            raise FamilyError(
                f"--model {spec!r} names family {family!r}, which is not being served ({', '.join(names)})"
            )
        sources[family] = source
    return sources
