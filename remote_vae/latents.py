"""Latents: check a latent's shape against the family, unpack it, and normalise it as the family's pipeline does.

Shapes are checked from the numbers alone, before any tensor exists, so a
request for an absurd output is refused without allocating anything.

A latent passes through three forms:
  wire       what the client sent: the pipeline's packed token sequence, or a
             latent in the pipeline's layout, or the VAE's own;
  canonical  channels first, in the pipeline's channels (Flux.2: 2x2 patches
             folded into 128 channels): where the pipeline normalises;
  model      what the VAE's decode takes (Flux.2: 32 channels, unfolded).
Encoding runs the other way and answers in the layout the pipeline holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import RequestError
from .families import Family

if TYPE_CHECKING:  # torch is imported where it is used: `remote-vae families` describes layouts without it
    import torch


@dataclass(frozen=True)
class ScalarFactors:
    """Images and HunyuanVideo: one scaling factor and an optional shift (PROTOCOL §5)."""

    scaling_factor: float | None = None
    shift_factor: float | None = None

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Before decode: z / scaling_factor + shift_factor."""
        if self.scaling_factor is not None:
            latents = latents / self.scaling_factor
        if self.shift_factor is not None:
            latents = latents + self.shift_factor
        return latents

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """After encode: (z - shift_factor) * scaling_factor."""
        if self.shift_factor is not None:
            latents = latents - self.shift_factor
        if self.scaling_factor is not None:
            latents = latents * self.scaling_factor
        return latents


@dataclass(frozen=True)
class ChannelStats:
    """Wan: latents normalised per channel, z_norm = (z - mean) / std.

    The arithmetic is the Wan pipelines' own (divide by 1/std, multiply by
    1/std), so results match them bit for bit rather than to rounding.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        view = (1, len(self.mean)) + (1,) * (latents.ndim - 2)
        mean = torch.tensor(self.mean).view(view).to(latents.device, latents.dtype)
        inverse_std = (1.0 / torch.tensor(self.std)).view(view).to(latents.device, latents.dtype)
        return mean, inverse_std

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inverse_std = self._stats(latents)
        return latents / inverse_std + mean

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        mean, inverse_std = self._stats(latents)
        return (latents - mean) * inverse_std


@dataclass(frozen=True, eq=False)
class WeightStats:
    """Flux.2 and LTX: per-channel statistics read from the VAE's weights, z_norm = (z - mean) * scaling_factor / std.

    `std` is computed as the pipeline computes it (Flux.2: sqrt(running_var + eps) in
    the model's dtype); the arithmetic is the pipelines' own.
    """

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float = 1.0

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1) + (1,) * (latents.ndim - 2)
        return self.mean.view(view).to(latents.device, latents.dtype), self.std.view(view).to(
            latents.device, latents.dtype
        )

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return latents * std / self.scaling_factor + mean

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return (latents - mean) * self.scaling_factor / std


Normalisation = ScalarFactors | ChannelStats | WeightStats


def own_normalisation(family: Family, weight_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> Normalisation:
    """The family's own latent normalisation, what do_scaling=True asks for (`weight_stats`: (mean, std) read from the model)."""
    if family.latents_stats_in_weights is not None:
        if weight_stats is None:
            raise ValueError(f"{family.name} normalises with statistics from its weights; none were given")
        return WeightStats(*weight_stats, family.scaling_factor if family.scaling_factor is not None else 1.0)
    if family.latents_mean is not None:
        return ChannelStats(family.latents_mean, family.latents_std)
    return ScalarFactors(family.scaling_factor, family.shift_factor)


@dataclass(frozen=True)
class Scaling:
    """What the client asked for: explicit factors and/or the deprecated do_scaling switch."""

    scaling_factor: float | None = None
    shift_factor: float | None = None
    do_scaling: bool | None = None

    def normalisation(self, own: Normalisation) -> Normalisation:
        """What to undo before decoding (and apply after encoding), given the family's `own` normalisation."""
        # Explicit factors win; do_scaling=True alone means "this family's own normalisation";
        # anything else means the latent is already scaled (ComfyUI sends do_scaling=False).
        if self.scaling_factor is not None or self.shift_factor is not None:
            return ScalarFactors(self.scaling_factor, self.shift_factor)
        if self.do_scaling:
            return own
        return ScalarFactors()


@dataclass(frozen=True)
class LatentLayout:
    """How a family's pipeline holds its latent, relative to what its VAE takes (the config's `latent_layout`)."""

    channels: int  # the VAE's latent channels
    compression: int  # pixels per latent cell along a side
    video: bool
    patch: int = 1  # the pipeline folds patch x patch cells into channels (Flux.2)
    frames_first: bool = False  # the pipeline's video latent is [B, T, C, h, w] (CogVideoX)
    frame_axis: bool = False  # the VAE takes images as one-frame videos [B, C, 1, h, w] (Qwen-Image)
    packing: str = "none"  # the pipeline's token sequence: "patches" (Flux.1), "tokens" (Flux.2, LTX), "none"

    @classmethod
    def of(cls, family: Family) -> "LatentLayout":
        packing = family.latent_layout.get("packing", "none" if family.is_video else "patches")
        return cls(
            family.latent_channels,
            family.spatial_compression,
            family.is_video,
            **{**family.latent_layout, "packing": packing},
        )

    @property
    def pipeline_channels(self) -> int:
        return self.channels * self.patch**2

    def describe(self) -> str:
        """The accepted latent forms, for error messages."""
        c = self.pipeline_channels
        if self.video:
            forms = [
                f"[B, T, {c}, h, w] (as the pipeline holds it) or [B, {c}, T, h, w]"
                if self.frames_first
                else f"[B, {c}, T, h, w]"
            ]
            if self.packing == "tokens":
                forms.append(f"packed [B, T*h*w, {c}] with height and width")
            return " or ".join(forms)
        forms = [f"[B, {c}, 1, h, w] or [B, {c}, h, w]" if self.frame_axis else f"[B, {c}, h, w]"]
        if self.patch > 1:
            forms.append(f"the VAE's own [B, {self.channels}, {self.patch}h, {self.patch}w]")
        if self.packing == "patches":
            forms.append(f"packed [B, seq, {c * 4}] with height and width")
        elif self.packing == "tokens":
            forms.append(f"packed [B, h*w, {c}] with height and width")
        return " or ".join(forms)

    def fold(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's [B, C, h, w] -> canonical [B, C*p*p, h/p, w/p] (Flux2Pipeline._patchify_latents)."""
        if self.patch == 1:
            return latents
        p, (b, c, h, w) = self.patch, latents.shape
        return latents.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)

    def unfold(self, latents: torch.Tensor) -> torch.Tensor:
        """Canonical -> the VAE's latent (Flux2Pipeline._unpatchify_latents)."""
        if self.patch == 1:
            return latents
        p, (b, c, h, w) = self.patch, latents.shape
        return (
            latents.reshape(b, c // (p * p), p, p, h, w)
            .permute(0, 1, 4, 2, 5, 3)
            .reshape(b, c // (p * p), h * p, w * p)
        )

    def as_pipeline_holds(self, latents: torch.Tensor) -> torch.Tensor:
        """Canonical -> the layout the pipeline holds (an encode's reply)."""
        return latents.permute(0, 2, 1, 3, 4).contiguous() if self.frames_first else latents


@dataclass(frozen=True)
class LatentPlan:
    """A decode request's latent, validated: its wire shape, which form it is in, and the VAE latent it becomes."""

    wire_shape: tuple[int, ...]
    batch: int
    height: int  # of the VAE's latent
    width: int
    form: str = "canonical"  # canonical | frames_first | no_frame_axis | unfolded | patches | tokens
    latent_frames: int | None = None  # video only
    tokens_first: bool = False  # tokens: the bytes are a C-contiguous [B, seq, C], not the pipeline's memory

    def output_frames(self, family: Family) -> int:
        """Frames per sample: 1 for an image."""
        return 1 if self.latent_frames is None else family.frames_for(self.latent_frames)

    def output_size(self, family: Family) -> tuple[int, int]:
        """(width, height) in pixels of each decoded image or frame."""
        return self.width * family.spatial_compression, self.height * family.spatial_compression

    def output_pixels(self, family: Family) -> int:
        width, height = self.output_size(family)
        return self.batch * self.output_frames(family) * width * height


def check_dims(shape: tuple[int, ...]) -> None:
    if not shape:
        raise RequestError("shape is missing; send it as repeated query keys, e.g. shape=1&shape=4&shape=64&shape=64")
    if any(dim <= 0 for dim in shape):
        raise RequestError(f"shape {list(shape)} has a dimension below 1; every dimension must be a positive integer")


def plan_decode(
    shape: tuple[int, ...], family: Family, height: int | None, width: int | None, packed_memory: str | None = None
) -> LatentPlan:
    check_dims(shape)
    layout = LatentLayout.of(family)
    kind = "video" if family.is_video else "image"
    expected = f"this family ({family.name}) decodes {kind} latents {layout.describe()}"
    plan = (_plan_video if family.is_video else _plan_image)(shape, layout, height, width, expected)
    if packed_memory == "tokens_first":
        plan = replace(plan, tokens_first=True)
    if plan.latent_frames is not None and family.latent_frames_odd and plan.latent_frames % 2 == 0:
        frames = plan.latent_frames
        raise RequestError(
            f"latent has {frames} latent frames; {family.name} decodes an odd number (e.g. {frames - 1 or 1} or {frames + 1}): "
            f"an even count does not decode to {family.temporal_compression}k+1 frames, and its pipelines never make one"
        )
    return plan


def _plan_image(shape, layout: LatentLayout, height, width, expected: str) -> LatentPlan:
    channels, p = layout.pipeline_channels, layout.patch
    batch = shape[0]
    if len(shape) == 3 and layout.packing != "none":
        return _plan_packed(shape, layout, height, width, expected)
    if len(shape) == 5 and layout.frame_axis and shape[1:3] == (channels, 1):
        return LatentPlan(shape, batch, shape[3] * p, shape[4] * p)
    if len(shape) == 4 and shape[1] == channels:
        return LatentPlan(
            shape, batch, shape[2] * p, shape[3] * p, "no_frame_axis" if layout.frame_axis else "canonical"
        )
    if len(shape) == 4 and p > 1 and shape[1] == layout.channels:
        if shape[2] % p or shape[3] % p:
            raise RequestError(
                f"latent {list(shape)} is the VAE's own; its sides must be multiples of {p} to fold into the pipeline's {channels} channels"
            )
        return LatentPlan(shape, batch, shape[2], shape[3], "unfolded")
    if len(shape) in (4, 5) and shape[1] not in (channels, layout.channels):
        raise RequestError(f"latent has {shape[1]} channels, but {expected}")
    what = {5: "a 5-D (video) latent", 3: "a packed latent"}.get(len(shape), f"a {len(shape)}-D latent")
    raise RequestError(f"got {what} {list(shape)}, but {expected}")


def _plan_video(shape, layout: LatentLayout, height, width, expected: str) -> LatentPlan:
    channels = layout.pipeline_channels
    if len(shape) == 3 and layout.packing == "tokens":
        return _plan_packed(shape, layout, height, width, expected)
    if len(shape) != 5:
        what = {4: "an image latent", 3: "a packed latent"}.get(len(shape), "a latent")
        raise RequestError(f"got {what} of {len(shape)} dimensions {list(shape)}, but {expected}")
    batch, first, second, h, w = shape
    # Where both could be the channels, the layout the family's pipeline hands out wins.
    if layout.frames_first and second == channels:
        return LatentPlan(shape, batch, h, w, "frames_first", latent_frames=first)
    if first == channels:
        return LatentPlan(shape, batch, h, w, latent_frames=second)
    raise RequestError(f"latent {list(shape)} has no axis of {channels} channels, but {expected}")


def _plan_packed(shape, layout: LatentLayout, height, width, expected: str) -> LatentPlan:
    batch, seq, features = shape
    if height is None or width is None:
        raise RequestError(
            f"packed latent {list(shape)} needs the image's pixel height and width (query height=..&width=..)"
        )
    if layout.packing == "patches":
        # Flux.1 packs 2x2 patches of the latent into one token of 4*C features.
        if features % 4 or features // 4 != layout.pipeline_channels:
            raise RequestError(f"packed latent has {features} features per token, but {expected}")
        cell = 2 * layout.compression
        h, w = 2 * (height // cell), 2 * (width // cell)
        tokens, grid = (h // 2) * (w // 2), f"{h // 2}x{w // 2} patches of {cell}x{cell} pixels"
        plan = LatentPlan(shape, batch, h, w, "patches")
    else:
        # Tokens are the canonical latent's cells, row by row (and frame by frame), features = channels.
        if features != layout.pipeline_channels:
            raise RequestError(f"packed latent has {features} features per token, but {expected}")
        cell = layout.compression * layout.patch
        h, w = height // cell, width // cell
        frames = max(1, seq // (h * w)) if h * w and layout.video else 1
        tokens = h * w * frames
        grid = f"{h}x{w} cells of {cell}x{cell} pixels" + (
            " per latent frame, so a multiple of that" if layout.video else ""
        )
        plan = LatentPlan(
            shape, batch, h * layout.patch, w * layout.patch, "tokens", latent_frames=frames if layout.video else None
        )
    if tokens == 0 or seq != tokens:
        raise RequestError(
            f"packed latent has {seq} tokens, but height={height} width={width} means {tokens} tokens ({grid})"
        )
    return plan


PACKED_MEMORY = ("channels_first", "tokens_first")


def to_canonical(latents: torch.Tensor, plan: LatentPlan, layout: LatentLayout) -> torch.Tensor:
    """The wire latent in the canonical form: channels first, the pipeline's channels (where it normalises).

    Token sequences ("tokens" packing) arrive as the pipeline's tensor holds them in memory.
    Flux2Pipeline and LTXPipeline make [B, seq, C] as a transposed view of [B, C, seq],
    and diffusers' remote_decode sends a tensor's memory as it lies, so its bytes are
    channels first; `tokens_first` reads a C-contiguous [B, seq, C] instead.
    """
    batch, form = plan.batch, plan.form
    if form == "frames_first":
        return latents.permute(0, 2, 1, 3, 4).contiguous()
    if form == "no_frame_axis":
        return latents.unsqueeze(2)
    if form == "unfolded":
        return layout.fold(latents)
    if form == "patches":  # the inverse of FluxPipeline._pack_latents
        channels, h, w = layout.pipeline_channels, plan.height, plan.width
        patches = latents.view(batch, h // 2, w // 2, channels, 2, 2)
        image = patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, h, w)
        return image.unsqueeze(2) if layout.frame_axis else image
    if form == "tokens":  # Flux2Pipeline._unpack_latents_with_ids, LTXPipeline._unpack_latents
        cells = (plan.latent_frames,) if plan.latent_frames is not None else ()
        cells += (plan.height // layout.patch, plan.width // layout.patch)
        if not plan.tokens_first:
            return latents.reshape(batch, -1, *cells)
        channels_last = latents.reshape(batch, *cells, -1)
        return channels_last.permute(0, channels_last.ndim - 1, *range(1, channels_last.ndim - 1)).contiguous()
    return latents


def check_batch(batch: int, max_batch: int) -> None:
    if batch > max_batch:
        raise RequestError(
            f"batch of {batch}; this server takes at most {max_batch} images or videos per request", status=413
        )


def check_finite(values: torch.Tensor, what: str, expected: str = "") -> None:
    """NaN or infinity in is refused, not decoded: it would come out as black or garbage pixels."""
    bad = values.numel() - int(values.isfinite().sum())
    if bad:
        raise RequestError(
            f"{what} holds {bad} NaN or infinite value(s); expected finite values{' ' + expected if expected else ''}"
        )


def check_sides(height: int, width: int, family: Family, what: str = "image") -> None:
    """Both sides of an image or frame to encode must be multiples of the spatial compression."""
    step = family.encode_step
    if height % step or width % step:
        raise RequestError(
            f"{what} is {width}x{height}; both sides must be multiples of {step} "
            f"(e.g. {width - width % step or step}x{height - height % step or step})"
        )


def check_image_size(batch: int, height: int, width: int, family: Family, max_pixels: int) -> None:
    """An image to encode: sides divisible by the compression, total pixels within the limit."""
    check_sides(height, width, family)
    pixels = batch * height * width
    if pixels > max_pixels:
        raise RequestError(
            f"{batch} image(s) of {width}x{height} = {pixels} pixels; this server accepts at most {max_pixels}",
            status=413,
        )


def frame_step(family: Family) -> int:
    """A video to encode has k * frame_step + 1 frames: the temporal compression (twice it where latent frames must be odd)."""
    return family.temporal_compression * (2 if family.latent_frames_odd else 1)


def nearest_frame_counts(frames: int, family: Family) -> tuple[int, int]:
    """The valid frame counts (k * frame_step + 1) either side of `frames` (at least 1)."""
    step = frame_step(family)
    below = (frames - 1) // step * step + 1
    return below, below + step


def check_frame_count(frames: int, family: Family) -> None:
    """A video to encode has k * frame_step + 1 frames: one latent frame for the first, one per further group."""
    step = frame_step(family)
    if frames < 1 or (frames - 1) % step:
        nearest = " or ".join(str(count) for count in nearest_frame_counts(max(frames, 1), family))
        raise RequestError(
            f"video has {frames} frames; {family.name} encodes {step}k+1 frames (1, {step + 1}, {2 * step + 1}, ...): "
            f"the nearest valid counts are {nearest}"
        )


def check_video_size(batch: int, frames: int, height: int, width: int, family: Family, max_pixels: int) -> None:
    """A video to encode: sides, frame count and total pixels over all frames."""
    check_sides(height, width, family, "video frame")
    pixels = batch * frames * height * width
    if pixels > max_pixels:
        raise RequestError(
            f"{batch} video(s) of {frames} frames of {width}x{height} = {pixels} pixels; this server accepts at most {max_pixels}",
            status=413,
        )
    check_frame_count(frames, family)


def check_output_size(plan: LatentPlan, family: Family, max_pixels: int) -> None:
    pixels = plan.output_pixels(family)
    if pixels > max_pixels:
        width, height = plan.output_size(family)
        what = (
            f"{plan.batch} video(s) of {plan.output_frames(family)} frames"
            if plan.latent_frames
            else f"{plan.batch} image(s)"
        )
        raise RequestError(
            f"latent {list(plan.wire_shape)} decodes to {what} of {width}x{height} = {pixels} pixels; "
            f"this server returns at most {max_pixels}",
            status=413,
        )
