"""The run policy: how one model call runs, and what happens when the device runs out of memory.

A batch runs in one call when it fits the family's pixel budget on this device, else one sample at a time (as
diffusers' slicing does); both give the same results to float rounding, since every layer of these VAEs treats samples
independently. A frame larger than the family's `tile_above_pixels` is decoded in tiles: exactly (tiling/) where the
model allows it, else by diffusers' own blended tiling. A call that runs out of device memory frees the allocator's
cache and runs again one sample at a time, then tiled, as far as the model can; then it is refused with a 503.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from diffusers.models.modeling_utils import ModelMixin

from ..device import BatchBudget, DevicePath, available_memory, compiled_calls, to_device
from ..errors import RequestError
from ..families import Family
from ..latents import Normalisation, ScalarFactors, own_normalisation
from ..tiling import Tiler, tiler_for
from ..vocabulary import LatentDist, ModelLatents, Tiling
from .loading import blends_tiles, model_description, weight_stats

log = logging.getLogger("remote_vae")

# Output pixels per band of the exact tiled path: what one step of device work is sized by.
DEFAULT_BAND_PIXELS = {"cuda": 1 << 20, "cpu": 1 << 16}
# Host memory one whole activation of the exact tiled path may take before its bands are recomputed instead:
# what keeps a large decode's memory flat (a 4096² image's widest SD activation is 8 GiB).
DEFAULT_STORE_BYTES = 256 << 20
_OUT_OF_MEMORY = object()


def compile_key(operation: str, inputs: torch.Tensor) -> tuple:
    """What a compiled graph is for: the operation, one sample's input shape, and whether the batch is of one
    (torch specialises a batch of one; any larger batch shares one graph with a dynamic size)."""
    return (operation, tuple(inputs.shape[1:]), inputs.shape[0] == 1)


class Compilation:
    """Whether a model is compiled, the shapes warmed up, and the compile stance around each of its calls."""

    def __init__(self, family: Family):
        self.family = family
        self.enabled = False
        self.warmed: set[tuple] = set()  # compile_key()s with compiled graphs
        self.warming = False  # warm_up is running: compiling new shapes is what it is for
        self._said_unwarmed: set[tuple] = set()

    def stance(self, operation: str, inputs: torch.Tensor) -> AbstractContextManager:
        """The compile stance around a call; says once per shape when a request's shape was not warmed up."""
        if not self.enabled:
            return nullcontext()
        key = compile_key(operation, inputs)
        if not self.warming and key not in self.warmed and key not in self._said_unwarmed:
            self._said_unwarmed.add(key)
            log.warning(
                "%s: %s of %s x %s was not warmed up, so it runs eagerly rather than compiling inside a request; "
                "add its size to --warmup-sizes",
                self.family.name,
                operation,
                inputs.shape[0],
                list(inputs.shape[1:]),
            )
        return compiled_calls(self.warming)


class FrameSink(Protocol):
    """Receives a video decoder's output chunk by chunk, while the rest is still being decoded."""

    def chunk(self, frames: torch.Tensor) -> None:
        """[b, 3, f, H, W] finished frames on the device, in order: all rows of the call at once, or one row at a
        time."""

    def restart(self) -> None:
        """Forget what came so far: the call failed and runs again."""


@dataclass
class LoadedVae:
    """A family's model on its device, and how each call runs: whole, one sample at a time, or tiled."""

    family: Family
    model: ModelMixin
    device: torch.device
    dtype: torch.dtype
    source: str
    tile_above_pixels: int | None = None  # None: never tile
    path: DevicePath = field(default_factory=DevicePath)
    budget: BatchBudget = field(default_factory=BatchBudget)
    band_pixels: int | None = None  # output pixels per band of the exact tiled path; None: by device
    # The most one whole activation of the exact tiled path may take in host memory; None: DEFAULT_STORE_BYTES.
    store_bytes: int | None = None
    # What the VAE's decoded output runs through to become the waveform (LTX-2's vocoder), or None
    vocoder: ModelMixin | None = None

    def __post_init__(self):
        # One inference at a time per model: the device is the bottleneck, and
        # interleaving two large decodes only doubles peak memory.
        self._lock = threading.Lock()
        self.exact_tiler = tiler_for(self.model)
        self.exact_tiling = self.exact_tiler is not None
        self.band_pixels = self.band_pixels or DEFAULT_BAND_PIXELS.get(self.device.type, DEFAULT_BAND_PIXELS["cpu"])
        self.blends_tiles = blends_tiles(self.model)
        # A model that decodes only in its tiles: the smallest latent (frames, side) one covers, from its own config
        tile = self.family.tiled_only
        self.smallest_latent = (
            (tile["frames"], self.model.config[tile["side"]] // self.family.spatial_compression) if tile else None
        )
        self.can_tile = self.blends_tiles or self.exact_tiling
        self.layout = self.family.layout
        self.samples_per_call = self.family.samples_per_call or 1 << 30
        # What do_scaling=True undoes: the family's factors or statistics, or those in the weights.
        self.normalisation: Normalisation = own_normalisation(self.family, weight_stats(self.family, self.model))
        # What a drop-in VAE needs (GET /families), read once: it copies buffers from the device
        self.description = model_description(self.family, self.model, self.vocoder)
        # The decode keyword for a decode timestep, where the model is conditioned on one (LTX 0.9.1+).
        timestep = self.family.decode_timestep
        self.timestep_argument = timestep if timestep and self.model.config.get("timestep_conditioning", True) else None
        # Read by /metrics: out-of-memory events by outcome, model calls by how they ran.
        self.oom_events = {"retried_sliced": 0, "retried_tiled": 0, "refused": 0}
        self.calls = {"whole": 0, "sliced": 0, "tiled": 0}
        self.compilation = Compilation(self.family)

    def check_covers_a_tile(self, latent_frames: int | None, height: int, width: int) -> None:
        """A 400 for a latent smaller than one of the model's tiles, where it decodes only in them (Allegro)."""
        if self.smallest_latent is None:
            return
        frames, side = self.smallest_latent
        if (latent_frames or 0) < frames or height < side or width < side:
            compression = self.family.spatial_compression
            raise RequestError(
                f"latent [T={latent_frames}, h={height}, w={width}] is smaller than one of {self.family.name}'s decode "
                f"tiles, {frames} x {side} x {side} latent cells ({self.family.frames_for(frames)} frames of "
                f"{side * compression}x{side * compression} pixels): the model decodes only in its tiles"
            )

    def _starts_tiled(self, frame_pixels: int, asked: str | None) -> bool:
        """Whether a call starts tiled: past the threshold, asked for blended tiles (the model then tiles where a local
        enable_tiling() would), or a model that decodes only in its tiles (Allegro: its untiled path raises)."""
        return (
            self.tiles(frame_pixels)
            or (asked == Tiling.BLEND and self.blends_tiles)
            or self.family.tiled_only is not None
        )

    def tiles(self, frame_pixels: int) -> bool:
        """Whether an image or frame of this many pixels is decoded / encoded in tiles."""
        return self.can_tile and self.tile_above_pixels is not None and frame_pixels > self.tile_above_pixels

    def checked_tiling(self, requested: str | None) -> str | None:
        """The tiling a request asks for, refused where the model has no such path."""
        self.tiling_for(requested)
        return requested

    def check_distribution(self, normalisation: Normalisation) -> None:
        """For latent_dist=parameters: refused where the encoder returns a latent, not a distribution (its description
        says which), or where `normalisation` would change the model's own latents (none, or a preview decoder's)."""
        if self.description["encoder_output"] != "latent_dist":
            raise RequestError("this VAE's encoder returns a latent, not a distribution; send latent_dist=mean")
        own = self.normalisation if self.family.model_latents == ModelLatents.NORMALISED else ScalarFactors()
        if normalisation != own:
            raise RequestError("latent_dist=parameters returns the VAE's own mean and log-variance; send no scaling")

    def tiling_for(self, requested: str | None) -> str:
        """The tiling a call uses when it tiles: the requested one, else the family's default ('exact' where the model
        allows it), else diffusers' 'blend'."""
        if requested == "exact" and not self.exact_tiling:
            raise RequestError(
                f"{self.family.name} has no exact tiled path (its encoder and decoder are neither GroupNorm, "
                "convolutions and plain samplers nor row-local outside the mid block); send tiling=blend"
            )
        return requested or ("exact" if self.exact_tiling and self.family.default_tiling == "exact" else "blend")

    def _exactly(self, call: Callable, output_pixels: int) -> Callable:
        """call run with the exact tiler in place of the model's encoder and decoder."""

        def run(values: torch.Tensor, **extra) -> torch.Tensor:
            with self._tiler(values, output_pixels).installed():
                return call(values, **extra)

        return run

    def _tiler(self, inputs: torch.Tensor, output_pixels: int) -> Tiler:
        """An exact tiler whose whole activations stay on the device while about three of them fit there, else wait in
        host memory, where one is held whole up to `store_bytes` and past that the bands are recomputed."""
        if not self.exact_tiler.keeps_activations:
            return self.exact_tiler(self.model, band_pixels=self.band_pixels)
        widest = max(getattr(self.model.config, "block_out_channels", None) or [128])
        whole = inputs.shape[0] * widest * output_pixels * self.dtype.itemsize
        if self.device.type == "cuda" and 3 * whole < available_memory(self.device) // 2:
            return self.exact_tiler(self.model, band_pixels=self.band_pixels, store=self.device)
        limit = DEFAULT_STORE_BYTES if self.store_bytes is None else self.store_bytes
        return self.exact_tiler(self.model, band_pixels=self.band_pixels, store=torch.device("cpu"), store_limit=limit)

    def decode(
        self,
        latents: torch.Tensor,
        frames: FrameSink | None = None,
        timestep: torch.Tensor | None = None,
        tiling: str | None = None,
    ) -> torch.Tensor:
        """Decode the VAE's latents [B, C, (T,) h, w] (scaled already; on the host) to the decoder's raw output, on the
        device.

        `frames`, for models whose untiled decoder emits finished frames call by call
        (the family's `streams_frames`), receives them as they come. `timestep` ([B])
        goes to models conditioned on a decode timestep. Images decoded as one-frame
        videos (`frame_axis`) come back as images [B, 3, H, W].
        """
        compression, audio = self.family.spatial_compression, self.family.audio
        frame_pixels = latents.shape[-2] * latents.shape[-1] * compression**2
        if audio is not None:  # a waveform's samples, every channel: what sizes its memory
            frame_pixels = audio.channels * audio.samples_for(latents.shape[-1])
        frame_count = self.family.frames_for(latents.shape[2]) if self.family.is_video else 1
        streams = frames if self.family.streams_frames else None
        extra = {self.timestep_argument: timestep} if self.timestep_argument and timestep is not None else {}
        call = lambda z, **kw: self.model.decode(z, **kw).sample  # noqa: E731
        if self.vocoder is not None:  # LTX-2's audio: latent -> mel spectrogram -> waveform, as its pipeline runs them
            spectrogram = call
            call = lambda z, **kw: self.vocoder(spectrogram(z, **kw))  # noqa: E731
        if self.family.frames_as_batch:
            call = _frames_as_batch(call, num_frames=True)
        if self.family.decoded_frames_first:  # Allegro's [B, F, C, H, W] as the others', as its pipeline permutes it
            frames_first = call
            call = lambda z, **kw: frames_first(z, **kw).permute(0, 2, 1, 3, 4)  # noqa: E731
        exact = self._exactly(call, frame_pixels * frame_count) if self.tiling_for(tiling) == "exact" else None
        sample = self._run("decode", latents, frame_pixels, frame_count, call, streams, extra, exact, tiling)
        return sample.squeeze(2) if self.layout.frame_axis else sample

    def encode(
        self, images: torch.Tensor, tiling: str | None = None, latent_dist: LatentDist = LatentDist.MEAN
    ) -> torch.Tensor:
        """Encode [B, 3, (F,) H, W] pixels in -1..1 (an audio family's waveform [B, channels, N], whose H x W is its
        samples; on the host) to the VAE's latent, the distribution's mean (deterministic) or its parameters
        (`latent_dist`), on the device."""
        if self.layout.frame_axis:
            images = images.unsqueeze(2)
        frame_count = images.shape[2] if self.family.is_video else 1
        frame_pixels = images.shape[-2] * images.shape[-1]
        call = lambda x: latent_of(self.model.encode(x), latent_dist)  # noqa: E731
        if self.family.frames_as_batch:
            call = _frames_as_batch(call)
        exact = self._exactly(call, frame_pixels * frame_count) if self.tiling_for(tiling) == "exact" else None
        return self._run("encode", images, frame_pixels, frame_count, call, exact=exact, asked=tiling)

    def _run(
        self,
        operation: str,
        inputs: torch.Tensor,
        frame_pixels: int,
        frame_count: int,
        call: Callable,
        frames: FrameSink | None = None,
        extra: dict[str, torch.Tensor] | None = None,
        exact: Callable | None = None,
        asked: str | None = None,
    ):
        """call(inputs) whole, one sample at a time, or tiled (by `exact` where given, else the model's own blended
        tiling). Blended tiles `asked` for are switched on whatever the size: the model then tiles where a local
        enable_tiling() would (diffusers' own rule, a side past its tile size), so the pixels are that pipeline's."""
        batch = inputs.shape[0]
        with self._lock, torch.inference_mode(), self.compilation.stance(operation, inputs):
            values = to_device(inputs, self.device, self.dtype, self.path)
            extra = {name: value.to(self.device, self.dtype) for name, value in (extra or {}).items()}
            tiled = self._starts_tiled(frame_pixels, asked)
            sliced = batch > self.samples_per_call or (
                batch > 1 and not self.budget.allows(batch * frame_count * frame_pixels, self.device)
            )
            while True:
                # Tiled, the decoder sees tiles or bands, not whole frames: nothing to stream (the frames go after).
                result = self._attempt(
                    exact if tiled and exact else call,
                    values,
                    sliced,
                    tiled and not exact,
                    None if tiled else frames,
                    extra,
                )
                if result is not _OUT_OF_MEMORY:
                    self.calls["tiled" if tiled else "sliced" if sliced else "whole"] += 1
                    return result
                sliced, tiled, outcome = self._after_out_of_memory(batch, sliced, tiled)
                log.warning(
                    "%s: out of device memory on %d x %d-pixel %s; %s",
                    self.family.name,
                    batch,
                    frame_pixels,
                    operation,
                    outcome.replace("_", " "),
                )
                self.oom_events[outcome] += 1
                if frames is not None:
                    frames.restart()

    def _after_out_of_memory(self, batch: int, sliced: bool, tiled: bool) -> tuple[bool, bool, str]:
        """The out-of-memory ladder: one sample at a time, then tiled; then the request is refused with 503."""
        if batch > 1 and not sliced:
            return True, tiled, "retried_sliced"
        if self.can_tile and not tiled:
            return True, True, "retried_tiled"
        self.oom_events["refused"] += 1
        even = " even tiled" if self.can_tile else ""
        raise RequestError(
            f"{self.family.name}: the device ran out of memory on this request{even}; retry later, or "
            "send a smaller batch or size",
            status=503,
            headers={"Retry-After": "10"},
        )

    def _attempt(
        self, call: Callable, values: torch.Tensor, sliced: bool, tiled: bool, frames: FrameSink | None, extra: dict
    ):
        """call(values, **extra) sliced, and with the model's own tiling as asked; _OUT_OF_MEMORY, with the cache freed,
        if the device ran out.

        Sliced runs one sample per call, as diffusers' use_slicing does, but here for every
        model and with per-sample arguments (LTX's slicing drops its timestep).
        """
        if self.blends_tiles:
            self.model.use_tiling = tiled
        hook = self.model.decoder.register_forward_hook(lambda module, args, out: frames.chunk(out)) if frames else None
        try:
            if sliced and values.shape[0] > 1:
                rows = range(values.shape[0])
                return torch.cat([call(values[i : i + 1], **{k: v[i : i + 1] for k, v in extra.items()}) for i in rows])
            return call(values, **extra)
        except torch.cuda.OutOfMemoryError:
            pass
        finally:
            if hook is not None:
                hook.remove()
        # Outside the except block: the exception and its frames' tensors are gone, so their memory can be freed.
        free_device_memory(self.device)
        return _OUT_OF_MEMORY


def _frames_as_batch(call: Callable, num_frames: bool = False) -> Callable:
    """call on videos [B, C, F, h, w] for a model that takes their frames as a batch [B*F, C, h, w] (and, decoding,
    their count: SVD's temporal decoder mixes the frames of each clip), back in [B, C', F, H, W]."""

    def run(videos: torch.Tensor, **extra) -> torch.Tensor:
        batch, channels, frames = videos.shape[:3]
        flat = videos.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, *videos.shape[3:])
        out = call(flat, **({"num_frames": frames} if num_frames else {}), **extra)
        return out.reshape(batch, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    return run


def latent_of(encoded, latent_dist: LatentDist = LatentDist.MEAN) -> torch.Tensor:
    """An encoder's latent: the distribution's mean (deterministic) or its parameters (mean and log-variance), or the
    latent itself where the model has no distribution (taesd's `latents`, DC-AE's `latent`)."""
    distribution = getattr(encoded, "latent_dist", None)
    if distribution is None:  # latent_dist=parameters is refused for such a model before it runs (service.py)
        return encoded.latents if hasattr(encoded, "latents") else encoded.latent
    # mode(): a Gaussian's mean, an identity distribution's latent (Cosmos)
    return distribution.parameters if latent_dist == LatentDist.PARAMETERS else distribution.mode()


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
