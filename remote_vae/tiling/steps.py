"""The GroupNorm tiler's program: the steps a band of rows goes through (row-local layers, GroupNorms with whole-image
statistics, residuals), built from diffusers' Encoder / Decoder and HunyuanVideo's causal 3-D ones.

The diffusers classes are imported with this module, which tiling.tiler_for imports when a model is loaded; a diffusers
without HunyuanVideo's module loses that architecture's exact path only.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn


def _classes(module: str, *names: str) -> tuple[type, ...]:
    """These classes of a diffusers module, or none where the installed diffusers lacks one: its models then have no
    exact path here."""
    try:
        found = importlib.import_module(module)
        return tuple(getattr(found, name) for name in names)
    except (ImportError, AttributeError):
        return ()


# HunyuanVideo's causal 3-D decoder and encoder, built of the same pieces in 3-D (imported here, not by the server:
# this module is imported when a model is first tiled).
HUNYUAN_VIDEO = _classes(
    "diffusers.models.autoencoders.autoencoder_kl_hunyuan_video",
    "HunyuanVideoDecoder3D",
    "HunyuanVideoEncoder3D",
    "HunyuanVideoResnetBlockCausal3D",
    "HunyuanVideoUpsampleCausal3D",
    "HunyuanVideoDownsampleCausal3D",
)


PAIRS = ((Decoder, Encoder),) + ((HUNYUAN_VIDEO[:2],) if HUNYUAN_VIDEO else ())


RESNETS = (ResnetBlock2D,) + HUNYUAN_VIDEO[2:3]


UPSAMPLERS = (Upsample2D,) + HUNYUAN_VIDEO[3:4]


DOWNSAMPLERS = (Downsample2D,) + HUNYUAN_VIDEO[4:5]


@dataclass
class Layer:
    """A row-local layer: output rows [s, e) read input rows [s/scale - halo, e/scale + halo)."""

    run: Callable[[torch.Tensor], torch.Tensor]
    halo: int
    scale: float = 1.0  # output rows per input row
    align: int = 1  # slices start on a multiple of this many input rows (a stride-2 sampler's phase)


@dataclass
class Norm:
    """GroupNorm with statistics over the whole activation, then the activation function."""

    norm: nn.GroupNorm
    act: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Save:
    """Keeps the current rows as `name`, for a residual."""

    name: str


@dataclass
class Add:
    """(shortcut(saved `name`) + current) / divide: a resnet's residual."""

    name: str
    shortcut: Callable[[torch.Tensor], torch.Tensor] | None
    divide: float = 1.0


Step = Layer | Norm | Save | Add


def resnet_steps(resnet: nn.Module, name: str) -> list[Step]:
    """ResnetBlock2D (no time embedding) or HunyuanVideo's causal resnet; dropout is the identity in eval mode."""
    return [
        Save(name),
        Norm(resnet.norm1, resnet.nonlinearity),
        _conv(resnet.conv1),
        Norm(resnet.norm2, resnet.nonlinearity),
        _conv(resnet.conv2),
        Add(name, resnet.conv_shortcut, getattr(resnet, "output_scale_factor", 1.0)),
    ]


def _conv(conv: nn.Module) -> Layer:
    return Layer(conv, _halo(conv))


def _sampler(sampler: nn.Module) -> Layer:
    """An up- or downsampler as a layer: nearest 2x then a conv, or a strided conv (bands start on even rows)."""
    if isinstance(sampler, UPSAMPLERS):
        factor = int(getattr(sampler, "upsample_factor", (2, 2))[-2])
        return Layer(sampler, halo=1, scale=factor)
    stride = first_conv(sampler).stride[-2]
    return Layer(sampler, halo=2, scale=1 / stride, align=stride)


def decoder_tail(decoder: nn.Module) -> list[Step]:
    """The decoder after its mid block: up blocks, then norm, act and conv out."""
    steps: list[Step] = []
    for b, block in enumerate(decoder.up_blocks):
        for r, resnet in enumerate(block.resnets):
            steps += resnet_steps(resnet, f"up{b}.{r}")
        steps += [_sampler(sampler) for sampler in block.upsamplers or []]
    return steps + [Norm(decoder.conv_norm_out, decoder.conv_act), _conv(decoder.conv_out)]


def encoder_head(encoder: nn.Module) -> list[Step]:
    """The encoder before its mid block: conv in, then down blocks."""
    steps: list[Step] = [_conv(encoder.conv_in)]
    for b, block in enumerate(encoder.down_blocks):
        for r, resnet in enumerate(block.resnets):
            steps += resnet_steps(resnet, f"down{b}.{r}")
        steps += [_sampler(sampler) for sampler in block.downsamplers or []]
    return steps


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """nn.GroupNorm with given statistics ([B, groups]), computed in float32 as torch's kernel does."""
    batch, channels = x.shape[:2]
    grouped = x.float().reshape(batch, norm.num_groups, -1)
    normalised = ((grouped - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    if norm.affine:
        shape = (1, channels) + (1,) * (x.ndim - 2)
        normalised = normalised * norm.weight.float().view(shape) + norm.bias.float().view(shape)
    return normalised.to(x.dtype)


def first_conv(module: nn.Module) -> nn.Module:
    """The first convolution inside module (2-D or 3-D)."""
    return next(m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))


def _halo(module: nn.Module) -> int:
    """Rows a convolution reads either side of an output row."""
    conv = first_conv(module)
    return conv.kernel_size[-2] // 2 * conv.dilation[-2]


def layer_heights(steps: list[Step], height: int) -> list[int]:
    """The height of the activation before each step, and after the last."""
    heights = [height]
    for step in steps:
        heights.append(int(heights[-1] * step.scale) if isinstance(step, Layer) else heights[-1])
    return heights


def rows_needed(steps: list[Step], start: int, stop: int, height: int) -> tuple[int, int]:
    """The input rows that output rows start..stop of steps read (halos included, clipped to the image).

    The first is a multiple of every strided sampler's phase, carried back to the input,
    so that each one's slice starts where the whole image's rows do.
    """
    heights = layer_heights(steps, height)
    for step, rows_in in zip(reversed(steps), reversed(heights[:-1]), strict=True):
        if isinstance(step, Layer):
            start = max(0, math.floor(start / step.scale) - step.halo)
            stop = min(rows_in, math.ceil(stop / step.scale) + step.halo)
    align, scale = 1, 1.0
    for step in steps:
        if isinstance(step, Layer):
            align, scale = max(align, round(step.align / scale)), scale * step.scale
    return start // align * align, stop


def accumulate(sums, rows: torch.Tensor, groups: int):
    """Running float64 (sum, sum of squares, count) per sample and group."""
    grouped = rows.to(torch.float64).reshape(rows.shape[0], groups, -1)
    total, squares, count = grouped.sum(-1), grouped.square().sum(-1), grouped.shape[-1]
    return (total, squares, count) if sums is None else (sums[0] + total, sums[1] + squares, sums[2] + count)


def finish_statistics(sums, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/sqrt(var + eps)) from the running sums."""
    total, squares, count = sums
    mean = total / count
    variance = (squares / count - mean.square()).clamp_min(0)
    return mean.float(), torch.rsqrt(variance + norm.eps).float()


def plain_attention(mid: nn.Module) -> bool:
    """Whether a mid block is diffusers' UNetMidBlock2D with plain 2-D self-attention, which GroupNormTiler.attention
    runs by query bands."""
    if type(mid) is not UNetMidBlock2D or any(type(resnet) is not ResnetBlock2D for resnet in mid.resnets):
        return False
    for attention in mid.attentions:
        if attention is not None and (
            type(attention.processor) is not AttnProcessor2_0
            or attention.spatial_norm is not None
            or attention.norm_q is not None
            or attention.norm_k is not None
            or attention.is_cross_attention
        ):
            return False
    return True
