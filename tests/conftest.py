"""Shared fixtures: tiny seeded VAEs on disk, and the real server in a subprocess.

Nothing here touches the Hugging Face Hub: models are built with random
weights and saved with save_pretrained; the hub-loading path reads a
temporary cache with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from diffusers import AutoencoderKL

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 120

# Four blocks: three downsamplings, the 8x compression of the real models.
TINY_BLOCKS = dict(
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
SD_FACTORS = dict(scaling_factor=0.18215)
FLUX_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)


def tiny_sd_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(latent_channels=4, **TINY_BLOCKS, **SD_FACTORS).eval()


def tiny_flux_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **TINY_BLOCKS, **FLUX_FACTORS).eval()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {"sd15": root / "sd15", "flux": root / "flux"}
    tiny_sd_vae().save_pretrained(dirs["sd15"])
    tiny_flux_vae().save_pretrained(dirs["flux"])
    return dirs


@pytest.fixture(scope="session")
def reference(model_dirs) -> dict[str, AutoencoderKL]:
    """The same weights loaded in-process by diffusers: what the service must match."""
    return {name: AutoencoderKL.from_pretrained(path).eval() for name, path in model_dirs.items()}


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, model_dirs) -> Path:
    """A Hugging Face cache holding the tiny SD VAE under sd15's Hub repo id."""
    family = json.loads((ROOT / "configs" / "sd15.json").read_text())
    cache = tmp_path_factory.mktemp("hf_home") / "hub"
    repo = cache / ("models--" + family["hub_repo"].replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in model_dirs["sd15"].iterdir():
        shutil.copy(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("REMOTE_VAE_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


class LiveServer:
    """`python -m remote_vae serve ...` on 127.0.0.1, waited on until healthy."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "remote_vae", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {STARTUP_SECONDS}s:\n{self.log_path.read_text()}")

    def healthy(self) -> bool:
        return self.process.poll() is None and requests.get(self.url + "/health", timeout=10).status_code == 200

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# Small limits so tests can cross them cheaply.
MAX_PIXELS = 4 * 256 * 256
MAX_BODY_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="session")
def multi_server(model_dirs, tmp_path_factory):
    """sd15 and flux on one server, each under /<family>/."""
    args = [
        "sd15", "flux",
        "--model", f"sd15={model_dirs['sd15']}", "--model", f"flux={model_dirs['flux']}",
        "--max-pixels", str(MAX_PIXELS), "--max-body-bytes", str(MAX_BODY_BYTES),
    ]
    server = LiveServer(args, offline_env(), tmp_path_factory.mktemp("logs") / "multi.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hub_server(hf_cache, tmp_path_factory):
    """sd15 alone, at /, with weights from the Hugging Face cache (no --model)."""
    env = offline_env(HF_HUB_CACHE=str(hf_cache))
    server = LiveServer(["sd15", "--max-pixels", str(MAX_PIXELS)], env, tmp_path_factory.mktemp("logs") / "hub.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sd(multi_server) -> str:
    return multi_server.url + "/sd15/"


@pytest.fixture(scope="session")
def flux(multi_server) -> str:
    return multi_server.url + "/flux/"


def seeded(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()
