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
class Scaling:
    """What the client asked for: explicit factors and/or the deprecated do_scaling switch."""

    scaling_factor: float | None = None
    shift_factor: float | None = None
    do_scaling: bool | None = None

    def factors(self, family: Family) -> tuple[float | None, float | None]:
        # Explicit factors win; do_scaling=True alone means "this family's own factors";
        # anything else means the latent is already scaled (ComfyUI sends do_scaling=False).
        if self.scaling_factor is not None or self.shift_factor is not None:
            return self.scaling_factor, self.shift_factor
        if self.do_scaling:
            return family.scaling_factor, family.shift_factor
        return None, None


@dataclass(frozen=True)
class LatentPlan:
    """A decode request's latent, validated: its wire shape and the [B, C, h, w] it unpacks to."""

    wire_shape: tuple[int, ...]
    batch: int
    channels: int
    height: int
    width: int
    packed: bool

    def output_pixels(self, family: Family) -> int:
        scale = family.spatial_compression
        return self.batch * self.height * scale * self.width * scale


def check_dims(shape: tuple[int, ...]) -> None:
    if not shape:
        raise RequestError("shape is missing; send it as repeated query keys, e.g. shape=1&shape=4&shape=64&shape=64")
    if any(dim <= 0 for dim in shape):
        raise RequestError(f"shape {list(shape)} has a dimension below 1; every dimension must be a positive integer")


def plan_decode(shape: tuple[int, ...], family: Family, height: int | None, width: int | None) -> LatentPlan:
    check_dims(shape)
    channels = family.latent_channels
    expected = (
        f"this family ({family.name}) decodes image latents [B, {channels}, h, w] "
        f"or packed latents [B, seq, {channels * 4}] with height and width"
    )
    if len(shape) == 4:
        if shape[1] != channels:
            raise RequestError(f"latent has {shape[1]} channels, but {expected}")
        return LatentPlan(shape, shape[0], shape[1], shape[2], shape[3], packed=False)
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


def unscale(latents: torch.Tensor, factors: tuple[float | None, float | None]) -> torch.Tensor:
    """Before decode: z / scaling_factor + shift_factor."""
    scaling_factor, shift_factor = factors
    if scaling_factor is not None:
        latents = latents / scaling_factor
    if shift_factor is not None:
        latents = latents + shift_factor
    return latents


def scale(latents: torch.Tensor, factors: tuple[float | None, float | None]) -> torch.Tensor:
    """After encode: (z - shift_factor) * scaling_factor."""
    scaling_factor, shift_factor = factors
    if shift_factor is not None:
        latents = latents - shift_factor
    if scaling_factor is not None:
        latents = latents * scaling_factor
    return latents


def check_image_size(batch: int, height: int, width: int, family: Family, max_pixels: int) -> None:
    """An image to encode: sides divisible by the compression, total pixels within the limit."""
    step = family.spatial_compression
    if height % step or width % step:
        raise RequestError(
            f"image is {width}x{height}; both sides must be multiples of {step} "
            f"(e.g. {width - width % step or step}x{height - height % step or step})"
        )
    pixels = batch * height * width
    if pixels > max_pixels:
        raise RequestError(f"{batch} image(s) of {width}x{height} = {pixels} pixels; this server accepts at most {max_pixels}", status=413)


def check_output_size(plan: LatentPlan, family: Family, max_pixels: int) -> None:
    pixels = plan.output_pixels(family)
    if pixels > max_pixels:
        scale_ = family.spatial_compression
        raise RequestError(
            f"latent {list(plan.wire_shape)} decodes to {plan.batch} image(s) of "
            f"{plan.width * scale_}x{plan.height * scale_} = {pixels} pixels; this server returns at most {max_pixels}",
            status=413,
        )

