"""The real server with faults injected into the tiny models' decoders, for the reliability tests.

`python tests/faulty_serve.py serve ...` takes the same arguments as
`python -m remote_vae serve`. Before each decoder call it reads the JSON file
named by FAULTS_FILE (missing or empty: no faults), so a test changes the
faults of a running server by rewriting the file:
  {"delay": seconds}      every decoder call sleeps first (a slow device)
  {"oom_above": pixels}   a decoder call on more latent pixels than this
                          raises torch.cuda.OutOfMemoryError, as a GPU would
  {"fail_above": value}   a decoder call on values larger than this raises
                          RuntimeError: one poisoned request in a batch
  {"oom_exact": true}     the exact tiled decode (remote_vae/tiling/group_norm.py, which
                          runs the decoder's layers itself) runs out of memory too
  {"fast": true}          the decoder and encoder (and Wan's encoder) are replaced by
                          a resampling (zeros) of the right shape, so the attack tests measure the request
                          path's memory and time, not a model's
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
from diffusers.models.autoencoders import autoencoder_kl_wan
from diffusers.models.autoencoders import vae as vae_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remote_vae.cli import main  # noqa: E402
from remote_vae.tiling.group_norm import GroupNormTiler  # noqa: E402

decoder_forward = vae_blocks.Decoder.forward
encoder_forward = vae_blocks.Encoder.forward
exact_decoder_forward = GroupNormTiler.decoder_forward


def faults() -> dict:
    try:
        return json.loads(Path(os.environ["FAULTS_FILE"]).read_text() or "{}")
    except (KeyError, OSError, ValueError):
        return {}


def faulty_forward(self, z, *args, **kwargs):
    fault = faults()
    time.sleep(fault.get("delay", 0))
    if "oom_above" in fault and z.shape[-2] * z.shape[-1] > fault["oom_above"]:
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB (injected by tests/faulty_serve.py)"
        )
    if "fail_above" in fault and z.abs().max() > fault["fail_above"]:
        raise RuntimeError("model failure injected by tests/faulty_serve.py")
    if fault.get("fast"):
        return torch.nn.functional.interpolate(z[:, :3].tanh(), scale_factor=8)
    return decoder_forward(self, z, *args, **kwargs)


def faulty_encoder_forward(self, x, *args, **kwargs):
    if faults().get("fast"):
        pooled = torch.nn.functional.avg_pool2d(x, 8)  # [B, 3, H/8, W/8]
        channels = self.conv_out.out_channels
        return pooled.repeat(1, (channels + 2) // 3, 1, 1)[:, :channels]
    return encoder_forward(self, x, *args, **kwargs)


def faulty_exact_decoder_forward(self, sample, *extra):
    if faults().get("oom_exact"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (exact tiled decode; injected by tests/faulty_serve.py)")
    return exact_decoder_forward(self, sample, *extra)


wan_encode = autoencoder_kl_wan.AutoencoderKLWan._encode


def faulty_wan_encode(self, x):
    if faults().get(
        "fast"
    ):  # Wan's encoder output: mean and log-variance, 4x fewer frames (the first alone), 8x smaller
        return torch.zeros(
            x.shape[0],
            2 * self.config.z_dim,
            1 + (x.shape[2] - 1) // 4,
            x.shape[3] // 8,
            x.shape[4] // 8,
            dtype=x.dtype,
        )
    return wan_encode(self, x)


vae_blocks.Decoder.forward = faulty_forward
vae_blocks.Encoder.forward = faulty_encoder_forward
autoencoder_kl_wan.AutoencoderKLWan._encode = faulty_wan_encode
GroupNormTiler.decoder_forward = faulty_exact_decoder_forward

if __name__ == "__main__":
    sys.exit(main())
