"""The inference core: one request in, one result out, for any front end.

The HTTP server (server.py via wire.py) and the Inference Endpoints adapter
(handler.py) both build a DecodeRequest or EncodeRequest and call a
VaeService, so there is one path from request to pixels. Stages in order:
latents (check, unpack, scale) -> vae (decode / encode) -> media (postprocess).
Image and video families share the path; the family's data says which.

A request becomes a Job in three steps, so a server can queue only the part
that needs the device: `prepare_*` checks and builds tensors (CPU, no model),
`Job.run` uses the model, `Job.finish` does CPU-only media work (MP4 writing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch

from . import latents as latent_ops
from .errors import RequestError
from .families import Family
from .media import VIDEO_TYPES, Mp4Options, Postprocessor, VideoFile, VideoPostprocessor, is_image_file, is_video_file, open_image, parse_dtype, tensor_from_bytes, video_demuxer
from .vae import LoadedVae

# What a decode returns, by name (images / videos; a video batch's clips follow one another):
#   raw:   [B, 3, H, W] / [B, 3, F, H, W] decoder output in the model dtype (about -1..1)
#   uint8: [B, H, W, 3] / [B*F, H, W, 3] denormalised 0..255
#   unit:  [B, 3, H, W] / [B*F, 3, H, W] float in 0..1
#   image: PIL images (the wire encodes them as JPEG / PNG / WebP); images only
#   mp4:   the bytes of an H.264 MP4; videos only
IMAGE_FORMS = ("raw", "uint8", "unit", "image")
VIDEO_FORMS = ("raw", "uint8", "unit", "mp4")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 256 * 1024 * 1024
    # Pixels over the whole batch, of a decode's output or an encode's input.
    max_pixels: int = 4 * 2048 * 2048
    # The same over every frame of a video batch: 2^27 holds 129 frames of 1280x720.
    max_video_pixels: int = 1 << 27
    # Images or videos in one request.
    max_batch: int = 64


@dataclass
class RawTensor:
    """A tensor as the wire carries it: shape, dtype name and raw memory."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes


@dataclass
class DecodeRequest:
    latent: RawTensor
    form: str = "image"
    scaling: latent_ops.Scaling = field(default_factory=latent_ops.Scaling)
    height: int | None = None
    width: int | None = None
    mp4: Mp4Options = field(default_factory=Mp4Options)


@dataclass
class Decoded:
    """A decode's result and what it holds: `count` images or videos of `frames` frames each."""

    value: torch.Tensor | list[PIL.Image.Image] | bytes
    count: int
    frames: int | None = None  # None for images


def _unchanged(value: Any) -> Any:
    return value


@dataclass
class Job:
    """A checked request: `run` does the device work, `finish` the CPU-only media work on its result.

    `count` images or videos (of `frames` frames; None for images) go in or come out.
    """

    run: Callable[[], Any]
    count: int
    frames: int | None = None
    finish: Callable[[Any], Any] = _unchanged

    def __call__(self) -> Any:
        return self.finish(self.run())


@dataclass
class EncodeRequest:
    image: PIL.Image.Image | bytes | None = None  # an image, or an image or video file's bytes
    tensor: RawTensor | None = None  # or [B, 3, H, W] / [B, 3, F, H, W] in -1..1
    scaling: latent_ops.Scaling = field(default_factory=latent_ops.Scaling)


class VaeService:
    def __init__(self, vae: LoadedVae, limits: Limits):
        self.vae = vae
        self.family: Family = vae.family
        self.limits = limits
        video = self.family.is_video
        self.post = (VideoPostprocessor if video else Postprocessor)(self.family.spatial_compression)
        self.forms = VIDEO_FORMS if video else IMAGE_FORMS
        self.max_pixels = limits.max_video_pixels if video else limits.max_pixels

    def _require(self, operation: str) -> None:
        if not self.family.serves(operation):
            raise RequestError(f"family {self.family.name} does not {operation}; it serves: {', '.join(self.family.operations)}")

    def prepare_decode(self, request: DecodeRequest) -> Job:
        self._require("decode")
        raw = request.latent
        plan = latent_ops.plan_decode(raw.shape, self.family, request.height, request.width)
        latent_ops.check_batch(plan.batch, self.limits.max_batch)
        latent_ops.check_output_size(plan, self.family, self.max_pixels)
        if request.form not in self.forms:
            if self.family.is_video:
                hint = "decodes videos: ask for output_type=mp4, pt, or pil with a client-side processor (Accept: tensor/binary), not an image file"
            else:
                hint = "decodes images: output_type=mp4 is for video families; use output_type=pil or pt"
            raise RequestError(f"{self.family.name} {hint}")
        latents = tensor_from_bytes(raw.data, raw.shape, parse_dtype(raw.dtype))
        latent_ops.check_finite(latents, "latent")
        latents = latent_ops.unpack(latents, plan)
        # Convert, then scale: on CPU a float16 latent is scaled in float32, not in float16.
        latents = latents.to(self.vae.dtype)
        latents = request.scaling.normalisation(self.family).unscale(latents)
        frames = plan.output_frames(self.family) if plan.latent_frames else None
        if request.form == "mp4":
            # The device's part ends at uint8 frames; the MP4 is written after the model is free again.
            return Job(partial(self.vae.decode, latents, self.post.uint8), plan.batch, frames, partial(self.post.mp4, options=request.mp4))
        return Job(partial(self.vae.decode, latents, getattr(self.post, request.form)), plan.batch, frames)

    def decode(self, request: DecodeRequest) -> Decoded:
        job = self.prepare_decode(request)
        return Decoded(job(), job.count, job.frames)

    def prepare_encode(self, request: EncodeRequest) -> Job:
        self._require("encode")
        if request.tensor is not None:
            pixels = self._pixel_tensor(request.tensor)
        else:
            pixels = self._video_file(request.image) if self.family.is_video else self._image_file(request.image)
        normalisation = request.scaling.normalisation(self.family)

        def run() -> torch.Tensor:
            return normalisation.scale(self.vae.encode(pixels)).cpu()

        return Job(run, pixels.shape[0], pixels.shape[2] if pixels.ndim == 5 else None)

    def encode(self, request: EncodeRequest) -> torch.Tensor:
        return self.prepare_encode(request)()

    def _pixel_tensor(self, raw: RawTensor) -> torch.Tensor:
        """Images [B, 3, H, W] or videos [B, 3, F, H, W] in -1..1, their size checked before allocation."""
        latent_ops.check_dims(raw.shape)
        video = self.family.is_video
        kind, layout = ("video", "[B, 3, F, H, W] in -1..1 (F = 1 for a single image)") if video else ("image", "[B, 3, H, W] in -1..1")
        if len(raw.shape) != (5 if video else 4) or raw.shape[1] != 3:
            raise RequestError(f"{kind} tensor has shape {list(raw.shape)}; expected {layout}")
        latent_ops.check_batch(raw.shape[0], self.limits.max_batch)
        if video:
            batch, _, frames, height, width = raw.shape
            latent_ops.check_video_size(batch, frames, height, width, self.family, self.max_pixels)
        else:
            latent_ops.check_image_size(raw.shape[0], raw.shape[2], raw.shape[3], self.family, self.max_pixels)
        pixels = tensor_from_bytes(raw.data, raw.shape, parse_dtype(raw.dtype))
        latent_ops.check_finite(pixels, f"{kind} tensor", "in -1..1")
        return pixels

    def _image_file(self, image: PIL.Image.Image | bytes | None) -> torch.Tensor:
        """[1, 3, H, W] in -1..1 from an image or its file bytes."""
        if image is None:
            raise RequestError("nothing to encode: send an image file (PNG, JPEG, WebP) or a tensor with shape and dtype")
        if isinstance(image, (bytes, bytearray)):
            if is_video_file(image):
                raise RequestError(f"{self.family.name} encodes images; this is a video file: send it to a video family")
            image = open_image(bytes(image), self.max_pixels)
        else:
            image = image.convert("RGB")
        latent_ops.check_image_size(1, image.height, image.width, self.family, self.max_pixels)
        return self.post.preprocess(image)

    def _video_file(self, data: PIL.Image.Image | bytes | None) -> torch.Tensor:
        """[1, 3, F, H, W] in -1..1 from a video file, or from an image (a one-frame video)."""
        if data is None:
            raise RequestError("nothing to encode: send a video file (MP4, WebM, GIF), an image, or a [B, 3, F, H, W] tensor with shape and dtype")
        if isinstance(data, PIL.Image.Image):
            frames = np.asarray(data.convert("RGB"))[None]
        elif video_demuxer(data):
            frames = self._read_video(bytes(data))
        elif is_image_file(data):
            frames = np.asarray(open_image(bytes(data), self.max_pixels))[None]
        else:
            raise RequestError(f"body is neither a video file ({VIDEO_TYPES}) nor an image file (PNG, JPEG, WebP)")
        latent_ops.check_video_size(1, frames.shape[0], frames.shape[1], frames.shape[2], self.family, self.max_pixels)
        return self.post.preprocess_frames(frames)

    def _read_video(self, data: bytes) -> np.ndarray:
        with VideoFile(data) as video:
            latent_ops.check_sides(video.height, video.width, self.family, "video frame")
            return video.frames(max_frames=max(1, self.max_pixels // (video.width * video.height)))
