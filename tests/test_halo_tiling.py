"""Exact banded tiling of the row-local VAEs (halo_tiling.py: Wan 2.1 / 2.2, Qwen-Image, HunyuanVideo 1.5): every band's
rows equal the untiled decode and encode, through the models' own frame-by-frame causal caches; the measured halo is what
makes them equal."""

import dataclasses

import pytest
import torch
from conftest import seeded

from remote_vae import halo_tiling
from remote_vae.halo_tiling import HaloTiler
from remote_vae.tiling import ExactTiler

ROW_LOCAL = ("wan21", "wan22", "qwenimage", "hunyuanvideo15")


def test_the_halo_tiler_covers_the_row_local_families_and_no_groupnorm_one(reference):
    supported = {name for name, model in reference.items() if HaloTiler.supports(model)}
    assert supported == set(ROW_LOCAL)
    assert not any(ExactTiler.supports(reference[name]) for name in supported)


def cases(family: str, model) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent and pixels of odd sizes: 2 latent frames (5 pixel frames), 11 x 5 latent cells."""
    reach = halo_tiling.reach_of(model, halo_tiling.architecture_of(model))
    channels = halo_tiling._first_conv(model.decoder.conv_in).in_channels
    batch = 1 if family == "hunyuanvideo15" else 2  # diffusers' HunyuanVideo 1.5 attention takes one sample per call
    latents = seeded(batch, channels, 2, 11, 5, seed=61)
    compression = reach.encoder_scale * (model.config.get("patch_size") or 1)  # Wan 2.2 folds 2x2 pixels before its encoder
    pixels = seeded(batch, 3, 5, 11 * compression, 5 * compression, seed=62)
    return latents, pixels.clamp(-1, 1)


def banded(model, call, **reach_changes):
    """call() with the model's encoder and decoder run a latent row per band; with reach_changes, a changed halo."""
    reach = halo_tiling.reach_of(model, halo_tiling.architecture_of(model))
    halo_tiling._REACHES[model] = dataclasses.replace(reach, **reach_changes)
    try:
        tiler = HaloTiler(model, band_pixels=1)
        tiler.min_band_halos = 0
        with torch.no_grad(), tiler.installed():
            return call(), tiler.bands
    finally:
        halo_tiling._REACHES[model] = reach


@pytest.mark.parametrize("family", ROW_LOCAL)
def test_a_latent_row_per_band_gives_the_untiled_decode_and_encode(reference, family):
    model = reference[family]
    latents, pixels = cases(family, model)
    with torch.no_grad():
        untiled, untiled_latents = model.decode(latents).sample, model.encode(pixels).latent_dist.mean
    decoded, decode_bands = banded(model, lambda: model.decode(latents).sample)
    encoded, encode_bands = banded(model, lambda: model.encode(pixels).latent_dist.mean)
    torch.testing.assert_close(decoded, untiled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoded, untiled_latents, atol=1e-5, rtol=1e-5)
    assert decode_bands >= 11 and encode_bands >= 11  # every latent row its own band (in every call, where a model calls per frame)


@pytest.mark.parametrize("family", ["wan21", "hunyuanvideo15"])
def test_the_measured_halo_is_what_makes_bands_exact(reference, family):
    """Half the halo, and band edges show: the test above would fail without the measured halo."""
    model = reference[family]
    latents, pixels = cases(family, model)
    reach = halo_tiling.reach_of(model, halo_tiling.architecture_of(model))
    with torch.no_grad():
        untiled, untiled_latents = model.decode(latents).sample, model.encode(pixels).latent_dist.mean
    short = dict(decoder_halo=reach.decoder_halo // 2, encoder_halo=reach.encoder_halo // 2)
    decoded, _ = banded(model, lambda: model.decode(latents).sample, **short)
    encoded, _ = banded(model, lambda: model.encode(pixels).latent_dist.mean, **short)
    assert (decoded - untiled).abs().max() > 1e-4 and (encoded - untiled_latents).abs().max() > 1e-4


def test_each_band_is_a_pass_of_the_models_own_clip_loop(reference):
    """Wan decodes a frame per call and encodes 1 then 4 frames per call, with causal caches: its clip loop runs once per
    band (three here), the caches holding that band's rows; one tiler serves clip after clip."""
    model = reference["wan21"]
    latents, pixels = seeded(1, 16, 3, 8, 4, seed=63), seeded(1, 3, 9, 64, 32, seed=64).clamp(-1, 1)
    with torch.no_grad():
        untiled, untiled_latents = model.decode(latents).sample, model.encode(pixels).latent_dist.mean
        tiler = HaloTiler(model, band_pixels=3 * 8 * 32 * 4)  # three latent rows per band (encode: 8 x 32 pixels x 4 frames)
        tiler.min_band_halos = 0
        with tiler.installed():
            encoded = [model.encode(pixels).latent_dist.mean for _ in range(2)]
            assert tiler.bands == 6
            decoded = [model.decode(latents).sample for _ in range(2)]
    for tiled in decoded:
        torch.testing.assert_close(tiled, untiled, atol=1e-5, rtol=1e-5)
    for tiled in encoded:
        torch.testing.assert_close(tiled, untiled_latents, atol=1e-5, rtol=1e-5)
