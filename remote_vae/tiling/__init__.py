"""Exact tiling: a decode or encode band by band, equal to the untiled result to float rounding, in bounded memory.

Two tilers, for two kinds of network, behind one interface (`Tiler`); `tiler_for` picks the one a model's structure
allows, checking the structure, not a name:

- `group_norm.GroupNormTiler`: diffusers' 2-D Encoder / Decoder (AutoencoderKL: SD1.5, SDXL, SD3, Flux, Flux.2) and
  HunyuanVideo's causal 3-D ones. GroupNorm sees the whole image, so the network runs as a program of steps
  (steps.py) over bands of rows, each GroupNorm's statistics gathered over all bands first.
- `halo.HaloTiler`: the VAEs that normalise each pixel on its own (Wan, Qwen-Image, HunyuanVideo 1.5, LTX-Video).
  Outside the mid block every layer is row-local, so a band with a halo as wide as the receptive field is exact.
  What differs per architecture (which modules run whole, which in bands) is registered per diffusers module in
  architectures.py, imported only when a model from that module is loaded.

Nothing here is imported with the server: the tilers reach into diffusers' architecture modules, and a diffusers
without one of those must cost that architecture its exact path, not every family its import.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from torch import nn


class Tiler(Protocol):
    """An exact tiler for one call: while `installed()`, the model's encoder and decoder run band by band.

    A tiler that `keeps_activations` holds whole ones between layers and takes where (`store`, a device) and how
    many bytes of them (`store_limit`) as keywords; the others take the model and the band size alone.
    """

    keeps_activations: bool

    def __init__(self, model: nn.Module, band_pixels: int, **store: object): ...

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether this tiler runs the model's encoder and decoder exactly."""

    def installed(self) -> AbstractContextManager[None]: ...


def tiler_for(model: nn.Module) -> type[Tiler] | None:
    """The exact tiler for a model, tried in order: GroupNorm models layer by layer, row-local ones band by band."""
    from .group_norm import GroupNormTiler
    from .halo import HaloTiler

    tilers: tuple[type[Tiler], ...] = (GroupNormTiler, HaloTiler)
    return next((tiler for tiler in tilers if tiler.supports(model)), None)


__all__ = ["Tiler", "tiler_for"]
