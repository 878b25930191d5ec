"""Dynamic batching against the live server: coalescing, exactness, fairness, the batch wait, failure isolation,
and whole batches against one sample at a time.

The device is made busy with a slow decoder (tests/faulty_serve.py), so concurrent requests
pile up behind it and the next model call takes them together. Every answer is compared with
diffusers in-process. The queue's 503s, timeouts and disconnects are tested with batching on
(its default) in test_reliability.py.
"""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest
import requests
import torch
from conftest import FAULTY_LAUNCHER, LiveServer, in_parallel, offline_env, psnr, seeded, wait_until
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.utils.remote_utils import remote_decode, remote_encode
from PIL import Image

BATCH_WAIT_MS = 400
DELAY = 1.5  # seconds per model call while the device is made busy


@pytest.fixture(scope="module")
def batching(model_dirs, faults_file, tmp_path_factory):
    """sd15 and flux, batches of up to 8 images, a long batch wait so that it shows."""
    args = [
        "sd15",
        "flux",
        "--model",
        f"sd15={model_dirs['sd15']}",
        "--model",
        f"flux={model_dirs['flux']}",
        "--max-batch-images",
        "8",
        "--batch-wait-ms",
        str(BATCH_WAIT_MS),
    ]
    server = LiveServer(
        args,
        offline_env(FAULTS_FILE=str(faults_file)),
        tmp_path_factory.mktemp("logs") / "batching.log",
        launcher=FAULTY_LAUNCHER,
    )
    yield server
    server.stop()


def sd15_server(model_dirs, faults_file, tmp_path_factory, name: str, *options: str):
    args = ["sd15", "--model", str(model_dirs["sd15"]), *options]
    server = LiveServer(
        args,
        offline_env(FAULTS_FILE=str(faults_file)),
        tmp_path_factory.mktemp("logs") / f"{name}.log",
        launcher=FAULTY_LAUNCHER,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def unbatched(model_dirs, faults_file, tmp_path_factory):
    """sd15 with batching off."""
    yield from sd15_server(model_dirs, faults_file, tmp_path_factory, "unbatched", "--max-batch-images", "1")


@pytest.fixture(scope="module")
def budgeted(model_dirs, faults_file, tmp_path_factory):
    """sd15 with batching on and a pixel budget of two 64x64 images per model call."""
    yield from sd15_server(
        model_dirs, faults_file, tmp_path_factory, "budgeted", "--batch-pixel-budget", str(2 * 64 * 64)
    )


def decoded(vae, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents).sample


def pixels(sample: torch.Tensor) -> np.ndarray:
    return np.stack(
        [np.asarray(image) for image in VaeImageProcessor(vae_scale_factor=8).postprocess(sample, output_type="pil")]
    )


def assert_same_pixels(actual, expected: np.ndarray) -> None:
    """uint8 within 1 of diffusers' (the server's channels-last convolutions round differently)."""
    assert np.abs(np.asarray(actual).astype(int) - expected.astype(int)).max() <= 1


def model_calls(server: LiveServer, family: str, operation: str = "decode") -> tuple[float, float]:
    """(model calls, requests in them) so far."""
    labels = dict(family=family, operation=operation)
    return server.metric("remote_vae_model_call_requests_count", **labels), server.metric(
        "remote_vae_model_call_requests_sum", **labels
    )


def busy_device(server: LiveServer, url: str, seed: int = 100) -> threading.Thread:
    """A request that holds the device (the decoder is slow) while others arrive."""
    thread = threading.Thread(
        target=remote_decode,
        kwargs=dict(
            endpoint=url, tensor=seeded(1, 4, 8, 8, seed=seed), output_type="pt", return_type="pt", do_scaling=False
        ),
    )
    thread.start()
    wait_until(lambda: server.metric("remote_vae_running") == 1)
    return thread


def test_concurrent_requests_of_mixed_shapes_forms_and_families_each_get_their_own_answer(
    batching, set_faults, reference
):
    sd, flux = batching.url + "/sd15/", batching.url + "/flux/"
    set_faults(delay=DELAY)
    calls_before, requests_before = model_calls(batching, "sd15")
    blocker = busy_device(batching, sd)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    packed = seeded(1, 16, 64, seed=8)
    calls = [
        # One key, [., 4, 8, 8]: four requests (five images) with different forms and scaling share a model call.
        lambda: remote_decode(
            endpoint=sd, tensor=seeded(1, 4, 8, 8, seed=1), output_type="pt", return_type="pt", do_scaling=False
        ),
        lambda: remote_decode(
            endpoint=sd,
            tensor=seeded(2, 4, 8, 8, seed=2),
            output_type="pt",
            partial_postprocess=True,
            return_type="pt",
            do_scaling=False,
        ),
        lambda: remote_decode(
            endpoint=sd, tensor=seeded(1, 4, 8, 8, seed=3), output_type="pil", image_format="png", do_scaling=False
        ),
        lambda: remote_decode(
            endpoint=sd, tensor=seeded(1, 4, 8, 8, seed=4), output_type="pt", return_type="pt", scaling_factor=0.18215
        ),
        # Another shape: a call of its own.
        lambda: remote_decode(
            endpoint=sd, tensor=seeded(1, 4, 8, 16, seed=5), output_type="pt", return_type="pt", do_scaling=False
        ),
        lambda: remote_decode(
            endpoint=sd, tensor=seeded(1, 4, 8, 16, seed=6), output_type="pil", image_format="jpg", do_scaling=False
        ),
        # Other families and operations.
        lambda: remote_decode(
            endpoint=flux, tensor=seeded(1, 16, 8, 8, seed=7), output_type="pt", return_type="pt", do_scaling=False
        ),
        lambda: remote_decode(
            endpoint=flux, tensor=packed, height=64, width=64, output_type="pt", return_type="pt", do_scaling=False
        ),
        lambda: remote_encode(endpoint=sd, image=image),
    ]
    results = in_parallel(len(calls), lambda index: calls[index](), stagger=0.02)
    blocker.join(timeout=60)

    sd_vae, flux_vae = reference["sd15"], reference["flux"]
    expect_raw = [
        decoded(sd_vae, seeded(1, 4, 8, 8, seed=1)),
        None,
        None,
        decoded(sd_vae, seeded(1, 4, 8, 8, seed=4) / 0.18215),
    ]
    torch.testing.assert_close(results[0], expect_raw[0], atol=1e-4, rtol=1e-4)
    assert_same_pixels(results[1], pixels(decoded(sd_vae, seeded(2, 4, 8, 8, seed=2))))
    assert_same_pixels(results[2], pixels(decoded(sd_vae, seeded(1, 4, 8, 8, seed=3)))[0])
    torch.testing.assert_close(results[3], expect_raw[3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[4], decoded(sd_vae, seeded(1, 4, 8, 16, seed=5)), atol=1e-4, rtol=1e-4)
    expected = pixels(decoded(sd_vae, seeded(1, 4, 8, 16, seed=6)))[0]
    jpeg = io.BytesIO()
    Image.fromarray(expected).save(jpeg, format="JPEG", quality=90, subsampling=0)
    # As Pillow writes it locally
    assert psnr(torch.tensor(np.asarray(results[5])), torch.tensor(np.asarray(Image.open(jpeg).convert("RGB")))) >= 40
    torch.testing.assert_close(results[6], decoded(flux_vae, seeded(1, 16, 8, 8, seed=7)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        results[7], decoded(flux_vae, FluxPipeline._unpack_latents(packed, 64, 64, 8)), atol=1e-4, rtol=1e-4
    )
    with torch.no_grad():
        torch.testing.assert_close(results[8], sd_vae.encode(image).latent_dist.mean, atol=1e-4, rtol=1e-4)

    # sd15 decodes: the busy call, then one call per shape, whatever the forms and factors.
    calls_after, requests_after = model_calls(batching, "sd15")
    assert (calls_after - calls_before, requests_after - requests_before) == (3, 7)
    assert batching.metric("remote_vae_model_call_images_sum", family="sd15", operation="decode") >= 6


def test_the_oldest_request_leads_so_other_shapes_are_not_starved(batching, set_faults):
    """Busy call A1, then B (another shape), then A2..A12: B goes next, before the As that came after it,
    whose eleven requests then take two calls (8 + 3 images)."""
    sd = batching.url + "/sd15/"
    set_faults(delay=1.0)
    calls_before, requests_before = model_calls(batching, "sd15")
    blocker = busy_device(batching, sd)
    finished = {}

    def send(name, latent):
        remote_decode(endpoint=sd, tensor=latent, output_type="pt", return_type="pt", do_scaling=False)
        finished[name] = time.monotonic()

    other = threading.Thread(target=send, args=("B", seeded(1, 4, 16, 8, seed=20)))
    other.start()
    wait_until(lambda: batching.metric("remote_vae_queue_length") == 1)
    threads = [
        threading.Thread(target=send, args=(f"A{index}", seeded(1, 4, 8, 8, seed=index))) for index in range(2, 13)
    ]
    for thread in threads:
        thread.start()
    for thread in [other, *threads]:
        thread.join(timeout=60)
    blocker.join(timeout=60)
    assert len(finished) == 12
    later = sorted(finished[f"A{index}"] for index in range(2, 13))
    assert finished["B"] < later[0]
    assert later[8] - later[7] > 0.5 and later[7] - later[0] < 0.5  # two calls: 8 requests, then 3
    calls_after, requests_after = model_calls(batching, "sd15")
    assert (calls_after - calls_before, requests_after - requests_before) == (4, 13)


def test_a_forming_batch_waits_for_arriving_requests_but_never_past_the_batch_wait(batching, set_faults):
    sd = batching.url + "/sd15/"
    set_faults()
    latent = seeded(1, 4, 8, 8)

    def timed_decode() -> float:
        started = time.monotonic()
        remote_decode(endpoint=sd, tensor=latent, output_type="pt", return_type="pt", do_scaling=False)
        return time.monotonic() - started

    # Nothing else arriving: no waiting at all.
    assert min(timed_decode() for _ in range(3)) < BATCH_WAIT_MS / 1000 * 0.75
    # A request still uploading its body could join: the batch waits for it, but only BATCH_WAIT_MS.
    body = latent.numpy().tobytes()
    with socket.create_connection(("127.0.0.1", batching.port)) as slow:
        slow.sendall(
            b"POST /sd15/?shape=1&shape=4&shape=8&shape=8&dtype=float32&output_type=pt HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Type: tensor/binary\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:100]
        )
        wait_until(lambda: batching.metric("remote_vae_receiving") == 1)
        waited = timed_decode()
        assert BATCH_WAIT_MS / 1000 <= waited < BATCH_WAIT_MS / 1000 + 1.0
        slow.sendall(body[100:])
        assert slow.recv(12).startswith(b"HTTP/1.1 200")


def test_a_request_that_breaks_the_model_fails_alone(batching, set_faults, reference):
    sd = batching.url + "/sd15/"
    set_faults(delay=1.0, fail_above=1000)
    blocker = busy_device(batching, sd)
    poisoned = seeded(1, 4, 8, 8, seed=30)
    poisoned[0, 0, 0, 0] = 1e6  # finite, so it passes every check, but the injected fault breaks the model on it

    def call(index):
        if index == 3:
            return requests.post(
                sd,
                data=poisoned.numpy().tobytes(),
                headers={"Content-Type": "tensor/binary"},
                params={"shape": [1, 4, 8, 8], "dtype": "float32", "output_type": "pt"},
            )
        if index == 4:  # malformed: answered before it queues
            return requests.post(
                sd,
                data=b"\0" * 10,
                headers={"Content-Type": "tensor/binary"},
                params={"shape": [1, 4, 8, 8], "dtype": "float32"},
            )
        return remote_decode(
            endpoint=sd,
            tensor=seeded(1, 4, 8, 8, seed=31 + index),
            output_type="pt",
            return_type="pt",
            do_scaling=False,
        )

    results = in_parallel(6, call, stagger=0.02)
    blocker.join(timeout=60)
    assert results[3].status_code == 500 and "internal error" in results[3].json()["error"]
    assert results[4].status_code == 400 and "needs 1024 bytes" in results[4].json()["error"]
    for index in (0, 1, 2, 5):
        torch.testing.assert_close(
            results[index], decoded(reference["sd15"], seeded(1, 4, 8, 8, seed=31 + index)), atol=1e-4, rtol=1e-4
        )
    assert "running them one at a time" in batching.log_path.read_text()
    assert batching.healthy()


@pytest.mark.parametrize("server_name,calls", [("unbatched", 5), ("budgeted", 3)])
def test_requests_share_a_call_only_when_batching_is_on_and_they_fit_the_budget(
    request, server_name, calls, set_faults
):
    """A busy call, then four 64x64 requests: off, a call each; with a budget of two such images, two calls of two."""
    server = request.getfixturevalue(server_name)
    set_faults(delay=0.5)
    calls_before, requests_before = model_calls(server, "sd15")
    blocker = busy_device(server, server.url + "/")
    in_parallel(
        4,
        lambda index: remote_decode(
            endpoint=server.url + "/",
            tensor=seeded(1, 4, 8, 8, seed=index),
            output_type="pt",
            return_type="pt",
            do_scaling=False,
        ),
    )
    blocker.join(timeout=60)
    calls_after, requests_after = model_calls(server, "sd15")
    assert (calls_after - calls_before, requests_after - requests_before) == (calls, 5)


@pytest.mark.parametrize("server_name,mode", [("batching", "whole"), ("budgeted", "sliced")])
def test_a_batch_runs_whole_when_it_fits_the_pixel_budget(request, server_name, mode, reference):
    """Four 64x64 images: within the CPU budget (2^16 pixels) whole; over a budget of two images, one at a time."""
    server = request.getfixturevalue(server_name)
    url = server.url + ("/sd15/" if server_name == "batching" else "/")
    before = server.metric("remote_vae_model_calls_total", family="sd15", mode=mode)
    latents = seeded(4, 4, 8, 8, seed=40)
    out = remote_decode(
        endpoint=url, tensor=latents, output_type="pt", partial_postprocess=True, return_type="pt", do_scaling=False
    )
    assert_same_pixels(out, pixels(decoded(reference["sd15"], latents)))
    assert server.metric("remote_vae_model_calls_total", family="sd15", mode=mode) == before + 1
