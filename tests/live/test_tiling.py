"""Exact tiled decode and encode (tiling.py): over HTTP with every image tiled, equal to diffusers' untiled output,
where diffusers' blended tiling (tiling=blend) measurably is not."""

import numpy as np
import pytest
import requests
import torch
from conftest import LiveServer, offline_env, seeded, tensor_of
from diffusers.utils.remote_utils import remote_decode

from remote_vae.families import load_family
from remote_vae.latents import check_output_size, plan_decode
from remote_vae.settings import GPU_MAX_PIXELS, read_settings
from remote_vae.tiling.group_norm import GroupNormTiler

FAMILIES = ("sd15", "flux", "sd3", "flux2")
BAND_PIXELS = 1500  # a few dozen rows per band at these sizes: many bands, each with halos


@pytest.fixture(scope="module")
def tiling_server(model_dirs, tmp_path_factory):
    """Families whose every image is tiled (--tile-above-pixels 0), in narrow bands."""
    args = [*FAMILIES, "--tile-above-pixels", "0", "--tile-band-pixels", str(BAND_PIXELS)]
    args += [option for name in FAMILIES for option in ("--model", f"{name}={model_dirs[name]}")]
    server = LiveServer(args, offline_env(), tmp_path_factory.mktemp("logs") / "tiling.log")
    yield server
    server.stop()


def untiled_decode(model, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(latents).sample


def uint8(sample: torch.Tensor) -> torch.Tensor:
    return ((sample / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.int16)


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(share of uint8 pixels within 1 of each other, PSNR in dB over 0..255)."""
    difference = (uint8(a) - uint8(b)).abs()
    error = (difference.double() ** 2).mean().item()
    return (difference <= 1).double().mean().item(), 10 * np.log10(255**2 / max(error, 1e-12))


def latent_for(family: str, seed: int) -> torch.Tensor:
    # 13x11 latent cells: 104x88 pixels, no multiple of a band, a tile or 16 (Flux.2 folds 2x2: 14x12)
    channels = load_family(family).latent_channels
    return seeded(2, channels, 14, 12, seed=seed) if family == "flux2" else seeded(2, channels, 13, 11, seed=seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_tiled_decode_is_the_untiled_decode(tiling_server, reference, family):
    latents = latent_for(family, seed=51)
    url = f"{tiling_server.url}/{family}/"
    out = remote_decode(
        url, tensor=latents, output_type="pt", partial_postprocess=False, return_type="pt", do_scaling=False
    )
    untiled = untiled_decode(reference[family], latents)
    within_one, psnr = agreement(out, untiled)
    assert within_one >= 0.999 and psnr >= 50, (within_one, psnr)
    torch.testing.assert_close(out, untiled, atol=1e-4, rtol=1e-4)
    assert tiling_server.metric("remote_vae_model_calls_total", family=family, mode="tiled") >= 1
    if reference[family].tile_sample_min_size >= max(out.shape[-2:]):
        return  # diffusers would not tile this image at all (the tiny Flux.2 keeps 1024-pixel tiles)
    # diffusers' blended tiles (64-pixel tiles for the tiny SD-style models) are measurably not the untiled image
    blend = tensor_of(
        requests.post(
            url,
            params={"shape": list(latents.shape), "dtype": "float32", "output_type": "pt", "tiling": "blend"},
            data=latents.numpy().tobytes(),
            headers={"Content-Type": "tensor/binary"},
            timeout=120,
        )
    )
    _, blend_psnr = agreement(blend, untiled)
    assert blend_psnr < psnr - 10 and (blend - untiled).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_exact_tiled_encode_is_the_untiled_encode(tiling_server, reference, family):
    pixels = seeded(1, 3, 104, 88, seed=52).clamp(-1, 1)
    response = requests.post(
        f"{tiling_server.url}/{family}/",
        params={"shape": list(pixels.shape), "dtype": "float32"},
        data=pixels.numpy().tobytes(),
        timeout=120,
    )
    with torch.no_grad():
        expected = reference[family].encode(pixels).latent_dist.mean
    torch.testing.assert_close(tensor_of(response), expected, atol=1e-4, rtol=1e-4)


def test_exact_tiling_where_the_model_has_none_is_refused(families_server):
    latents = torch.zeros(
        1, 3, 16, 2, 2
    )  # CogVideoX (frames first): its norms are conditioned on the latent, over frame batches
    response = requests.post(
        f"{families_server.url}/cogvideox/",
        params={"shape": list(latents.shape), "dtype": "float32", "output_type": "pt", "tiling": "exact"},
        data=latents.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary"},
        timeout=60,
    )
    assert response.status_code == 400 and "tiling=blend" in response.json()["error"]


def test_exact_tiling_covers_the_groupnorm_families(reference):
    supported = {name for name, model in reference.items() if GroupNormTiler.supports(model)}
    assert supported == {"sd15", "sdxl", "flux", "sd3", "flux2", "hunyuanvideo", "cogview4"}


def tiled_in_process(model, call, store_limit):
    tiler = GroupNormTiler(model, band_pixels=BAND_PIXELS, store_limit=store_limit)
    with torch.no_grad(), tiler.installed():
        return call(), (tiler.recomputed, tiler.overwritten)


# A 104x88 image, or 9 such frames: odd latent sizes, many bands.
INPUTS = {"sd15": ((2, 4, 13, 11), (1, 3, 104, 88)), "hunyuanvideo": ((1, 16, 3, 13, 11), (1, 3, 9, 104, 88))}


@pytest.mark.parametrize("family", sorted(INPUTS))
def test_whether_activations_are_held_whole_or_recomputed_the_result_is_untiled(reference, family):
    """store_limit None holds every GroupNorm's input whole; 0 holds none, recomputing bands from the mid block
    (decode) or the pixels (encode) for each GroupNorm's statistics; 40000 bytes holds the low-resolution ones only.
    Where a segment keeps the resolution, its output overwrites its input band by band, each band once no later band
    reads its rows."""
    model = reference[family]
    latent_shape, pixel_shape = INPUTS[family]
    latents, pixels = seeded(*latent_shape, seed=53), seeded(*pixel_shape, seed=54).clamp(-1, 1)
    with torch.no_grad():
        untiled_pixels, untiled_latents = model.decode(latents).sample, model.encode(pixels).latent_dist.mean
    recomputed, overwritten = {}, {}
    for limit in (None, 40000, 0):
        decoded, (decode_recomputed, decode_overwritten) = tiled_in_process(
            model, lambda: model.decode(latents).sample, limit
        )
        encoded, (encode_recomputed, encode_overwritten) = tiled_in_process(
            model, lambda: model.encode(pixels).latent_dist.mean, limit
        )
        torch.testing.assert_close(decoded, untiled_pixels, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(encoded, untiled_latents, atol=1e-4, rtol=1e-4)
        recomputed[limit], overwritten[limit] = (
            (decode_recomputed, encode_recomputed),
            (decode_overwritten, encode_overwritten),
        )
    assert recomputed[None] == (0, 0)
    assert all(0 < some < none for some, none in zip(recomputed[40000], recomputed[0], strict=True)), recomputed
    assert overwritten[None][0] > 0 and sum(overwritten[40000]) > 0, overwritten


def test_the_service_recomputes_bands_past_its_store_limit(model_dirs, reference, tmp_path):
    """--tile-store-bytes 0: the service holds no activation whole, and still returns the untiled decode and encode."""
    server = LiveServer(
        [
            "sd15",
            "--model",
            f"sd15={model_dirs['sd15']}",
            "--tile-above-pixels",
            "0",
            "--tile-band-pixels",
            str(BAND_PIXELS),
            "--tile-store-bytes",
            "0",
        ],
        offline_env(),
        tmp_path / "streamed.log",
    )
    try:
        latents = latent_for("sd15", seed=55)
        out = remote_decode(
            f"{server.url}/",
            tensor=latents,
            output_type="pt",
            partial_postprocess=False,
            return_type="pt",
            do_scaling=False,
        )
        torch.testing.assert_close(out, untiled_decode(reference["sd15"], latents), atol=1e-4, rtol=1e-4)
        pixels = seeded(1, 3, 104, 88, seed=56).clamp(-1, 1)
        encoded = tensor_of(
            requests.post(
                f"{server.url}/",
                params={"shape": list(pixels.shape), "dtype": "float32"},
                data=pixels.numpy().tobytes(),
                timeout=120,
            )
        )
        with torch.no_grad():
            torch.testing.assert_close(encoded, reference["sd15"].encode(pixels).latent_dist.mean, atol=1e-4, rtol=1e-4)
        assert server.metric("remote_vae_model_calls_total", family="sd15", mode="tiled") >= 2
    finally:
        server.stop()


def test_a_gpu_takes_8192_squared_by_default_and_refuses_more_from_the_numbers():
    settings = read_settings(["sd15"])
    limits = settings.limits_for("cuda")
    assert limits.max_pixels == GPU_MAX_PIXELS == 8192 * 8192
    assert settings.limits_for("cpu").max_pixels < GPU_MAX_PIXELS
    family = load_family("sdxl")
    check_output_size(plan_decode((1, 4, 1024, 1024), family, None, None), family, limits.max_pixels)
    with pytest.raises(Exception) as refused:
        check_output_size(plan_decode((1, 4, 1024, 1025), family, None, None), family, limits.max_pixels)
    assert refused.value.status == 413 and "8200x8192" in str(refused.value)
