"""Checks on the numbers of a request: batch, sides, frame counts and output size, before any tensor exists."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import RequestError
from ..families import Family

if TYPE_CHECKING:  # torch is imported where it is used: `remote-vae families` describes layouts without it
    import torch


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


def nearest_frame_counts(frames: int, family: Family) -> tuple[int, int]:
    """The valid frame counts (k * frame_step + 1) either side of `frames` (at least 1)."""
    step = family.frame_step
    below = (frames - 1) // step * step + 1
    return below, below + step


def check_frame_count(frames: int, family: Family) -> None:
    """A video to encode has k * frame_step + 1 frames: one latent frame for the first, one per further group."""
    step = family.frame_step
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
            f"{batch} video(s) of {frames} frames of {width}x{height} = {pixels} pixels; this server accepts at most "
            f"{max_pixels}",
            status=413,
        )
    check_frame_count(frames, family)


def check_pixel_shape(shape: tuple[int, ...], family: Family, max_batch: int, max_pixels: int) -> tuple[int, ...]:
    """(count, frames, height, width) of an encode's images [B, 3, H, W] (a video family: videos [B, 3, F, H, W]),
    checked from the shape alone."""
    video, channels = family.is_video, family.pixel_channels
    kind, layout = (
        ("video", "[B, 3, F, H, W] in -1..1 (F = 1 for a single image)")
        if video
        else ("image", f"[B, {channels}, H, W] in -1..1" + (" (RGBA)" if channels == 4 else ""))
    )
    if len(shape) != (5 if video else 4) or shape[1] != channels:
        raise RequestError(f"{kind} tensor has shape {list(shape)}; expected {layout}")
    check_batch(shape[0], max_batch)
    if video:
        batch, _, frames, height, width = shape
        check_video_size(batch, frames, height, width, family, max_pixels)
    else:
        (batch, _, height, width), frames = shape, 1
        check_image_size(batch, height, width, family, max_pixels)
    return batch, frames, height, width
