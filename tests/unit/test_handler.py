"""handler.py: EndpointHandler called directly, as Inference Endpoints' toolkit calls it."""

import base64
import io

import numpy as np
import pytest
import torch
from conftest import seeded
from diffusers.image_processor import VaeImageProcessor
from diffusers_reference import SD, assert_pixels_close, decode_locally, uint8_locally
from PIL import Image

from handler import EndpointHandler
from remote_vae.errors import RequestError

processor = VaeImageProcessor(vae_scale_factor=8)


@pytest.fixture(scope="module")
def handler(model_dirs, monkeypatch_module):
    monkeypatch_module.setenv("REMOTE_VAE_DEVICE", "cpu")
    monkeypatch_module.setenv("REMOTE_VAE_MAX_PIXELS", "123456")
    monkeypatch_module.delenv("REMOTE_VAE_FAMILIES", raising=False)
    return EndpointHandler(str(model_dirs["sd15"]))  # family found from config.json


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def from_reply(reply: dict) -> torch.Tensor:
    dtype = {"float32": torch.float32, "uint8": torch.uint8}[reply["parameters"]["dtype"]]
    return torch.frombuffer(bytearray(base64.b64decode(reply["inputs"])), dtype=dtype).reshape(
        reply["parameters"]["shape"]
    )


def test_family_is_inferred(handler):
    assert handler.service.family.name == "sd15"


def test_settings_come_from_the_serve_environment(handler):
    assert handler.service.limits.max_pixels == 123456
    assert handler.service.vae.device.type == "cpu"


def test_tensor_inputs(handler, reference):
    latents = seeded(1, 4, 8, 8)
    reply = handler({"inputs": latents, "parameters": {"output_type": "pt", "scaling_factor": SD}})
    torch.testing.assert_close(from_reply(reply), decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)


def test_raw_bytes_and_base64_inputs(handler, reference):
    latents = seeded(2, 4, 8, 8)
    parameters = {
        "shape": [2, 4, 8, 8],
        "dtype": "float32",
        "output_type": "pt",
        "partial_postprocess": True,
        "do_scaling": True,
    }
    expected = uint8_locally(decode_locally(reference["sd15"], latents, SD))
    for inputs in (latents.numpy().tobytes(), base64.b64encode(latents.numpy().tobytes()).decode()):
        reply = handler({"inputs": inputs, "parameters": dict(parameters)})
        assert_pixels_close(from_reply(reply).numpy(), expected)


def test_pil_output_is_an_image(handler, reference):
    latents = seeded(1, 4, 8, 8)
    image = handler({"inputs": latents, "parameters": {"output_type": "pil", "scaling_factor": SD}})
    assert isinstance(image, Image.Image)
    assert_pixels_close(np.asarray(image)[None], uint8_locally(decode_locally(reference["sd15"], latents, SD)))


def test_pil_image_inputs_encode(handler, reference):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    reply = handler({"inputs": image, "parameters": {"scaling_factor": SD}})
    with torch.no_grad():
        expected = reference["sd15"].encode(processor.preprocess(image)).latent_dist.mean * SD
    torch.testing.assert_close(from_reply(reply), expected, atol=1e-4, rtol=1e-4)


def test_image_file_bytes_encode(handler):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 24), "red").save(buffer, format="PNG")
    reply = handler({"inputs": buffer.getvalue()})
    assert reply["parameters"]["shape"] == [1, 4, 3, 2]


def test_bad_inputs_raise_request_errors(handler):
    with pytest.raises(RequestError, match="needs 512 bytes"):
        handler({"inputs": bytes(10), "parameters": {"shape": [1, 4, 8, 8], "dtype": "float16"}})
    with pytest.raises(RequestError, match="base64"):
        handler({"inputs": "@@not base64@@"})
    with pytest.raises(RequestError, match="expected a tensor"):
        handler({"inputs": 42})


def test_video_family_through_the_handler(model_dirs, reference, monkeypatch_module):
    """A Wan model directory: the family comes from config.json (z_dim), MP4 replies come back base64."""
    video_handler = EndpointHandler(str(model_dirs["wan21"]))
    assert video_handler.service.family.name == "wan21"
    latents = seeded(1, 16, 2, 2, 3)
    reply = video_handler({"inputs": latents, "parameters": {"output_type": "mp4", "fps": 8}})
    assert reply["parameters"] == {"media_type": "video/mp4", "video_count": 1, "frame_count": 5}
    mp4 = base64.b64decode(reply["inputs"])
    assert mp4[4:8] == b"ftyp"
    latents_back = from_reply(video_handler({"inputs": mp4}))  # the MP4 bytes, encoded again
    assert latents_back.shape == (1, 16, 2, 2, 3)
    reply = video_handler({"inputs": latents, "parameters": {"output_type": "pt"}})
    with torch.no_grad():
        expected = reference["wan21"].decode(latents).sample
    torch.testing.assert_close(from_reply(reply), expected, atol=1e-4, rtol=1e-4)
    assert reply["parameters"]["frame_count"] == 5
