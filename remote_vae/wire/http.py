"""The HTTP request's parts as the wire sees them (HttpCall), its body read into parameters and bytes (a JSON body
bounded before it is parsed), and replies: tensors, errors (one body, errors.error_body) and failures."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field

import torch

from ..errors import ERROR_MEDIA_TYPE, RequestError, error_body
from ..media import dtype_name, tensor_to_bytes
from ..service import Limits
from ..vocabulary import MEDIA_TYPES, SAFETENSORS_TYPE
from .parameters import Params

log = logging.getLogger("remote_vae")

JSON_TYPES = ("application/json", "tensor/base64")


MAX_JSON_TOKENS = 4096  # structure in a JSON body: a few dozen parameters' worth, far past what any client sends


FORMATS_BY_MEDIA_TYPE = {media: name for name, media in MEDIA_TYPES.items()}


def media_type(header: str | None) -> str:
    """'Image/PNG; charset=x' -> 'image/png'; '' when absent."""
    return (header or "").split(";")[0].strip().lower()


def first_accepted(header: str | None) -> str:
    """The first media type of an Accept header; clients send one."""
    return media_type((header or "").split(",")[0])


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
    return HttpReply(status, error_body(message), ERROR_MEDIA_TYPE, dict(headers or {}))


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
        # A request's JSON is one base64 string and a few parameters. Its structure is counted before parsing:
        # json.loads
        # of 128 MB of "[]," builds tens of millions of objects (3.5 GB, seconds holding the GIL) before any check.
        tokens = sum(body.count(token) for token in (b",", b":", b"[", b"{"))
        if tokens > MAX_JSON_TOKENS:
            raise RequestError(
                f"the JSON body has {tokens} commas, colons and brackets; a request's JSON holds one base64 string and "
                "a few "
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


def tensor_reply(tensor: torch.Tensor, encoding: str, headers: dict[str, str] | None = None) -> HttpReply:
    shape, dtype = list(tensor.shape), dtype_name(tensor.dtype)
    headers = {**(headers or {}), "shape": json.dumps(shape, separators=(",", ":")), "dtype": dtype}
    data = tensor_to_bytes(tensor)
    if encoding in JSON_TYPES:
        document = {"inputs": base64.b64encode(data).decode(), "parameters": {"shape": shape, "dtype": dtype}}
        return HttpReply(200, json.dumps(document).encode(), encoding, headers)
    return HttpReply(200, data, "tensor/binary", headers)


def named_tensors_reply(tensors: dict[str, torch.Tensor], headers: dict[str, str] | None = None) -> HttpReply:
    """Several tensors in one reply, as one safetensors file (a video and its sound's waveforms)."""
    from safetensors.torch import save

    body = save({name: tensor.contiguous() for name, tensor in tensors.items()})
    return HttpReply(200, body, SAFETENSORS_TYPE, headers)


def failure_reply(exc: Exception) -> HttpReply:
    """A client's mistake as its 4xx (or 503) JSON; anything else as a 500 that hides the details. Call it in an except
    block."""
    if isinstance(exc, RequestError):
        return error_reply(exc.status, exc.message, exc.headers)
    log.exception("unexpected error while serving a request")  # a bug, not the client's fault: log it, hide it
    return error_reply(500, "internal error while processing the request; see the server log")
