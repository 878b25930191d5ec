"""Backpressure and failure: the bounded queue, queue timeouts, disconnects, slow bodies,
device out-of-memory and SIGTERM, on the real server with faults injected (tests/faulty_serve.py)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
import requests
import torch
from conftest import FAULTY_LAUNCHER, LiveServer, in_parallel, offline_env, seeded, tensor_of, wait_until
from diffusers.utils.remote_utils import remote_decode

MAX_QUEUE, QUEUE_TIMEOUT, BODY_TIMEOUT = 2, 3.0, 2.0


@pytest.fixture(scope="module")
def faulty(model_dirs, faults_file, tmp_path_factory):
    """sd15 behind a small queue: 1 running + 2 waiting, 3 s queue timeout, 2 s body timeout."""
    args = [
        "sd15",
        "--model",
        str(model_dirs["sd15"]),
        "--max-queue",
        str(MAX_QUEUE),
        "--queue-timeout",
        str(QUEUE_TIMEOUT),
        "--body-timeout",
        str(BODY_TIMEOUT),
    ]
    server = LiveServer(
        args,
        offline_env(FAULTS_FILE=str(faults_file)),
        tmp_path_factory.mktemp("logs") / "faulty.log",
        launcher=FAULTY_LAUNCHER,
    )
    yield server
    server.stop()


def decode(url: str, latent: torch.Tensor, timeout: float = 60) -> requests.Response:
    return requests.post(
        url + "/",
        data=latent.numpy().tobytes(),
        timeout=timeout,
        headers={"Content-Type": "tensor/binary"},
        params={"shape": list(latent.shape), "dtype": "float32", "output_type": "pt"},
    )


def test_full_queue_is_503_with_retry_after_and_the_rest_are_served(faulty, set_faults, reference):
    set_faults(delay=0.6)
    latent = seeded(1, 4, 8, 8)
    responses = in_parallel(6, lambda index: decode(faulty.url, latent))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * (1 + MAX_QUEUE) + [503] * (6 - 1 - MAX_QUEUE), statuses
    with torch.no_grad():
        expected = reference["sd15"].decode(latent).sample
    for response in responses:
        if response.status_code == 503:
            assert "busy" in response.json()["error"] and int(response.headers["Retry-After"]) >= 1
        else:
            torch.testing.assert_close(tensor_of(response), expected, atol=1e-4, rtol=1e-4)
    assert faulty.metric("remote_vae_requests_total", family="sd15", operation="-", status="503") >= 3


def test_waiting_past_the_queue_timeout_is_503(faulty, set_faults):
    set_faults(delay=QUEUE_TIMEOUT + 2)
    latent = seeded(1, 4, 8, 8)
    first = {}
    runner = threading.Thread(target=lambda: first.update(response=decode(faulty.url, latent)))
    runner.start()
    wait_until(lambda: faulty.metric("remote_vae_running") == 1)
    started = time.monotonic()
    response = decode(faulty.url, latent)
    waited = time.monotonic() - started
    assert response.status_code == 503 and "waited 3 s" in response.json()["error"] and response.headers["Retry-After"]
    assert QUEUE_TIMEOUT - 0.5 < waited < QUEUE_TIMEOUT + 2
    runner.join(timeout=60)
    assert first["response"].status_code == 200


def test_a_client_that_disconnects_has_its_queued_work_dropped(faulty, set_faults):
    set_faults(delay=2)
    latent = seeded(1, 4, 8, 8)
    decoded_before = faulty.metric("remote_vae_batch_size_count", family="sd15", operation="decode")
    dropped_before = faulty.metric("remote_vae_requests_total", family="sd15", operation="decode", status="499")
    first = {}
    runner = threading.Thread(target=lambda: first.update(response=decode(faulty.url, latent)))
    runner.start()
    wait_until(lambda: faulty.metric("remote_vae_running") == 1)
    body = latent.numpy().tobytes()
    with socket.create_connection(("127.0.0.1", faulty.port)) as sock:
        sock.sendall(
            b"POST /?shape=1&shape=4&shape=8&shape=8&dtype=float32 HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"tensor/binary\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        wait_until(lambda: faulty.metric("remote_vae_queue_length") == 1)
    # Closed while queued: dropped at once, long before the first request frees the device.
    wait_until(
        lambda: (
            faulty.metric("remote_vae_requests_total", family="sd15", operation="decode", status="499")
            == dropped_before + 1
        ),
        1.5,
    )
    runner.join(timeout=60)
    assert first["response"].status_code == 200
    time.sleep(0.5)
    assert faulty.metric("remote_vae_batch_size_count", family="sd15", operation="decode") == decoded_before + 1
    assert faulty.metric("remote_vae_queue_length") == 0 and faulty.metric("remote_vae_admitted") == 0


def test_a_body_that_never_finishes_is_408(faulty):
    with socket.create_connection(("127.0.0.1", faulty.port), timeout=BODY_TIMEOUT + 10) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: tensor/binary\r\nContent-Length: 1000\r\n\r\n" + bytes(10)
        )
        reply = b""
        while b"}" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in reply
    assert faulty.metric("remote_vae_admitted") == 0 and faulty.healthy()


@pytest.mark.parametrize("tiling", ["exact", "blend"])
def test_out_of_memory_is_retried_tiled(faulty, set_faults, reference, model_dirs, tiling):
    """16x16 latents run out of "device memory" whole. Tiled exactly (the default) the retry gives the untiled
    pixels; asked for tiling=blend, diffusers' enable_tiling() output, tiled from the start as a local enable_tiling()
    tiles (its 8x8-latent tiles fit), so nothing runs out."""
    set_faults(oom_above=64)
    latent = seeded(1, 4, 16, 16, seed=3)
    before = faulty.metric("remote_vae_out_of_memory_total", family="sd15", outcome="retried_tiled")
    if tiling == "exact":  # the default: what diffusers' client gets
        out = remote_decode(faulty.url + "/", tensor=latent, output_type="pt", return_type="pt", do_scaling=False)
    else:
        out = tensor_of(
            requests.post(
                faulty.url + "/",
                params={"shape": [1, 4, 16, 16], "dtype": "float32", "output_type": "pt", "tiling": tiling},
                data=latent.numpy().tobytes(),
                headers={"Content-Type": "tensor/binary"},
                timeout=60,
            )
        )
    vae = reference["sd15"]
    with torch.no_grad():
        vae.enable_tiling()
        blended = vae.decode(latent).sample
        vae.disable_tiling()
        whole = vae.decode(latent).sample
    torch.testing.assert_close(out, whole if tiling == "exact" else blended, atol=1e-4, rtol=1e-4)
    assert (blended - whole).abs().max() > 1e-3  # the two tiled paths really differ
    retried = faulty.metric("remote_vae_out_of_memory_total", family="sd15", outcome="retried_tiled")
    assert retried == before + (1 if tiling == "exact" else 0)


def test_out_of_memory_even_tiled_is_503_and_the_next_request_succeeds(faulty, set_faults):
    set_faults(oom_above=16, oom_exact=True)
    latent = seeded(1, 4, 16, 16, seed=4)
    response = decode(faulty.url, latent)
    assert (
        response.status_code == 503 and "out of memory" in response.json()["error"] and response.headers["Retry-After"]
    )
    assert faulty.metric("remote_vae_out_of_memory_total", family="sd15", outcome="refused") >= 1
    set_faults()
    assert decode(faulty.url, latent).status_code == 200 and faulty.healthy()


def test_sigterm_finishes_in_flight_work_then_exits_0(model_dirs, faults_file, tmp_path):
    faults_file.write_text(json.dumps({"delay": 2}))
    server = LiveServer(
        ["sd15", "--model", str(model_dirs["sd15"]), "--graceful-timeout", "20"],
        offline_env(FAULTS_FILE=str(faults_file)),
        tmp_path / "sigterm.log",
        launcher=FAULTY_LAUNCHER,
    )
    try:
        result = {}
        runner = threading.Thread(target=lambda: result.update(response=decode(server.url, seeded(1, 4, 8, 8))))
        runner.start()
        wait_until(lambda: server.metric("remote_vae_running") == 1)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(requests.ConnectionError):  # no longer accepting
            requests.get(server.url + "/health", timeout=5)
        runner.join(timeout=60)
        assert result["response"].status_code == 200  # the in-flight request was finished
        assert server.process.wait(timeout=30) == 0
    finally:
        faults_file.write_text("{}")
        server.stop()
