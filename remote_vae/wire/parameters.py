"""The query parameters: each declared once, with its JSON schema, what it does and the operations that read it.

The wire's parser reads a parameter only by its declaration (`Params` refuses a name not declared here, and takes a
choice's values and an integer's bounds from its schema), and the OpenAPI document (server/openapi.py) describes the
same table, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qs

from ..errors import RequestError
from ..vocabulary import AUDIO_FORMATS, COMPUTE_DTYPES, IMAGE_FORMATS, LatentDist, Operation, PackedMemory, Tiling, Word

BOTH, DECODE, ENCODE = (Operation.DECODE, Operation.ENCODE), (Operation.DECODE,), (Operation.ENCODE,)

# name: (JSON schema, what it does, the operations that read it). Lists are repeated keys (shape=1&shape=4&...).
PARAMETERS: dict[str, tuple[dict[str, Any], str, tuple[Operation, ...]]] = {
    "shape": (
        {"type": "array", "items": {"type": "integer", "minimum": 1}},
        "The body tensor's shape, one repeated key per dimension (shape=1&shape=4&shape=64&shape=64). Decode: the "
        "latent, "
        "[B, C, h, w] or [B, C, T, h, w] or packed [B, seq, features] (audio: [B, C, T]); encode: an image tensor "
        "[B, 3, H, W] (video [B, 3, F, H, W], audio a waveform [B, channels, samples]) in -1..1. Omitted when "
        "encoding a file.",
        BOTH,
    ),
    "dtype": (
        {"type": "string", "enum": list(COMPUTE_DTYPES)},
        "The body tensor's dtype (little-endian; bfloat16 as raw 2-byte words).",
        BOTH,
    ),
    "scaling_factor": (
        {"type": "number"},
        "Decode: latent / scaling_factor before the VAE; encode: latent * scaling_factor after it.",
        BOTH,
    ),
    "shift_factor": (
        {"type": "number"},
        "Decode: + shift_factor after unscaling; encode: - shift_factor before scaling.",
        BOTH,
    ),
    "do_scaling": (
        {"type": "boolean"},
        "True with no factors: the family's own normalisation (per-channel families take only this); "
        "False or nothing: the latent is the VAE's own. Explicit factors win.",
        BOTH,
    ),
    "output_type": (
        {"type": "string", "enum": ["pil", "pt", "mp4", *AUDIO_FORMATS]},
        "pil: an image file (or, with Accept: tensor/binary, float pixels 0..1); pt: a tensor; mp4: an H.264 video; "
        "wav / flac (audio families): a 32-bit float WAV or a 24-bit FLAC. Missing: inferred from Accept (an audio "
        "family's default is wav).",
        DECODE,
    ),
    "partial_postprocess": (
        {"type": "boolean"},
        "With output_type=pt: uint8 pixels [B, H, W, 3] (a video: [F, H, W, 3]) instead of the VAE's raw output.",
        DECODE,
    ),
    "image_format": (
        {"type": "string", "enum": list(IMAGE_FORMATS), "default": "jpg"},
        "With output_type=pil: the image file's format.",
        DECODE,
    ),
    "quality": ({"type": "number"}, "JPEG / WebP quality 1..100; for mp4, imageio's 0..10 (10 best).", DECODE),
    "png_compression": (
        {"type": "integer", "minimum": 0, "maximum": 9},
        "zlib level of a PNG reply (the pixels are the same at every level).",
        DECODE,
    ),
    "fps": ({"type": "number", "minimum": 1, "maximum": 240}, "Frame rate of an mp4 reply.", DECODE),
    "crf": (
        {"type": "integer", "minimum": 0, "maximum": 51},
        "x264's constant rate factor of an mp4 reply (lower is better).",
        DECODE,
    ),
    "height": (
        {"type": "integer", "minimum": 1},
        "Pixel height, for packed (3-D) latents only; ignored otherwise.",
        DECODE,
    ),
    "width": (
        {"type": "integer", "minimum": 1},
        "Pixel width, for packed (3-D) latents only; ignored otherwise.",
        DECODE,
    ),
    "packed_memory": (
        {"type": "string", "enum": list(PackedMemory.words())},
        "Which memory order a packed latent's bytes are in.",
        DECODE,
    ),
    "decode_timestep": ({"type": "number"}, "LTX-Video: the decode timestep its pipeline passes.", DECODE),
    "decode_noise_scale": (
        {"type": "number"},
        "LTX-Video: noise mixed into the latent before decoding, as its pipeline does.",
        DECODE,
    ),
    "decode_noise_seed": ({"type": "integer", "minimum": 0}, "LTX-Video: the seed of that noise.", DECODE),
    "latent_dist": (
        {"type": "string", "enum": list(LatentDist.words()), "default": "mean"},
        "mean: the encoder distribution's mean, scaled as asked. parameters: its mean and log-variance concatenated on "
        "the channel axis ([B, 2C, ...], diffusers' DiagonalGaussianDistribution(parameters)), the VAE's own (send no "
        "scaling), so that a sample drawn with the client's generator is a local pipeline's.",
        ENCODE,
    ),
    "tiling": (
        {"type": "string", "enum": list(Tiling.words())},
        "exact: when the call tiles, tiles equal to the untiled result; blend: diffusers' blended tiles wherever a "
        "local enable_tiling() would use them. Missing: the family's default (exact where it has an exact path, unless "
        "its config says blend).",
        BOTH,
    ),
}


MAX_SHAPE_DIMS = 8


class Params:
    """Request parameters by name, from a query string and/or a JSON object.

    Query values are strings as `requests` encodes them (lists as repeated
    keys, booleans as True/False); JSON values keep their JSON types.
    """

    def __init__(self, values: dict[str, list[Any]] | None = None):
        self.values = values or {}

    @classmethod
    def from_query(cls, query: str) -> Params:
        try:
            return cls(parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=256))
        except ValueError as exc:
            raise RequestError(f"query string cannot be parsed: {exc}") from exc

    def overlay_json(self, parameters: Any) -> None:
        """JSON parameters fill in whatever the query string did not say."""
        if parameters is None:
            return
        if not isinstance(parameters, dict):
            raise RequestError(f'"parameters" is a {type(parameters).__name__}; expected a JSON object')
        for name, value in parameters.items():
            self.values.setdefault(str(name), value if isinstance(value, list) and name == "shape" else [value])

    def _last(self, name: str) -> Any:
        if name not in PARAMETERS:  # a parameter the server reads is declared, so /docs describes it
            raise KeyError(f"query parameter {name!r} is read but not declared in wire/parameters.py")
        values = self.values.get(name)
        if not values:
            return None
        value = values[-1]
        return None if value in ("", "None", None) else value

    def text(self, name: str) -> str | None:
        value = self._last(name)
        return None if value is None else str(value)

    def choice(self, name: str, choices: type[Word] | None = None) -> str | None:
        """One of the values its schema declares, as a member of `choices` where given; None when not sent."""
        value = self.text(name)
        if value is None:
            return None
        words = PARAMETERS[name][0]["enum"]
        if value.lower() not in words:
            raise RequestError(f"{name}={value!r} is not supported; expected one of {', '.join(words)}")
        return choices(value.lower()) if choices is not None else value.lower()

    def flag(self, name: str) -> bool | None:
        value = self._last(name)
        if value is None or isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise RequestError(f"{name}={value!r} is not a boolean; expected True or False")

    def number(self, name: str) -> float | None:
        value = self._last(name)
        if value is None:
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"{name}={value!r} is not a number; expected e.g. {name}=0.18215") from None
        except OverflowError:  # an integer too large for a float (JSON allows 4300 digits)
            raise RequestError(f"{name} is an integer of {len(str(value))} digits; expected a finite number") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise RequestError(f"{name}={value!r} must be a finite number")
        return number

    def integer(self, name: str, low: int | None = None, high: int | None = None) -> int | None:
        """An integer within `low`..`high`, by default its schema's minimum and maximum (or 1 and 2^20)."""
        value = self._last(name)
        if value is None:
            return None
        schema = PARAMETERS[name][0]
        low = schema.get("minimum", 1) if low is None else low
        high = schema.get("maximum", 1 << 20) if high is None else high
        parsed = _as_int(value)
        if parsed is None or not low <= parsed <= high:
            raise RequestError(f"{name}={value!r} must be an integer from {low} to {high}")
        return parsed

    def shape(self) -> tuple[int, ...] | None:
        values = self.values.get("shape")
        if not values:
            return None
        if len(values) == 1 and isinstance(values[0], str) and ("," in values[0] or "[" in values[0]):
            # curl users write shape=[1,4,64,64] or shape=1,4,64,64
            values = values[0].strip("[] ").split(",")
        if len(values) > MAX_SHAPE_DIMS:
            raise RequestError(f"shape has {len(values)} dimensions; at most {MAX_SHAPE_DIMS} are accepted")
        dims = [_as_int(value) for value in values]
        if any(dim is None for dim in dims):
            raise RequestError(f"shape {values} must be a list of integers, e.g. shape=1&shape=4&shape=64&shape=64")
        return tuple(dims)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        return None
