"""Requests and the jobs they become: what a decode or encode asks for (DecodeRequest, EncodeRequest), what checking
it found (Checked: its plan and the host memory it will hold), and the Job the service runs, with the per-pixel facts
that size each reservation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from . import latents as latent_ops
from .decoders import (
    ImageHeader,
    VideoFile,
)
from .media import (
    AudioFile,
    ImageFile,
    Mp4Options,
    Mp4Stream,
)
from .vocabulary import LatentDist, OutputForm, PackedMemory, Tiling

# -- what a request holds on the host ------------------------------------------------
# Reserved from the memory budget (memory.py) before it is allocated, from the sizes alone. Measured against the code
# below; each is an upper bound of the copies alive at once. A request's body is reserved as it arrives
# (server/pipeline.py).
LATENT_COPIES = 6  # from the bytes, canonical, in the model's dtype, scaled, unfolded, noised: 4 bytes a value each


def image_reply_bytes_per_pixel(channels: int = 3) -> int:
    """What an image reply holds a pixel: the uint8 sheet (3, or 4 for RGBA), Pillow's copy (4), the file twice while
    written (up to 2 x (channels + 0.5)): 14 for RGB, 17 for RGBA."""
    return 3 * channels + 5


MP4_REPLY_BYTES_PER_PIXEL = 7  # frames of later clips waiting their turn (3), the MP4 read back (up to 3.5)


IMAGE_DECODE_BYTES_PER_PIXEL = 12  # Pillow's image (4), its RGB conversion (4), the packed array the job holds (3)


VIDEO_DECODE_BYTES_PER_PIXEL = 3  # ffmpeg writes the frames into the one array the job holds


TENSOR_REPLY_COPIES = {"binary": 2, "json": 5}  # the result, its bytes (and base64 twice, for JSON replies)


def tensor_reply_bytes(values: int, element_size: int, encoding: str) -> int:
    return values * element_size * TENSOR_REPLY_COPIES["binary" if encoding == "binary" else "json"]


@dataclass
class Checked:
    """A request checked against the limits from its numbers and headers alone: what it will hold on the host, and
    why."""

    hold_bytes: int
    purpose: str
    header: ImageHeader | VideoFile | None = None  # an encode's file, opened, not yet decoded
    plan: latent_ops.LatentPlan | None = None  # a decode's latent, planned

    def close(self) -> None:
        if isinstance(self.header, VideoFile):
            self.header.close()


@dataclass
class RawTensor:
    """A tensor as the wire carries it: shape, dtype name and raw memory."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes


@dataclass
class DecodeRequest:
    latent: RawTensor
    form: OutputForm = OutputForm.IMAGE
    scaling: latent_ops.Scaling = field(default_factory=latent_ops.Scaling)
    height: int | None = None
    width: int | None = None
    mp4: Mp4Options = field(default_factory=Mp4Options)
    image: ImageFile = field(default_factory=ImageFile)
    audio: AudioFile = field(default_factory=AudioFile)
    decode_timestep: DecodeTimestep | None = None
    packed_memory: PackedMemory | None = None  # token sequences; None: channels first, the pipelines' memory
    tiling: Tiling | None = None  # when the call tiles; None: exact where the model allows
    # The sound's latent, decoded by the family's `sound` family in the same request (LTX-2's audio_latents)
    sound: RawTensor | None = None


@dataclass(frozen=True)
class DecodeTimestep:
    """LTX: the timestep its decoder is conditioned on, and the noise mixed into the latent first, as LTXPipeline does.

    The pipeline draws that noise from its own generator after denoising, which no
    client can hand over; here it comes from `noise_seed` (torch.Generator on the CPU).
    """

    timestep: float = 0.0
    noise_scale: float | None = None  # None: the timestep, as in LTXPipeline
    noise_seed: int = 0

    def apply(
        self, latents: torch.Tensor, noise_space: Callable[[torch.Tensor], torch.Tensor] = lambda noise: noise
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents with the noise mixed in, the timestep per sample). `noise_space` takes the noise into the latent's
        space first: LTX-2's pipeline mixes it into the normalised latent, so the VAE's own takes it denormalised."""
        scale = self.timestep if self.noise_scale is None else self.noise_scale
        timestep = torch.full((latents.shape[0],), self.timestep, dtype=latents.dtype)
        if scale:  # (1 - 0) * z + 0 * noise is z: no noise to draw
            generator = torch.Generator().manual_seed(self.noise_seed)
            noise = noise_space(torch.randn(latents.shape, generator=generator, dtype=latents.dtype))
            scales = torch.full((latents.shape[0],) + (1,) * (latents.ndim - 1), scale, dtype=latents.dtype)
            latents = (1 - scales) * latents + scales * noise
        return latents, timestep


@dataclass
class Decoded:
    """A decode's result and what it holds: `count` images or videos of `frames` frames each."""

    value: torch.Tensor | list[PIL.Image.Image] | bytes
    count: int
    frames: int | None = None  # None for images


def unchanged(value: Any) -> Any:
    return value


@dataclass
class Job:
    """A checked request, ready for the model.

    `inputs` ([b, ...] on the host, in the model's dtype) go through the model with
    other jobs of the same `batch_key`; `respond` turns this job's rows of the
    output (on the device) into its result on the host; `finish` does the CPU-only
    media work on that result once the device is free. `count` images or videos
    (of `frames` frames; None for images) go in or come out. `stream` is the MP4
    a video decode writes while it runs.
    """

    operation: str  # "decode" or "encode"
    inputs: torch.Tensor  # held while the job waits: the model's input, or an encode file's uint8 pixels
    respond: Callable[[torch.Tensor], Any]
    count: int
    pixels: int  # the decode's output or the encode's input: count x frames x height x width
    frames: int | None = None
    finish: Callable[[Any], Any] = unchanged
    stream: Mp4Stream | None = None
    timestep: torch.Tensor | None = None  # [count]: a decode timestep per sample (LTX)
    tiling: str | None = None  # the tiling asked for ("exact", "blend"); None: the family's default
    expand: Callable[[torch.Tensor], torch.Tensor] = unchanged  # held inputs -> the model's input, in the model call
    latent_dist: LatentDist = LatentDist.MEAN  # what an encode returns of the encoder's distribution
    sampling_rate: int | None = None  # audio: `count` clips of `pixels // count` samples per channel at this rate
    # The sound's job (LTX-2's audio), run by the sound family's service after this one's model call: the result is
    # then (this job's result, the waveforms [B, channels, N] on the host)
    sound: Job | None = None

    def model_inputs(self) -> torch.Tensor:
        return self.expand(self.inputs)

    @property
    def batch_key(self) -> tuple:
        """What jobs must share to go through the model in one call: the operation, one sample's shape and dtype,
        conditioning, tiling and what an encode returns."""
        shape = tuple(self.inputs.shape[1:])
        return (self.operation, shape, self.inputs.dtype, self.timestep is not None, self.tiling, self.latent_dist)


@dataclass
class EncodeRequest:
    image: PIL.Image.Image | bytes | None = None  # an image, or an image, video or audio file's bytes
    tensor: RawTensor | None = None  # or [B, 3, H, W] / [B, 3, F, H, W] / a waveform [B, channels, N] in -1..1
    scaling: latent_ops.Scaling = field(default_factory=latent_ops.Scaling)
    tiling: str | None = None
    latent_dist: LatentDist = LatentDist.MEAN


def expand_to(
    pixels: torch.Tensor, preprocess: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    return preprocess(pixels).to(dtype)
