"""Decode through the live server with diffusers' own client, against diffusers in-process."""

import io

import numpy as np
import pytest
import requests
import torch
from conftest import psnr, seeded
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.utils.remote_utils import remote_decode
from diffusers_reference import FLUX, SD, assert_pixels_close, decode_locally, processor, uint8_locally
from PIL import Image


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pt_raw_matches_diffusers(sd, reference, dtype):
    latents = seeded(1, 4, 8, 12, dtype=dtype)
    out = remote_decode(sd, tensor=latents, output_type="pt", return_type="pt", scaling_factor=SD)
    expected = decode_locally(reference["sd15"], latents, SD)
    assert out.shape == (1, 3, 64, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_pt_raw_is_unclamped(sd, reference):
    latents = seeded(1, 4, 8, 8, seed=3) * 4
    out = remote_decode(sd, tensor=latents, output_type="pt", return_type="pt", scaling_factor=SD)
    assert out.abs().max() > 1  # raw VAE output, not denormalised
    torch.testing.assert_close(out, decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)


def test_pt_partial_postprocess_is_uint8_hwc(sd, reference):
    latents = seeded(2, 4, 8, 8, dtype=torch.float16)
    out = remote_decode(
        sd, tensor=latents, output_type="pt", partial_postprocess=True, return_type="pt", scaling_factor=SD
    )
    assert out.dtype == torch.uint8 and out.shape == (2, 64, 64, 3)
    assert_pixels_close(out.numpy(), uint8_locally(decode_locally(reference["sd15"], latents, SD)))


def test_pt_partial_postprocess_to_pil(sd, reference):
    latents = seeded(1, 4, 8, 8)
    image = remote_decode(
        sd, tensor=latents, output_type="pt", partial_postprocess=True, return_type="pil", scaling_factor=SD
    )
    assert_pixels_close(np.asarray(image)[None], uint8_locally(decode_locally(reference["sd15"], latents, SD)))


def test_pil_with_processor_returns_unit_floats(sd, reference):
    latents = seeded(2, 4, 8, 8, dtype=torch.float16)
    out = remote_decode(sd, tensor=latents, output_type="pil", processor=processor, return_type="pt", scaling_factor=SD)
    expected = processor.postprocess(decode_locally(reference["sd15"], latents, SD), output_type="pt")
    assert out.shape == (2, 3, 64, 64) and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    images = remote_decode(
        sd, tensor=latents, output_type="pil", processor=processor, return_type="pil", scaling_factor=SD
    )
    assert_pixels_close(
        np.stack([np.asarray(i) for i in images]), uint8_locally(decode_locally(reference["sd15"], latents, SD))
    )


def test_png_is_exact(sd, reference):
    latents = seeded(1, 4, 10, 6)
    image = remote_decode(sd, tensor=latents, image_format="png", scaling_factor=SD)
    assert image.format == "png" and image.size == (48, 80)
    assert_pixels_close(np.asarray(image)[None], uint8_locally(decode_locally(reference["sd15"], latents, SD)))


def test_png_compression_changes_the_bytes_never_the_pixels(sd, reference):
    latents = seeded(1, 4, 16, 16, seed=9)
    expected = uint8_locally(decode_locally(reference["sd15"], latents, SD))
    sizes = {}
    for level in (0, 1, 9):
        response = requests.post(
            sd,
            params={
                "shape": [1, 4, 16, 16],
                "dtype": "float32",
                "scaling_factor": SD,
                "output_type": "pil",
                "image_format": "png",
                "png_compression": level,
            },
            data=latents.numpy().tobytes(),
            headers={"Content-Type": "tensor/binary", "Accept": "image/png"},
        )
        assert response.headers["content-type"] == "image/png"
        assert_pixels_close(np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))[None], expected)
        sizes[level] = len(response.content)
    assert sizes[0] > sizes[1] >= sizes[9]  # 0 stores, 9 compresses hardest
    bad = requests.post(
        sd,
        params={"shape": [1, 4, 16, 16], "dtype": "float32", "output_type": "pil", "png_compression": 10},
        data=latents.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "image/png"},
    )
    assert bad.status_code == 400 and "png_compression" in bad.json()["error"]


def jpeg_locally(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_jpeg_matches_local_jpeg_of_diffusers_pixels(sd, reference):
    latents = seeded(1, 4, 16, 16)
    expected = uint8_locally(decode_locally(reference["sd15"], latents, SD))[0]
    image = remote_decode(sd, tensor=latents, scaling_factor=SD)  # Accept: image/jpeg, default quality 90
    assert image.format == "jpeg" and image.size == (128, 128)
    assert psnr(torch.tensor(np.asarray(image)), torch.tensor(jpeg_locally(expected, 90))) >= 40
    assert psnr(torch.tensor(np.asarray(image)), torch.tensor(expected)) >= 30
    # quality is honoured: a higher quality is closer to the lossless pixels.
    response = requests.post(
        sd,
        params={
            "shape": [1, 4, 16, 16],
            "dtype": "float32",
            "scaling_factor": SD,
            "output_type": "pil",
            "quality": 100,
        },
        data=latents.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "image/jpeg"},
    )
    best = np.asarray(Image.open(io.BytesIO(response.content)))
    assert (
        psnr(torch.tensor(best), torch.tensor(expected))
        > psnr(torch.tensor(np.asarray(image)), torch.tensor(expected)) + 3
    )


def test_batch_image_is_stacked_vertically(sd, reference):
    latents = seeded(3, 4, 8, 6)
    image = remote_decode(sd, tensor=latents, image_format="png", scaling_factor=SD)
    assert image.size == (48, 3 * 64)
    expected = uint8_locally(decode_locally(reference["sd15"], latents, SD))
    assert_pixels_close(np.asarray(image).reshape(3, 64, 48, 3), expected)


def test_batch_tensor_matches_per_sample(sd, reference):
    latents = seeded(3, 4, 8, 8)
    out = remote_decode(sd, tensor=latents, output_type="pt", return_type="pt", scaling_factor=SD)
    torch.testing.assert_close(out, decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)


def test_prescaled_latents_with_do_scaling_false(sd, reference):
    latents = seeded(1, 4, 8, 8)
    out = remote_decode(sd, tensor=latents / SD, do_scaling=False, output_type="pt", return_type="pt")
    torch.testing.assert_close(out, decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)
    # ...and the scaling really matters: unscaled and scaled decodes differ.
    assert (out - decode_locally(reference["sd15"], latents)).abs().max() > 0.1


def test_do_scaling_true_uses_family_factors(sd, flux, reference):
    latents = seeded(1, 4, 8, 8)
    with pytest.warns(FutureWarning):
        out = remote_decode(sd, tensor=latents, output_type="pt", return_type="pt")  # sends do_scaling=True
    torch.testing.assert_close(out, decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)
    latents = seeded(1, 16, 8, 8)
    with pytest.warns(FutureWarning):
        out = remote_decode(flux, tensor=latents, output_type="pt", return_type="pt")
    torch.testing.assert_close(out, decode_locally(reference["flux"], latents, *FLUX), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("height,width", [(64, 64), (48, 80), (72, 56)])
def test_flux_packed_latents(flux, reference, height, width):
    h, w = 2 * (height // 16), 2 * (width // 16)
    unpacked = seeded(2, 16, h, w, dtype=torch.bfloat16)
    packed = FluxPipeline._pack_latents(unpacked, 2, 16, h, w)
    out = remote_decode(
        flux,
        tensor=packed,
        height=height,
        width=width,
        output_type="pt",
        return_type="pt",
        scaling_factor=FLUX[0],
        shift_factor=FLUX[1],
    )
    assert out.shape == (2, 3, 8 * h, 8 * w)
    torch.testing.assert_close(out, decode_locally(reference["flux"], unpacked, *FLUX), atol=1e-4, rtol=1e-4)


def test_flux_unpacked_latents_and_png(flux, reference):
    latents = seeded(1, 16, 8, 8, dtype=torch.bfloat16)
    image = remote_decode(flux, tensor=latents, image_format="png", scaling_factor=FLUX[0], shift_factor=FLUX[1])
    assert_pixels_close(np.asarray(image)[None], uint8_locally(decode_locally(reference["flux"], latents, *FLUX)))


def test_packed_sd_latent(sd, reference):
    unpacked = seeded(1, 4, 8, 8)
    packed = FluxPipeline._pack_latents(unpacked, 1, 4, 8, 8)  # [1, 16, 16]
    out = remote_decode(sd, tensor=packed, height=64, width=64, output_type="pt", return_type="pt", scaling_factor=SD)
    torch.testing.assert_close(out, decode_locally(reference["sd15"], unpacked, SD), atol=1e-4, rtol=1e-4)


def test_comfyui_nonsense_height_width_ignored_for_4d(sd, reference):
    latents = seeded(1, 4, 8, 8)
    out = remote_decode(sd, tensor=latents, do_scaling=False, height=1, width=1, output_type="pt", return_type="pt")
    torch.testing.assert_close(out, decode_locally(reference["sd15"], latents), atol=1e-4, rtol=1e-4)
