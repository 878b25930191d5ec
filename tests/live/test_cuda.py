"""The CUDA-only paths, on a GPU: skipped where torch sees none (CI), run where one is lent.

The logic of each path is tested on CPU elsewhere (the encoder choice, the budget's arithmetic,
uint8 rounding); here the real thing runs: pinned transfers, uint8 made on the GPU against
diffusers' own postprocess of the same GPU sample, nvJPEG against Pillow, the budget from
measured memory, and a served decode on CUDA against diffusers on CUDA.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import LiveServer, offline_env, psnr, seeded
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode
from PIL import Image

from remote_vae.device import BatchBudget, DevicePath, PeakMemory, available_memory, to_device, to_host
from remote_vae.families import load_family
from remote_vae.media import jpeg_encoder_for, uint8_images
from remote_vae.vae import load_vae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def test_pinned_transfers_round_trip():
    path = DevicePath.default(CUDA)
    host = torch.randn(2, 4, 16, 16)
    on_device = to_device(host, CUDA, torch.float16, path)
    assert (
        on_device.is_cuda
        and on_device.dtype == torch.float16
        and on_device.is_contiguous(memory_format=torch.channels_last)
    )
    back = to_host(on_device, path)
    assert back.is_pinned() and back.is_contiguous() and torch.equal(back, host.half())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_uint8_on_the_gpu_is_diffusers_postprocess_of_the_same_sample(dtype):
    sample = (torch.randn(2, 3, 64, 48, device=CUDA) * 1.5).to(dtype)
    expected = (
        (VaeImageProcessor(vae_scale_factor=8).postprocess(sample, output_type="np") * 255).round().astype("uint8")
    )
    assert np.array_equal(uint8_images(sample).cpu().numpy(), expected)


def test_nvjpeg_matches_pillow_quality():
    encode = jpeg_encoder_for(CUDA)
    if encode is None:
        pytest.skip("torchvision with nvJPEG is not installed")
    ramp = np.add.outer(np.arange(256), np.arange(384)).astype(np.float32)
    pixels = np.stack([ramp % 256, (ramp * 3) % 256, (255 - ramp / 3) % 256], axis=-1).astype(np.uint8)
    pixels = np.clip(pixels.astype(int) + np.random.default_rng(0).integers(-20, 20, pixels.shape), 0, 255).astype(
        np.uint8
    )
    ours = np.asarray(Image.open(io.BytesIO(encode(torch.from_numpy(pixels).to(CUDA), 90))).convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, subsampling=0)
    pillow = np.asarray(Image.open(buffer).convert("RGB"))
    with Image.open(io.BytesIO(encode(torch.from_numpy(pixels).to(CUDA), 90))) as image:
        assert image.layer[0][1:3] == image.layer[1][1:3] == (1, 1)  # 4:4:4: chroma at full resolution, as Pillow's
    reference = torch.from_numpy(pixels)
    assert abs(psnr(torch.from_numpy(ours), reference) - psnr(torch.from_numpy(pillow), reference)) < 1.5


def test_the_budget_comes_from_measured_memory(model_dirs):
    vae = load_vae(load_family("sd15"), str(model_dirs["sd15"]), CUDA, torch.float16)  # warms up 256x256, measuring
    assert vae.budget.bytes_per_pixel and vae.budget.bytes_per_pixel > 0
    assert vae.budget.limit(CUDA) == int(0.8 * available_memory(CUDA) / vae.budget.bytes_per_pixel)
    assert BatchBudget(pixels=7).limit(CUDA) == 7
    with PeakMemory(CUDA) as peak:
        torch.empty(1 << 20, device=CUDA)
    assert peak.bytes >= 1 << 20


def test_a_served_cuda_decode_matches_diffusers_on_cuda(model_dirs, reference, tmp_path):
    server = LiveServer(
        ["sd15", "--model", str(model_dirs["sd15"]), "--dtype", "float16"],
        offline_env(),
        tmp_path / "cuda.log",
        device="cuda",
    )
    try:
        latents = seeded(4, 4, 16, 16, seed=5)
        out = remote_decode(
            endpoint=server.url + "/",
            tensor=latents,
            output_type="pt",
            partial_postprocess=True,
            return_type="pt",
            do_scaling=False,
        )
        vae = reference["sd15"].to(CUDA, torch.float16)
        with torch.no_grad():
            sample = vae.decode(latents.to(CUDA, torch.float16)).sample
        expected = (
            (VaeImageProcessor(vae_scale_factor=8).postprocess(sample, output_type="np") * 255).round().astype("uint8")
        )
        assert np.abs(out.numpy().astype(int) - expected.astype(int)).max() <= 1
    finally:
        server.stop()
        reference["sd15"].to("cpu", torch.float32)


@pytest.mark.parametrize("store, limit", [("cuda", None), ("cpu", None), ("cpu", 0)])
def test_exact_tiling_on_the_gpu_with_activations_on_the_device_or_in_host_memory(reference, store, limit):
    """The exact tiled path on CUDA, whole activations kept on the GPU, waiting in host memory, or none held
    (every band recomputed): diffusers' untiled decode."""
    from remote_vae.tiling.group_norm import GroupNormTiler

    model = reference["sd15"].to(CUDA)
    try:
        latents = seeded(1, 4, 29, 23, seed=61).to(CUDA)
        with torch.inference_mode():
            untiled = model.decode(latents).sample
            with PeakMemory(CUDA) as peak:
                tiler = GroupNormTiler(model, band_pixels=40 * 184, store=torch.device(store), store_limit=limit)
                with tiler.installed():
                    tiled = model.decode(latents).sample
        torch.testing.assert_close(tiled, untiled, atol=1e-4, rtol=1e-4)
        assert peak.bytes is not None
    finally:
        reference["sd15"].to("cpu")


def test_banded_tiling_on_the_gpu(reference):
    """Wan's banded exact path on CUDA (its clip loop once per band, the causal caches on the GPU): diffusers' untiled
    decode and encode."""
    from remote_vae.tiling.halo import HaloTiler

    model = reference["wan21"].to(CUDA)
    try:
        latents, pixels = (
            seeded(1, 16, 3, 29, 5, seed=62).to(CUDA),
            seeded(1, 3, 9, 232, 40, seed=63).clamp(-1, 1).to(CUDA),
        )
        with torch.inference_mode():
            untiled, untiled_latents = model.decode(latents).sample, model.encode(pixels).latent_dist.mean
            tiler = HaloTiler(model, band_pixels=1)
            tiler.min_band_halos = 0
            with tiler.installed():
                tiled, tiled_latents = model.decode(latents).sample, model.encode(pixels).latent_dist.mean
        torch.testing.assert_close(tiled, untiled, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tiled_latents, untiled_latents, atol=1e-4, rtol=1e-4)
        assert tiler.bands == 2 * 29
    finally:
        reference["wan21"].to("cpu")
