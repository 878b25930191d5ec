"""Shared fixtures: tiny seeded VAEs on disk, and the real server in a subprocess.

Nothing here touches the Hugging Face Hub: models are built with random
weights and saved with save_pretrained; the hub-loading path reads a
temporary cache with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import diffusers
import pytest
import requests
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLCosmos,
    AutoencoderKLFlux2,
    AutoencoderKLHunyuanImage,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTXVideo,
    AutoencoderKLMagvit,
    AutoencoderKLMochi,
    AutoencoderKLQwenImage,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
    AutoencoderOobleck,
    AutoencoderTiny,
)
from forkserver import ServerForker

from remote_vae.families import available as available_families
from remote_vae.families import load_family
from remote_vae.vae import unsupported

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


def tiny_sdxl_vae() -> AutoencoderKL:
    torch.manual_seed(15)
    return AutoencoderKL(latent_channels=4, **TINY_BLOCKS, scaling_factor=0.13025).eval()


def tiny_flux_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **TINY_BLOCKS, **FLUX_FACTORS
    ).eval()


def _mostly_grey(conv_out: torch.nn.Module) -> None:
    """Make the RGB outputs share 90% of their weights.

    Random-weight decoders emit per-pixel colour noise that no real video has,
    and an H.264 yuv420p stream stores colour at half resolution, so MP4 round
    trips of such noise cap near 22-27 dB PSNR whatever the quality. Mostly
    shared channels keep real colour differences (a swapped channel still
    fails the tensor tests) with chroma detail a real video could carry.
    """
    with torch.no_grad():
        conv_out.weight.copy_(conv_out.weight[:1] + 0.1 * conv_out.weight)
        conv_out.bias.copy_(conv_out.bias[:1] + 0.1 * conv_out.bias)


def tiny_hunyuan_vae() -> AutoencoderKLHunyuanVideo:
    torch.manual_seed(2)
    model = AutoencoderKLHunyuanVideo(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=16
    )
    _mostly_grey(model.decoder.conv_out.conv)
    return model.eval()


def tiny_wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(3)
    model = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    _mostly_grey(model.decoder.conv_out)
    return model.eval()


def _random_stats(model: torch.nn.Module, mean: str, spread: str, seed: int) -> None:
    """Statistics kept in the weights (Flux.2's batch norm, LTX's buffers) are 0 and 1 when built: make them matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.get_buffer(mean).copy_(0.5 * torch.randn(model.get_buffer(mean).shape, generator=generator))
        model.get_buffer(spread).copy_(0.5 + torch.rand(model.get_buffer(spread).shape, generator=generator))


def tiny_sd3_vae() -> AutoencoderKL:
    torch.manual_seed(5)
    return AutoencoderKL(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **TINY_BLOCKS,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ).eval()


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    torch.manual_seed(6)
    model = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=32
    )
    _random_stats(model, "bn.running_mean", "bn.running_var", seed=6)
    return model.eval()


def tiny_qwenimage_vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(7)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()


def tiny_wan22_vae() -> AutoencoderKLWan:
    torch.manual_seed(8)
    family = json.loads((ROOT / "configs" / "wan22.json").read_text())
    model = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=family["latents_mean"],
        latents_std=family["latents_std"],
    )
    _mostly_grey(model.decoder.conv_out)
    return model.eval()


def tiny_hunyuanvideo15_vae() -> AutoencoderKLHunyuanVideo15:
    torch.manual_seed(9)
    model = AutoencoderKLHunyuanVideo15(block_out_channels=(8, 16, 16, 64, 64), layers_per_block=1, latent_channels=32)
    _mostly_grey(model.decoder.conv_out.conv)
    return model.eval()


def tiny_ltxvideo_vae() -> AutoencoderKLLTXVideo:
    torch.manual_seed(10)
    model = AutoencoderKLLTXVideo(
        block_out_channels=(8, 8, 16, 16, 32),
        down_block_types=("LTXVideo095DownBlock3D",) * 4,
        decoder_block_out_channels=(16, 32, 64),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True,) * 4,
        decoder_spatio_temporal_scaling=(True,) * 3,
        decoder_inject_noise=(False,) * 4,
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True,) * 3,
        upsample_factor=(2, 2, 2),
        timestep_conditioning=True,
        latent_channels=128,
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    )
    _random_stats(model, "latents_mean", "latents_std", seed=10)
    _mostly_grey(model.decoder.conv_out.conv)
    return model.eval()


def tiny_cogvideox_vae() -> AutoencoderKLCogVideoX:
    torch.manual_seed(11)
    model = AutoencoderKLCogVideoX(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=16,
        scaling_factor=1.15258426,
    )
    _mostly_grey(model.decoder.conv_out.conv)
    return model.eval()


def tiny_sana_vae() -> AutoencoderDC:
    torch.manual_seed(16)  # six stages: the real 32x compression and 32 channels
    return AutoencoderDC(
        latent_channels=32,
        attention_head_dim=2,
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=(8, 8, 8, 16, 16, 32),  # the last as wide as the latent: the shortcuts average it
        decoder_block_out_channels=(8, 8, 8, 16, 16, 32),
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
        decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        scaling_factor=0.41407,
    ).eval()


def tiny_mochi_vae() -> AutoencoderKLMochi:
    torch.manual_seed(17)
    model = AutoencoderKLMochi(
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        latent_channels=12,
        layers_per_block=(1, 1, 1, 1, 1),
        add_attention_block=(False, True, False, False, False),
    )
    _mostly_grey(model.decoder.proj_out)
    return model.eval()


def tiny_easyanimate_vae() -> AutoencoderKLMagvit:
    torch.manual_seed(18)
    model = AutoencoderKLMagvit(
        block_out_channels=[8, 8, 8, 8], latent_channels=16, layers_per_block=1, norm_num_groups=8
    )
    _mostly_grey(model.decoder.conv_out)
    return model.eval()


def tiny_stableaudio_vae() -> AutoencoderOobleck:
    """The real strides (2048 samples per latent step) and latent (64 channels: the encoder's 128 are its mean and
    scale), narrow everywhere else."""
    torch.manual_seed(19)
    return AutoencoderOobleck(
        encoder_hidden_size=128, channel_multiples=[1, 1, 1, 1, 1], decoder_channels=8, decoder_input_channels=64
    ).eval()


def tiny_stableaudio3_vae() -> diffusers.AutoencoderSAME:
    """SAME's real patch and stride (4096 samples per latent step) and 256-channel latent, one narrow transformer."""
    torch.manual_seed(20)
    return diffusers.AutoencoderSAME(
        encoder_channels=16,
        encoder_c_mults=[2],
        encoder_transformer_depths=[1],
        dim_heads=8,
        decoder_sinusoidal_blocks=[1],
    ).eval()


def tiny_hunyuanimage21_vae() -> AutoencoderKLHunyuanImage:
    """The real 32x compression and 64-channel latent; 32 channels a block (its GroupNorm has 32 groups), the last
    two 128 (it must be divisible by twice the latent channels)."""
    torch.manual_seed(21)
    model = AutoencoderKLHunyuanImage(
        in_channels=3,
        out_channels=3,
        latent_channels=64,
        block_out_channels=(32, 32, 32, 32, 128, 128),
        layers_per_block=1,
        spatial_compression_ratio=32,
        sample_size=64,
        scaling_factor=0.75289,
    )
    _mostly_grey(model.decoder.conv_out)
    return model.eval()


def tiny_svd_vae() -> AutoencoderKLTemporalDecoder:
    """SD's 8x encoder and SVD's temporal decoder, 32 channels a block (the GroupNorms' 32 groups)."""
    torch.manual_seed(22)
    model = AutoencoderKLTemporalDecoder(
        down_block_types=("DownEncoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1
    )
    _mostly_grey(model.decoder.conv_out)
    return model.eval()


def tiny_cosmos_vae() -> AutoencoderKLCosmos:
    """Cosmos 1.0's Haar patching and 8x8x8 compression, 16 latent channels (its statistics' 16 x 16), 8 channels a
    block. Its last projection makes each colour's wavelet coefficients (colour the fastest axis of its 192 channels):
    scaled down so the random pixels stay mostly within -1..1, and the colours mostly shared, as _mostly_grey does."""
    torch.manual_seed(23)
    model = AutoencoderKLCosmos(
        encoder_block_out_channels=(8, 8, 8, 8),
        decode_block_out_channels=(8, 8, 8, 8),
        num_layers=1,
        resolution=64,
    )
    last = model.decoder.conv_out.conv_t
    with torch.no_grad():
        for values in (last.weight, last.bias):
            colours = values.view(-1, 3, *values.shape[1:])
            values.copy_((0.3 * (colours[:, :1] + 0.1 * colours)).view_as(values))
    return model.eval()


def tiny_qwenimage21_vae() -> diffusers.AutoencoderKLQwenImage21:
    """Qwen-Image 2.1's RGBA in and out, 64-channel latent and 16x compression (four downsamplings), 8 channels a
    block."""
    torch.manual_seed(24)
    return diffusers.AutoencoderKLQwenImage21(
        base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1
    ).eval()


def tiny_hunyuanimage21refiner_vae() -> diffusers.AutoencoderKLHunyuanImageRefiner:
    """The refiner's 32-channel latent and 16x compression, narrow blocks (as tiny_hunyuanvideo15_vae)."""
    torch.manual_seed(25)
    model = diffusers.AutoencoderKLHunyuanImageRefiner(
        block_out_channels=(8, 16, 16, 64, 64), layers_per_block=1, latent_channels=32
    )
    _mostly_grey(model.decoder.conv_out.conv)
    return model.eval()


def tiny_allegro_vae() -> diffusers.AutoencoderKLAllegro:
    """Allegro's 8x4 compression and 4-channel latent, 4 channels a block (its tiles are big: 0.4 s a decode, 8
    channels took 1 s), and tiles of 24 frames x 128x128 pixels (sample_size 128: the smallest its fixed tile overlaps
    of 120 and 80 pixels allow, so a 6 x 16 x 16 latent is one tile)."""
    torch.manual_seed(26)
    model = diffusers.AutoencoderKLAllegro(
        block_out_channels=(4, 4, 4, 4), norm_num_groups=2, layers_per_block=1, sample_size=128
    )
    _mostly_grey(model.decoder.conv_out)
    return model.eval()


def tiny_ltx2_vae() -> diffusers.AutoencoderKLLTX2Video:
    """LTX-2's real latent (128 channels, 32x / 8x) and decoder layout, narrow; not timestep-conditioned, as LTX-2's."""
    torch.manual_seed(22)
    model = diffusers.AutoencoderKLLTX2Video(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_block_out_channels=(16, 32, 64),
        decoder_layers_per_block=(1, 1, 1, 1),
        timestep_conditioning=False,
        latent_channels=128,
        decoder_causal=False,
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    )
    _random_stats(model, "latents_mean", "latents_std", seed=22)
    _mostly_grey(model.decoder.conv_out.conv)
    return model.eval()


def tiny_cogview4_vae() -> AutoencoderKL:
    """CogView 4's VAE as its conversion script builds it (16 channels, no quant convs nor mid-block attention)."""
    torch.manual_seed(25)
    return AutoencoderKL(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=1.0,
        shift_factor=0.0,
        **TINY_BLOCKS,
    ).eval()


def tiny_acestep_vae() -> AutoencoderOobleck:
    """ACE-Step 1.5's strides (1920 samples of 48 kHz per latent step) and 64-channel latent, narrow elsewhere."""
    torch.manual_seed(24)
    return AutoencoderOobleck(
        encoder_hidden_size=128,
        downsampling_ratios=[2, 4, 4, 6, 10],
        channel_multiples=[1, 1, 1, 1, 1],
        decoder_channels=8,
        decoder_input_channels=64,
        audio_channels=2,
        sampling_rate=48000,
    ).eval()


class Ltx2Sound:
    """LTX-2's audio VAE and vocoder, saved as a pipeline's folders hold them: the VAE at the root, its vocoder in
    vocoder/ (where the server looks for it beside the VAE)."""

    def __init__(self):
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

        torch.manual_seed(23)
        # 128 base channels: its statistics are per feature of the pipeline's packed tokens, 8 channels x 16 bins
        self.audio_vae = diffusers.AutoencoderKLLTX2Audio(
            base_channels=128,
            output_channels=2,
            ch_mult=(1, 1, 1),
            num_res_blocks=1,
            in_channels=2,
            latent_channels=8,
            norm_type="pixel",
            causality_axis="height",
            mid_block_add_attention=False,
            sample_rate=16000,
            mel_hop_length=160,
            is_causal=True,
            mel_bins=64,
        ).eval()
        _random_stats(self.audio_vae, "latents_mean", "latents_std", seed=23)
        self.vocoder = LTX2Vocoder(  # the real 240x upsampling to 24 kHz, narrow
            in_channels=128,
            hidden_channels=32,
            out_channels=2,
            upsample_kernel_sizes=[16, 15, 8, 4, 4],
            upsample_factors=[6, 5, 2, 2, 2],
            resnet_kernel_sizes=[3],
            resnet_dilations=[[1]],
            output_sampling_rate=24000,
        ).eval()

    def save_pretrained(self, folder: Path) -> None:
        self.audio_vae.save_pretrained(folder)
        self.vocoder.save_pretrained(Path(folder) / "vocoder")


def tiny_taesd(latent_channels: int, seed: int):
    def build() -> AutoencoderTiny:
        torch.manual_seed(seed)
        return AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
            latent_channels=latent_channels,
        ).eval()

    return build


TINY_MODELS = {
    "sd15": tiny_sd_vae,
    "sdxl": tiny_sdxl_vae,
    "flux": tiny_flux_vae,
    "hunyuanvideo": tiny_hunyuan_vae,
    "wan21": tiny_wan_vae,
    "sd3": tiny_sd3_vae,
    "flux2": tiny_flux2_vae,
    "qwenimage": tiny_qwenimage_vae,
    "wan22": tiny_wan22_vae,
    "hunyuanvideo15": tiny_hunyuanvideo15_vae,
    "ltxvideo": tiny_ltxvideo_vae,
    "cogvideox": tiny_cogvideox_vae,
    "sana": tiny_sana_vae,
    "mochi": tiny_mochi_vae,
    "easyanimate": tiny_easyanimate_vae,
    "stableaudio": tiny_stableaudio_vae,
    "hunyuanimage21": tiny_hunyuanimage21_vae,
    "svd": tiny_svd_vae,
    "cosmos": tiny_cosmos_vae,
    "qwenimage21": tiny_qwenimage21_vae,
    "hunyuanimage21refiner": tiny_hunyuanimage21refiner_vae,
    "allegro": tiny_allegro_vae,
    "stableaudio3": tiny_stableaudio3_vae,
    "ltx2": tiny_ltx2_vae,
    "ltx2audio": Ltx2Sound,
    "acestep": tiny_acestep_vae,
    "cogview4": tiny_cogview4_vae,
    "taesd": tiny_taesd(4, 12),
    "taesdxl": tiny_taesd(4, 13),
    "taef1": tiny_taesd(16, 14),
}
MODEL_CLASSES = {
    "sd15": AutoencoderKL,
    "sdxl": AutoencoderKL,
    "flux": AutoencoderKL,
    "hunyuanvideo": AutoencoderKLHunyuanVideo,
    "wan21": AutoencoderKLWan,
    "sd3": AutoencoderKL,
    "flux2": AutoencoderKLFlux2,
    "qwenimage": AutoencoderKLQwenImage,
    "wan22": AutoencoderKLWan,
    "hunyuanvideo15": AutoencoderKLHunyuanVideo15,
    "ltxvideo": AutoencoderKLLTXVideo,
    "cogvideox": AutoencoderKLCogVideoX,
    "sana": AutoencoderDC,
    "mochi": AutoencoderKLMochi,
    "easyanimate": AutoencoderKLMagvit,
    "stableaudio": AutoencoderOobleck,
    "hunyuanimage21": AutoencoderKLHunyuanImage,
    "svd": AutoencoderKLTemporalDecoder,
    "cosmos": AutoencoderKLCosmos,
    "qwenimage21": getattr(diffusers, "AutoencoderKLQwenImage21", None),
    "hunyuanimage21refiner": diffusers.AutoencoderKLHunyuanImageRefiner,
    "allegro": diffusers.AutoencoderKLAllegro,
    "stableaudio3": getattr(diffusers, "AutoencoderSAME", None),
    "ltx2": getattr(diffusers, "AutoencoderKLLTX2Video", None),
    "ltx2audio": getattr(diffusers, "AutoencoderKLLTX2Audio", None),
    "acestep": AutoencoderOobleck,
    "cogview4": AutoencoderKL,
    "taesd": AutoencoderTiny,
    "taesdxl": AutoencoderTiny,
    "taef1": AutoencoderTiny,
}
# The families the installed diffusers cannot build (the toolkit stack's 0.37.1 predates AutoencoderSAME and
# AutoencoderKLQwenImage21) have no tiny model here, so no fixture builds them and no test takes them.
UNBUILDABLE = {name for name in TINY_MODELS if unsupported(load_family(name))}
for name in UNBUILDABLE:
    del TINY_MODELS[name], MODEL_CLASSES[name]
NEW_FAMILIES = (
    "sd3",
    "flux2",
    "qwenimage",
    "wan22",
    "hunyuanvideo15",
    "ltxvideo",
    "cogvideox",
    "taesd",
    "taesdxl",
    "taef1",
    "sana",
    "mochi",
    "easyanimate",
    "hunyuanimage21",
    "svd",
    "cosmos",
    "qwenimage21",
    "hunyuanimage21refiner",
    "allegro",
    "ltx2",
    "cogview4",
)
NEW_FAMILIES = tuple(name for name in NEW_FAMILIES if name in TINY_MODELS)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {name: root / name for name in TINY_MODELS}
    for name, build in TINY_MODELS.items():
        build().save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="session")
def reference(model_dirs) -> dict[str, torch.nn.Module]:
    """The same weights loaded in-process by diffusers: what the service must match."""
    return {name: MODEL_CLASSES[name].from_pretrained(path).eval() for name, path in model_dirs.items()}


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


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made by openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Under pytest-xdist, each worker and the servers it starts share the cores with the other workers: torch's threads
# are the cores' share (one each on two cores), since more threads than cores make every torch op spin and wait (the
# halo-tiling tests ran 3.5x slower so).
# REMOTE_VAE_TEST_THREADS sets it where another run shares the cores too (.ci/run).
CPU_THREADS = int(
    os.environ.get("REMOTE_VAE_TEST_THREADS")
    or max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
)
torch.set_num_threads(CPU_THREADS)


def offline_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("REMOTE_VAE_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(CPU_THREADS))
    env.update(extra)
    return env


FORKER = ServerForker(ROOT, offline_env)


def pytest_unconfigure(config):
    FORKER.close()


class LiveServer:
    """`python -m remote_vae serve ...` on 127.0.0.1, waited on until healthy.

    `launcher` replaces `-m remote_vae` (tests/faulty_serve.py injects faults);
    `verify` is the CA file for an HTTPS server.
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        launcher: list[str] | None = None,
        verify: str | None = None,
        startup_seconds: float = STARTUP_SECONDS,
        device: str = "cpu",
        open_files: int | None = None,
    ):
        self.startup_seconds = startup_seconds
        self.port = free_port()
        self.url = f"{'https' if verify else 'http'}://127.0.0.1:{self.port}"
        self.verify = verify or True
        self.log_path = log_path
        command = [
            sys.executable,
            *(launcher or ["-m", "remote_vae"]),
            "serve",
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            device,
        ]
        self.log = open(log_path, "wb")
        # open_files: the server's RLIMIT_NOFILE, soft and hard (as `ulimit -n` sets it), to test the open-file limit
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))) if open_files else None
        self.process = FORKER.start(command, env, log_path, open_files) or subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=limit
        )
        self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if requests.get(self.url + "/health", timeout=2, verify=self.verify).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {self.startup_seconds}s:\n{self.log_path.read_text()}")

    def healthy(self) -> bool:
        return (
            self.process.poll() is None
            and requests.get(self.url + "/health", timeout=10, verify=self.verify).status_code == 200
        )

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """/metrics as {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(self.url + "/metrics", timeout=10, verify=self.verify).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def memory(self) -> dict[str, float]:
        """The server process's resident set now and its peak since the last reset_peak(), in MiB (Linux /proc)."""
        fields = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
            if ":" in line
        )
        return {"resident": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024}

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # resets VmHWM to the resident set now

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
        "sd15",
        "flux",
        "--model",
        f"sd15={model_dirs['sd15']}",
        "--model",
        f"flux={model_dirs['flux']}",
        "--max-pixels",
        str(MAX_PIXELS),
        "--max-body-bytes",
        str(MAX_BODY_BYTES),
    ]
    server = LiveServer(args, offline_env(), tmp_path_factory.mktemp("logs") / "multi.log")
    yield server
    server.stop()


# Tiles small enough for tiny test videos to be split into several.
TEST_TILING = {
    "hunyuanvideo": dict(
        tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24, tile_sample_stride_width=24
    ),
    "wan21": dict(
        tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24, tile_sample_stride_width=24
    ),
    "ltxvideo": dict(
        tile_sample_min_height=256,
        tile_sample_min_width=256,
        tile_sample_stride_height=192,
        tile_sample_stride_width=192,
    ),
}
MAX_VIDEO_PIXELS = 17 * 64 * 64


@pytest.fixture(scope="session")
def video_server(model_dirs, tmp_path_factory):
    """hunyuanvideo and wan21, plus each (and ltxvideo) as a '-tiled' family (a config file) that always tiles."""
    configs = tmp_path_factory.mktemp("configs")
    untiled = ["hunyuanvideo", "wan21"]
    # Exact tiling in several bands at these sizes
    names, options = (
        list(untiled),
        [
            "--max-video-pixels",
            str(MAX_VIDEO_PIXELS),
            "--max-body-bytes",
            str(MAX_BODY_BYTES),
            "--tile-band-pixels",
            "20000",
        ],
    )
    for name, tiling in TEST_TILING.items():
        family = json.loads((ROOT / "configs" / f"{name}.json").read_text())
        path = configs / f"{name}-tiled.json"
        path.write_text(
            json.dumps({**family, "name": f"{name}-tiled", "tile_above_pixels": 0, "tiling_options": tiling})
        )
        names.append(str(path))
        options += ["--model", f"{name}-tiled={model_dirs[name]}"]
    options += [option for name in untiled for option in ("--model", f"{name}={model_dirs[name]}")]
    args = names + options
    server = LiveServer(args, offline_env(), tmp_path_factory.mktemp("logs") / "video.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def families_server(model_dirs, tmp_path_factory):
    """Every family added for diffusers' current VAEs on one server, each under /<family>/."""
    sounds = [load_family(name).sound for name in NEW_FAMILIES if load_family(name).sound]  # served beside theirs
    args = list(NEW_FAMILIES) + [
        option for name in (*NEW_FAMILIES, *sounds) for option in ("--model", f"{name}={model_dirs[name]}")
    ]
    server = LiveServer(args, offline_env(), tmp_path_factory.mktemp("logs") / "families.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def every_family_server(model_dirs, tmp_path_factory):
    """Every shipped family on one server, each under /<family>/ (the drop-in VAE's and the ComfyUI nodes' tests)."""
    names = [name for name in available_families() if name in model_dirs]
    weights = [option for name in names for option in ("--model", f"{name}={model_dirs[name]}")]
    server = LiveServer([*names, *weights], offline_env(), tmp_path_factory.mktemp("logs") / "every_family.log")
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


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a few KB of compressed zeros after it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(1 << 20), 9))
        + chunk(b"IEND", b"")
    )


def tensor_of(response: requests.Response) -> torch.Tensor:
    """A 200 tensor reply (raw bytes with shape and dtype headers) as a tensor."""
    assert response.status_code == 200, response.text
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8}[
        response.headers["dtype"]
    ]
    return torch.frombuffer(bytearray(response.content), dtype=dtype).reshape(json.loads(response.headers["shape"]))


def seeded(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def in_parallel(count: int, call, stagger: float = 0.05) -> list:
    """call(index) for each index in its own thread, started `stagger` seconds apart (so they arrive in order)."""
    results = [None] * count

    def run(index):
        results[index] = call(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
        time.sleep(stagger)
    for thread in threads:
        thread.join(timeout=120)
    return results


def wait_until(condition, seconds: float = 10, what=lambda: "condition not reached") -> None:
    """Polls `condition` for up to `seconds`; `what()` is the failure's message (say, the value it last saw)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)


# The real server with faults injected into the tiny decoders (tests/faulty_serve.py).
FAULTY_LAUNCHER = [str(ROOT / "tests" / "faulty_serve.py")]


@pytest.fixture(scope="module")
def faults_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text("{}")
    return path


@pytest.fixture
def set_faults(faults_file):
    """set_faults(delay=..., oom_above=..., fail_above=...) changes a running faulty server's faults; none after the
    test."""

    def write(**faults):
        faults_file.write_text(json.dumps(faults))

    yield write
    faults_file.write_text("{}")


# The heaviest files (the GPU suite and Ray each keep both cores busy for a minute) share one worker, one after the
# other, in this order, so neither slows the other past its budget; every other file goes to whichever worker is free,
# as --dist=loadfile does, the files with the most tests first. test_attacks.py (exclusive: the others wait while it
# runs) comes right after the GPU suite, so its tests never wait for the suite's 100-s tiny run, nor for Ray's tests,
# to end: where they did, both cores idled 28 s and the attacks took 76 s, against 51 s now. test_compile.py comes last:
# it compiles the GPU suite's graph, which it finds in torch's cache.
HEAVY_FILES = (
    "tests/deploy/test_gpu_suite.py",
    "tests/live/test_attacks.py",
    "tests/deploy/test_ray_serve.py",
    "tests/live/test_compile.py",
)


def pytest_collection_modifyitems(items):
    """The heavy files first, in their order: on their worker they take longest, so they start at once instead of
    ending the run; then the others, the most tests first (what xdist's own reordering does, which
    pytest_xdist_make_scheduler turns off so that this order holds)."""
    counts = collections.Counter(item.nodeid.split("::")[0] for item in items)

    def rank(item) -> tuple[int, int]:
        path = item.nodeid.split("::")[0]
        return (HEAVY_FILES.index(path), 0) if path in HEAVY_FILES else (len(HEAVY_FILES), -counts[path])

    items.sort(key=rank)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test marked `exclusive` (memory peaks and deadlines calibrated on a quiet machine) runs, fixtures and all,
    while no other xdist worker runs a test: the others wait at their next one. Two file locks make a turnstile, so a
    stream of ordinary tests cannot starve it: every test passes the gate; an exclusive one holds it while it waits
    for the running ones to end, then runs alone."""
    folder = item.config.workerinput.get("remote_vae_locks") if hasattr(item.config, "workerinput") else None
    if folder is None:  # one process: nothing runs beside it
        yield
        return
    exclusive = item.get_closest_marker("exclusive") is not None
    with open(Path(folder) / "gate", "a") as gate, open(Path(folder) / "running", "a") as running:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(running, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(running, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """The controller names each worker the folder of the locks above (one per run)."""
    node.workerinput["remote_vae_locks"] = str(_lock_folder(node.config))


def _lock_folder(config) -> Path:
    if shared := os.environ.get("REMOTE_VAE_TEST_LOCKS"):  # shared with another run on the same cores (.ci/run)
        Path(shared).mkdir(parents=True, exist_ok=True)
        return Path(shared)
    if not hasattr(config, "_remote_vae_locks"):
        config._remote_vae_locks = Path(tempfile.mkdtemp(prefix="remote-vae-test-locks-"))
        config.add_cleanup(lambda: shutil.rmtree(config._remote_vae_locks, ignore_errors=True))
    return config._remote_vae_locks


@pytest.hookimpl(optionalhook=True)  # only with pytest-xdist (the GPU image runs without it)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # the order pytest_collection_modifyitems gives

    class HeavyFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "heavy" if scope in HEAVY_FILES else scope

    return HeavyFilesTogether(config, log)
