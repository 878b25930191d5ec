"""Encode through the live server with diffusers' own client, against diffusers in-process."""

import io

import pytest
import requests
import torch
from conftest import seeded
from diffusers.utils.remote_utils import remote_encode
from diffusers_reference import FLUX, SD, encode_locally, processor
from PIL import Image


def random_image(width=72, height=56, mode="RGB", seed=0) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy()).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_pil_image_any_mode(sd, reference, mode):
    image = random_image(mode=mode)  # 72x56: multiples of 8, not of 16
    latents = remote_encode(sd, image, scaling_factor=SD)
    expected = encode_locally(reference["sd15"], processor.preprocess(image.convert("RGB")), SD)
    assert latents.shape == (1, 4, 7, 9)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensor_batch(sd, reference, dtype):
    images = (seeded(2, 3, 40, 24).tanh()).to(dtype)
    latents = remote_encode(sd, images, scaling_factor=SD)
    torch.testing.assert_close(latents, encode_locally(reference["sd15"], images, SD), atol=1e-4, rtol=1e-4)


def test_flux_on_the_decode_url_returns_unpacked_latents(flux, reference):
    image = random_image(88, 40)
    latents = remote_encode(flux, image, scaling_factor=FLUX[0], shift_factor=FLUX[1])
    assert latents.shape == (1, 16, 5, 11)
    expected = encode_locally(reference["flux"], processor.preprocess(image), *FLUX)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


def test_no_scaling_is_the_distribution_mean(sd, reference):
    image = random_image()
    latents = remote_encode(sd, image)
    torch.testing.assert_close(
        latents, encode_locally(reference["sd15"], processor.preprocess(image)), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("fmt,media", [("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("PNG", "image/png")])
def test_image_bodies_with_content_type_on_encode_route(multi_server, reference, fmt, media):
    image = random_image()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95)
    response = requests.post(multi_server.url + "/sd15/encode", data=buffer.getvalue(), headers={"Content-Type": media})
    assert response.status_code == 200, response.text
    assert response.headers["dtype"] == "float32" and response.headers["shape"] == "[1,4,7,9]"
    latents = torch.frombuffer(bytearray(response.content), dtype=torch.float32).reshape(1, 4, 7, 9)
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    torch.testing.assert_close(
        latents, encode_locally(reference["sd15"], processor.preprocess(decoded)), atol=1e-4, rtol=1e-4
    )


def test_encode_is_deterministic(sd):
    image = random_image()
    assert torch.equal(remote_encode(sd, image), remote_encode(sd, image))
