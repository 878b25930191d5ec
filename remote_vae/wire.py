"""The wire: HTTP request in, HTTP reply out (PROTOCOL.md).

Parses every request form real clients send (tensor/binary with a query
string, tensor/base64, the toolkit's JSON, bare image files), tells decode
from encode, negotiates the body of the reply from output_type and Accept,
and renders results and errors. It knows nothing of Starlette: server.py
hands it the parts of a request and sends back what it returns.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import PIL.Image
import torch

from .decoders import is_image_file, is_video_file
from .errors import RequestError
from .latents import Scaling
from .media import ImageFile, Mp4Options, dtype_name, tensor_to_bytes
from .service import Checked, DecodeRequest, DecodeTimestep, EncodeRequest, Job, Limits, RawTensor, VaeService
from .vocabulary import IMAGE_FORMATS, MEDIA_TYPES, Operation, OutputForm, PackedMemory, Tiling, Word

log = logging.getLogger("remote_vae")


MAX_SHAPE_DIMS = 8
JSON_TYPES = ("application/json", "tensor/base64")
MAX_JSON_TOKENS = 4096  # structure in a JSON body: a few dozen parameters' worth, far past what any client sends
FORMATS_BY_MEDIA_TYPE = {media: name for name, media in MEDIA_TYPES.items()}


def media_type(header: str | None) -> str:
    """'Image/PNG; charset=x' -> 'image/png'; '' when absent."""
    return (header or "").split(";")[0].strip().lower()


def first_accepted(header: str | None) -> str:
    """The first media type of an Accept header; clients send one."""
    return media_type((header or "").split(",")[0])


class Params:
    """Request parameters by name, from a query string and/or a JSON object.

    Query values are strings as `requests` encodes them (lists as repeated
    keys, booleans as True/False); JSON values keep their JSON types.
    """

    def __init__(self, values: dict[str, list[Any]] | None = None):
        self.values = values or {}

    @classmethod
    def from_query(cls, query: str) -> "Params":
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
        values = self.values.get(name)
        if not values:
            return None
        value = values[-1]
        return None if value in ("", "None", None) else value

    def text(self, name: str) -> str | None:
        value = self._last(name)
        return None if value is None else str(value)

    def choice(self, name: str, choices: tuple[str, ...] | type[Word]) -> str | None:
        """One of `choices`, as its member where they are a vocabulary; None when not sent."""
        value = self.text(name)
        if value is None:
            return None
        words = choices.words() if isinstance(choices, type) else choices
        if value.lower() not in words:
            raise RequestError(f"{name}={value!r} is not supported; expected one of {', '.join(words)}")
        return choices(value.lower()) if isinstance(choices, type) else value.lower()

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

    def integer(self, name: str, low: int = 1, high: int = 1 << 20) -> int | None:
        value = self._last(name)
        if value is None:
            return None
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


@dataclass
class HttpCall:
    """The parts of an HTTP request the wire needs."""

    body: bytes
    query: str = ""
    content_type: str = ""
    accept: str = ""
    operation: str | None = None  # "decode" / "encode" for explicit routes, None to infer


@dataclass
class HttpReply:
    status: int
    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> HttpReply:
    return HttpReply(status, json.dumps({"error": message}).encode(), "application/json", dict(headers or {}))


# -- parsing -----------------------------------------------------------------


def json_too_large(size: int | str, limits: Limits) -> RequestError:
    return RequestError(
        f"the JSON body is {size} bytes; this server takes JSON bodies of at most {limits.max_json_bytes} "
        f"(an eighth of --max-body-bytes): send large tensors and files as raw bytes (Content-Type: "
        "tensor/binary with shape and dtype in the query, or the file itself)",
        status=413,
    )


def read_payload(call: HttpCall) -> tuple[Params, bytes]:
    """The request's parameters and the bytes it carries (raw tensor memory or an image file). A JSON body's size was
    bounded as it was read (server.read_body, Limits.max_json_bytes)."""
    params = Params.from_query(call.query)
    content_type = media_type(call.content_type)
    if content_type not in JSON_TYPES:
        return params, call.body
    body = call.body.strip()
    if body.startswith(b"{"):
        # A request's JSON is one base64 string and a few parameters. Its structure is counted before parsing: json.loads
        # of 128 MB of "[]," builds tens of millions of objects (3.5 GB, seconds holding the GIL) before any check.
        tokens = sum(body.count(token) for token in (b",", b":", b"[", b"{"))
        if tokens > MAX_JSON_TOKENS:
            raise RequestError(
                f"the JSON body has {tokens} commas, colons and brackets; a request's JSON holds one base64 string and a few "
                f'parameters (at most {MAX_JSON_TOKENS}): {{"inputs": "<base64>", "parameters": {{...}}}}'
            )
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise RequestError(
                f'body is not valid JSON ({exc}); expected {{"inputs": "<base64>", "parameters": {{...}}}}'
            ) from None
        if not isinstance(document, dict) or "inputs" not in document:
            raise RequestError('JSON body must be an object with "inputs" (base64 of the tensor bytes or image file)')
        params.overlay_json(document.get("parameters"))
        inputs = document["inputs"]
    elif content_type == "tensor/base64":
        inputs = body.decode("ascii", errors="replace")
    else:
        raise RequestError('body is not a JSON object; expected {"inputs": "<base64>", "parameters": {...}}')
    if not isinstance(inputs, str):
        raise RequestError(f'"inputs" is a {type(inputs).__name__}; expected a base64 string')
    try:
        return params, base64.b64decode(inputs, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f'"inputs" is not valid base64 ({exc})') from None


def is_file_upload(content_type: str, data: bytes) -> bool:
    """An image or video file, by its Content-Type or its magic bytes."""
    return content_type.startswith(("image/", "video/")) or is_image_file(data) or is_video_file(data)


def infer_operation(content_type: str, data: bytes, shape: tuple[int, ...] | None) -> str:
    """Decode or encode on the shared routes (PROTOCOL §3)."""
    if content_type.startswith("tensor/"):
        return "decode"
    if is_file_upload(content_type, data):
        return "encode"
    if shape is not None:
        # An image tensor has 3 channels; no latent does.
        return "encode" if len(shape) >= 4 and shape[1] == 3 else "decode"
    raise RequestError(
        "cannot tell what to do with this request: to decode, send Content-Type: tensor/binary with "
        "shape and dtype; to encode, send an image file (PNG, JPEG, WebP), a video file (MP4, WebM, GIF) "
        "or a [B, 3, H, W] / [B, 3, F, H, W] tensor with shape and dtype"
    )


def raw_tensor(params: Params, data: bytes) -> RawTensor:
    shape = params.shape()
    if shape is None:
        raise RequestError("shape is missing; send it as repeated query keys, e.g. shape=1&shape=4&shape=64&shape=64")
    dtype = params.text("dtype")
    if dtype is None:
        raise RequestError("dtype is missing; expected dtype=float16, bfloat16 or float32")
    return RawTensor(shape, dtype, data)


def scaling(params: Params) -> Scaling:
    factor = params.number("scaling_factor")
    if factor == 0:
        raise RequestError("scaling_factor=0 would divide by zero; expected e.g. 0.18215")
    return Scaling(factor, params.number("shift_factor"), params.flag("do_scaling"))


@dataclass
class ReplyShape:
    """What the reply body will be: a tensor (binary or base64 JSON), an image file or an MP4."""

    tensor_encoding: str = "binary"  # or the base64 media type
    image: ImageFile = field(default_factory=ImageFile)


def negotiate_decode(
    params: Params, accept: str, png_compression: int = ImageFile.png_compression
) -> tuple[OutputForm, ReplyShape]:
    """(decode form, reply shape) from output_type, partial_postprocess, image_format, quality, png_compression and Accept."""
    output_type = params.choice("output_type", ("pt", "pil", "mp4"))
    reply = ReplyShape(tensor_encoding=accept if accept in JSON_TYPES else "binary")
    wants_tensor = accept.startswith("tensor/") or accept in JSON_TYPES
    if output_type is None:
        # Old clients send no output_type: Accept says what they want.
        output_type = "mp4" if accept == "video/mp4" else "pt" if wants_tensor else "pil"
    if output_type == "mp4":
        return OutputForm.MP4, reply
    if output_type == "pt":
        return (OutputForm.UINT8 if params.flag("partial_postprocess") else OutputForm.RAW), reply
    if wants_tensor:
        return OutputForm.UNIT, reply  # pil with a client-side processor
    requested = params.choice("image_format", tuple(IMAGE_FORMATS)) or "jpg"
    level = params.integer("png_compression", 0, 9)
    reply.image = ImageFile(
        format=FORMATS_BY_MEDIA_TYPE.get(accept) or IMAGE_FORMATS[requested],
        quality=params.integer("quality", 1, 100) or ImageFile.quality,
        png_compression=png_compression if level is None else level,
    )
    return OutputForm.IMAGE, reply


def mp4_options(params: Params) -> Mp4Options:
    """fps, and crf (x264's 0..51, lower is better) or quality (imageio's 0..10, higher is better)."""
    fps = params.number("fps")
    if fps is not None and not 1 <= fps <= 240:
        raise RequestError(
            f"fps={fps:g} is out of range; expected a frame rate from 1 to 240 (default {Mp4Options.fps:g})"
        )
    crf = params.integer("crf", 0, 51)
    quality = params.number("quality")
    if crf is None and quality is not None:
        if not 0 <= quality <= 10:
            raise RequestError(
                f"quality={quality:g} is out of range for mp4; expected 0..10 (imageio's scale, 10 best) or crf=0..51"
            )
        crf = int((1 - quality / 10) * 51)  # imageio-ffmpeg's own mapping, as in diffusers' export_to_video
    return Mp4Options(fps=fps or Mp4Options.fps, crf=Mp4Options.crf if crf is None else crf)


def parse_decode(params: Params, data: bytes) -> DecodeRequest:
    latent = raw_tensor(params, data)
    request = DecodeRequest(latent=latent, scaling=scaling(params))
    if len(latent.shape) == 3:
        # Only packed latents need pixel sizes; other clients send nonsense ones.
        request.height = params.integer("height")
        request.width = params.integer("width")
        request.packed_memory = params.choice("packed_memory", PackedMemory)
    request.decode_timestep = decode_timestep(params)
    request.tiling = params.choice("tiling", Tiling)
    return request


def decode_timestep(params: Params) -> DecodeTimestep | None:
    """LTX's decode_timestep, decode_noise_scale and decode_noise_seed; None when none is sent."""
    timestep, scale = params.number("decode_timestep"), params.number("decode_noise_scale")
    seed = params.integer("decode_noise_seed", 0, (1 << 63) - 1)
    if timestep is None and scale is None and seed is None:
        return None
    for name, value in (("decode_timestep", timestep), ("decode_noise_scale", scale)):
        if value is not None and not 0 <= value <= 1:
            raise RequestError(
                f"{name}={value} is outside 0..1; LTX pipelines use e.g. decode_timestep=0.05, decode_noise_scale=0.025"
            )
    return DecodeTimestep(timestep or 0.0, scale, seed or 0)


def parse_encode(content_type: str, params: Params, data: bytes) -> EncodeRequest:
    request = EncodeRequest(scaling=scaling(params), tiling=params.choice("tiling", Tiling))
    if is_file_upload(content_type, data) or params.shape() is None:
        request.image = data
    else:
        request.tensor = raw_tensor(params, data)
    return request


# -- rendering ---------------------------------------------------------------


def tensor_reply(tensor: torch.Tensor, encoding: str, headers: dict[str, str] | None = None) -> HttpReply:
    shape, dtype = list(tensor.shape), dtype_name(tensor.dtype)
    headers = {**(headers or {}), "shape": json.dumps(shape, separators=(",", ":")), "dtype": dtype}
    data = tensor_to_bytes(tensor)
    if encoding in JSON_TYPES:
        document = {"inputs": base64.b64encode(data).decode(), "parameters": {"shape": shape, "dtype": dtype}}
        return HttpReply(200, json.dumps(document).encode(), encoding, headers)
    return HttpReply(200, data, "tensor/binary", headers)


def count_headers(job: Job) -> dict[str, str]:
    """How many images, or videos and frames per video, a decode reply holds."""
    if job.frames is None:
        return {"image-count": str(job.count)}
    return {"video-count": str(job.count), "frame-count": str(job.frames)}


# -- one call ----------------------------------------------------------------
# A call goes through three steps, so the server can queue only the middle one:
#   prepare (parse and check; CPU) -> service.run(jobs) (the model; batched, one call at a time) -> render (media; CPU).


@dataclass
class Prepared:
    """A parsed and checked request: the service's job and how its reply will look."""

    job: Job
    form: OutputForm
    reply: ReplyShape
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Inspected:
    """A request parsed and checked from its numbers and headers, before anything is decoded or allocated:
    what it will hold on the host (`checked.hold_bytes`) is known, so the server can reserve it first."""

    operation: Operation
    request: DecodeRequest | EncodeRequest
    checked: Checked
    reply: ReplyShape

    def close(self) -> None:
        self.checked.close()


def inspect(
    service: VaeService,
    params: Params,
    data: bytes,
    content_type: str = "",
    accept: str = "",
    operation: str | None = None,
    images_as: OutputForm = OutputForm.IMAGE,
) -> Inspected:
    """Parse and check one request up to the point where it would decode or allocate; shared by the HTTP server and handler.py.

    `images_as` is the form of an image reply: IMAGE (the file's bytes) or PIL (PIL images, for handler.py).
    """
    operation = operation or infer_operation(content_type, data, params.shape())
    if operation == Operation.ENCODE:
        reply = ReplyShape(tensor_encoding=accept if accept in JSON_TYPES else "binary")
        request = parse_encode(content_type, params, data)
        return Inspected(Operation.ENCODE, request, service.check_encode(request, reply.tensor_encoding), reply)
    form, reply = negotiate_decode(params, accept, service.png_compression)
    request = parse_decode(params, data)
    request.form = images_as if form == OutputForm.IMAGE else form
    if form == OutputForm.MP4:
        request.mp4 = mp4_options(params)
    request.image = reply.image
    return Inspected(Operation.DECODE, request, service.check_decode(request, reply.tensor_encoding), reply)


def prepare_inspected(service: VaeService, inspected: Inspected) -> Prepared:
    """The job of a request `inspect` has checked: its latents built, or its file decoded."""
    if inspected.operation == Operation.ENCODE:
        encoded = service.prepare_encode(inspected.request, inspected.checked)
        return Prepared(encoded, OutputForm.LATENTS, inspected.reply)
    job = service.prepare_decode(inspected.request, inspected.checked)
    return Prepared(job, inspected.request.form, inspected.reply, count_headers(job))


def prepare(
    service: VaeService,
    params: Params,
    data: bytes,
    content_type: str = "",
    accept: str = "",
    operation: str | None = None,
    images_as: OutputForm = OutputForm.IMAGE,
) -> Prepared:
    """Parse, check and prepare one request at once, up to the point where it needs the model."""
    inspected = inspect(service, params, data, content_type, accept, operation, images_as)
    try:
        return prepare_inspected(service, inspected)
    finally:
        inspected.close()


def inspect_call(service: VaeService, call: HttpCall) -> Inspected:
    params, data = read_payload(call)
    return inspect(service, params, data, media_type(call.content_type), first_accepted(call.accept), call.operation)


def prepare_call(service: VaeService, call: HttpCall) -> Prepared:
    inspected = inspect_call(service, call)
    try:
        return prepare_inspected(service, inspected)
    finally:
        inspected.close()


def render(prepared: Prepared, result: Any) -> HttpReply:
    """The reply body from what the model stage returned: MP4 and image files finished, tensors as bytes."""
    value = prepared.job.finish(result)
    if prepared.form == OutputForm.IMAGE:
        return HttpReply(200, value, MEDIA_TYPES[prepared.reply.image.format], prepared.headers)
    if prepared.form == OutputForm.MP4:
        return HttpReply(200, value, "video/mp4", prepared.headers)
    return tensor_reply(value, prepared.reply.tensor_encoding, prepared.headers)


@dataclass
class Outcome:
    """A served request before rendering: latents, or a decode result (PIL images for an image reply), and how the reply should look."""

    form: OutputForm
    value: torch.Tensor | list[PIL.Image.Image] | bytes
    reply: ReplyShape
    headers: dict[str, str] = field(default_factory=dict)


def dispatch(
    service: VaeService,
    params: Params,
    data: bytes,
    content_type: str = "",
    accept: str = "",
    operation: str | None = None,
) -> Outcome:
    """All of one request at once, without a queue (handler.py: the toolkit runs one request at a time and writes image files itself)."""
    prepared = prepare(service, params, data, content_type, accept, operation, images_as=OutputForm.PIL)
    return Outcome(prepared.form, service.call(prepared.job), prepared.reply, prepared.headers)


def failure_reply(exc: Exception) -> HttpReply:
    """A client's mistake as its 4xx (or 503) JSON; anything else as a 500 that hides the details. Call it in an except block."""
    if isinstance(exc, RequestError):
        return error_reply(exc.status, exc.message, exc.headers)
    log.exception("unexpected error while serving a request")  # a bug, not the client's fault: log it, hide it
    return error_reply(500, "internal error while processing the request; see the server log")
