"""Latents: check a latent's shape against the family (checks.py), unpack it (layout.py), and normalise it as the
family's pipeline does (normalisation.py).

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

from ..families import LatentLayout
from .checks import (
    check_batch,
    check_finite,
    check_frame_count,
    check_image_size,
    check_pixel_shape,
    check_sides,
    check_video_size,
    nearest_frame_counts,
)
from .layout import LatentPlan, check_dims, check_output_size, plan_decode, to_canonical
from .normalisation import (
    ChannelStats,
    Normalisation,
    ScalarFactors,
    Scaling,
    WeightStats,
    check_frames_covered,
    own_normalisation,
)

__all__ = [
    "ChannelStats",
    "LatentLayout",
    "LatentPlan",
    "Normalisation",
    "ScalarFactors",
    "Scaling",
    "WeightStats",
    "check_batch",
    "check_dims",
    "check_finite",
    "check_frame_count",
    "check_frames_covered",
    "check_image_size",
    "check_output_size",
    "check_pixel_shape",
    "check_sides",
    "check_video_size",
    "nearest_frame_counts",
    "own_normalisation",
    "plan_decode",
    "to_canonical",
]
