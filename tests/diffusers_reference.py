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


def decode_as_family(family: str, vae, latents: torch.Tensor, **kwargs) -> torch.Tensor:
    """vae.decode(latents).sample on canonical latents [B, C, (T,) h, w], as the family's model takes them: a clip's
    frames as a batch, with their count, for SVD's temporal decoder (`frames_as_batch`); Allegro's tiles
    (`tiled_only`), its frames-first output as [B, 3, F, H, W]."""
    from remote_vae.families import load_family

    spec = load_family(family)
    with torch.no_grad():
        if spec.tiled_only:  # Allegro: only in its tiles (as its docstring enables them), frames first
            vae.enable_tiling()
            return vae.decode(latents, **kwargs).sample.permute(0, 2, 1, 3, 4)
        if not spec.frames_as_batch:
            return vae.decode(latents, **kwargs).sample
        batch, frames = latents.shape[0], latents.shape[2]
        out = vae.decode(latents.permute(0, 2, 1, 3, 4).flatten(0, 1), num_frames=frames, **kwargs).sample
        return out.unflatten(0, (batch, frames)).permute(0, 2, 1, 3, 4)


def encode_as_family(family: str, vae, pixels: torch.Tensor) -> torch.Tensor:
    """The encoder's deterministic latent (a distribution's mean, or the latent) of pixels [B, 3, (F,) H, W], as the
    family's model takes them (SVD: the frames as a batch, back in [B, C, F, h, w])."""
    from remote_vae.families import load_family
    from remote_vae.vae import latent_of

    with torch.no_grad():
        if not load_family(family).frames_as_batch:
            return latent_of(vae.encode(pixels))
        batch, frames = pixels.shape[0], pixels.shape[2]
        latent = latent_of(vae.encode(pixels.permute(0, 2, 1, 3, 4).flatten(0, 1)))
        return latent.unflatten(0, (batch, frames)).permute(0, 2, 1, 3, 4)
