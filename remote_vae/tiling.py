"""Exact tiled decode and encode: the untiled result, to float rounding, with bounded device memory.

diffusers' `enable_tiling()` decodes overlapping tiles independently and blends
their seams; every tile's GroupNorm then sees its own statistics, so tones shift
from tile to tile. Here the network runs layer by layer instead, each layer over
bands of rows:

- a convolution (or an up- or downsampler) runs per band, its input taken with a
  halo of rows wide enough for its receptive field, and the halo's rows cropped
  from its output, so every output row is computed from exactly the inputs the
  untiled layer uses;
- every GroupNorm first gathers its statistics over all bands (sums in float64),
  then normalises each band with those global statistics;
- the mid block (with its attention) runs whole, at latent resolution, where an
  8192² image is a 1024² latent.

Whole activations live in `store` (the device while they fit, else host
memory); the device holds one band's work at a time. This applies to diffusers'
2-D `Encoder` / `Decoder` (AutoencoderKL and the families built on it: SD1.5,
SDXL, SD3, Flux, Flux.2); `ExactTiler.supports` checks the structure, not a name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn


class ExactTiler:
    """Runs a model's 2-D encoder and decoder band by band, exactly (see the module's docstring)."""

    def __init__(self, model: nn.Module, band_pixels: int, store: torch.device | None = None):
        self.model = model
        self.band_pixels = max(1, band_pixels)  # output pixels per band: what bounds the device's work
        self.device = next(model.parameters()).device
        self.store = store or self.device

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether the model's encoder and decoder are built only of the pieces this tiler runs exactly."""
        decoder, encoder = getattr(model, "decoder", None), getattr(model, "encoder", None)
        if type(decoder) is not Decoder or type(encoder) is not Encoder:
            return False
        if not isinstance(decoder.conv_norm_out, nn.GroupNorm) or not isinstance(encoder.conv_norm_out, nn.GroupNorm):
            return False  # a spatial norm (MoVQ) conditions on the latent
        blocks = list(decoder.up_blocks) + list(encoder.down_blocks)
        for block in blocks:
            for resnet in block.resnets:
                if type(resnet) is not ResnetBlock2D or resnet.upsample is not None or resnet.downsample is not None:
                    return False
                if not (isinstance(resnet.norm1, nn.GroupNorm) and isinstance(resnet.norm2, nn.GroupNorm)):
                    return False
            for sampler in list(getattr(block, "upsamplers", None) or []) + list(getattr(block, "downsamplers", None) or []):
                if type(sampler) not in (Upsample2D, Downsample2D) or sampler.norm is not None or not sampler.use_conv:
                    return False
                if type(sampler) is Upsample2D and (sampler.use_conv_transpose or not sampler.interpolate):
                    return False
        return True

    # -- the two networks ------------------------------------------------------------

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] latents (on the device) -> the decoder's output [B, 3, H, W], in `store`."""
        model, decoder = self.model, self.model.decoder
        if getattr(model, "post_quant_conv", None) is not None:
            latents = model.post_quant_conv(latents)
        sample = decoder.mid_block(decoder.conv_in(latents), None)  # latent resolution: whole
        sample = sample.to(self.store)
        for block in decoder.up_blocks:
            for resnet in block.resnets:
                sample = self.resnet(resnet, sample)
            for upsampler in block.upsamplers or []:
                sample = self.banded(upsampler, sample, scale=2, halo=1)
        return self.norm_act_conv(decoder.conv_norm_out, decoder.conv_act, decoder.conv_out, sample)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels -> the encoder's moments (mean and log-variance), on the device."""
        model, encoder = self.model, self.model.encoder
        sample = self.banded(encoder.conv_in, images.to(self.store), scale=1, halo=_halo(encoder.conv_in))
        for block in encoder.down_blocks:
            for resnet in block.resnets:
                sample = self.resnet(resnet, sample)
            for downsampler in block.downsamplers or []:
                # Output row j reads input rows 2j..2j+2; bands start on even rows.
                sample = self.banded(downsampler, sample, scale=0.5, halo=2)
        sample = encoder.mid_block(sample.to(self.device))  # latent resolution: whole
        moments = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(sample)))
        if getattr(model, "quant_conv", None) is not None:
            moments = model.quant_conv(moments)
        return moments

    # -- layers ----------------------------------------------------------------------

    def resnet(self, resnet: ResnetBlock2D, x: torch.Tensor) -> torch.Tensor:
        """ResnetBlock2D.forward (no time embedding), band by band with global GroupNorm statistics."""
        hidden = self.norm_act_conv(resnet.norm1, resnet.nonlinearity, resnet.conv1, x)
        shortcut = resnet.conv_shortcut or (lambda rows: rows)

        def add_input(rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            return (shortcut(x[..., start:stop, :].to(self.device)) + rows) / resnet.output_scale_factor

        # dropout is the identity in eval mode. Without a shortcut conv the output has x's shape and
        # overwrites it band by band: a band reads only its own rows of x, so one whole activation less is held.
        into = x if resnet.conv_shortcut is None else None
        return self.norm_act_conv(resnet.norm2, resnet.nonlinearity, resnet.conv2, hidden, then=add_input, into=into)

    def norm_act_conv(self, norm: nn.GroupNorm, act: Callable, conv: nn.Conv2d, x: torch.Tensor, then=None, into=None) -> torch.Tensor:
        """conv(act(norm(x))), the norm's statistics gathered over all of x first."""
        mean, rstd = self.group_statistics(norm, x)
        return self.banded(lambda rows: conv(act(group_norm(norm, rows, mean, rstd))), x, scale=1, halo=_halo(conv), then=then, into=into)

    def group_statistics(self, norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample and group: the mean and 1/sqrt(var + eps) over the whole of x, summed band by band in float64."""
        batch, groups = x.shape[0], norm.num_groups
        total = torch.zeros(batch, groups, dtype=torch.float64, device=self.device)
        squares = torch.zeros_like(total)
        for start, stop in self.bands(x.shape[-2], x.shape[-1]):
            rows = x[..., start:stop, :].to(self.device, torch.float64).reshape(batch, groups, -1)
            total += rows.sum(-1)
            squares += rows.square().sum(-1)
        count = x[0, : x.shape[1] // groups].numel()
        mean = total / count
        variance = (squares / count - mean.square()).clamp_min(0)
        return mean.float(), torch.rsqrt(variance + norm.eps).float()

    def bands(self, height: int, width: int, step: int = 1) -> list[tuple[int, int]]:
        """Row ranges of about band_pixels each (a multiple of `step` rows) covering `height` rows."""
        rows = max(step, self.band_pixels // max(1, width) // step * step)
        return [(start, min(height, start + rows)) for start in range(0, height, rows)]

    def banded(self, layer: Callable, x: torch.Tensor, scale: float, halo: int, then=None, into: torch.Tensor | None = None) -> torch.Tensor:
        """layer(x) computed band by band: each band's input carries `halo` rows either side, cropped from its output.

        `scale` is output rows per input row (2 upsamples, 0.5 downsamples); `then(rows, start, stop)`
        finishes each band of output (a residual). The result is assembled in `store`, or in `into`.
        """
        height, width = x.shape[-2], x.shape[-1]
        out_height, out_width = int(height * scale), int(width * scale)
        align = 2 if scale < 1 else 1
        out = into
        for start, stop in self.bands(out_height, out_width, step=2 if scale > 1 else 1):
            first = max(0, math.floor(start / scale) - halo) // align * align
            last = min(height, math.ceil(stop / scale) + halo)
            rows = layer(x[..., first:last, :].to(self.device))
            offset = int(first * scale)
            rows = rows[..., start - offset : stop - offset, :]
            if then is not None:
                rows = then(rows, start, stop)
            if out is None:
                out = torch.empty(x.shape[0], rows.shape[1], out_height, out_width, dtype=rows.dtype, device=self.store)
            out[..., start:stop, :] = rows
        return out


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """nn.GroupNorm with given statistics ([B, groups]), computed in float32 as torch's kernel does."""
    batch, channels = x.shape[:2]
    grouped = x.float().reshape(batch, norm.num_groups, -1)
    normalised = ((grouped - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    if norm.affine:
        shape = (1, channels) + (1,) * (x.ndim - 2)
        normalised = normalised * norm.weight.float().view(shape) + norm.bias.float().view(shape)
    return normalised.to(x.dtype)


def _halo(conv: nn.Conv2d) -> int:
    """Rows a convolution reads either side of an output row."""
    return conv.kernel_size[0] // 2 * conv.dilation[0]
