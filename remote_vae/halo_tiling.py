"""Exact spatial tiling for VAEs whose full-resolution layers are all row-local: the untiled result, band by band.

Wan 2.1 / 2.2, Qwen-Image and HunyuanVideo 1.5 normalise with an RMS norm over
the channels of each pixel, not with GroupNorm over the image, so outside their
mid block (attention over a whole frame or clip) nothing needs the whole image:
a band of latent rows with a halo as wide as the receptive field gives exactly
the untiled output for the band's own rows. So the decoder runs conv in and the
mid block whole, at latent resolution, then the up blocks and head band by band;
the encoder runs conv in and the down blocks band by band, then the mid block
and head whole. The halo is measured on the model (every convolution's reach at
its resolution, summed), not assumed.

Wan and Qwen-Image decode a frame per call and encode a few frames per call,
each causal convolution reading the last frames of its input from a cache. So
the model's own clip loop (`_decode` / `_encode`) runs once per band, a pass,
and in each of its calls the tiler's decoder or encoder forward does that
band's rows with the model's own cache, which therefore holds one band's rows
(and halo) and starts afresh with every pass, as diffusers' blended tiling
loops tiles outside frames. What runs whole is done once: the decoder's mid
block outputs, per call, are kept from the first pass for the others; the
encoder's banded outputs, per call, are gathered over the passes, and the last
pass runs the mid block and head on them, with the model's cache, in order.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders import autoencoder_kl_hunyuanvideo15 as hv15
from diffusers.models.autoencoders import autoencoder_kl_qwenimage as qwen
from diffusers.models.autoencoders import autoencoder_kl_wan as wan
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn

# Frames out per frame in, at most, for any current video VAE: sizes bands, never results.
TEMPORAL_BOUND = 4


# -- what runs whole and what runs per band, per architecture ---------------------------


def _cached_conv(conv: nn.Module, x: torch.Tensor, cache: list | None, index: list[int]) -> torch.Tensor:
    """A causal conv through its cache entry (the last two frames of its input), as Wan's conv in / conv out run."""
    if cache is None:
        return conv(x)
    i = index[0]
    held = x[:, :, -wan.CACHE_T:].clone()
    if held.shape[2] < wan.CACHE_T and cache[i] is not None:
        held = torch.cat([cache[i][:, :, -1:].to(held.device), held], dim=2)
    x = conv(x, cache[i])
    cache[i] = held
    index[0] += 1
    return x


def _wan_decoder_whole(decoder, x, cache, index):
    return decoder.mid_block(_cached_conv(decoder.conv_in, x, cache, index), cache, index)


def _wan_decoder_banded(decoder, x, cache, index, first_chunk):
    for block in decoder.up_blocks:
        chunk = {"first_chunk": first_chunk} if "first_chunk" in inspect.signature(block.forward).parameters else {}
        x = block(x, cache, index, **chunk)
    return _cached_conv(decoder.conv_out, decoder.nonlinearity(decoder.norm_out(x)), cache, index)


def _wan_encoder_banded(encoder, x, cache, index):
    x = _cached_conv(encoder.conv_in, x, cache, index)
    for layer in encoder.down_blocks:
        x = layer(x, cache, index)
    return x


def _wan_encoder_whole(encoder, x, cache, index):
    x = encoder.nonlinearity(encoder.norm_out(encoder.mid_block(x, cache, index)))
    return _cached_conv(encoder.conv_out, x, cache, index)


def _hv15_decoder_whole(decoder, x, cache, index):
    return decoder.mid_block(decoder.conv_in(x) + x.repeat_interleave(repeats=decoder.repeat, dim=1))


def _hv15_decoder_banded(decoder, x, cache, index, first_chunk):
    for block in decoder.up_blocks:
        x = block(x)
    return decoder.conv_out(decoder.conv_act(decoder.norm_out(x)))


def _hv15_encoder_banded(encoder, x, cache, index):
    x = encoder.conv_in(x)
    for block in encoder.down_blocks:
        x = block(x)
    return x


def _hv15_encoder_whole(encoder, x, cache, index):
    x = encoder.mid_block(x)
    batch, _, frames, height, width = x.shape
    shortcut = x.view(batch, -1, encoder.group_size, frames, height, width).mean(dim=2)
    return encoder.conv_out(encoder.conv_act(encoder.norm_out(x))) + shortcut


@dataclass(frozen=True)
class Architecture:
    """An encoder/decoder pair split at the mid block, and the module types allowed in the banded parts."""

    decoder: type
    encoder: type
    decoder_whole: Callable
    decoder_banded: Callable
    encoder_banded: Callable
    encoder_whole: Callable
    row_local: tuple[type, ...]  # every module type in the banded parts: none looks beyond its halo

    def decoder_banded_modules(self, decoder: nn.Module) -> list[nn.Module]:
        return [decoder.up_blocks, decoder.norm_out, decoder.conv_out]

    def encoder_banded_modules(self, encoder: nn.Module) -> list[nn.Module]:
        return [encoder.conv_in, encoder.down_blocks]


_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.Identity, nn.Dropout, nn.SiLU, nn.ZeroPad2d, nn.Conv2d, nn.Conv3d)
ARCHITECTURES = (
    Architecture(wan.WanDecoder3d, wan.WanEncoder3d, _wan_decoder_whole, _wan_decoder_banded, _wan_encoder_banded, _wan_encoder_whole,
                 _CONTAINERS + (wan.WanCausalConv3d, wan.WanRMS_norm, wan.WanUpsample, wan.WanResample, wan.WanResidualBlock,
                                wan.WanUpBlock, wan.WanResidualUpBlock, wan.WanResidualDownBlock, wan.AvgDown3D, wan.DupUp3D)),
    Architecture(qwen.QwenImageDecoder3d, qwen.QwenImageEncoder3d, _wan_decoder_whole, _wan_decoder_banded, _wan_encoder_banded,
                 _wan_encoder_whole,
                 _CONTAINERS + (qwen.QwenImageCausalConv3d, qwen.QwenImageRMS_norm, qwen.QwenImageUpsample, qwen.QwenImageResample,
                                qwen.QwenImageResidualBlock, qwen.QwenImageUpBlock)),
    Architecture(hv15.HunyuanVideo15Decoder3D, hv15.HunyuanVideo15Encoder3D, _hv15_decoder_whole, _hv15_decoder_banded,
                 _hv15_encoder_banded, _hv15_encoder_whole,
                 _CONTAINERS + (hv15.HunyuanVideo15CausalConv3d, hv15.HunyuanVideo15RMS_norm, hv15.HunyuanVideo15Upsample,
                                hv15.HunyuanVideo15Downsample, hv15.HunyuanVideo15ResnetBlock, hv15.HunyuanVideo15UpBlock3D,
                                hv15.HunyuanVideo15DownBlock3D)),
)


def architecture_of(model: nn.Module) -> Architecture | None:
    """The model's split, if its encoder and decoder are of a known pair and their banded parts are row-local only."""
    decoder, encoder = getattr(model, "decoder", None), getattr(model, "encoder", None)
    for arch in ARCHITECTURES:
        if type(decoder) is arch.decoder and type(encoder) is arch.encoder:
            banded = arch.decoder_banded_modules(decoder) + arch.encoder_banded_modules(encoder)
            if all(type(module) in arch.row_local for part in banded for module in part.modules()):
                return arch
    return None


# -- the halo: how many latent rows beyond a band its output rows read ------------------


@dataclass(frozen=True)
class Reach:
    decoder_halo: int  # latent rows each side of a decoded band
    encoder_halo: int  # latent rows each side of an encoded band
    decoder_scale: int  # output rows per latent row
    encoder_scale: int  # input rows per latent row


_REACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reach_of(model: nn.Module, arch: Architecture) -> Reach:
    """Each part's halo, from one tiny run of it recording every convolution's kernel, stride and resolution."""
    if model not in _REACHES:
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        decoder, encoder = model.decoder, model.encoder
        latent_channels = _first_conv(decoder.conv_in).in_channels
        with torch.inference_mode():
            middle = arch.decoder_whole(decoder, torch.zeros(1, latent_channels, 1, 2, 2, dtype=dtype, device=device), *_fresh(decoder))
            decoder_halo, out_rows = _halo(arch.decoder_banded_modules(decoder), 2,
                                           lambda: arch.decoder_banded(decoder, middle, *_fresh(decoder), True))
            encoder_in = torch.zeros(1, _first_conv(encoder.conv_in).in_channels, 1, 64, 64, dtype=dtype, device=device)
            encoder_halo, latent_rows = _halo(arch.encoder_banded_modules(encoder), None,
                                              lambda: arch.encoder_banded(encoder, encoder_in, *_fresh(encoder)))
        _REACHES[model] = Reach(decoder_halo, encoder_halo, out_rows // 2, 64 // latent_rows)
    return _REACHES[model]


def _fresh(part: nn.Module) -> tuple[list, list[int]]:
    """An empty cache (enough entries for every conv) and index, for a run that must not touch the model's own."""
    return [None] * sum(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in part.modules()), [0]


def _first_conv(module: nn.Module) -> nn.Module:
    return next(m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))


def _halo(modules: list[nn.Module], latent_rows: int | None, run: Callable[[], torch.Tensor]) -> tuple[int, int]:
    """(halo in latent rows, output rows) of run(): each conv reaches half its kernel each side (its whole kernel when
    strided, where padding may be one-sided), divided by its input's rows per latent row. latent_rows None: the output's."""
    seen: list[tuple[int, int, int]] = []  # (kernel rows spanned, stride, rows at its resolution: output rows times stride,
    # as its input may come padded)

    def record(conv: nn.Module, args, out: torch.Tensor) -> None:
        seen.append((conv.dilation[-2] * (conv.kernel_size[-2] - 1) + 1, conv.stride[-2], out.shape[-2] * conv.stride[-2]))

    convs = [m for part in modules for m in part.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    hooks = [conv.register_forward_hook(record) for conv in convs]
    try:
        out_rows = run().shape[-2]
    finally:
        for hook in hooks:
            hook.remove()
    per_latent = latent_rows or out_rows
    reach = sum((kernel - 1 if stride > 1 else kernel // 2) * per_latent / rows for kernel, stride, rows in seen)
    return math.ceil(reach) + 1, out_rows


# -- the tiler ------------------------------------------------------------------------


class HaloTiler:
    """Runs a row-local model's encoder and decoder band by band, exactly (see the module's docstring)."""

    min_band_halos = 4  # a band is at least this many halos tall: the halos' extra work stays under half

    def __init__(self, model: nn.Module, band_pixels: int, store: torch.device | None = None, store_limit: int | None = None):
        self.model = model  # (store and store_limit are tiling.ExactTiler's: nothing here waits between layers)
        self.arch = architecture_of(model)
        self.band_pixels = max(1, band_pixels)  # output (decode) or input (encode) pixels per band
        self.bands = 0  # band passes run (read by tests)
        self._plan: list[tuple[tuple[int, int], tuple[int, int]]] = []  # this clip's bands: (rows, rows read with halo)
        self._band = 0  # the pass running
        self._call = 0  # the model's decoder / encoder calls so far in this pass
        self._kept: list = []  # per call: the decoder's whole part's output and cache index, or the encoder's gathered rows

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return architecture_of(model) is not None

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Within: the model's clip loops run once per band, with this tiler's decoder and encoder forward."""
        model = self.model
        decode, encode = model._decode, model._encode
        model._decode, model._encode = self._passes(decode, self._place), self._passes(encode, lambda output, result: result)
        model.decoder.forward, model.encoder.forward = self.decoder_forward, self.encoder_forward
        try:
            yield
        finally:
            del model._decode, model._encode, model.decoder.forward, model.encoder.forward  # back to the class's own

    def _passes(self, loop: Callable, combine: Callable) -> Callable:
        """The model's clip loop run once per band of the clip (the first pass plans them), each result combined into
        the output as its pass ends."""
        def run(*args, **kwargs):
            self._plan, self._kept, output, passes = [], [], None, 0
            while passes == 0 or passes < len(self._plan):
                self._band, self._call = passes, 0
                output = combine(output, loop(*args, **kwargs))
                passes += 1
                self.bands += 1
            self._band, self._kept = 0, []
            return output
        return run

    def _place(self, output: torch.Tensor | DecoderOutput | None, result: torch.Tensor | DecoderOutput) -> torch.Tensor | DecoderOutput:
        """A pass's decoded rows put into the clip's output, of the model's own type (a tensor or a DecoderOutput),
        allocated at the first pass: the output is held once, not also as its bands."""
        if len(self._plan) == 1:
            return result
        sample = result.sample if isinstance(result, DecoderOutput) else result
        (start, stop), _ = self._plan[self._band]
        scale = sample.shape[-2] // (stop - start)  # output rows per latent row, after the model's own unfolding
        if output is None:
            whole = sample.new_empty(*sample.shape[:-2], self._plan[-1][0][1] * scale, sample.shape[-1])
            output = DecoderOutput(sample=whole) if isinstance(result, DecoderOutput) else whole
        (output.sample if isinstance(output, DecoderOutput) else output)[..., start * scale : stop * scale, :] = sample
        return output

    def decoder_forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] | None = None,
                        first_chunk: bool = False) -> torch.Tensor:
        """One call of the model's decode loop, for this pass's band: the whole part (from the first pass), then the band."""
        decoder, reach, index = self.model.decoder, reach_of(self.model, self.arch), feat_idx or [0]
        call, self._call = self._call, self._call + 1
        if self._band == 0:
            self._kept.append((self.arch.decoder_whole(decoder, x, feat_cache, index), index[0]))
        middle, index[0] = self._kept[call]
        if self._band == 0 and call == 0:
            # Output pixels per latent row: a model with causal caches decodes a frame per call (at most TEMPORAL_BOUND
            # frames out), one without decodes its whole clip in one.
            frames = (x.shape[2] if feat_cache is None else 1) * TEMPORAL_BOUND
            self._plan = self._bands(middle.shape[-2], reach.decoder_scale**2 * middle.shape[-1] * frames, reach.decoder_halo)
        (start, stop), (low, high) = self._plan[self._band]
        rows = self.arch.decoder_banded(decoder, middle[..., low:high, :], feat_cache, index, first_chunk)
        return rows[..., (start - low) * reach.decoder_scale : (stop - low) * reach.decoder_scale, :]

    def encoder_forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] | None = None) -> torch.Tensor:
        """One call of the model's encode loop, for this pass's band: the band's rows gathered; in the last pass the whole
        part on all of them (earlier passes answer zeros of its shape, which the combination drops)."""
        encoder, reach, index = self.model.encoder, reach_of(self.model, self.arch), feat_idx or [0]
        call, self._call = self._call, self._call + 1
        scale = reach.encoder_scale
        if self._band == 0 and call == 0:
            # Input pixels per latent row: a model with causal caches takes one frame, then up to TEMPORAL_BOUND, per call.
            frames = x.shape[2] if feat_cache is None else TEMPORAL_BOUND
            self._plan = self._bands(x.shape[-2] // scale, scale * x.shape[-1] * frames, reach.encoder_halo)
        (start, stop), (low, high) = self._plan[self._band]
        rows = self.arch.encoder_banded(encoder, x[..., low * scale : high * scale, :], feat_cache, index)[..., start - low : stop - low, :]
        if self._band == 0:
            self._kept.append(rows.new_empty(*rows.shape[:-2], x.shape[-2] // scale, rows.shape[-1]))
        gathered = self._kept[call]
        gathered[..., start:stop, :] = rows
        if self._band + 1 < len(self._plan):
            return gathered.new_zeros(gathered.shape[0], _first_conv(encoder.conv_out).out_channels, *gathered.shape[2:])
        return self.arch.encoder_whole(encoder, gathered, feat_cache, index)

    def _bands(self, rows: int, pixels_per_row: int, halo: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """(latent rows, the rows read with the halo) of bands covering `rows`, of near equal height (no thin last band
        that would cost two halos for a few rows)."""
        height = max(self.band_pixels // max(1, pixels_per_row), self.min_band_halos * halo, 1)
        count = math.ceil(rows / height)
        edges = [rows * band // count for band in range(count + 1)]
        return [((start, stop), (max(0, start - halo), min(rows, stop + halo))) for start, stop in zip(edges, edges[1:])]
