"""Compilation and warm-up: which graphs a compiled model has, and the runs at start-up that make them.

Warming up runs every --warmup-sizes size through each operation the family serves, before the first request: it
compiles the graphs (--compile), loads the kernels and tunes cuDNN on CUDA, and measures the model's peak memory per
pixel for the batch budget (device.BatchBudget).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from ..device import PeakMemory, compile_model
from ..families import Family
from .policy import LoadedVae, compile_key

log = logging.getLogger("remote_vae")


def default_warmup_size(family: Family) -> tuple[int, ...]:
    """A 256x256 image, or one 256x256 frame."""
    return (256, 256, 1) if family.is_video else (256, 256)


def compile_and_warm_up(vae: LoadedVae, sizes: Sequence[tuple[int, ...]], batches: Sequence[int]) -> None:
    """Compile the model if its device path says so, and warm every size up; a model torch cannot compile is
    served eagerly. On CUDA with no sizes given, one small size loads the kernels and measures memory."""
    if vae.device.type == "cuda" and not sizes:
        sizes = [default_warmup_size(vae.family)]
    if vae.path.compile:
        uncompile = compile_model(vae.model, len(sizes) * len(vae.family.operations))
        vae.compilation.enabled = True
        try:
            warm_up(vae, sizes, batches)
            return
        except Exception as exc:  # any failure inside torch.compile: serve the model uncompiled
            first_line = str(exc).splitlines()[0][:300]
            log.error(
                "%s: compiling failed (%s: %s); serving it uncompiled", vae.family.name, type(exc).__name__, first_line
            )
            uncompile()
            vae.compilation.enabled = False
            vae.compilation.warmed.clear()
    warm_up(vae, sizes, batches)


def warm_up(vae: LoadedVae, sizes: Sequence[tuple[int, ...]], batches: Sequence[int]) -> None:
    """Run every size (W, H) or (W, H, F) in pixels at every batch size through each operation the family serves."""
    compilation, budget = vae.compilation, vae.budget
    for size in sizes:
        width, height, *frames = size
        for operation in vae.family.operations:
            for batch in batches:
                inputs = warm_up_inputs(vae, operation, batch, width, height, frames[0] if frames else None)
                started = time.monotonic()
                compilation.warming = True
                try:
                    with PeakMemory(vae.device) as peak:
                        vae.decode(inputs) if operation == "decode" else vae.encode(inputs)
                finally:
                    compilation.warming = False
                compilation.warmed.add(compile_key(operation, inputs))
                if peak.bytes and operation == "decode" and batch == 1 and budget.pixels is None:
                    pixels = max(1, width * height * (frames[0] if frames else 1))
                    budget.bytes_per_pixel = max(budget.bytes_per_pixel or 0, peak.bytes / pixels)
                seconds = time.monotonic() - started
                log.info(
                    "%s: warmed up %s of %s x %s in %.1f s%s",
                    vae.family.name,
                    operation,
                    batch,
                    "x".join(map(str, size)),
                    seconds,
                    " (compiled)" if compilation.enabled else "",
                )


def warm_up_inputs(vae: LoadedVae, operation: str, batch: int, width: int, height: int, frames: int | None):
    """Zeros of the shape an operation takes for that many pixels (and frames)."""
    family = vae.family
    frames = frames if family.is_video else None
    if operation == "encode":
        return torch.zeros((batch, family.pixel_channels) + ((frames,) if frames else ()) + (height, width))
    step = family.spatial_compression
    latent_frames = ((frames - 1) // family.temporal_compression + 1,) if frames else ()
    if latent_frames and family.latent_frames_odd:
        latent_frames = (latent_frames[0] | 1,)
    frame_axis = (1,) if vae.layout.frame_axis else ()
    spatial = (height // step, width // step)
    return torch.zeros((batch, family.latent_channels) + latent_frames + frame_axis + spatial)
