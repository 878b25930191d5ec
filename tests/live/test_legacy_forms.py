"""docs/protocol.md §6: the older request forms, sent with raw `requests`."""

import base64
import io

import numpy as np
import requests
import torch
from conftest import seeded
from diffusers.image_processor import VaeImageProcessor
from diffusers_reference import SD, assert_pixels_close, decode_locally, uint8_locally
from PIL import Image

processor = VaeImageProcessor(vae_scale_factor=8)


def b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode()


def tensor_from_json(document: dict) -> torch.Tensor:
    dtype = {"float32": torch.float32, "uint8": torch.uint8}[document["parameters"]["dtype"]]
    data = bytearray(base64.b64decode(document["inputs"]))
    return torch.frombuffer(data, dtype=dtype).reshape(document["parameters"]["shape"])


def test_tensor_base64_in_and_out(sd, reference):
    latents = seeded(1, 4, 8, 8)
    response = requests.post(
        sd,
        params={
            "shape": [1, 4, 8, 8],
            "dtype": "float32",
            "output_type": "pt",
            "partial_postprocess": "false",
            "scaling_factor": SD,
        },
        json={"inputs": b64(latents)},
        headers={"Content-Type": "tensor/base64", "Accept": "tensor/base64"},
    )
    assert response.status_code == 200, response.text
    out = tensor_from_json(response.json())
    torch.testing.assert_close(out, decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)


def test_sdnext_json_body_no_query_jpeg(sd, reference):
    latents = seeded(1, 4, 8, 8)
    body = {
        "inputs": b64(latents),
        "parameters": {"shape": [1, 4, 8, 8], "dtype": "float32", "scaling_factor": SD, "image_format": "png"},
    }
    response = requests.post(sd, json=body, headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    assert_pixels_close(image[None], uint8_locally(decode_locally(reference["sd15"], latents, SD)))
    response = requests.post(sd, json=body, headers={"Accept": "image/jpeg"})  # Accept wins over image_format
    assert response.headers["content-type"] == "image/jpeg" and response.content.startswith(b"\xff\xd8")


def test_json_accept_json_without_output_type_gives_raw_tensor(sd, reference):
    latents = seeded(1, 4, 8, 8)
    body = {"inputs": b64(latents), "parameters": {"shape": [1, 4, 8, 8], "dtype": "float32", "do_scaling": True}}
    response = requests.post(sd, json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    torch.testing.assert_close(
        tensor_from_json(response.json()), decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4
    )


def test_comfyui_request(sd, reference):
    latents = seeded(1, 4, 8, 8) / SD  # ComfyUI sends raw latents, already unscaled
    params = {
        "shape": [1, 4, 8, 8],
        "dtype": "float32",
        "do_scaling": "False",
        "output_type": "pt",
        "partial_postprocess": "False",
        "height": 8,
        "width": 8,
    }
    response = requests.post(
        sd,
        params=params,
        data=latents.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "tensor/binary"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["shape"] == "[1,3,64,64]" and response.headers["dtype"] == "float32"
    out = torch.frombuffer(bytearray(response.content), dtype=torch.float32).reshape(1, 3, 64, 64)
    torch.testing.assert_close(out, decode_locally(reference["sd15"], latents), atol=1e-4, rtol=1e-4)


def test_lowercase_booleans_and_comma_shape(sd, reference):
    latents = seeded(2, 4, 8, 8)
    query = "shape=2,4,8,8&dtype=float32&output_type=pt&partial_postprocess=true&do_scaling=true"
    response = requests.post(
        sd + "?" + query, data=latents.numpy().tobytes(), headers={"Content-Type": "tensor/binary"}
    )
    assert response.status_code == 200, response.text
    out = torch.frombuffer(bytearray(response.content), dtype=torch.uint8).reshape(2, 64, 64, 3)
    assert_pixels_close(out.numpy(), uint8_locally(decode_locally(reference["sd15"], latents, SD)))


def test_json_encode_with_base64_png(sd, reference):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 32, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    response = requests.post(
        sd,
        json={"inputs": base64.b64encode(buffer.getvalue()).decode(), "parameters": {"scaling_factor": SD}},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    with torch.no_grad():
        expected = reference["sd15"].encode(processor.preprocess(image)).latent_dist.mean * SD
    torch.testing.assert_close(tensor_from_json(response.json()), expected, atol=1e-4, rtol=1e-4)
