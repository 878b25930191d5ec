"""Fuzzing the live server with hypothesis: every malformed request gets a 4xx JSON error,
nothing hangs or crashes, and memory stays bounded.

CI runs REMOTE_VAE_FUZZ_EXAMPLES (default 150) cases; the recorded run in
docs/reliability.md used REMOTE_VAE_FUZZ_EXAMPLES=2500. With
REMOTE_VAE_FUZZ_REPORT=path the run's status counts are written there as JSON.
"""

from __future__ import annotations

import base64
import collections
import io
import json
import os
from pathlib import Path

import numpy as np
import requests
from conftest import bomb_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

EXAMPLES = int(os.environ.get("REMOTE_VAE_FUZZ_EXAMPLES", "150"))
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
# family path -> (latent channels, is video)
TARGETS = {"sd15/": (4, False), "flux/": (16, False), "hunyuanvideo/": (16, True)}
STATUSES: collections.Counter = collections.Counter()

dims = st.one_of(st.integers(-3, 0), st.integers(1, 16), st.integers(10**4, 10**10))
dtypes = st.sampled_from(["float16", "bfloat16", "float32", "float64", "int8", "uint8", "", "Float16", "float16 "])
targets = st.sampled_from(sorted(TARGETS))


@st.composite
def wrong_byte_count(draw):
    """Any shape and dtype, with a body whose length does not match them."""
    shape = draw(st.lists(dims, min_size=0, max_size=9))
    dtype = draw(dtypes)
    size = ITEMSIZE.get(dtype, 1) * int(np.prod([max(dim, 0) for dim in shape], dtype=object)) if shape else 0
    length = draw(st.integers(0, 4096).filter(lambda n: n != size))
    return draw(targets), {"shape": shape, "dtype": dtype}, bytes(length), {"Content-Type": "tensor/binary"}


@st.composite
def wrong_layout(draw):
    """The right byte count for a shape the family cannot decode: wrong ndim, channels, or a 5-D / 4-D mix-up."""
    target = draw(targets)
    channels, video = TARGETS[target]
    ndim = draw(st.sampled_from([1, 2, 4, 5, 6, 8]))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    if ndim == 5 and video or ndim == 4 and not video:
        shape[1] = draw(st.integers(1, 20).filter(lambda c: c not in (channels, 3)))
    dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
    return (
        target,
        {"shape": shape, "dtype": dtype},
        bytes(ITEMSIZE[dtype] * int(np.prod(shape))),
        {"Content-Type": "tensor/binary"},
    )


@st.composite
def packed_mismatch(draw):
    """Flux packed latents [B, seq, 64] whose token count does not fit height x width."""
    seq = draw(st.integers(1, 40))
    height, width = draw(st.integers(-64, 512)), draw(st.integers(-64, 512))
    if height > 0 and width > 0 and (height // 16) * (width // 16) == seq:
        seq += 1
    return (
        "flux/",
        {"shape": [1, seq, 64], "dtype": "float16", "height": height, "width": width},
        bytes(2 * seq * 64),
        {"Content-Type": "tensor/binary"},
    )


@st.composite
def non_finite(draw):
    target = draw(st.sampled_from(["sd15/", "flux/"]))
    channels = TARGETS[target][0]
    values = np.zeros((1, channels, 2, 2), dtype=np.float32)
    values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return (
        target,
        {"shape": list(values.shape), "dtype": "float32", "output_type": draw(st.sampled_from(["pt", "pil"]))},
        values.tobytes(),
        {"Content-Type": "tensor/binary"},
    )


@st.composite
def bad_parameter(draw):
    """A valid latent with one parameter no client may send."""
    name, value = draw(
        st.sampled_from(
            [
                ("output_type", "gif"),
                ("output_type", "PT "),
                ("partial_postprocess", "maybe"),
                ("image_format", "tiff"),
                ("scaling_factor", "0"),
                ("scaling_factor", "nan"),
                ("shift_factor", "inf"),
                ("scaling_factor", "1e400"),
                ("quality", "0"),
                ("quality", "101"),
                ("do_scaling", "sometimes"),
            ]
        )
    )
    # partial_postprocess is only read with pt (ignoring what does not apply is the protocol's rule)
    params = {
        "shape": [1, 4, 2, 2],
        "dtype": "float16",
        "output_type": "pt" if name == "partial_postprocess" else "pil",
        name: value,
    }
    return "sd15/", params, bytes(32), {"Content-Type": "tensor/binary"}


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 20, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@st.composite
def bad_image(draw):
    """Truncated, bomb, odd-sided or garbage images, sent as files or as base64 JSON."""
    kind = draw(st.sampled_from(["truncated", "bomb", "odd", "garbage"]))
    if kind == "truncated":
        data = png(64, 64)
        data = data[: draw(st.integers(0, len(data) // 2))]
    elif kind == "bomb":
        data = bomb_png(draw(st.integers(5000, 200_000)), draw(st.integers(5000, 200_000)))
    elif kind == "odd":
        data = png(draw(st.integers(1, 80).filter(lambda n: n % 8)), draw(st.integers(1, 80)))
    else:
        data = b"\x89PNG\r\n\x1a\n" + draw(st.binary(max_size=200))
    target = draw(st.sampled_from(["sd15/", "flux/", "sd15/encode"]))
    if draw(st.booleans()):
        return (
            target,
            {},
            json.dumps({"inputs": base64.b64encode(data).decode()}).encode(),
            {"Content-Type": "application/json"},
        )
    return (
        target,
        {},
        data,
        {"Content-Type": draw(st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", ""]))},
    )


@st.composite
def bad_json(draw):
    body = draw(
        st.one_of(
            st.binary(max_size=300),
            st.text(max_size=300).map(str.encode),
            st.just(b"[" * 50_000),
            st.builds(
                lambda s: json.dumps({"inputs": s}).encode(), st.text(alphabet="@#$%^&*!~ ", min_size=1, max_size=100)
            ),
            st.builds(
                lambda p: json.dumps({"inputs": "AAAA", "parameters": p}).encode(),
                st.one_of(st.integers(), st.text(), st.lists(st.integers())),
            ),
            st.just(b'{"inputs": 12}'),
            st.just(b"{}"),
            st.just(b"null"),
        )
    )
    return draw(targets), {}, body, {"Content-Type": draw(st.sampled_from(["application/json", "tensor/base64"]))}


@st.composite
def odd_headers(draw):
    """Random bytes under a random Content-Type / Accept, to a random route."""
    target = draw(st.sampled_from(["sd15/", "sd15/predict", "sd15/decode", "flux/encode", "hunyuanvideo/"]))
    content_type = draw(
        st.sampled_from(
            ["tensor/binary", "video/mp4", "image/webp", "text/plain", "multipart/form-data", "*/*", "tensor/", ";;"]
        )
    )
    accept = draw(
        st.sampled_from(["", "*/*", "image/png", "video/mp4", "tensor/base64", "text/html;q=0.1, */*", "\x7f"])
    )
    body = draw(
        st.binary(max_size=2048).filter(lambda b: not b.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"RIFF")))
    )
    params = draw(
        st.dictionaries(
            st.sampled_from(["shape", "dtype", "height", "width", "fps", "crf"]), st.text(max_size=12), max_size=3
        )
    )
    return target, params, body, {"Content-Type": content_type, "Accept": accept}


MALFORMED = st.one_of(
    wrong_byte_count(),
    wrong_layout(),
    packed_mismatch(),
    non_finite(),
    bad_parameter(),
    bad_image(),
    bad_json(),
    odd_headers(),
)


def resident_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def test_malformed_requests_get_4xx_json(multi_server, video_server):
    servers = {"sd15/": multi_server, "flux/": multi_server, "hunyuanvideo/": video_server}
    rss_before = {server.process.pid: resident_mib(server.process.pid)[0] for server in (multi_server, video_server)}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not os.environ.get("REMOTE_VAE_FUZZ_RANDOM"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(MALFORMED)
    def check(case):
        path, params, body, headers = case
        server = servers[path.split("/")[0] + "/"]
        headers = {name: value for name, value in headers.items() if value}
        response = requests.post(f"{server.url}/{path}", params=params, data=body, headers=headers, timeout=60)
        STATUSES[response.status_code] += 1
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300], path, params, headers)
        assert response.headers["content-type"] == "application/json", response.headers
        assert isinstance(response.json()["error"], str) and response.json()["error"]

    check()
    for server in (multi_server, video_server):
        assert server.healthy()
        rss, peak = resident_mib(server.process.pid)
        # Shapes up to 10^10 elements and 200000^2-pixel bombs must not be allocated: memory stays where it was.
        assert rss - rss_before[server.process.pid] < 300 and peak < 3000, (rss, peak, rss_before)
    report = os.environ.get("REMOTE_VAE_FUZZ_REPORT")
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    "examples": sum(STATUSES.values()),
                    "statuses": dict(sorted(STATUSES.items())),
                    "peak_rss_mib": {
                        name: resident_mib(s.process.pid)[1]
                        for name, s in (("images", multi_server), ("video", video_server))
                    },
                },
                indent=1,
            )
        )
