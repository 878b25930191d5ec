"""The VAE stage: load a family's model (loading.py), run each call by the run policy (policy.py), compiled and
warmed up where asked (warmup.py).

Models are diffusers classes named by the family config, set up by the device
path (device.py: layout, cuDNN, pinned transfers, optional compile). A batch
(one request's, or several requests' coalesced by server/batching.py) runs in one
call when it fits the family's pixel budget on this device, else one sample
at a time (as diffusers' slicing does). Both give the same results to float rounding:
every layer of these VAEs treats samples independently.

Video models already decode a few latent frames at a time (HunyuanVideo's
frame-wise decoding, Wan's causal cache). On top of that, the model's own
spatial tiling is switched on per call when a frame is larger than the
family's `tile_above_pixels` (or --tile-above-pixels), so peak memory stays
bounded at high resolutions; below it, output is diffusers' untiled output.

A call that runs out of device memory frees the allocator's cache and runs
again one sample at a time, then tiled, as far as the model can; when nothing
is left to try it is refused with a 503. The process and the model live on.

What differs between models is read from the family's data, not branched on:
a model that must see one sample per call (`samples_per_call`), images taken
as one-frame videos (`latent_layout.frame_axis`), a decode timestep argument
(`decode_timestep`), normalisation statistics kept in the weights
(`latents_stats_in_weights`, read once at load), and encoders without a
distribution (taesd's, whose latent is returned as is).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..device import BatchBudget, DevicePath, set_up_model
from ..families import Family
from .loading import (
    RANDOM_WEIGHTS_SEED,
    WEIGHT_FILES,
    LoadError,
    UnsupportedFamily,
    blends_tiles,
    default_source,
    download_weights,
    load_model,
    load_vocoder,
    model_class,
    model_description,
    network_failure,
    resolve_device,
    resolve_dtype,
    unsupported,
    weights_folder,
)
from .policy import DEFAULT_BAND_PIXELS, DEFAULT_STORE_BYTES, FrameSink, LoadedVae, latent_of
from .warmup import compile_and_warm_up, default_warmup_size

__all__ = [
    "DEFAULT_BAND_PIXELS",
    "DEFAULT_STORE_BYTES",
    "RANDOM_WEIGHTS_SEED",
    "WEIGHT_FILES",
    "FrameSink",
    "LoadError",
    "LoadedVae",
    "UnsupportedFamily",
    "default_source",
    "default_warmup_size",
    "download_weights",
    "latent_of",
    "load_vae",
    "model_description",
    "model_class",
    "network_failure",
    "resolve_device",
    "resolve_dtype",
    "unsupported",
    "weights_folder",
]

log = logging.getLogger("remote_vae")


def load_vae(
    family: Family,
    source: str | None,
    device: torch.device,
    dtype: torch.dtype,
    random_weights: bool = False,
    tile_above_pixels: int | None | str = "family",
    path: DevicePath | None = None,
    budget: BatchBudget | None = None,
    warmup_sizes: Sequence[tuple[int, ...]] = (),
    warmup_batches: Sequence[int] = (1,),
    band_pixels: int | None = None,
    store_bytes: int | None = None,
) -> LoadedVae:
    """The family's model on its device, set up and warmed up.

    tile_above_pixels overrides the family's ("family" keeps it, None never tiles). `path`
    defaults to the measured device path for `device`; `budget` to the device's own.
    """
    path = path or DevicePath.default(device)
    model, source = load_model(family, source, dtype, random_weights)
    model = set_up_model(model, device, path)
    vocoder = load_vocoder(family, source, dtype, random_weights)
    vocoder = None if vocoder is None else set_up_model(vocoder, device, path)
    tile_above = family.tile_above_pixels if tile_above_pixels == "family" else tile_above_pixels
    if not blends_tiles(model):  # a model without tiling decodes whole, whatever the threshold
        tile_above = None
    else:
        # Tile sizes are set once; each call switches use_tiling (above the threshold, or after running out of memory).
        model.enable_tiling(**family.tiling_options)
        model.use_tiling = False
    budget = budget or BatchBudget()
    vae = LoadedVae(family, model, device, dtype, source, tile_above, path, budget, band_pixels, store_bytes, vocoder)
    compile_and_warm_up(vae, warmup_sizes, warmup_batches)
    tiling = f", tiling frames above {tile_above} pixels" if tile_above is not None else ""
    compiled = ", compiled" if vae.compilation.enabled else ""
    log.info(
        "loaded %s (%s) on %s as %s%s%s",
        family.name,
        source,
        device,
        str(dtype).removeprefix("torch."),
        tiling,
        compiled,
    )
    return vae
