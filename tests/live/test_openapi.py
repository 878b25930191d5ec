"""GET /openapi.json describes every route, query parameter, content type and error reply of the running server,
and GET /docs renders it, from bundled files, in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import requests
from conftest import ROOT
from openapi_spec_validator import validate
from PIL import Image

from remote_vae.wire.parameters import PARAMETERS, Params

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")


@pytest.fixture(scope="module")
def described(multi_server) -> dict:
    response = requests.get(multi_server.url + "/openapi.json", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


def test_the_document_is_valid_openapi(described):
    validate(described)
    assert described["openapi"].startswith("3.")


def test_every_route_is_described_and_every_described_route_answers(described, multi_server):
    paths = described["paths"]
    expected = {
        ("/", "get"),
        ("/health", "get"),
        ("/metrics", "get"),
        ("/families", "get"),
        ("/openapi.json", "get"),
        ("/docs", "get"),
    }
    for family in ("sd15", "flux"):
        expected |= {(f"/{family}{route}", "post") for route in ("/", "/predict", "/decode", "/encode")}
        expected |= {(f"/{family}{route}", "get") for route in ("/", "/health", "/families")}
    assert expected <= {(path, method) for path, operations in paths.items() for method in operations}
    for path, operations in paths.items():
        for method in operations:
            response = requests.request(
                method, multi_server.url + path, data=b"" if method == "post" else None, timeout=30
            )
            assert response.status_code not in (404, 405), (method, path, response.status_code)
            if method == "post":  # an empty body is a bad request, said in JSON
                assert response.status_code == 400 and "error" in response.json()


def test_every_query_parameter_the_server_reads_is_described():
    """The declared table against the wire's source: a parameter declared and never read fails; one read and not
    declared fails when it is read (Params refuses it)."""
    source = "".join(path.read_text() for path in (ROOT / "remote_vae" / "wire").glob("*.py"))
    read = set(re.findall(r'params\.(?:text|choice|flag|number|integer)\("(\w+)"', source)) | {"shape"}
    assert read == set(PARAMETERS), read ^ set(PARAMETERS)
    with pytest.raises(KeyError, match="not declared"):
        Params.from_query("colour=red").text("colour")


def test_operations_say_their_parameters_content_types_and_errors(described):
    decode = described["paths"]["/sd15/decode"]["post"]
    encode = described["paths"]["/flux/encode"]["post"]
    assert {"shape", "dtype", "output_type", "scaling_factor", "height", "fps"} <= {
        p["name"] for p in decode["parameters"]
    }
    assert "output_type" not in {p["name"] for p in encode["parameters"]}
    assert {"tensor/binary", "application/json"} <= set(decode["requestBody"]["content"])
    assert {"image/png", "image/jpeg", "video/mp4"} <= set(encode["requestBody"]["content"])
    assert {"image/png", "image/jpeg", "image/webp", "video/mp4", "tensor/binary"} <= set(
        decode["responses"]["200"]["content"]
    )
    for status in ("400", "408", "413", "503", "500"):
        assert decode["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
    assert "401" not in decode["responses"]  # this server has no API keys
    assert "0.18215" in decode["description"] and "0.3611" in encode["description"]  # each family's scaling


def browser() -> str:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    message = "no headless Chromium (Debian: apt-get install chromium-headless-shell)"
    if os.environ.get("REMOTE_VAE_REQUIRE_BROWSER"):  # CI installs it: there, a missing browser is a failure
        pytest.fail(message)
    pytest.skip(message)


def in_browser(url: str, *flags: str) -> subprocess.CompletedProcess:
    command = [
        browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=20000",
        *flags,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def test_the_docs_page_renders_the_routes_in_a_browser(multi_server, tmp_path):
    page = requests.get(multi_server.url + "/docs", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert not re.search(r'(src|href)="(https?:)?//', page.text)  # nothing from a CDN: every asset is the server's own
    dom = in_browser(multi_server.url + "/docs", "--dump-dom").stdout
    for path in ("/sd15/decode", "/flux/encode", "/families", "/metrics"):
        assert path in dom, path  # Swagger UI built a block for the route from /openapi.json
    shot = tmp_path / "docs.png"
    in_browser(multi_server.url + "/docs", f"--screenshot={shot}", "--window-size=1280,2000")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def share_near(colour: tuple[int, int, int]) -> float:
        return float((np.abs(pixels - colour).sum(-1) < 40).mean())

    # Swagger UI's method colours: POST blocks green, GET blocks blue. A blank or unstyled page has neither.
    assert share_near((73, 204, 144)) > 0.002 and share_near((97, 175, 254)) > 0.002
