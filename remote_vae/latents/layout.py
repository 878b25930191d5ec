"""Unpacking: which of the family's accepted shapes a decode's latent arrived in, planned from the numbers alone
(`plan_decode`), and the latent brought into the canonical form (`to_canonical`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..errors import RequestError
from ..families import Family, LatentLayout
from ..vocabulary import Arrangement, PackedMemory, Packing

if TYPE_CHECKING:  # torch is imported where it is used: `remote-vae families` describes layouts without it
    import torch


@dataclass(frozen=True)
class LatentPlan:
    """A decode request's latent, validated: its wire shape, which form it is in, and the VAE latent it becomes."""

    wire_shape: tuple[int, ...]
    batch: int
    height: int  # of the VAE's latent
    width: int
    arrangement: Arrangement = Arrangement.CANONICAL  # which accepted shape the wire latent is in
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
    layout = family.layout
    expected = f"this family ({family.name}) decodes {family.kind} latents {layout.describe()}"
    planner = {"audio": _plan_audio, "video": _plan_video, "image": _plan_image}[family.kind]
    plan = planner(shape, layout, height, width, expected)
    if packed_memory == PackedMemory.TOKENS_FIRST:
        plan = replace(plan, tokens_first=True)
    if min(plan.height, plan.width) < family.min_latent_side:
        side = family.min_latent_side
        raise RequestError(
            f"latent is {plan.height}x{plan.width} cells a frame; {family.name}'s decoder takes at least {side} a side "
            f"({side * family.spatial_compression} pixels)"
        )
    if plan.latent_frames is not None and family.latent_frames_odd and plan.latent_frames % 2 == 0:
        frames = plan.latent_frames
        raise RequestError(
            f"latent has {frames} latent frames; {family.name} decodes an odd number (e.g. {frames - 1 or 1} or "
            f"{frames + 1}): "
            f"an even count does not decode to {family.temporal_compression}k+1 frames, and its pipelines never make "
            "one"
        )
    return plan


def _plan_image(shape, layout: LatentLayout, height, width, expected: str) -> LatentPlan:
    channels, p = layout.pipeline_channels, layout.patch
    batch = shape[0]
    if len(shape) == 3 and layout.packing != Packing.NONE:
        return _plan_packed(shape, layout, height, width, expected)
    if len(shape) == 5 and layout.frame_axis and shape[1:3] == (channels, 1):
        return LatentPlan(shape, batch, shape[3] * p, shape[4] * p)
    if len(shape) == 4 and shape[1] == channels:
        return LatentPlan(
            shape,
            batch,
            shape[2] * p,
            shape[3] * p,
            Arrangement.NO_FRAME_AXIS if layout.frame_axis else Arrangement.CANONICAL,
        )
    if layout.paired_frames and len(shape) in (4, 5) and shape[1] == layout.channels and shape[2:-2] in ((), (1,)):
        return LatentPlan(shape, batch, shape[-2], shape[-1], Arrangement.UNFOLDED)  # the VAE's own, one frame
    if len(shape) == 4 and p > 1 and shape[1] == layout.channels:
        if shape[2] % p or shape[3] % p:
            raise RequestError(
                f"latent {list(shape)} is the VAE's own; its sides must be multiples of {p} to fold into the "
                f"pipeline's {channels} channels"
            )
        return LatentPlan(shape, batch, shape[2], shape[3], Arrangement.UNFOLDED)
    if len(shape) in (4, 5) and shape[1] not in (channels, layout.channels):
        raise RequestError(f"latent has {shape[1]} channels, but {expected}")
    what = {5: "a 5-D (video) latent", 3: "a packed latent"}.get(len(shape), f"a {len(shape)}-D latent")
    raise RequestError(f"got {what} {list(shape)}, but {expected}")


def _plan_video(shape, layout: LatentLayout, height, width, expected: str) -> LatentPlan:
    channels = layout.pipeline_channels
    if len(shape) == 3 and layout.packing == Packing.TOKENS:
        return _plan_packed(shape, layout, height, width, expected)
    if len(shape) != 5:
        what = {4: "an image latent", 3: "a packed latent"}.get(len(shape), "a latent")
        raise RequestError(f"got {what} of {len(shape)} dimensions {list(shape)}, but {expected}")
    batch, first, second, h, w = shape
    # Where both could be the channels, the layout the family's pipeline hands out wins.
    if layout.frames_first and second == channels:
        return LatentPlan(shape, batch, h, w, Arrangement.FRAMES_FIRST, latent_frames=first)
    if first == channels:
        return LatentPlan(shape, batch, h, w, latent_frames=second)
    raise RequestError(f"latent {list(shape)} has no axis of {channels} channels, but {expected}")


def _plan_audio(shape, layout: LatentLayout, height, width, expected: str) -> LatentPlan:
    """[B, C, T] (or [B, C, T, bins]; [B, T, C] where the pipeline holds its steps first, which wins where T is C too):
    held as `height` 1 and `width` T latent steps."""
    dims = 4 if layout.audio_bins else 3
    if layout.frames_first and len(shape) == 3 and shape[2] == layout.channels:  # as the pipeline holds it (ACE-Step)
        return LatentPlan(shape, shape[0], 1, shape[1], Arrangement.FRAMES_FIRST)
    if len(shape) == dims and shape[1] == layout.channels and shape[3:] in ((), (layout.audio_bins,)):
        return LatentPlan(shape, shape[0], 1, shape[2])
    if len(shape) == dims and shape[1] == layout.channels:
        raise RequestError(f"latent has {shape[3]} bins, but {expected}")
    if len(shape) == dims:
        raise RequestError(f"latent has {shape[1]} channels, but {expected}")
    raise RequestError(f"got a {len(shape)}-D latent {list(shape)}, but {expected}")


def _plan_packed(shape, layout: LatentLayout, height, width, expected: str) -> LatentPlan:
    batch, seq, features = shape
    if height is None or width is None:
        raise RequestError(
            f"packed latent {list(shape)} needs the image's pixel height and width (query height=..&width=..)"
        )
    if layout.packing == Packing.PATCHES:
        # Flux.1 packs 2x2 patches of the latent into one token of 4*C features.
        if features % 4 or features // 4 != layout.pipeline_channels:
            raise RequestError(f"packed latent has {features} features per token, but {expected}")
        cell = 2 * layout.compression
        h, w = 2 * (height // cell), 2 * (width // cell)
        tokens, grid = (h // 2) * (w // 2), f"{h // 2}x{w // 2} patches of {cell}x{cell} pixels"
        plan = LatentPlan(shape, batch, h, w, Arrangement.PATCHES)
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
            shape,
            batch,
            h * layout.patch,
            w * layout.patch,
            Arrangement.TOKENS,
            latent_frames=frames if layout.video else None,
        )
    if tokens == 0 or seq != tokens:
        raise RequestError(
            f"packed latent has {seq} tokens, but height={height} width={width} means {tokens} tokens ({grid})"
        )
    return plan


def to_canonical(latents: torch.Tensor, plan: LatentPlan, layout: LatentLayout) -> torch.Tensor:
    """The wire latent in the canonical form: channels first, the pipeline's channels (where it normalises).

    Token sequences ("tokens" packing) arrive as the pipeline's tensor holds them in memory.
    Flux2Pipeline and LTXPipeline make [B, seq, C] as a transposed view of [B, C, seq],
    and diffusers' remote_decode sends a tensor's memory as it lies, so its bytes are
    channels first; `tokens_first` reads a C-contiguous [B, seq, C] instead.
    """
    batch, arrangement = plan.batch, plan.arrangement
    if arrangement == Arrangement.FRAMES_FIRST:  # [B, T, C, h, w], or an audio latent's [B, T, C]
        return latents.transpose(1, 2).contiguous()
    if arrangement == Arrangement.NO_FRAME_AXIS:
        return latents.unsqueeze(2)
    if arrangement == Arrangement.UNFOLDED:
        return layout.fold(latents)
    if arrangement == Arrangement.PATCHES:  # the inverse of FluxPipeline._pack_latents
        channels, h, w = layout.pipeline_channels, plan.height, plan.width
        patches = latents.view(batch, h // 2, w // 2, channels, 2, 2)
        image = patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, h, w)
        return image.unsqueeze(2) if layout.frame_axis else image
    if arrangement == Arrangement.TOKENS:  # Flux2Pipeline._unpack_latents_with_ids, LTXPipeline._unpack_latents
        # a frame axis for video latents, and for images a VAE takes as one-frame videos (Qwen-Image 2.1)
        cells = (plan.latent_frames,) if plan.latent_frames is not None else (1,) if layout.frame_axis else ()
        cells += (plan.height // layout.patch, plan.width // layout.patch)
        if not plan.tokens_first:
            return latents.reshape(batch, -1, *cells)
        channels_last = latents.reshape(batch, *cells, -1)
        return channels_last.permute(0, channels_last.ndim - 1, *range(1, channels_last.ndim - 1)).contiguous()
    return latents


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
