"""README's "Calling it over HTTPS": the Python, curl and JavaScript examples, run as written
against a server with TLS, an API key and CORS, with https://vae.example.com/ swapped for it.
Each result is checked against diffusers in-process on the same weights.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import requests
from conftest import ROOT, LiveServer, offline_env, seeded, self_signed_certificate
from diffusers_reference import SD, assert_pixels_close, decode_locally, uint8_locally
from PIL import Image

from remote_vae import families

README = (ROOT / "README.md").read_text()
PLACEHOLDER = "https://vae.example.com/"
KEY = "readme-key-0123456789abcdef"
ORIGIN = "https://app.example.com"


def example(language: str) -> str:
    """The fenced block after `<!-- client: LANGUAGE -->` in README.md."""
    match = re.search(rf"<!-- client: {language} -->\n```\w+\n(.*?)```", README, re.S)
    assert match, f"README has no {language} client example"
    return match.group(1)


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(folder)
    args = [
        "sd15",
        "--model",
        str(model_dirs["sd15"]),
        "--api-key",
        KEY,
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--cors-origins",
        ORIGIN,
    ]
    live = LiveServer(args, offline_env(), folder / "server.log", verify=str(cert))
    yield live
    live.stop()


def client_env(server) -> dict[str, str]:
    # Each client's own way to trust a self-signed certificate.
    return {
        **os.environ,
        "REMOTE_VAE_API_KEY": KEY,
        "REQUESTS_CA_BUNDLE": server.verify,
        "CURL_CA_BUNDLE": server.verify,
        "NODE_EXTRA_CA_CERTS": server.verify,
    }


def png_pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_python_example(server, reference, tmp_path, monkeypatch):
    for name, value in client_env(server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    from diffusers.utils import remote_utils

    monkeypatch.setattr(remote_utils, "requests", remote_utils.requests)  # the example swaps in a session
    scope: dict = {}
    exec(example("python").replace(PLACEHOLDER, server.url + "/"), scope)
    expected = uint8_locally(decode_locally(reference["sd15"], scope["latents"], SD))[0]
    assert_pixels_close(png_pixels((tmp_path / "image.png").read_bytes()), expected)


def test_curl_example(server, reference, tmp_path):
    latents = seeded(1, 4, 64, 64, seed=7).half()
    (tmp_path / "latent.bin").write_bytes(latents.numpy().tobytes())
    done = subprocess.run(
        ["bash", "-c", example("curl").replace(PLACEHOLDER, server.url + "/")],
        cwd=tmp_path,
        env=client_env(server),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    expected = uint8_locally(decode_locally(reference["sd15"], latents.float(), SD))[0]
    assert_pixels_close(png_pixels((tmp_path / "image.png").read_bytes()), expected)


def test_javascript_example(server, reference, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    latents = seeded(1, 4, 16, 16, seed=8)
    (tmp_path / "latent.bin").write_bytes(latents.numpy().tobytes())
    harness = (
        example("javascript")
        + f"""
import {{ readFileSync, writeFileSync }} from "node:fs";
const latent = new Float32Array(new Uint8Array(readFileSync("latent.bin")).buffer);
const png = await decodeToPng("{server.url}/", process.env.REMOTE_VAE_API_KEY, latent, [1, 4, 16, 16], {{
scaling_factor: {SD} }});
writeFileSync("image.png", png);
try {{
  await decodeToPng("{server.url}/", "wrong-key-0123456789abcdef", latent, [1, 4, 16, 16], {{ scaling_factor: {SD} }});
}} catch (error) {{
  console.log(error.message);
}}
"""
    )
    (tmp_path / "decode.mjs").write_text(harness)
    done = subprocess.run(
        [node, "decode.mjs"], cwd=tmp_path, env=client_env(server), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("401: ")  # the error path reads the JSON error
    expected = uint8_locally(decode_locally(reference["sd15"], latents, SD))[0]
    assert_pixels_close(png_pixels((tmp_path / "image.png").read_bytes()), expected)


def test_browser_pages_on_allowed_origins_may_call_it(server):
    """CORS: the preflight (no key) is answered; replies expose the headers a page needs; other origins get no grant."""
    preflight = requests.options(
        server.url + "/",
        verify=server.verify,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    latents = seeded(1, 4, 8, 8)
    reply = requests.post(
        server.url + "/",
        verify=server.verify,
        data=latents.numpy().tobytes(),
        params={"shape": [1, 4, 8, 8], "dtype": "float32", "output_type": "pt", "scaling_factor": SD},
        headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}", "Content-Type": "tensor/binary"},
    )
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    assert {"shape", "dtype", "x-request-id"} <= set(reply.headers["access-control-expose-headers"].split(", "))
    refused = requests.post(server.url + "/", verify=server.verify, data=b"", headers={"Origin": ORIGIN})
    # The page can read why
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    other = requests.options(
        server.url + "/",
        verify=server.verify,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_readme_scaling_table_matches_the_family_configs():
    rows = {
        name: cell
        for names, cell in re.findall(
            r"^\| (`\w+`(?:, `\w+`)*) \| (`(?:scaling_factor|do_scaling).*?) \|$", README, re.M
        )
        for name in re.findall(r"`(\w+)`", names)
    }
    assert set(rows) == set(families.available())
    for name, cell in rows.items():
        written = dict(re.findall(r"`(\w+)=([^`]+)`", cell))
        expected = {key: str(value) for key, value in families.load_family(name).client_scaling().items()}
        assert written == expected, name
