"""Exact banded tiling of the row-local VAEs (tiling/halo.py: Wan 2.1 / 2.2, Qwen-Image, HunyuanVideo 1.5, LTX-Video):
every band's
rows equal the untiled decode and encode, through the models' own frame-by-frame causal caches; the measured halo is
what
makes them equal."""

import dataclasses

import pytest
import torch
from conftest import TINY_MODELS, seeded

from remote_vae.families import load_family
from remote_vae.tiling import halo as halo_tiling
from remote_vae.tiling.group_norm import GroupNormTiler
from remote_vae.tiling.halo import HaloTiler
from remote_vae.tiling.steps import first_conv
from remote_vae.vae import load_vae

ROW_LOCAL = tuple(
    name for name in ("wan21", "wan22", "qwenimage", "hunyuanvideo15", "ltxvideo", "ltx2") if name in TINY_MODELS
)


def test_the_halo_tiler_covers_the_row_local_families_and_no_groupnorm_one(reference):
    supported = {name for name, model in reference.items() if HaloTiler.supports(model)}
    assert supported == set(ROW_LOCAL)
    assert not any(GroupNormTiler.supports(reference[name]) for name in supported)


# Latent rows of each case (a band each): LTX-2's 32x cells make 11 rows 352 pixels of 9 frames, 20 s here
ROWS = {"ltx2": 5}


def cases(family: str, model) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A latent and pixels of odd sizes (2 latent frames, 11 x 5 latent cells), and what else the decoder takes."""
    rows = ROWS.get(family, 11)
    reach = halo_tiling.encoder_reach(model, halo_tiling.architecture_of(model))
    channels = first_conv(model.decoder.conv_in).in_channels
    batch = 1 if family == "hunyuanvideo15" else 2  # diffusers' HunyuanVideo 1.5 attention takes one sample per call
    latents = seeded(batch, channels, 2, rows, 5, seed=61)
    # Wan 2.2 folds 2x2 pixels before its encoder
    folded = model.config.get("patch_size") or 1 if family == "wan22" else 1
    compression = reach.scale * folded
    frames = 1 + (getattr(model, "temporal_compression_ratio", None) or 4)  # two latent frames' worth
    pixels = seeded(batch, 3, frames, rows * compression, 5 * compression, seed=62)
    # LTX's decode timestep
    extra = {"temb": torch.tensor([0.05, 0.4][:batch])} if model.config.get("timestep_conditioning") else {}
    return latents, pixels.clamp(-1, 1), extra


def banded(model, call, halo_share: float = 1.0):
    """call() with the model's encoder and decoder run a latent row per band, with this share of their measured
    halos."""
    arch = halo_tiling.architecture_of(model)
    reaches = {
        model.decoder: halo_tiling.decoder_reach(model, arch),
        model.encoder: halo_tiling.encoder_reach(model, arch),
    }
    for part, reach in reaches.items():
        halo_tiling._REACHES[part] = dataclasses.replace(reach, halo=int(reach.halo * halo_share))
    try:
        tiler = HaloTiler(model, band_pixels=1)
        tiler.min_band_halos = 0
        with torch.no_grad(), tiler.installed():
            return call(), tiler.bands
    finally:
        halo_tiling._REACHES.update(reaches)


@pytest.mark.parametrize("family", ROW_LOCAL)
def test_a_latent_row_per_band_gives_the_untiled_decode_and_encode(reference, family):
    model = reference[family]
    latents, pixels, extra = cases(family, model)
    with torch.no_grad():
        untiled, untiled_latents = model.decode(latents, **extra).sample, model.encode(pixels).latent_dist.mean
    decoded, decode_bands = banded(model, lambda: model.decode(latents, **extra).sample)
    encoded, encode_bands = banded(model, lambda: model.encode(pixels).latent_dist.mean)
    torch.testing.assert_close(decoded, untiled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoded, untiled_latents, atol=1e-5, rtol=1e-5)
    # Every latent row its own band (in every call, where a model calls per frame)
    assert decode_bands >= ROWS.get(family, 11) and encode_bands >= ROWS.get(family, 11)


@pytest.mark.parametrize(
    "family", [name for name in ("wan21", "hunyuanvideo15", "ltxvideo", "ltx2") if name in ROW_LOCAL]
)
def test_the_measured_halo_is_what_makes_bands_exact(reference, family):
    """Half the halo, and band edges show: the test above would fail without the measured halo."""
    model = reference[family]
    latents, pixels, extra = cases(family, model)
    with torch.no_grad():
        untiled, untiled_latents = model.decode(latents, **extra).sample, model.encode(pixels).latent_dist.mean
    decoded, _ = banded(model, lambda: model.decode(latents, **extra).sample, halo_share=0.5)
    encoded, _ = banded(model, lambda: model.encode(pixels).latent_dist.mean, halo_share=0.5)
    assert (decoded - untiled).abs().max() > 1e-4 and (encoded - untiled_latents).abs().max() > 1e-4


def test_each_band_is_a_pass_of_the_models_own_clip_loop(reference):
    """Wan decodes a frame per call and encodes 1 then 4 frames per call, with causal caches: its clip loop runs once
    per
    band (three here), the caches holding that band's rows; one tiler serves clip after clip."""
    model = reference["wan21"]
    latents, pixels = seeded(1, 16, 3, 8, 4, seed=63), seeded(1, 3, 9, 64, 32, seed=64).clamp(-1, 1)
    with torch.no_grad():
        untiled, untiled_latents = model.decode(latents).sample, model.encode(pixels).latent_dist.mean
        tiler = HaloTiler(
            model, band_pixels=3 * 8 * 32 * 4
        )  # three latent rows per band (encode: 8 x 32 pixels x 4 frames)
        tiler.min_band_halos = 0
        with tiler.installed():
            encoded = [model.encode(pixels).latent_dist.mean for _ in range(2)]
            assert tiler.bands == 6
            decoded = [model.decode(latents).sample for _ in range(2)]
    for tiled in decoded:
        torch.testing.assert_close(tiled, untiled, atol=1e-5, rtol=1e-5)
    for tiled in encoded:
        torch.testing.assert_close(tiled, untiled_latents, atol=1e-5, rtol=1e-5)


def test_ltx_decodes_exactly_in_bands_through_the_vae_stage_with_its_timestep(model_dirs, reference, monkeypatch):
    """The service's decode of LTX-Video, tiling=exact: its decode timestep reaches every band, the frame is split (two
    or three bands: 41 latent rows, four halos at least each), and the result is the untiled decode; diffusers' blend
    differs."""
    plans = []
    plan = HaloTiler._bands
    monkeypatch.setattr(HaloTiler, "_bands", lambda self, *args: plans.append(plan(self, *args)) or plans[-1])
    vae = load_vae(
        load_family("ltxvideo"), str(model_dirs["ltxvideo"]), torch.device("cpu"), torch.float32, tile_above_pixels=0
    )
    latents, timestep = seeded(2, 128, 2, 41, 2, seed=65), torch.tensor([0.05, 0.4])
    with torch.no_grad():
        untiled = reference["ltxvideo"].decode(latents, temb=timestep).sample
    exact, blend = (vae.decode(latents, timestep=timestep, tiling=tiling) for tiling in ("exact", "blend"))
    assert plans and all(len(bands) >= 2 for bands in plans) and vae.calls["tiled"] == 2
    torch.testing.assert_close(exact, untiled, atol=1e-5, rtol=1e-5)
    assert (blend - untiled).abs().max() > 1e-2


def test_a_tiled_decode_measures_and_touches_only_the_decoder():
    """The encoder's reach is measured when it is first tiled, not with the decoder's: on the CPU a decode then leaves
    the
    encoder's weights unread (LTX's encoder holds 0.69 B of its 1.25 B parameters)."""
    model = TINY_MODELS["ltxvideo"]()
    with torch.no_grad(), HaloTiler(model, band_pixels=1).installed():
        model.decode(seeded(1, 128, 1, 4, 2, seed=66), temb=torch.tensor([0.05]))
    assert model.decoder in halo_tiling._REACHES and model.encoder not in halo_tiling._REACHES


def test_a_decoder_that_draws_spatial_noise_has_no_exact_bands():
    """LTX 0.9.1's resnets can add noise drawn for the shape they see: a band would draw other noise than the whole
    frame."""
    model = TINY_MODELS["ltxvideo"]()
    noisy = type(model).from_config({**model.config, "decoder_inject_noise": (True, False, False, False)})
    assert HaloTiler.supports(model) and not HaloTiler.supports(noisy)
