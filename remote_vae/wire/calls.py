"""One call through the wire (docs/protocol.md), in the steps the server queues between: inspect (parse and check,
from the numbers alone) -> prepare (decode the file or build the latents) -> the model (service.run, batched) ->
render (the reply's bytes). `dispatch` runs all of them at once, for handler.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import PIL.Image
import torch

from ..service import Checked, DecodeRequest, EncodeRequest, Job, VaeService
from ..vocabulary import AUDIO_FORMATS, MEDIA_TYPES, SOUND_REPLY_NAMES, Operation, OutputForm
from .http import (
    JSON_TYPES,
    HttpCall,
    HttpReply,
    first_accepted,
    media_type,
    named_tensors_reply,
    read_payload,
    tensor_reply,
)
from .parameters import Params
from .parse import ReplyShape, infer_operation, mp4_options, negotiate_decode, parse_decode, parse_encode

log = logging.getLogger("remote_vae")


# -- rendering ---------------------------------------------------------------


def count_headers(job: Job) -> dict[str, str]:
    """How many images, videos and frames per video, or audio clips and samples per clip, a decode reply holds."""
    if job.sampling_rate is not None:
        samples = str(job.pixels // job.count)
        return {"audio-count": str(job.count), "sample-count": samples, "sample-rate": str(job.sampling_rate)}
    if job.frames is None:
        return {"image-count": str(job.count)}
    counts = {"video-count": str(job.count), "frame-count": str(job.frames)}
    return counts if job.sound is None else {**counts, **count_headers(job.sound)}


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


@dataclass
class WireRequest:
    """One request as the wire reads it, whoever received it: the HTTP server (`WireRequest.of`) or handler.py."""

    params: Params
    data: bytes
    content_type: str = ""
    accept: str = ""
    operation: str | None = None  # "decode" / "encode" for explicit routes, None to infer
    images_as: OutputForm = OutputForm.IMAGE  # an image reply's form: IMAGE (the file's bytes) or PIL (handler.py)

    @classmethod
    def of(cls, call: HttpCall) -> WireRequest:
        params, data = read_payload(call)
        return cls(params, data, media_type(call.content_type), first_accepted(call.accept), call.operation)


def inspect(service: VaeService, wire: WireRequest) -> Inspected:
    """Parse and check one request up to the point where it would decode or allocate; shared by the HTTP server and
    handler.py."""
    params, data, accept = wire.params, wire.data, wire.accept
    audio = service.family.audio
    operation = wire.operation or infer_operation(
        wire.content_type, data, params.shape(), audio.channels if audio else None, service.family.pixel_channels
    )
    if operation == Operation.ENCODE:
        reply = ReplyShape(tensor_encoding=accept if accept in JSON_TYPES else "binary")
        request = parse_encode(wire.content_type, params, data)
        return Inspected(Operation.ENCODE, request, service.check_encode(request, reply.tensor_encoding), reply)
    form, reply = negotiate_decode(params, accept, service.png_compression, audio is not None)
    request = parse_decode(params, data, wire.content_type)
    request.form = wire.images_as if form == OutputForm.IMAGE else form
    if form == OutputForm.MP4:
        request.mp4 = mp4_options(params)
    request.image = reply.image
    request.audio = reply.audio
    return Inspected(Operation.DECODE, request, service.check_decode(request, reply.tensor_encoding), reply)


def prepare_inspected(service: VaeService, inspected: Inspected) -> Prepared:
    """The job of a request `inspect` has checked: its latents built, or its file decoded."""
    if inspected.operation == Operation.ENCODE:
        encoded = service.prepare_encode(inspected.request, inspected.checked)
        return Prepared(encoded, OutputForm.LATENTS, inspected.reply)
    job = service.prepare_decode(inspected.request, inspected.checked)
    return Prepared(job, inspected.request.form, inspected.reply, count_headers(job))


def prepare(service: VaeService, wire: WireRequest) -> Prepared:
    """Parse, check and prepare one request at once, up to the point where it needs the model."""
    inspected = inspect(service, wire)
    try:
        return prepare_inspected(service, inspected)
    finally:
        inspected.close()


def inspect_call(service: VaeService, call: HttpCall) -> Inspected:
    return inspect(service, WireRequest.of(call))


def prepare_call(service: VaeService, call: HttpCall) -> Prepared:
    return prepare(service, WireRequest.of(call))


def render(prepared: Prepared, result: Any) -> HttpReply:
    """The reply body from what the model stage returned: MP4 and image files finished, tensors as bytes."""
    value = prepared.job.finish(result)
    if prepared.form == OutputForm.IMAGE:
        return HttpReply(200, value, MEDIA_TYPES[prepared.reply.image.format], prepared.headers)
    if prepared.form == OutputForm.MP4:
        return HttpReply(200, value, "video/mp4", prepared.headers)
    if prepared.form == OutputForm.AUDIO:
        return HttpReply(200, value, AUDIO_FORMATS[prepared.reply.audio.format], prepared.headers)
    if prepared.job.sound is not None:  # the video's tensor and its waveforms
        return named_tensors_reply(dict(zip(SOUND_REPLY_NAMES, value, strict=True)), prepared.headers)
    return tensor_reply(value, prepared.reply.tensor_encoding, prepared.headers)


@dataclass
class Outcome:
    """A served request before rendering: latents, or a decode result (PIL images for an image reply), and how the reply
    should look."""

    form: OutputForm
    value: torch.Tensor | list[PIL.Image.Image] | bytes
    reply: ReplyShape
    headers: dict[str, str] = field(default_factory=dict)


def dispatch(service: VaeService, wire: WireRequest) -> Outcome:
    """All of one request at once, without a queue (handler.py: the toolkit runs one request at a time and writes image
    files itself, so images come back as PIL images)."""
    prepared = prepare(service, replace(wire, images_as=OutputForm.PIL))
    return Outcome(prepared.form, service.call(prepared.job), prepared.reply, prepared.headers)
