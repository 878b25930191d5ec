"""What the tests compare against: diffusers run in-process on the same weights and latents, and the helpers that
read a reply or run the command line. Shared by tests/unit, tests/live and tests/deploy."""

from __future__ import annotations

import subprocess
import sys

import imageio
import numpy as np
import torch
from conftest import ROOT
from diffusers.image_processor import VaeImageProcessor

SD = 0.18215

FLUX = (0.3611, 0.1159)

processor = VaeImageProcessor(vae_scale_factor=8)


def decode_locally(vae, latents, scaling_factor=None, shift_factor=None) -> torch.Tensor:
    z = latents.float()
    if scaling_factor is not None:
        z = z / scaling_factor
    if shift_factor is not None:
        z = z + shift_factor
    with torch.no_grad():
        return vae.decode(z).sample


def uint8_locally(sample: torch.Tensor) -> np.ndarray:
    return (processor.postprocess(sample, output_type="np") * 255).round().astype("uint8")


def assert_pixels_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 1


def encode_locally(vae, images: torch.Tensor, scaling_factor=None, shift_factor=None) -> torch.Tensor:
    with torch.no_grad():
        z = vae.encode(images.float()).latent_dist.mean
    if shift_factor is not None:
        z = z - shift_factor
    if scaling_factor is not None:
        z = z * scaling_factor
    return z


def read_mp4(data: bytes, tmp_path) -> tuple[np.ndarray, dict]:
    path = tmp_path / "out.mp4"
    path.write_bytes(data)
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack(list(reader.iter_data())), reader.get_meta_data()
    finally:
        reader.close()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "remote_vae", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
