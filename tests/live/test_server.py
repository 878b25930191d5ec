"""The HTTP layer: health while loading, the multi-family index, 500s, and start-up failures."""

import subprocess
import sys
import threading
import time

import pytest
import requests
import torch
import uvicorn
from conftest import FORKER, ROOT, free_port, offline_env
from forkserver import ForkedServer

from remote_vae.families import load_family
from remote_vae.server import Registry, Slot, create_app
from remote_vae.wire import HttpCall, failure_reply, prepare_call


@pytest.fixture
def unloaded_server():
    """An app whose model has not loaded yet, served in-process."""
    registry = Registry({"sd15": Slot(load_family("sd15"))})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(registry), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", registry
    server.should_exit = True
    thread.join(timeout=10)


def test_loading_answers_503_json(unloaded_server):
    url, registry = unloaded_server
    for path in ("/", "/health"):
        response = requests.get(url + path)
        assert response.status_code == 503 and response.json()["status"] == "loading"
    response = requests.post(url + "/", data=b"x", headers={"Content-Type": "tensor/binary"})
    assert response.status_code == 503 and "loading" in response.json()["error"] and response.headers["Retry-After"]
    registry.slots["sd15"].error = "boom"
    assert requests.get(url + "/health").json()["families"] == {"sd15": "failed"}


@pytest.mark.skipif(not FORKER.wanted, reason="servers start as commands here")
def test_the_test_servers_are_forked_from_the_warm_parent(multi_server):
    """scripts/forkserver.py, which falls back to commands quietly: its fallback would only cost time, so this says when
    it happens. That each child has its own environment is shown by the Hub-cache servers (test_hub_loading.py)."""
    assert isinstance(multi_server.process, ForkedServer)
    assert multi_server.healthy()


def test_multi_family_index(multi_server):
    index = requests.get(multi_server.url + "/").json()
    assert index["status"] == "ok"
    assert index["families"]["sd15"] == {"path": "/sd15/", "status": "ready", "operations": ["decode", "encode"]}
    assert set(index["families"]) == {"sd15", "flux"}
    assert requests.get(multi_server.url + "/flux/health").status_code == 200


def test_unexpected_errors_are_500_json_without_details():
    class Broken:
        png_compression = 1
        family = load_family("sd15")

        def check_decode(self, request, reply_encoding="binary"):
            raise ZeroDivisionError("secret internals")

    call = HttpCall(
        body=bytes(512), query="shape=1&shape=4&shape=8&shape=8&dtype=float16", content_type="tensor/binary"
    )
    try:
        prepare_call(Broken(), call)
    except ZeroDivisionError as exc:
        reply = failure_reply(exc)
    assert reply.status == 500 and reply.media_type == "application/json"
    assert b"secret" not in reply.body and b"Traceback" not in reply.body


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "remote_vae", *args]
    return subprocess.run(command, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=timeout)


def test_unknown_family_exits_2():
    result = run_cli("serve", "nope", "--port", str(free_port()))
    assert result.returncode == 2 and "unknown family 'nope'" in result.stderr


def test_ambiguous_model_exits_2():
    result = run_cli("serve", "sd15", "flux", "--model", "/tmp/x", "--port", str(free_port()))
    assert result.returncode == 2 and "FAMILY=" in result.stderr


def test_unloadable_model_exits_1(tmp_path):
    result = run_cli(
        "serve", "sd15", "--model", str(tmp_path), "--host", "127.0.0.1", "--port", str(free_port()), "--device", "cpu"
    )
    assert result.returncode == 1 and "no config.json" in result.stderr


def test_missing_hub_model_offline_exits_1(tmp_path):
    env = {**offline_env(), "HF_HUB_CACHE": str(tmp_path)}
    command = [
        sys.executable,
        "-m",
        "remote_vae",
        "serve",
        "sdxl",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--device",
        "cpu",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "HF_HUB_OFFLINE" in result.stderr


def test_families_command():
    result = run_cli("families")
    assert result.returncode == 0 and "madebyollin/sdxl-vae-fp16-fix" in result.stdout


@pytest.mark.parametrize(
    "options, words",
    [
        (["--max-queue", "-1"], "--max-queue"),
        (["--api-key", "short"], "at least 16"),
        (["--ssl-certfile", "cert.pem"], "both --ssl-certfile and --ssl-keyfile"),
        (["--api-key-file", "/nonexistent/keys"], "cannot read"),
        (["--max-batch-images", "0"], "--max-batch-images must be at least 1"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms from 0 to 10000"),
        (["--batch-pixel-budget", "lots"], "expected a pixel count (1 or more) or 'auto'"),
        (["--tile-store-bytes", "-1"], "expected a byte count (0 or more) or 'auto'"),
        (["--png-compression", "10"], "invalid choice"),
        (["--warmup-sizes", "100x100"], "both sides must be multiples of 8"),
        (["--warmup-sizes", "512x512x9"], "sd15 decodes images; give WIDTHxHEIGHT"),
        (["--warmup-sizes", "512"], "expected WIDTHxHEIGHT"),
    ],
)
def test_serve_options_that_cannot_work_exit_2_before_loading(options, words, monkeypatch, capsys):
    """In this process (the unknown-family tests above run the real process): a server that got as far as
    loading or listening fails the test instead."""
    from remote_vae import launch
    from remote_vae.cli import main

    def started(*args):
        raise AssertionError(f"serve {options} went on to load or listen")

    monkeypatch.setattr(launch.uvicorn.Server, "run", started)
    monkeypatch.setattr(launch, "load_in_background", started)
    try:
        code = main(["serve", "sd15", "--random-weights", "--host", "127.0.0.1", *options])
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    assert code == 2 and words in capsys.readouterr().err


def test_a_hub_that_cannot_be_reached_is_named_as_the_cause(monkeypatch):
    """diffusers reports an unreachable Hub as a repository without config.json; the load error names the network
    error."""
    import diffusers
    from huggingface_hub.errors import LocalEntryNotFoundError

    from remote_vae.vae import LoadError, load_vae

    def unreachable(*args, **kwargs):
        try:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except ConnectionRefusedError as refused:
                raise LocalEntryNotFoundError(
                    "An error happened while trying to locate the file on the Hub"
                ) from refused
        except LocalEntryNotFoundError as missing:
            raise OSError("stabilityai/sd-vae-ft-mse does not appear to have a file named config.json.") from missing

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(LoadError) as failed:
        load_vae(load_family("sd15"), "stabilityai/sd-vae-ft-mse", torch.device("cpu"), torch.float32)
    message = str(failed.value)
    assert (
        "Hugging Face Hub could not be reached" in message
        and "ConnectionRefusedError" in message
        and "config.json" not in message
    )
    assert "--model DIR" in message


@pytest.mark.parametrize(
    "host, warned", [("0.0.0.0", True), ("192.0.2.7", True), ("127.0.0.1", False), ("localhost", False), ("::1", False)]
)
def test_serving_beyond_loopback_without_a_key_warns_at_start(monkeypatch, caplog, host, warned):
    """No socket is opened: the server's run and the model loading are stubbed, the start-up checks run for real."""
    from remote_vae import launch
    from remote_vae.settings import read_settings

    monkeypatch.setattr(launch.uvicorn.Server, "run", lambda self: None)
    monkeypatch.setattr(launch, "load_in_background", lambda *args: None)
    with caplog.at_level("WARNING", logger="remote_vae"):
        launch.serve(read_settings(["sd15", "--random-weights", "--host", host]))
    assert ("without an API key" in caplog.text) == warned, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="remote_vae"):
        launch.serve(read_settings(["sd15", "--random-weights", "--host", host, "--api-key", "k" * 32]))
    assert "without an API key" not in caplog.text
