"""The inference core: requests in, results out, for any front end.

The HTTP server (server/ via wire/) and the Inference Endpoints adapter
(handler.py) both build a DecodeRequest or EncodeRequest and call a
VaeService, so there is one path from request to pixels. Stages in order:
latents (check, unpack, scale) -> vae (decode / encode) -> media (postprocess).
Image and video families share the path; the family's data says which.

A request becomes a Job, so a server can queue only the part that needs the
device and run several requests in one model call:
  prepare_*    checks the request and builds the model's input (CPU, no model);
  run(jobs)    one model call for jobs that share a batch key (server/batching.py
               coalesces them); each job's `respond` turns its rows of the output
               into its result on the device and copies only that back;
  Job.finish   the CPU-only media work (image files, MP4) after the device is free.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import PIL.Image
import torch

from . import latents as latent_ops
from .decoders import (
    IMAGE_TYPES,
    VIDEO_TYPES,
    ImageHeader,
    VideoFile,
    is_image_file,
    is_video_file,
    read_image_header,
    video_demuxer,
)
from .device import to_host
from .errors import RequestError
from .families import Family
from .jobs import (
    IMAGE_DECODE_BYTES_PER_PIXEL,
    LATENT_COPIES,
    MP4_REPLY_BYTES_PER_PIXEL,
    VIDEO_DECODE_BYTES_PER_PIXEL,
    Checked,
    Decoded,
    DecodeRequest,
    DecodeTimestep,
    EncodeRequest,
    Job,
    RawTensor,
    expand_to,
    image_reply_bytes_per_pixel,
    tensor_reply_bytes,
    unchanged,
)
from .media import (
    PNG_COMPRESSION,
    FrameRouter,
    Mp4Stream,
    Postprocessor,
    VideoPostprocessor,
    check_byte_count,
    dtype_name,
    encode_pixels,
    host_tensor,
    jpeg_encoder_for,
    parse_dtype,
    tensor_from_bytes,
)
from .settings import Limits
from .sound import SoundService, check_sound, sound_of, with_sound_job
from .vae import LoadedVae
from .vocabulary import IMAGE_FORMS, VIDEO_FORMS, LatentDist, ModelLatents, OutputForm

log = logging.getLogger("remote_vae")

# Factors finite on their own can still overflow the latent (scaling_factor=1e-320, shift_factor=1e39): every output
# NaN.
SCALED_FINITE = (
    "in {dtype}: choose a scaling_factor and shift_factor that keep the scaled latent finite (e.g. the "
    "family's own: GET /families)"
)


class VaeService:
    def __init__(self, vae: LoadedVae, limits: Limits, png_compression: int = PNG_COMPRESSION):
        self.vae = vae
        self.family: Family = vae.family
        self.limits = limits
        self.png_compression = png_compression  # a PNG reply's zlib level unless the request names one
        video = self.family.is_video
        self.to_host = partial(to_host, path=vae.path)
        self.post = (VideoPostprocessor if video else Postprocessor)(
            self.family.spatial_compression, self.to_host, jpeg_encoder_for(vae.device)
        )
        self.forms = VIDEO_FORMS if video else IMAGE_FORMS
        # What a decode's result is turned into on the device's side, by the form asked for (mp4 and image files
        # take options, so prepare_decode makes theirs per request).
        self.finish_on_device = {
            OutputForm.RAW: self.post.raw,
            OutputForm.UINT8: self.post.uint8,
            OutputForm.UNIT: self.post.unit,
            OutputForm.PIL: self.post.pil,
        }
        self.max_pixels = limits.max_video_pixels if video else limits.max_pixels
        # The service of the family that decodes this one's sound (`Family.sound`), once both are loaded
        self.sound: SoundService | None = None

    def images_per_call(self, job: Job) -> int:
        """How many images or videos like this job's one model call takes whole (at least 1):
        a bigger batch would run one sample at a time, and sharing a call would only make its requests wait for each
        other."""
        whole = self.vae.budget.limit(self.vae.device) // max(1, job.pixels // job.count)
        return max(1, min(whole, self.vae.samples_per_call))

    def _require(self, operation: str) -> None:
        if not self.family.serves(operation):
            raise RequestError(
                f"family {self.family.name} does not {operation}; it serves: {', '.join(self.family.operations)}"
            )

    def check_decode(self, request: DecodeRequest, reply_encoding: str = "binary") -> Checked:
        """Every check a decode needs before a tensor exists, and what it will hold: latents, result and reply."""
        self._require("decode")
        raw = request.latent
        plan = latent_ops.plan_decode(raw.shape, self.family, request.height, request.width, request.packed_memory)
        latent_ops.check_batch(plan.batch, self.limits.max_images_per_request)
        self.vae.check_covers_a_tile(plan.latent_frames, plan.height, plan.width)
        latent_ops.check_output_size(plan, self.family, self.max_pixels)
        if request.form not in self.forms:
            if self.family.is_video:
                hint = (
                    "decodes videos: ask for output_type=mp4, pt, or pil with a client-side processor (Accept: "
                    "tensor/binary), not an image file"
                )
            else:
                hint = "decodes images: output_type=mp4 is for video families; use output_type=pil or pt"
            raise RequestError(f"{self.family.name} {hint}")
        if request.form == OutputForm.IMAGE and request.image.format == "JPEG" and self.family.pixel_channels == 4:
            raise RequestError(
                f"{self.family.name} decodes RGBA images and a JPEG has no alpha channel: ask for image_format=png or "
                "webp, or output_type=pt"
            )
        check_byte_count(raw.data, raw.shape, parse_dtype(raw.dtype))
        self._decode_timestep(request)
        sound = check_sound(self.family, self.sound, request, plan.batch, reply_encoding)
        pixels = plan.output_pixels(self.family)
        latents = math.prod(raw.shape) * LATENT_COPIES * max(4, self.vae.dtype.itemsize)
        if request.form == OutputForm.IMAGE:
            result = pixels * image_reply_bytes_per_pixel(self.family.pixel_channels)
        elif request.form == OutputForm.MP4:
            result = pixels * MP4_REPLY_BYTES_PER_PIXEL
        else:
            element = 1 if request.form == OutputForm.UINT8 else self.vae.dtype.itemsize
            result = tensor_reply_bytes(pixels * self.family.pixel_channels, element, reply_encoding)
        held = latents + result + (sound.hold_bytes if sound else 0)
        return Checked(held, f"a decode to {pixels} pixels as {request.form}", plan=plan)

    def prepare_decode(self, request: DecodeRequest, checked: Checked | None = None) -> Job:
        """The job for a decode, checked first unless `check_decode` already has been (the memory it needs reserved)."""
        plan = (checked or self.check_decode(request)).plan
        raw = request.latent
        timestep = self._decode_timestep(request)
        tiling = self.vae.checked_tiling(request.tiling)
        latents = tensor_from_bytes(raw.data, raw.shape, parse_dtype(raw.dtype))
        latent_ops.check_finite(latents, "latent")
        latents = latent_ops.to_canonical(latents, plan, self.vae.layout)
        # Convert, then scale: on CPU a float16 latent is scaled in float32, not in float16.
        # Scaled here, per request, so requests with different factors can share a model call.
        latents = latents.to(self.vae.dtype)
        latents = self.vae.layout.unfold(
            self._to_model_space(request.scaling.normalisation(self.vae.normalisation), latents)
        )
        latent_ops.check_finite(latents, "latent after scaling", SCALED_FINITE.format(dtype=dtype_name(self.vae.dtype)))
        if timestep is not None:
            denormalised = self.family.pipeline_latents == "denormalised"  # LTX-2 mixes its noise in before that
            latents, timestep = timestep.apply(latents, *([self.vae.normalisation.unscale] if denormalised else []))
        frames = plan.output_frames(self.family) if plan.latent_frames else None
        job = partial(
            Job,
            "decode",
            latents,
            count=plan.batch,
            pixels=plan.output_pixels(self.family),
            frames=frames,
            timestep=timestep,
            tiling=tiling,
        )
        if request.form == OutputForm.MP4:
            width, height = plan.output_size(self.family)
            stream = Mp4Stream(plan.batch, frames, width, height, request.mp4)
            built = job(partial(self.post.mp4, stream=stream), finish=Mp4Stream.result, stream=stream)
        elif request.form == OutputForm.IMAGE:
            # A JPEG may be written on the device; anything else is written after the device is free.
            built = job(
                partial(self.post.image, options=request.image), finish=partial(encode_pixels, options=request.image)
            )
        else:
            built = job(self.finish_on_device[request.form])
        return with_sound_job(self.family, self.sound, built, request, frames or 1)

    def check_encode(self, request: EncodeRequest, reply_encoding: str = "binary") -> Checked:
        """Every check an encode needs before its pixels are decoded or allocated (a file's size from its headers),
        and what it will hold: its pixels and the latents' reply."""
        self._require("encode")
        if request.tensor is not None:
            count, frames, height, width = self._check_pixel_tensor(request.tensor)
            values = count * frames * height * width * self.family.pixel_channels
            held = values * (parse_dtype(request.tensor.dtype).itemsize + max(4, self.vae.dtype.itemsize))
            header = None
        else:
            header = self._open_file(request.image)
            count, frames, height, width = 1, getattr(header, "frame_count", 1), header.height, header.width
            per_pixel = VIDEO_DECODE_BYTES_PER_PIXEL if isinstance(header, VideoFile) else IMAGE_DECODE_BYTES_PER_PIXEL
            held = frames * height * width * per_pixel
        s, latent_frames = self.family.spatial_compression, (frames - 1) // (self.family.temporal_compression or 1) + 1
        if self.family.is_video:  # before a file's frames are decoded (it decodes at most the frames counted here)
            latent_ops.check_frames_covered(request.scaling.normalisation(self.vae.normalisation), latent_frames)
        latent_values = (
            count * latent_frames * math.ceil(height / s) * math.ceil(width / s) * self.family.latent_channels
        ) * (2 if request.latent_dist == LatentDist.PARAMETERS else 1)  # parameters: a mean and a log-variance
        held += tensor_reply_bytes(latent_values, 4, reply_encoding) + latent_values * 4
        what = (
            f"{frames} frames of {width}x{height}" if self.family.is_video else f"{count} image(s) of {width}x{height}"
        )
        return Checked(held, f"an encode of {what}", header)

    def prepare_encode(self, request: EncodeRequest, checked: Checked | None = None) -> Job:
        """The job for an encode, checked first unless `check_encode` already has been (the memory it needs reserved).
        A file's pixels are held as uint8 while the job waits; the model call makes them its float input."""
        checked = checked or self.check_encode(request)
        try:
            if request.tensor is not None:
                inputs, expand = self._pixel_tensor(request.tensor).to(self.vae.dtype), unchanged
                count, frames = inputs.shape[0], (inputs.shape[2] if inputs.ndim == 5 else None)
            else:  # uint8 [1, H, W, 3] or [1, F, H, W, 3]
                inputs = self._decoded(checked.header)
                preprocess = self.post.preprocess_frames if self.family.is_video else self.post.preprocess_pixels
                expand = partial(expand_to, preprocess=preprocess, dtype=self.vae.dtype)
                count, frames = 1, (inputs.shape[1] if self.family.is_video else None)
        finally:
            checked.close()
        normalisation = request.scaling.normalisation(self.vae.normalisation)
        layout = self.vae.layout
        tiling = self.vae.checked_tiling(request.tiling)
        if request.latent_dist == LatentDist.PARAMETERS:
            self.vae.check_distribution(normalisation)  # before the model runs

        def respond(latents: torch.Tensor) -> torch.Tensor:
            if request.latent_dist == LatentDist.PARAMETERS:  # the VAE's own, in the layout its encoder returns
                return self.to_host(latents)
            scaled = self._from_model_space(normalisation, layout.fold(latents))
            latent_ops.check_finite(
                scaled, "latent after scaling", SCALED_FINITE.format(dtype=dtype_name(scaled.dtype))
            )
            return self.to_host(layout.as_pipeline_holds(scaled))

        return Job(
            "encode",
            inputs,
            respond,
            count,
            inputs.numel() // self.family.pixel_channels,
            frames,
            tiling=tiling,
            expand=expand,
            latent_dist=request.latent_dist,
        )

    def _decode_timestep(self, request: DecodeRequest) -> DecodeTimestep | None:
        """The request's decode timestep where the model takes one; refused where the family has none."""
        if request.decode_timestep is not None and not self.family.decode_timestep:
            raise RequestError(
                f"{self.family.name} takes no decode timestep; drop decode_timestep / decode_noise_scale / "
                "decode_noise_seed"
            )
        if self.vae.timestep_argument is None:
            return None  # LTX 0.9.0 weights are not conditioned: LTXPipeline passes no timestep and no noise either
        return request.decode_timestep or DecodeTimestep()

    def _to_model_space(self, normalisation: latent_ops.Normalisation, latents: torch.Tensor) -> torch.Tensor:
        """Undo the client's normalisation; a preview decoder (model_latents 'normalised') then takes the family's own
        again."""
        own = self.vae.normalisation
        if self.family.model_latents != ModelLatents.NORMALISED:
            return normalisation.unscale(latents)
        return latents if normalisation == own else own.scale(normalisation.unscale(latents))

    def _from_model_space(self, normalisation: latent_ops.Normalisation, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of _to_model_space, for an encoder's latent."""
        own = self.vae.normalisation
        if self.family.model_latents != ModelLatents.NORMALISED:
            return normalisation.scale(latents)
        return latents if normalisation == own else normalisation.scale(own.unscale(latents))

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        """One model call for jobs that share a batch key: each job's result, or the exception it failed with.

        When the shared call fails for any reason but running out of memory, each
        job runs again on its own, so one bad request fails alone.
        """
        try:
            outputs = self._model_call(jobs)
        except Exception as exc:
            for job in jobs:
                if job.stream is not None:
                    job.stream.restart()
            if len(jobs) == 1 or isinstance(exc, RequestError):
                return [exc] * len(jobs)
            log.warning(
                "%s: a batch of %d requests failed (%s: %s); running them one at a time",
                self.family.name,
                len(jobs),
                type(exc).__name__,
                exc,
            )
            return [self.run([job])[0] for job in jobs]
        results: list[Any] = []
        for job, output in zip(jobs, outputs, strict=True):
            try:
                results.append(job.respond(output))
            except Exception as exc:
                if job.stream is not None:
                    job.stream.close()  # its writer would wait for frames that never come
                results.append(exc)
        return [sound_of(self.sound, job, result) for job, result in zip(jobs, results, strict=True)]

    def _model_call(self, jobs: Sequence[Job]) -> Sequence[torch.Tensor]:
        """The model's output for all jobs at once, split back into each job's rows."""
        inputs = jobs[0].model_inputs() if len(jobs) == 1 else torch.cat([job.model_inputs() for job in jobs])
        if jobs[0].operation == "encode":
            outputs = self.vae.encode(inputs, jobs[0].tiling, jobs[0].latent_dist)
        else:
            timestep = None if jobs[0].timestep is None else torch.cat([job.timestep for job in jobs])
            outputs = self.vae.decode(inputs, self.frame_router(jobs), timestep, jobs[0].tiling)
        return outputs.split([job.count for job in jobs]) if len(jobs) > 1 else [outputs]

    def frame_router(self, jobs: Sequence[Job]) -> FrameRouter | None:
        """Where decoded frames go while the model runs: each MP4 job's stream, clip by clip."""
        if all(job.stream is None for job in jobs):
            return None
        rows = [(job.stream, clip) if job.stream else None for job in jobs for clip in range(job.count)]
        return FrameRouter(rows, jobs[0].frames, self.to_host)

    def call(self, job: Job) -> Any:
        """One job on its own, media work included (no queue: handler.py, benchmarks)."""
        result = self.run([job])[0]
        if isinstance(result, BaseException):
            raise result
        return job.finish(result)

    def decode(self, request: DecodeRequest) -> Decoded:
        job = self.prepare_decode(request)
        return Decoded(self.call(job), job.count, job.frames)

    def encode(self, request: EncodeRequest) -> torch.Tensor:
        return self.call(self.prepare_encode(request))

    def _check_pixel_tensor(self, raw: RawTensor) -> tuple[int, int, int, int]:
        """(count, frames, height, width) of images [B, 3, H, W] or videos [B, 3, F, H, W], checked from the shape."""
        latent_ops.check_dims(raw.shape)
        sizes = latent_ops.check_pixel_shape(
            raw.shape, self.family, self.limits.max_images_per_request, self.max_pixels
        )
        check_byte_count(raw.data, raw.shape, parse_dtype(raw.dtype))
        return sizes

    def _pixel_tensor(self, raw: RawTensor) -> torch.Tensor:
        """Images [B, 3, H, W] or videos [B, 3, F, H, W] in -1..1, from a tensor `_check_pixel_tensor` has checked."""
        pixels = tensor_from_bytes(raw.data, raw.shape, parse_dtype(raw.dtype))
        latent_ops.check_finite(pixels, f"{'video' if self.family.is_video else 'image'} tensor", "in -1..1")
        return pixels

    def _open_file(self, data: PIL.Image.Image | bytes | None) -> ImageHeader | VideoFile:
        """An image or video file opened and its size checked from its headers, no pixel decoded yet."""
        video = self.family.is_video
        if data is None:
            sent = (
                f"a video file ({VIDEO_TYPES}), an image, or a [B, 3, F, H, W]"
                if video
                else f"an image file ({IMAGE_TYPES}) or a"
            )
            raise RequestError(f"nothing to encode: send {sent} tensor with shape and dtype")
        if isinstance(data, PIL.Image.Image):
            header = ImageHeader(data, None, data.width, data.height)
        elif video and video_demuxer(data):
            header = VideoFile(data)
        elif is_video_file(data):
            raise RequestError(f"{self.family.name} encodes images; this is a video file: send it to a video family")
        elif video and not is_image_file(data):
            raise RequestError(f"body is neither a video file ({VIDEO_TYPES}) nor an image file ({IMAGE_TYPES})")
        else:
            header = read_image_header(data, self.max_pixels)
        try:
            frames = getattr(header, "frame_count", 1)
            if video:
                latent_ops.check_video_size(1, frames, header.height, header.width, self.family, self.max_pixels)
            else:
                latent_ops.check_image_size(1, header.height, header.width, self.family, self.max_pixels)
        except RequestError:
            if isinstance(header, VideoFile):
                header.close()
            raise
        return header

    def _decoded(self, header: ImageHeader | VideoFile) -> torch.Tensor:
        """A file's uint8 pixels, [1, H, W, 3] for an image family ([1, H, W, 4]: RGBA), [1, F, H, W, 3] for a video
        family."""
        cap = self.limits.decode_cpu_seconds
        if isinstance(header, VideoFile):
            frames = header.frames(max_frames=header.frame_count, cap=cap)
            latent_ops.check_video_size(1, frames.shape[0], header.height, header.width, self.family, self.max_pixels)
        else:
            frames = header.pixels(cap, self.family.pixel_mode)[None]
        return host_tensor(frames[None] if self.family.is_video else frames)
