"""Decoder output to pixels, as diffusers' processors do it: denormalise, clamp, x255, round."""

from __future__ import annotations

import torch


def denormalize(sample: torch.Tensor) -> torch.Tensor:
    """-1..1 to 0..1, clamped, in the sample's dtype: VaeImageProcessor.denormalize."""
    return (sample * 0.5 + 0.5).clamp(0, 1)


def uint8_images(sample: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] decoder output -> uint8 [N, H, W, 3] on the same device.

    Exactly VaeImageProcessor's rounding: denormalise in the sample's dtype, then
    float32 x 255, rounded half to even (numpy's round), as postprocess + numpy_to_pil do.
    """
    return (denormalize(sample).float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
