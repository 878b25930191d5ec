"""The `serve` options: each flag once, with the Settings field it sets, its environment variable (REMOTE_VAE_ and
its name in capitals), how its text is read, and its help; and reading them into Settings."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..families import available
from ..vocabulary import COMPUTE_DTYPES
from .values import (
    ENV_PREFIX,
    GPU_MAX_PIXELS,
    GROUPS,
    Limits,
    Settings,
    SettingsError,
    env,
    env_flag,
)

# -- values of one option ---------------------------------------------------------------------------------------


def tile_threshold(value: str) -> int | None | str:
    """--tile-above-pixels: a pixel count, 'family' (the config's) or 'never'."""
    text = str(value).strip().lower()
    if text in ("family", "never"):
        return None if text == "never" else "family"
    pixels = int(text) if text.isdigit() else -1
    if pixels < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a pixel count (0 or more), 'family' or 'never'")
    return pixels


def _count_or_auto(value: str, unit: str, least: int) -> int | None:
    """A count of `unit` (at least `least`), or 'auto' (None: the default)."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < least:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a {unit} count ({least} or more) or 'auto'")
    return int(text)


def byte_budget(value: str) -> int | None:
    """--tile-store-bytes, --memory-budget: a byte count, or 'auto' (None: the default)."""
    return _count_or_auto(value, "byte", 0)


def pixel_budget(value: str) -> int | None:
    """--batch-pixel-budget and the other pixel budgets: a pixel count, or 'auto' (None: from the device)."""
    return _count_or_auto(value, "pixel", 1)


def warmup_size(value: str) -> tuple[int, ...]:
    """--warmup-sizes: 'WxH' or, for video families, 'WxHxF' (frames)."""
    parts = str(value).lower().split("x")
    if len(parts) not in (2, 3) or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024, or WIDTHxHEIGHTxFRAMES for video families"
        )
    return tuple(int(part) for part in parts)


# -- the options ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One `serve` option: its flag, the Settings field it sets, how its text is read, and its help, in which
    {default} is its default. Its environment variable is REMOTE_VAE_ and the flag's name in capitals."""

    flag: str
    target: str
    help: str
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    choices: tuple | None = None
    many: bool = False  # several values: space-separated in the variable
    per_unit: float = 1  # the flag's units per unit of the setting (--batch-wait-ms: 1000, the setting is in seconds)
    also_read: str | None = None  # a variable read after its own (--port: PORT, which Cloud Run and Spaces set)

    @property
    def name(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def default(self) -> Any:
        """The value when the flag is not given: its variable's, else the Settings default."""
        text = os.environ.get(self.variable, os.environ.get(self.also_read) if self.also_read else None)
        if text is None:
            value = _default_of(self.target)
            if self.many:
                return list(value)
            return value if self.per_unit == 1 else value * self.per_unit
        if self.parse is bool:
            return env_flag(self.name.upper())
        if self.many:
            try:
                return [self.parse(part) for part in text.split()]
            except argparse.ArgumentTypeError as exc:
                raise SettingsError(f"{self.variable}: {exc}") from None
        return text  # argparse reads a text default with `parse`, and reports a bad one naming the option

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        default = self.default()
        shown = self.parse(default) if isinstance(default, str) and self.parse not in (str, bool) else default
        shown = "auto" if shown is None else shown
        text = self.help.format(default=shown, families=", ".join(available()))
        text += f" [env {self.variable}{', space-separated' if self.many else ''}]"
        if not self.flag.startswith("-"):
            parser.add_argument(self.flag, nargs="*", type=self.parse, default=default, metavar=self.metavar, help=text)
        elif self.parse is bool:
            parser.add_argument(self.flag, action="store_true", default=default, help=text)
        elif self.flag == "--model":
            parser.add_argument(self.flag, action="append", default=None, metavar=self.metavar, help=text)
        else:
            parser.add_argument(
                self.flag,
                type=self.parse,
                default=default,
                metavar=self.metavar,
                choices=self.choices,
                nargs="*" if self.many else None,
                help=text,
            )


def option(flag: str) -> Option:
    """The serve option of this flag (the `health` command reads --port's)."""
    return next(option for option in OPTIONS if option.flag == flag)


def _default_of(target: str) -> Any:
    value: Any = Settings()
    for part in target.split("."):
        value = getattr(value, part)
    return value


OPTIONS: tuple[Option, ...] = (
    Option(
        "families", "families", "a name in configs/ ({families}) or a config file path", metavar="FAMILY", many=True
    ),
    Option(
        "--model",
        "models",
        "weights: a diffusers model directory or a Hub id org/name[/subfolder]; FAMILY= "
        "picks the family when serving several",
        metavar="[FAMILY=]PATH_OR_HUB_ID",
        many=True,
    ),
    Option(
        "--weights-dir",
        "weights_dir",
        "weights baked into an image: DIR/<family>/ (see `download`); used when "
        "--model is not given and HF_MODEL_DIR holds none",
        metavar="DIR",
    ),
    Option("--host", "host", "address to listen on (default {default})"),
    Option("--port", "port", "port, or the PORT variable (default {default})", parse=int, also_read="PORT"),
    Option("--device", "model.device", "auto, cuda, cuda:N or cpu (default {default})"),
    Option(
        "--dtype",
        "model.dtype",
        "compute dtype; auto = the family's GPU dtype on CUDA, float32 on CPU",
        choices=("auto", *COMPUTE_DTYPES),
    ),
    Option(
        "--random-weights",
        "model.random_weights",
        "build the architecture with seeded random weights, no download (for trying it out)",
        parse=bool,
    ),
    Option(
        "--max-body-bytes",
        "limits.max_body_bytes",
        "largest request body; larger gets 413 (default {default})",
        parse=int,
    ),
    Option(
        "--max-pixels",
        "max_pixels",
        "most pixels (over the batch) a decode returns or an encode takes; more gets "
        f"413 at once (default auto: {GPU_MAX_PIXELS} = 8192x8192 on a GPU, {Limits.max_pixels} on CPU)",
        parse=pixel_budget,
        metavar="N|auto",
    ),
    Option(
        "--max-video-pixels",
        "limits.max_video_pixels",
        "the same for videos, counting every frame; more gets 413 (default {default}, room for 129 frames of 1280x720)",
        parse=int,
    ),
    Option(
        "--max-batch",
        "limits.max_images_per_request",
        "most images or videos in one request; more gets 413 (default {default})",
        parse=int,
    ),
    Option(
        "--max-queue",
        "queue.max_waiting",
        "requests held beyond the one on the device, from when their body has "
        "been read until their reply is rendered; more get 503 with Retry-After, before anything is parsed or "
        "decoded (default {default})",
        parse=int,
    ),
    Option(
        "--queue-timeout",
        "queue.wait_timeout",
        "seconds a request may wait for the device; longer gets 503 (default {default:g})",
        parse=float,
    ),
    Option(
        "--body-timeout",
        "body_timeout",
        "seconds to receive a request body; slower gets 408 (default {default:g})",
        parse=float,
    ),
    Option(
        "--min-transfer-rate",
        "connections.min_rate",
        "a body must arrive, and a reply drain, at least this fast "
        "after the first --header-timeout seconds: a slower body gets 408, a slower reply is cut; 0 turns it off "
        "(default {default})",
        parse=int,
        metavar="BYTES_PER_S",
    ),
    Option(
        "--header-timeout",
        "connections.header_timeout",
        "seconds a connection has to send a request's head, "
        "after opening or after its last reply; then 408 and closed (default {default:g})",
        parse=float,
        metavar="S",
    ),
    Option(
        "--idle-timeout",
        "connections.idle_timeout",
        "seconds an idle keep-alive connection stays open (default {default:g})",
        parse=float,
        metavar="S",
    ),
    Option(
        "--max-connections",
        "connections.max_connections",
        "open connections at once; past it the one idle "
        "longest is closed, or with none idle the new one gets 503 (lowered to fit the open-file limit) (default "
        "{default})",
        parse=int,
        metavar="N",
    ),
    Option(
        "--memory-budget",
        "memory_budget",
        "host memory the requests in flight may hold at once (bodies, decoded "
        "pixels and frames, replies not yet sent), reserved before it is allocated; more waits, then gets 503 "
        "(default auto: 40%% of the machine's or the container's memory, at least 512 MiB)",
        parse=byte_budget,
        metavar="BYTES|auto",
    ),
    Option(
        "--decode-cpu-seconds",
        "limits.decode_cpu_seconds",
        "most CPU one image or video file may take to decode "
        "(each gets 1 s plus 250 ns a pixel, up to this); more gets 413 (default {default:g})",
        parse=float,
        metavar="S",
    ),
    Option("--api-key", "api_key", "require 'Authorization: Bearer KEY' on every POST (health and /metrics stay open)"),
    Option(
        "--api-key-file", "api_key_file", "the same with keys read from a file, one per line (several for rotation)"
    ),
    Option(
        "--cors-origins",
        "cors_origins",
        "let web pages on these origins call the API from a browser (e.g. https://app.example.com, or * for any)",
        metavar="ORIGIN",
        many=True,
    ),
    Option("--ssl-certfile", "ssl_certfile", "serve HTTPS with this PEM certificate (chain)"),
    Option("--ssl-keyfile", "ssl_keyfile", "the certificate's PEM private key"),
    Option(
        "--graceful-timeout",
        "graceful_timeout",
        "on SIGTERM, stop accepting and give in-flight requests this "
        "many seconds to finish, then exit 0 (default {default:g})",
        parse=float,
    ),
    Option(
        "--max-batch-images",
        "batching.max_images_per_call",
        "coalesce concurrent requests of the same shape into one "
        "model call of up to N images or videos; 1 turns batching off (default {default})",
        parse=int,
        metavar="N",
    ),
    Option(
        "--batch-wait-ms",
        "batching.wait",
        "longest a request waits for others to join its model call, and only "
        "while more are arriving (default {default:g})",
        parse=float,
        metavar="MS",
        per_unit=1000,
    ),
    Option(
        "--batch-pixel-budget",
        "model.batch_pixel_budget",
        "pixels (batch x frames x height x width) one model "
        "call may take whole; a larger batch runs one sample at a time. auto: on CUDA what fits the free memory, "
        "on CPU 65536 (measured)",
        parse=pixel_budget,
        metavar="N|auto",
    ),
    Option(
        "--png-compression",
        "png_compression",
        "zlib level of PNG replies unless a request sends "
        "png_compression; the pixels are the same at every level (default {default}: 3.3-4.6x faster than "
        "Pillow's 6 on photos for 7-10%% more bytes)",
        parse=int,
        choices=tuple(range(10)),
        metavar="0-9",
    ),
    Option(
        "--compile",
        "model.compile",
        "torch.compile the encoder and decoder; the --warmup-sizes are compiled at start-up, other sizes run eagerly",
        parse=bool,
    ),
    Option(
        "--warmup-sizes",
        "model.warmup_sizes",
        "sizes in pixels (and frames, for video families) to run once at "
        "start-up, before serving: compiles them with --compile, tunes cuDNN on CUDA",
        parse=warmup_size,
        metavar="WxH[xF]",
        many=True,
    ),
    Option(
        "--channels-last",
        "model.channels_last",
        "run convolutions in channels-last layout; auto = on for CUDA, off for the CPU (see docs/benchmarks.md)",
        choices=("auto", "on", "off"),
    ),
    Option(
        "--tile-store-bytes",
        "model.tile_store_bytes",
        "host memory what one cut of the exact tiled path holds "
        "whole (an activation and the residuals across it) may take; past it, bands are recomputed instead, so "
        "memory stays flat as images grow, for time (default auto: 268435456; on a GPU activations stay on the "
        "device while they fit)",
        parse=byte_budget,
        metavar="N|auto",
    ),
    Option(
        "--tile-band-pixels",
        "model.tile_band_pixels",
        "output pixels per band of the exact tiled path, the "
        "device's work per step (default auto: 1048576 on a GPU, 65536 on CPU)",
        parse=pixel_budget,
        metavar="N|auto",
    ),
    Option(
        "--tile-above-pixels",
        "model.tile_above_pixels",
        "decode/encode in tiles when an image or frame has more "
        "than N pixels (0 = always); 'family' keeps each family's own setting (video: on above 512x512 / "
        "1280x720, images: never)",
        parse=tile_threshold,
        metavar="N|family|never",
    ),
    Option("--log-level", "log_level", "(default {default})", choices=("debug", "info", "warning", "error")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`serve`'s options on a parser."""
    for option in OPTIONS:
        option.add_to(parser)


def read_settings(argv: Sequence[str] = ()) -> Settings:
    """`remote-vae serve ARGV` (without the word serve), over the REMOTE_VAE_* variables; SettingsError if the
    values do not fit together. Bad values of one option exit as argparse does."""
    parser = argparse.ArgumentParser(prog="remote-vae serve")
    add_arguments(parser)
    return settings_from(parser.parse_args([str(arg) for arg in argv]))


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings from a namespace that add_arguments' options filled in, checked."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        value = getattr(args, option.name)
        if option.many:
            value = tuple(value or ())
        if option.per_unit != 1:
            value = value / option.per_unit
        group, _, name = option.target.rpartition(".")
        (values.setdefault(group, {}) if group else values)[name] = value
    if values["models"] == () and args.model is None:
        values["models"] = tuple((env("MODEL") or "").split())
    groups = {name: GROUPS[name](**fields) for name, fields in values.items() if name in GROUPS}
    top = {name: value for name, value in values.items() if name not in GROUPS}
    return Settings(**top, **groups).checked()
