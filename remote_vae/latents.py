"""Latents: check a latent's shape against the family, unpack Flux, scale and shift.

Shapes are checked from the numbers alone, before any tensor exists, so a
request for an absurd output is refused without allocating anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import RequestError
from .families import Family


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


Normalisation = ScalarFactors | ChannelStats


def own_normalisation(family: Family) -> Normalisation:
    """The family's own latent normalisation, what do_scaling=True asks for."""
    if family.latents_mean is not None:
        return ChannelStats(family.latents_mean, family.latents_std)
    return ScalarFactors(family.scaling_factor, family.shift_factor)


@dataclass(frozen=True)
class Scaling:
    """What the client asked for: explicit factors and/or the deprecated do_scaling switch."""

    scaling_factor: float | None = None
    shift_factor: float | None = None
    do_scaling: bool | None = None

    def normalisation(self, family: Family) -> Normalisation:
        # Explicit factors win; do_scaling=True alone means "this family's own normalisation";
        # anything else means the latent is already scaled (ComfyUI sends do_scaling=False).
        if self.scaling_factor is not None or self.shift_factor is not None:
            return ScalarFactors(self.scaling_factor, self.shift_factor)
        if self.do_scaling:
            return own_normalisation(family)
        return ScalarFactors()


@dataclass(frozen=True)
class LatentPlan:
    """A decode request's latent, validated: its wire shape and the [B, C, (T,) h, w] it unpacks to."""

    wire_shape: tuple[int, ...]
    batch: int
    channels: int
    height: int
    width: int
    packed: bool = False
    latent_frames: int | None = None  # video only

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


def plan_decode(shape: tuple[int, ...], family: Family, height: int | None, width: int | None) -> LatentPlan:
    check_dims(shape)
    channels = family.latent_channels
    if family.is_video:
        expected = f"this family ({family.name}) decodes video latents [B, {channels}, T, h, w]"
        if len(shape) != 5:
            kind = {4: "an image latent", 3: "a packed latent"}.get(len(shape), "a latent")
            raise RequestError(f"got {kind} of {len(shape)} dimensions {list(shape)}, but {expected}")
        if shape[1] != channels:
            raise RequestError(f"latent has {shape[1]} channels, but {expected}")
        return LatentPlan(shape, shape[0], channels, shape[3], shape[4], latent_frames=shape[2])
    expected = (
        f"this family ({family.name}) decodes image latents [B, {channels}, h, w] "
        f"or packed latents [B, seq, {channels * 4}] with height and width"
    )
    if len(shape) == 4:
        if shape[1] != channels:
            raise RequestError(f"latent has {shape[1]} channels, but {expected}")
        return LatentPlan(shape, shape[0], shape[1], shape[2], shape[3])
    if len(shape) == 3:
        return _plan_packed(shape, family, height, width, expected)
    if len(shape) == 5:
        raise RequestError(f"got a 5-D (video) latent {list(shape)}, but {expected}")
    raise RequestError(f"got a {len(shape)}-D latent {list(shape)}, but {expected}")


def _plan_packed(shape, family: Family, height, width, expected: str) -> LatentPlan:
    batch, seq, features = shape
    if height is None or width is None:
        raise RequestError(f"packed latent {list(shape)} needs the image's pixel height and width (query height=..&width=..)")
    if features % 4 or features // 4 != family.latent_channels:
        raise RequestError(f"packed latent has {features} features per token, but {expected}")
    # Flux packs 2x2 patches of the latent; the latent is 1/compression of the pixels.
    patch = 2 * family.spatial_compression
    h, w = 2 * (height // patch), 2 * (width // patch)
    if h == 0 or w == 0 or seq != (h // 2) * (w // 2):
        raise RequestError(
            f"packed latent has {seq} tokens, but height={height} width={width} means "
            f"{(h // 2) * (w // 2)} tokens ({h // 2}x{w // 2} patches of {patch}x{patch} pixels)"
        )
    return LatentPlan(shape, batch, features // 4, h, w, packed=True)


def unpack(latents: torch.Tensor, plan: LatentPlan) -> torch.Tensor:
    """[B, seq, C*4] -> [B, C, h, w]: the inverse of FluxPipeline._pack_latents."""
    if not plan.packed:
        return latents
    batch, channels, h, w = plan.batch, plan.channels, plan.height, plan.width
    patches = latents.view(batch, h // 2, w // 2, channels, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, h, w)


def check_batch(batch: int, max_batch: int) -> None:
    if batch > max_batch:
        raise RequestError(f"batch of {batch}; this server takes at most {max_batch} images or videos per request", status=413)


def check_finite(values: torch.Tensor, what: str, expected: str = "") -> None:
    """NaN or infinity in is refused, not decoded: it would come out as black or garbage pixels."""
    bad = values.numel() - int(torch.isfinite(values).sum())
    if bad:
        raise RequestError(f"{what} holds {bad} NaN or infinite value(s); expected finite values{' ' + expected if expected else ''}")


def check_sides(height: int, width: int, family: Family, what: str = "image") -> None:
    """Both sides of an image or frame to encode must be multiples of the spatial compression."""
    step = family.spatial_compression
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
        raise RequestError(f"{batch} image(s) of {width}x{height} = {pixels} pixels; this server accepts at most {max_pixels}", status=413)


def nearest_frame_counts(frames: int, family: Family) -> tuple[int, int]:
    """The valid frame counts (k * temporal_compression + 1) either side of `frames` (at least 1)."""
    step = family.temporal_compression
    below = (frames - 1) // step * step + 1
    return below, below + step


def check_frame_count(frames: int, family: Family) -> None:
    """A video to encode has k * temporal_compression + 1 frames: one latent frame for the first, one per further group."""
    step = family.temporal_compression
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
        what = f"{plan.batch} video(s) of {plan.output_frames(family)} frames" if plan.latent_frames else f"{plan.batch} image(s)"
        raise RequestError(
            f"latent {list(plan.wire_shape)} decodes to {what} of {width}x{height} = {pixels} pixels; "
            f"this server returns at most {max_pixels}",
            status=413,
        )
