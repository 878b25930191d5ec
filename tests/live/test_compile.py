"""--compile on CPU with the tiny model: the warm-up size is compiled before the server is ready, it gives
diffusers' pixels, and a size that was not warmed up runs eagerly (the log says so) instead of compiling in a
request.

The model is the tests' tiny Flux VAE at 64x64, batches of one: the very graph the GPU suite's tiny compile stage
(scripts/gpu_suite.py --tiny, tests/deploy/test_gpu_suite.py) compiles, so whichever runs second finds it in
torch.compile's on-disk cache (/tmp/torchinductor_$USER) instead of paying the minute a cold compile takes on two
cores."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, LiveServer, offline_env, seeded
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.remote_utils import remote_decode


@pytest.fixture(scope="module")
def compiled(model_dirs, tmp_path_factory):
    # Decode only, and batches of one: a single graph to compile (about 55 s on two cores, cold).
    family = json.loads((ROOT / "configs" / "flux.json").read_text()) | {
        "name": "flux-compiled",
        "operations": ["decode"],
    }
    config = tmp_path_factory.mktemp("configs") / "flux-compiled.json"
    config.write_text(json.dumps(family))
    args = [
        str(config),
        "--model",
        str(model_dirs["flux"]),
        "--compile",
        "--warmup-sizes",
        "64x64",
        "--max-batch-images",
        "1",
    ]
    server = LiveServer(args, offline_env(), tmp_path_factory.mktemp("logs") / "compiled.log", startup_seconds=600)
    yield server
    server.stop()


def local_pixels(vae, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        sample = vae.decode(latents).sample
    return (VaeImageProcessor(vae_scale_factor=8).postprocess(sample, output_type="np") * 255).round().astype("uint8")


def test_compiled_decoder_gives_diffusers_pixels(compiled, reference):
    log = compiled.log_path.read_text()
    assert (
        "warmed up decode of 1 x 64x64" in log
        and "(compiled)" in log
        and "loaded flux-compiled" in log
        and "compiled" in log.split("loaded flux-compiled")[1]
    )
    latents = seeded(1, 16, 8, 8, seed=11)
    out = remote_decode(
        endpoint=compiled.url + "/",
        tensor=latents,
        output_type="pt",
        partial_postprocess=True,
        return_type="pt",
        do_scaling=False,
    )
    assert np.abs(out.numpy().astype(int) - local_pixels(reference["flux"], latents).astype(int)).max() <= 1
    raw = remote_decode(
        endpoint=compiled.url + "/", tensor=latents, output_type="pt", return_type="pt", do_scaling=False
    )
    with torch.no_grad():
        torch.testing.assert_close(raw, reference["flux"].decode(latents).sample, atol=1e-3, rtol=1e-3)


def test_a_size_that_was_not_warmed_up_runs_eagerly_and_says_so(compiled, reference):
    latents = seeded(1, 16, 8, 16, seed=12)  # 128x64: not warmed up
    started = time.monotonic()
    out = remote_decode(
        endpoint=compiled.url + "/",
        tensor=latents,
        output_type="pt",
        partial_postprocess=True,
        return_type="pt",
        do_scaling=False,
    )
    assert time.monotonic() - started < 10  # compiling it would take tens of seconds
    assert np.abs(out.numpy().astype(int) - local_pixels(reference["flux"], latents).astype(int)).max() <= 1
    assert "decode of 1 x [16, 8, 16] was not warmed up, so it runs eagerly" in compiled.log_path.read_text()
