"""handler.py on the stock Inference Endpoints toolkit: a model repository made by `deploy_endpoint.py prepare-repo`,
served as the toolkit serves it (tests/toolkit_server.py), answered with diffusers' in-process pixels.

.ci/run runs this module a second time in a virtual environment holding the toolkit image's stack (torch 2.5.1,
transformers 4.51.3, starlette 0.46, ...) with the repository's requirements.txt installed over it exactly as the
toolkit's entrypoint installs it (REMOTE_VAE_TOOLKIT_STACK=1): there, test_the_toolkit_stack checks what it runs on.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import torch
from conftest import ROOT, free_port, psnr, seeded
from diffusers.image_processor import VaeImageProcessor
from diffusers_reference import SD, assert_pixels_close, decode_locally, uint8_locally
from packaging.version import Version
from PIL import Image

from remote_vae.media import ImageFile, encode_image

pytestmark = [pytest.mark.deployment]

IN_THE_STACK = os.environ.get("REMOTE_VAE_TOOLKIT_STACK") == "1"
processor = VaeImageProcessor(vae_scale_factor=8)


@pytest.fixture(scope="module")
def repository(model_dirs, tmp_path_factory):
    target = tmp_path_factory.mktemp("toolkit") / "repository"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "deploy_endpoint.py"),
            "prepare-repo",
            str(target),
            "--family",
            "sd15",
            "--model",
            str(model_dirs["sd15"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return target


@pytest.fixture(scope="module")
def toolkit(repository, tmp_path_factory):
    """The toolkit's web service on 127.0.0.1, with the prepared repository as HF_MODEL_DIR (the package comes from
    there)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("REMOTE_VAE_") and key != "PYTHONPATH"}
    env.update(
        HF_MODEL_DIR=str(repository),
        REMOTE_VAE_FAMILIES="sd15",
        REMOTE_VAE_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        REMOTE_VAE_TOOLKIT_STACK="1" if IN_THE_STACK else "0",
    )
    log_path = tmp_path_factory.mktemp("toolkit-log") / "toolkit.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "toolkit_server.py"), str(port)],
            cwd=tmp_path_factory.mktemp("cwd"),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"the toolkit did not start (exit {process.poll()}):\n{log_path.read_text()}")
    yield url
    process.terminate()
    process.wait(timeout=20)


def latents_body(latents: torch.Tensor, **parameters) -> dict:
    return {
        "inputs": base64.b64encode(latents.numpy().tobytes()).decode(),
        "parameters": {"shape": list(latents.shape), "dtype": "float32", "scaling_factor": SD, **parameters},
    }


def pixels_of(file: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(file)).convert("RGB"))[None]  # a copy: writable, as torch.from_numpy wants


def test_the_toolkit_stack():
    """In CI's toolkit venv: the image's packages, unmoved by the repository's requirements.txt, and the pinned
    diffusers."""
    if not IN_THE_STACK:
        pytest.skip("runs in the toolkit image's stack (.ci/run sets REMOTE_VAE_TOOLKIT_STACK=1 there)")
    version = importlib.metadata.version
    assert version("torch").split("+")[0] == "2.5.1"
    assert version("transformers") == "4.51.3"
    assert version("sentence-transformers") == "4.0.2"
    assert version("starlette").startswith("0.46.")
    assert Version(version("huggingface_hub")) < Version("1.0")
    sys.path.insert(0, str(ROOT / "scripts"))
    from deploy_endpoint import toolkit_diffusers

    assert version("diffusers") == toolkit_diffusers()


def test_png_reply_is_diffusers_pixels(toolkit, reference):
    latents = seeded(1, 4, 8, 8)
    reply = requests.post(
        toolkit, json=latents_body(latents, output_type="pil"), headers={"Accept": "image/png"}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "image/png"
    assert_pixels_close(pixels_of(reply.content), uint8_locally(decode_locally(reference["sd15"], latents, SD)))


def test_jpeg_reply_keeps_the_servers_quality(toolkit, reference):
    """The toolkit saves JPEG with Pillow's defaults (quality 75, 4:2:0); the handler's image carries the server's
    settings."""
    latents = seeded(1, 4, 24, 24, seed=3)
    reply = requests.post(
        toolkit, json=latents_body(latents, output_type="pil"), headers={"Accept": "image/jpeg"}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    local = uint8_locally(decode_locally(reference["sd15"], latents, SD))
    ours = psnr(torch.from_numpy(pixels_of(reply.content)), torch.from_numpy(local))
    servers = psnr(torch.from_numpy(pixels_of(encode_image(local[0], ImageFile("JPEG")))), torch.from_numpy(local))
    buffer = io.BytesIO()
    Image.fromarray(local[0]).save(buffer, format="JPEG")
    pillows_default = psnr(torch.from_numpy(pixels_of(buffer.getvalue())), torch.from_numpy(local))
    assert abs(ours - servers) < 0.5 and ours > pillows_default + 3, (ours, servers, pillows_default)


def test_json_tensor_reply(toolkit, reference):
    latents = seeded(2, 4, 8, 8, seed=1)
    reply = requests.post(
        toolkit, json=latents_body(latents, output_type="pt"), headers={"Accept": "application/json"}, timeout=60
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["parameters"]["shape"] == [2, 3, 64, 64] and answer["parameters"]["dtype"] == "float32"
    decoded = torch.frombuffer(bytearray(base64.b64decode(answer["inputs"])), dtype=torch.float32).reshape(
        answer["parameters"]["shape"]
    )
    torch.testing.assert_close(decoded, decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)


def test_any_accept_is_json_with_a_base64_png(toolkit, reference):
    latents = seeded(1, 4, 8, 8, seed=2)
    reply = requests.post(toolkit, json=latents_body(latents, output_type="pil"), headers={"Accept": "*/*"}, timeout=60)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json", reply.text
    assert_pixels_close(
        pixels_of(base64.b64decode(reply.json())), uint8_locally(decode_locally(reference["sd15"], latents, SD))
    )


@pytest.mark.parametrize("file_format", ["PNG", "JPEG"])
def test_image_bodies_encode_with_query_parameters(toolkit, reference, file_format):
    """An image body reaches the handler as a PIL image; the query's scaling_factor arrives as a string."""
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    file = encode_image(image, ImageFile(file_format, quality=95))
    reply = requests.post(
        toolkit,
        params={"scaling_factor": SD},
        data=file,
        headers={"Content-Type": f"image/{file_format.lower()}", "Accept": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    latents = torch.frombuffer(bytearray(base64.b64decode(answer["inputs"])), dtype=torch.float32).reshape(
        answer["parameters"]["shape"]
    )
    with torch.no_grad():
        expected = (
            reference["sd15"].encode(processor.preprocess(Image.open(io.BytesIO(file)).convert("RGB"))).latent_dist.mean
            * SD
        )
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


def test_bad_requests_are_400_json_and_the_handler_keeps_serving(toolkit, reference):
    bad = requests.post(
        toolkit,
        json={"inputs": "@@not base64@@", "parameters": {"shape": [1, 4, 8, 8]}},
        headers={"Accept": "application/json"},
        timeout=60,
    )
    assert bad.status_code == 400 and "base64" in bad.json()["error"]
    short = requests.post(
        toolkit,
        json=latents_body(seeded(1, 4, 4, 4), shape=[1, 4, 8, 8]),
        headers={"Accept": "application/json"},
        timeout=60,
    )
    assert short.status_code == 400 and "bytes" in short.json()["error"]
    test_png_reply_is_diffusers_pixels(toolkit, reference)
