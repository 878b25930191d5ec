"""docs/protocol.md §7: every bad request gets a 4xx JSON error that says what was wrong; the server keeps serving."""

import base64
import io
import socket

import numpy as np
import pytest
import requests
from conftest import MAX_BODY_BYTES, bomb_png
from PIL import Image

TENSOR = {"Content-Type": "tensor/binary"}


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_file(width: int, height: int, file_format: str) -> bytes:
    """A valid file that Pillow would decode, of a format the server does not take."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(buffer, format=file_format)
    return buffer.getvalue()


def latent_bytes(*shape, itemsize=2) -> bytes:
    return bytes(int(np.prod(shape)) * itemsize)


# (path, query params, body, headers, expected status, words the message must contain)
CASES = {
    "byte count": (
        "sd15/",
        {"shape": [1, 4, 64, 64], "dtype": "float16"},
        bytes(8191),
        TENSOR,
        400,
        ["8191 bytes", "32768"],
    ),
    "unknown dtype": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float64"},
        latent_bytes(1, 4, 8, 8, itemsize=8),
        TENSOR,
        400,
        ["float64", "float16"],
    ),
    "missing shape": ("sd15/", {"dtype": "float16"}, latent_bytes(1, 4, 8, 8), TENSOR, 400, ["shape is missing"]),
    "missing dtype": ("sd15/", {"shape": [1, 4, 8, 8]}, latent_bytes(1, 4, 8, 8), TENSOR, 400, ["dtype is missing"]),
    "non-integer shape": ("sd15/", {"shape": ["a", 4], "dtype": "float16"}, b"", TENSOR, 400, ["shape"]),
    "negative dim": ("sd15/", {"shape": [1, 4, -8, 8], "dtype": "float16"}, b"", TENSOR, 400, ["positive"]),
    "zero dim": ("sd15/", {"shape": [0, 4, 8, 8], "dtype": "float16"}, b"", TENSOR, 400, ["positive"]),
    "too many dims": ("sd15/", {"shape": [1] * 9, "dtype": "float16"}, b"", TENSOR, 400, ["dimensions"]),
    "wrong channels": (
        "sd15/",
        {"shape": [1, 16, 8, 8], "dtype": "float16"},
        latent_bytes(1, 16, 8, 8),
        TENSOR,
        400,
        ["16 channels", "[B, 4, h, w]"],
    ),
    "flux wrong channels": (
        "flux/",
        {"shape": [1, 4, 8, 8], "dtype": "float16"},
        latent_bytes(1, 4, 8, 8),
        TENSOR,
        400,
        ["4 channels", "[B, 16, h, w]"],
    ),
    "5-D latent": (
        "sd15/",
        {"shape": [1, 4, 3, 8, 8], "dtype": "float16"},
        latent_bytes(1, 4, 3, 8, 8),
        TENSOR,
        400,
        ["video", "decodes image"],
    ),
    "2-D latent": ("sd15/", {"shape": [4, 8], "dtype": "float16"}, latent_bytes(4, 8), TENSOR, 400, ["2-D"]),
    "packed token mismatch": (
        "flux/",
        {"shape": [1, 100, 64], "dtype": "float16", "height": 64, "width": 64},
        latent_bytes(1, 100, 64),
        TENSOR,
        400,
        ["100 tokens", "16 tokens"],
    ),
    "packed features": (
        "flux/",
        {"shape": [1, 16, 30], "dtype": "float16", "height": 64, "width": 64},
        latent_bytes(1, 16, 30),
        TENSOR,
        400,
        ["30 features"],
    ),
    "packed no height": (
        "flux/",
        {"shape": [1, 16, 64], "dtype": "float16"},
        latent_bytes(1, 16, 64),
        TENSOR,
        400,
        ["height and width"],
    ),
    "packed bad height": (
        "flux/",
        {"shape": [1, 16, 64], "dtype": "float16", "height": "tall", "width": 64},
        latent_bytes(1, 16, 64),
        TENSOR,
        400,
        ["height"],
    ),
    "huge output": (
        "sd15/",
        {"shape": [1, 4, 100000, 100000], "dtype": "float16"},
        latent_bytes(1, 4, 8, 8),
        TENSOR,
        413,
        ["800000x800000", "at most"],
    ),
    "output over limit": (
        "sd15/",
        {"shape": [5, 4, 32, 32], "dtype": "float16"},
        latent_bytes(5, 4, 32, 32),
        TENSOR,
        413,
        ["at most"],
    ),
    "bad boolean": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float16", "partial_postprocess": "maybe", "output_type": "pt"},
        latent_bytes(1, 4, 8, 8),
        TENSOR,
        400,
        ["partial_postprocess", "True or False"],
    ),
    "scaling zero": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float16", "scaling_factor": 0},
        latent_bytes(1, 4, 8, 8),
        TENSOR,
        400,
        ["scaling_factor"],
    ),
    "scaling nan": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float16", "scaling_factor": "nan"},
        latent_bytes(1, 4, 8, 8),
        TENSOR,
        400,
        ["finite"],
    ),
    "scaling underflows the latent": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float32", "scaling_factor": 1e-320, "output_type": "pt"},
        np.ones((1, 4, 8, 8), np.float32).tobytes(),
        TENSOR,
        400,
        ["after scaling", "scaling_factor and shift_factor"],
    ),
    "shift overflows the latent": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float32", "shift_factor": 1e39, "output_type": "pt"},
        np.ones((1, 4, 8, 8), np.float32).tobytes(),
        TENSOR,
        400,
        ["after scaling", "finite"],
    ),
    "encode scaling overflows the latent": (
        "sd15/encode",
        {"scaling_factor": 1e308},
        png(16, 16),
        {},
        400,
        ["after scaling"],
    ),
    "scaling text": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float16", "shift_factor": "abc"},
        latent_bytes(1, 4, 8, 8),
        TENSOR,
        400,
        ["not a number"],
    ),
    "mp4 on image family": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float16", "output_type": "mp4"},
        latent_bytes(1, 4, 8, 8),
        TENSOR,
        400,
        ["mp4", "video"],
    ),
    "unknown output_type": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float16", "output_type": "gif"},
        latent_bytes(1, 4, 8, 8),
        TENSOR,
        400,
        ["output_type", "pt"],
    ),
    "unknown image_format": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float16", "output_type": "pil", "image_format": "tiff"},
        latent_bytes(1, 4, 8, 8),
        {**TENSOR, "Accept": "*/*"},
        400,
        ["image_format", "png"],
    ),
    "bad quality": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float16", "quality": 500},
        latent_bytes(1, 4, 8, 8),
        TENSOR,
        400,
        ["quality"],
    ),
    "garbage image": (
        "sd15/encode",
        {},
        b"not an image at all",
        {"Content-Type": "image/png"},
        400,
        ["not a readable image"],
    ),
    "tiff body": (
        "sd15/encode",
        {},
        image_file(64, 64, "TIFF"),
        {"Content-Type": "image/tiff"},
        400,
        ["not a readable image", "PNG, JPEG or WebP"],
    ),
    "bmp body": ("sd15/", {}, image_file(64, 64, "BMP"), {}, 400, ["not a readable image", "PNG, JPEG or WebP"]),
    "tga body": (
        "sd15/encode",
        {},
        image_file(64, 64, "TGA"),
        {"Content-Type": "image/x-tga"},
        400,
        ["not a readable image"],
    ),
    "pcx body": (
        "sd15/encode",
        {},
        image_file(64, 64, "PCX"),
        {"Content-Type": "image/x-pcx"},
        400,
        ["not a readable image"],
    ),
    "gif to an image family": (
        "sd15/encode",
        {},
        image_file(64, 64, "GIF"),
        {"Content-Type": "image/gif"},
        400,
        ["not a readable image"],
    ),
    "truncated png": ("sd15/", {}, png(64, 64)[:60], {}, 400, ["image"]),
    "image side not multiple of 8": ("sd15/", {}, png(60, 64), {}, 400, ["60x64", "multiples of 8"]),
    "image too large": ("sd15/", {}, png(1024, 1024), {}, 413, ["at most"]),
    "encode tensor wrong shape": (
        "sd15/encode",
        {"shape": [1, 4, 8, 8], "dtype": "float32"},
        latent_bytes(1, 4, 8, 8, itemsize=4),
        {},
        400,
        ["[B, 3, H, W]"],
    ),
    "encode tensor nan": (
        "sd15/",
        {"shape": [1, 3, 8, 8], "dtype": "float32"},
        np.full((1, 3, 8, 8), np.nan, dtype=np.float32).tobytes(),
        {},
        400,
        ["NaN"],
    ),
    "nan latent": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float32"},
        np.full((1, 4, 8, 8), np.nan, dtype=np.float32).tobytes(),
        TENSOR,
        400,
        ["256 NaN or infinite", "finite"],
    ),
    "infinite latent": (
        "flux/",
        {"shape": [1, 16, 8, 8], "dtype": "float16", "output_type": "pt"},
        np.r_[np.full(3, np.inf), np.zeros(16 * 64 - 3)].astype(np.float16).tobytes(),
        TENSOR,
        400,
        ["3 NaN or infinite"],
    ),
    "batch over limit": (
        "sd15/",
        {"shape": [65, 4, 1, 1], "dtype": "float16"},
        latent_bytes(65, 4, 1, 1),
        TENSOR,
        413,
        ["batch of 65", "at most 64"],
    ),
    "bomb png": ("sd15/", {}, bomb_png(100_000, 100_000), {}, 413, ["too large"]),
    "bomb png under pillow's guard": ("sd15/", {}, bomb_png(5000, 5000), {}, 413, ["5000x5000", "at most"]),
    "bomb png declared as png": (
        "flux/",
        {},
        bomb_png(30_000, 30_000),
        {"Content-Type": "image/png"},
        413,
        ["too large"],
    ),
    "encode tensor odd side": (
        "sd15/",
        {"shape": [1, 3, 12, 8], "dtype": "float32"},
        latent_bytes(1, 3, 12, 8, itemsize=4),
        {},
        400,
        ["multiples of 8"],
    ),
    "undecidable": ("sd15/", {}, b"\x00\x01\x02", {}, 400, ["cannot tell"]),
    "empty body": ("sd15/predict", {}, b"", {}, 400, ["cannot tell"]),
    "bad json": ("sd15/", {}, b"{not json", {"Content-Type": "application/json"}, 400, ["not valid JSON"]),
    "json without inputs": ("sd15/", {}, b'{"x": 1}', {"Content-Type": "application/json"}, 400, ["inputs"]),
    "json inputs not string": (
        "sd15/",
        {},
        b'{"inputs": [1, 2]}',
        {"Content-Type": "application/json"},
        400,
        ["base64 string"],
    ),
    "json parameters not object": (
        "sd15/",
        {},
        b'{"inputs": "", "parameters": 3}',
        {"Content-Type": "application/json"},
        400,
        ["parameters"],
    ),
    "bad base64": (
        "sd15/",
        {"shape": [1, 4, 8, 8], "dtype": "float16"},
        b'{"inputs": "@@@"}',
        {"Content-Type": "tensor/base64"},
        400,
        ["base64"],
    ),
    "deep json": ("sd15/", {}, b"[" * 100000 + b"]" * 100000, {"Content-Type": "application/json"}, 400, ["JSON"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_request_gets_json_error(multi_server, case):
    path, params, body, headers, status, words = CASES[case]
    response = requests.post(f"{multi_server.url}/{path}", params=params, data=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    for word in words:
        assert word in message
    assert "Traceback" not in message
    assert multi_server.healthy()


@pytest.mark.parametrize(
    "path, shape, name",
    [
        ("sd15/", [1, 4, 8, 8], "scaling_factor"),
        ("sd15/", [1, 4, 8, 8], "shift_factor"),
        ("sd15/", [1, 4, 8, 8], "quality"),
        ("flux/", [1, 16, 64], "height"),
    ],
)
def test_a_huge_json_integer_is_a_400(multi_server, path, shape, name):
    """JSON integers have up to 4300 digits: one too large for a float is a 400 naming the parameter, not a 500."""
    parameters = {"shape": shape, "dtype": "float16", "width": 64, "height": 64, name: 10**400}
    body = {"inputs": base64.b64encode(latent_bytes(*shape)).decode(), "parameters": parameters}
    response = requests.post(f"{multi_server.url}/{path}", json=body, timeout=60)
    assert response.status_code == 400 and name in response.json()["error"], response.status_code
    assert multi_server.healthy()


def test_a_json_structure_bomb_is_refused_before_parsing(multi_server):
    """A body of nested or repeated lists is counted, not parsed: a 400 at once, whatever its size within the JSON
    body limit (an eighth of --max-body-bytes, at least 1 MiB); past that limit, a 413 from its Content-Length."""
    for bomb in (
        b'{"inputs": "", "parameters": {"shape": [' + b"[]," * 300_000 + b"[]]}}",
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ):
        response = requests.post(
            f"{multi_server.url}/sd15/", data=bomb, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert response.status_code == 400 and "base64 string and a few parameters" in response.json()["error"], (
            response.text[:300]
        )
        assert response.elapsed.total_seconds() < 5
    too_large = b'{"inputs": "", "parameters": {"shape": [' + b"[]," * 500_000 + b"[]]}}"
    response = requests.post(
        f"{multi_server.url}/sd15/", data=too_large, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 413 and "JSON bodies of at most 1048576" in response.json()["error"], response.text[
        :300
    ]
    assert multi_server.healthy()


def test_unknown_route_and_family_are_json_404(multi_server):
    for path in ("/nope", "/sdxl/", "/sd15/nope"):
        response = requests.post(multi_server.url + path, data=b"x")
        assert response.status_code == 404 and "/sd15/, /flux/" in response.json()["error"]
    response = requests.get(multi_server.url + "/sd15/predict")
    assert response.status_code == 405 and "GET" in response.json()["error"]


def test_body_over_limit_is_413_without_reading_it(multi_server):
    # Declare a body far over the limit and send none of it: the answer must not wait for it.
    with socket.create_connection(("127.0.0.1", multi_server.port), timeout=10) as sock:
        sock.sendall(
            "POST /sd15/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: tensor/binary\r\nContent-Length: "
            f"{100 * MAX_BODY_BYTES}\r\n\r\n".encode()
        )
        reply = b""
        for _ in range(50):  # headers and body may arrive in separate segments
            chunk = sock.recv(65536)
            reply += chunk
            if not chunk or b"}" in reply:
                break
    reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and '"error"' in reply
    assert multi_server.healthy()


def test_chunked_body_over_limit_is_413(multi_server):
    def chunks():
        for _ in range(3):
            yield bytes(MAX_BODY_BYTES // 2 + 1)

    response = requests.post(
        multi_server.url + "/sd15/", params={"shape": [1, 4, 8, 8], "dtype": "float16"}, data=chunks(), headers=TENSOR
    )
    assert response.status_code == 413 and "at most" in response.json()["error"]
    assert multi_server.healthy()


def test_server_still_decodes_after_errors(multi_server, sd):
    import torch
    from diffusers.utils.remote_utils import remote_decode

    for case in ("byte count", "garbage image", "bad json"):
        path, params, body, headers, *_ = CASES[case]
        requests.post(f"{multi_server.url}/{path}", params=params, data=body, headers=headers)
    out = remote_decode(sd, tensor=torch.zeros(1, 4, 8, 8), output_type="pt", return_type="pt", do_scaling=False)
    assert out.shape == (1, 3, 64, 64)
