"""Exact spatial tiling for VAEs whose full-resolution layers are all row-local: the untiled result, band by band.

Wan 2.1 / 2.2, Qwen-Image, HunyuanVideo 1.5 and LTX-Video normalise with an RMS
norm over the channels of each pixel, not with GroupNorm over the image, so
outside their mid block (attention over a whole frame or clip in the first
three; LTX's has none, but it is where the network is deepest, and running it
whole halves the halo) nothing needs the whole image:
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

import functools
import importlib
import inspect
import math
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn

from .tiling import first_conv

# Frames out per latent frame, for a model that does not say (its `temporal_compression_ratio`): sizes bands, never results.
TEMPORAL_BOUND = 4


@dataclass
class Call:
    """What one call of a decoder's or encoder's forward gets beyond its input, by what it is."""

    cache: list | None = None  # the causal convolutions' cache (Wan, Qwen-Image: a frame or a few per call), else None
    index: list[int] = field(default_factory=lambda: [0])  # the next cache entry
    first_chunk: bool = False  # Wan 2.2's first frame
    temb: torch.Tensor | None = None  # LTX-Video's decode timestep

    _NAMES = {"feat_cache": "cache", "feat_idx": "index", "first_chunk": "first_chunk", "temb": "temb"}

    @classmethod
    def of(cls, part: nn.Module, args: tuple, kwargs: dict) -> Call:
        """The call from the arguments after the input, named as the part's own forward names them."""
        names = list(inspect.signature(type(part).forward).parameters)[2:]  # after self and the input
        given = {name: value for name, value in (dict(zip(names, args)) | kwargs).items() if value is not None}
        if unknown := set(given) - set(cls._NAMES):
            raise TypeError(
                f"{type(part).__name__}.forward got {sorted(unknown)}, which the banded path does not pass on"
            )
        return cls(**{cls._NAMES[name]: value for name, value in given.items()})


# -- what runs whole and what runs per band, per architecture ---------------------------


def _cached_conv(conv: nn.Module, x: torch.Tensor, call: Call) -> torch.Tensor:
    """A causal conv through its cache entry (the last two frames of its input), as Wan's conv in / conv out run."""
    cache, index = call.cache, call.index
    if cache is None:
        return conv(x)
    i = index[0]
    frames = sys.modules[
        type(conv).__module__
    ].CACHE_T  # the frames its module's convolutions cache (Wan's and Qwen-Image's: 2)
    held = x[:, :, -frames:].clone()
    if held.shape[2] < frames and cache[i] is not None:
        held = torch.cat([cache[i][:, :, -1:].to(held.device), held], dim=2)
    x = conv(x, cache[i])
    cache[i] = held
    index[0] += 1
    return x


def _wan_decoder_whole(decoder, x, call):
    return decoder.mid_block(_cached_conv(decoder.conv_in, x, call), call.cache, call.index)


def _wan_decoder_banded(decoder, x, call):
    for block in decoder.up_blocks:
        chunk = (
            {"first_chunk": call.first_chunk} if "first_chunk" in inspect.signature(block.forward).parameters else {}
        )
        x = block(x, call.cache, call.index, **chunk)
    return _cached_conv(decoder.conv_out, decoder.nonlinearity(decoder.norm_out(x)), call)


def _wan_encoder_banded(encoder, x, call):
    x = _cached_conv(encoder.conv_in, x, call)
    for layer in encoder.down_blocks:
        x = layer(x, call.cache, call.index)
    return x


def _wan_encoder_whole(encoder, x, call):
    x = encoder.nonlinearity(encoder.norm_out(encoder.mid_block(x, call.cache, call.index)))
    return _cached_conv(encoder.conv_out, x, call)


def _hv15_decoder_whole(decoder, x, call):
    return decoder.mid_block(decoder.conv_in(x) + x.repeat_interleave(repeats=decoder.repeat, dim=1))


def _hv15_decoder_banded(decoder, x, call):
    for block in decoder.up_blocks:
        x = block(x)
    return decoder.conv_out(decoder.conv_act(decoder.norm_out(x)))


def _hv15_encoder_banded(encoder, x, call):
    x = encoder.conv_in(x)
    for block in encoder.down_blocks:
        x = block(x)
    return x


def _hv15_encoder_whole(encoder, x, call):
    x = encoder.mid_block(x)
    batch, _, frames, height, width = x.shape
    shortcut = x.view(batch, -1, encoder.group_size, frames, height, width).mean(dim=2)
    return encoder.conv_out(encoder.conv_act(encoder.norm_out(x))) + shortcut


def _ltx_temb(decoder, call):
    return call.temb * decoder.timestep_scale_multiplier if decoder.timestep_scale_multiplier is not None else call.temb


def _ltx_norm(norm, x):
    return norm(x.movedim(1, -1)).movedim(-1, 1)


def _ltx_decoder_whole(decoder, x, call):
    return decoder.mid_block(decoder.conv_in(x), _ltx_temb(decoder, call))


def _ltx_decoder_banded(decoder, x, call):
    temb = _ltx_temb(decoder, call)
    for block in decoder.up_blocks:
        x = block(x, temb)
    x = _ltx_norm(decoder.norm_out, x)
    if decoder.time_embedder is not None:
        embedded = decoder.time_embedder(
            timestep=temb.flatten(), resolution=None, aspect_ratio=None, batch_size=x.shape[0], hidden_dtype=x.dtype
        )
        shift, scale = (
            embedded.view(x.shape[0], 2, -1, 1, 1, 1) + decoder.scale_shift_table[None, ..., None, None, None]
        ).unbind(dim=1)
        x = x * (1 + scale) + shift
    x = decoder.conv_out(decoder.conv_act(x))
    p, p_t = decoder.patch_size, decoder.patch_size_t  # unpatchified as the decoder does, in its order
    batch, _, frames, height, width = x.shape
    x = x.reshape(batch, -1, p_t, p, p, frames, height, width)
    return x.permute(0, 1, 5, 2, 6, 4, 7, 3).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _ltx_encoder_banded(encoder, x, call):
    p, p_t = encoder.patch_size, encoder.patch_size_t  # patchified as the encoder does, in its order
    batch, channels, frames, height, width = x.shape
    x = (
        x.reshape(batch, channels, frames // p_t, p_t, height // p, p, width // p, p)
        .permute(0, 1, 3, 7, 5, 2, 4, 6)
        .flatten(1, 4)
    )
    x = encoder.conv_in(x)
    for block in encoder.down_blocks:
        x = block(x)
    return x


def _ltx_encoder_whole(encoder, x, call):
    x = encoder.conv_out(encoder.conv_act(_ltx_norm(encoder.norm_out, encoder.mid_block(x))))
    return torch.cat(
        [x, x[:, -1:].repeat(1, x.shape[1] - 2, 1, 1, 1)], dim=1
    )  # the last channel repeated, as the encoder does


def _draws_no_noise(module: nn.Module) -> bool:
    """LTX 0.9.1's decoder can add spatial noise per resnet, drawn for the shape it sees: a band would draw other noise."""
    return getattr(module, "per_channel_scale1", None) is None and getattr(module, "per_channel_scale2", None) is None


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
    band_safe: Callable[[nn.Module], bool] = lambda module: (
        True
    )  # and each module, as configured, gives a band its own rows

    def decoder_banded_modules(self, decoder: nn.Module) -> list[nn.Module]:
        return [decoder.up_blocks, decoder.norm_out, decoder.conv_out]

    def encoder_banded_modules(self, encoder: nn.Module) -> list[nn.Module]:
        return [encoder.conv_in, encoder.down_blocks]


_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.Identity, nn.Dropout, nn.SiLU, nn.ZeroPad2d, nn.Conv2d, nn.Conv3d)


def _wan(wan) -> Architecture:
    return Architecture(
        wan.WanDecoder3d,
        wan.WanEncoder3d,
        _wan_decoder_whole,
        _wan_decoder_banded,
        _wan_encoder_banded,
        _wan_encoder_whole,
        _CONTAINERS
        + (
            wan.WanCausalConv3d,
            wan.WanRMS_norm,
            wan.WanUpsample,
            wan.WanResample,
            wan.WanResidualBlock,
            wan.WanUpBlock,
            wan.WanResidualUpBlock,
            wan.WanResidualDownBlock,
            wan.AvgDown3D,
            wan.DupUp3D,
        ),
    )


def _qwen(qwen) -> Architecture:
    return Architecture(
        qwen.QwenImageDecoder3d,
        qwen.QwenImageEncoder3d,
        _wan_decoder_whole,
        _wan_decoder_banded,
        _wan_encoder_banded,
        _wan_encoder_whole,
        _CONTAINERS
        + (
            qwen.QwenImageCausalConv3d,
            qwen.QwenImageRMS_norm,
            qwen.QwenImageUpsample,
            qwen.QwenImageResample,
            qwen.QwenImageResidualBlock,
            qwen.QwenImageUpBlock,
        ),
    )


def _hv15(hv15) -> Architecture:
    return Architecture(
        hv15.HunyuanVideo15Decoder3D,
        hv15.HunyuanVideo15Encoder3D,
        _hv15_decoder_whole,
        _hv15_decoder_banded,
        _hv15_encoder_banded,
        _hv15_encoder_whole,
        _CONTAINERS
        + (
            hv15.HunyuanVideo15CausalConv3d,
            hv15.HunyuanVideo15RMS_norm,
            hv15.HunyuanVideo15Upsample,
            hv15.HunyuanVideo15Downsample,
            hv15.HunyuanVideo15ResnetBlock,
            hv15.HunyuanVideo15UpBlock3D,
            hv15.HunyuanVideo15DownBlock3D,
        ),
    )


def _ltx(ltx) -> Architecture:
    from diffusers.models import embeddings, normalization

    return Architecture(
        ltx.LTXVideoDecoder3d,
        ltx.LTXVideoEncoder3d,
        _ltx_decoder_whole,
        _ltx_decoder_banded,
        _ltx_encoder_banded,
        _ltx_encoder_whole,
        _CONTAINERS
        + (
            ltx.LTXVideoCausalConv3d,
            ltx.LTXVideoResnetBlock3d,
            ltx.LTXVideoUpsampler3d,
            ltx.LTXVideoDownsampler3d,
            ltx.LTXVideoUpBlock3d,
            ltx.LTXVideoDownBlock3D,
            ltx.LTXVideo095DownBlock3D,
            normalization.RMSNorm,
            nn.LayerNorm,
            nn.Linear,
            embeddings.PixArtAlphaCombinedTimestepSizeEmbeddings,
            embeddings.Timesteps,
            embeddings.TimestepEmbedding,
        ),  # its norms normalise each pixel's channels; time embeddings, a sample's
        _draws_no_noise,
    )


# The architectures by the diffusers module that defines their decoder and encoder. A module is imported, and its
# architecture built, only when a loaded model's decoder comes from it: a diffusers that lacks or renamed one of these
# classes loses that architecture's exact path, never the import of this module or another family.
_BUILDERS: dict[str, Callable[[object], Architecture]] = {
    "diffusers.models.autoencoders.autoencoder_kl_wan": _wan,
    "diffusers.models.autoencoders.autoencoder_kl_qwenimage": _qwen,
    "diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15": _hv15,
    "diffusers.models.autoencoders.autoencoder_kl_ltx": _ltx,
}


@functools.cache
def _architecture_in(module: str) -> Architecture | None:
    build = _BUILDERS.get(module)
    try:
        return build(importlib.import_module(module)) if build else None
    except (ImportError, AttributeError):
        return None


def architecture_of(model: nn.Module) -> Architecture | None:
    """The model's split, if its encoder and decoder are of a known pair and their banded parts are row-local only."""
    decoder, encoder = getattr(model, "decoder", None), getattr(model, "encoder", None)
    arch = _architecture_in(type(decoder).__module__)
    if arch is not None and type(decoder) is arch.decoder and type(encoder) is arch.encoder:
        banded = arch.decoder_banded_modules(decoder) + arch.encoder_banded_modules(encoder)
        if all(
            type(module) in arch.row_local and arch.band_safe(module) for part in banded for module in part.modules()
        ):
            return arch
    return None


# -- the halo: how many latent rows beyond a band its output rows read ------------------


@dataclass(frozen=True)
class Reach:
    halo: int  # latent rows each side of a band
    scale: int  # pixel rows per latent row: out of the decoder, into the encoder


# A decoder's or encoder's reach, measured when it is first tiled, each on its own: a decode touches no encoder weights
# (on the CPU, weights mapped from a file stay unread, out of memory, until a run touches them).
_REACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_reach(model: nn.Module, arch: Architecture) -> Reach:
    """The decoder's halo, from one tiny run of its banded part recording every convolution's kernel, stride and resolution."""
    decoder = model.decoder
    if decoder not in _REACHES:
        parameter = next(decoder.parameters())
        latent = torch.zeros(
            1, first_conv(decoder.conv_in).in_channels, 1, 2, 2, dtype=parameter.dtype, device=parameter.device
        )
        with torch.inference_mode():
            middle = arch.decoder_whole(decoder, latent, _fresh(decoder))
            halo, out_rows = _halo(
                arch.decoder_banded_modules(decoder),
                2,
                lambda: arch.decoder_banded(decoder, middle, _fresh(decoder, first_chunk=True)),
            )
        _REACHES[decoder] = Reach(halo, out_rows // 2)
    return _REACHES[decoder]


def encoder_reach(model: nn.Module, arch: Architecture) -> Reach:
    """The encoder's halo, as the decoder's."""
    encoder = model.encoder
    if encoder not in _REACHES:
        parameter = next(encoder.parameters())
        pixels = torch.zeros(1, _encoder_channels(encoder), 1, 64, 64, dtype=parameter.dtype, device=parameter.device)
        with torch.inference_mode():
            halo, latent_rows = _halo(
                arch.encoder_banded_modules(encoder),
                None,
                lambda: arch.encoder_banded(encoder, pixels, _fresh(encoder)),
            )
        _REACHES[encoder] = Reach(halo, 64 // latent_rows)
    return _REACHES[encoder]


def _fresh(part: nn.Module, first_chunk: bool = False) -> Call:
    """A call with an empty cache (an entry for every conv) and a timestep, for a run that must not touch the model's own."""
    parameter = next(part.parameters())
    return Call(
        [None] * sum(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in part.modules()),
        [0],
        first_chunk,
        torch.zeros(1, dtype=parameter.dtype, device=parameter.device),
    )


def _encoder_channels(encoder: nn.Module) -> int:
    """The channels an encoder takes: its conv in's, unless it folds pixels into channels first (LTX's patches)."""
    folded = getattr(encoder, "patch_size", None) or 1
    return first_conv(encoder.conv_in).in_channels // (folded**2 * (getattr(encoder, "patch_size_t", None) or 1))


def _halo(modules: list[nn.Module], latent_rows: int | None, run: Callable[[], torch.Tensor]) -> tuple[int, int]:
    """(halo in latent rows, output rows) of run(): each conv reaches half its kernel each side (its whole kernel when
    strided, where padding may be one-sided), divided by its input's rows per latent row. latent_rows None: the output's."""
    seen: list[
        tuple[int, int, int]
    ] = []  # (kernel rows spanned, stride, rows at its resolution: output rows times stride,
    # as its input may come padded)

    def record(conv: nn.Module, args, out: torch.Tensor) -> None:
        seen.append(
            (conv.dilation[-2] * (conv.kernel_size[-2] - 1) + 1, conv.stride[-2], out.shape[-2] * conv.stride[-2])
        )

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

    def __init__(
        self, model: nn.Module, band_pixels: int, store: torch.device | None = None, store_limit: int | None = None
    ):
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
        model._decode, model._encode = (
            self._passes(decode, self._place),
            self._passes(encode, lambda output, result: result),
        )
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

    def _place(
        self, output: torch.Tensor | DecoderOutput | None, result: torch.Tensor | DecoderOutput
    ) -> torch.Tensor | DecoderOutput:
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

    def decoder_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One call of the model's decode loop, for this pass's band: the whole part (from the first pass), then the band."""
        decoder, reach = self.model.decoder, decoder_reach(self.model, self.arch)
        call, number = Call.of(decoder, args, kwargs), self._call
        self._call += 1
        if self._band == 0:
            self._kept.append((self.arch.decoder_whole(decoder, x, call), call.index[0]))
        middle, call.index[0] = self._kept[number]
        if self._band == 0 and number == 0:
            # Output pixels per latent row: a model with causal caches decodes a frame per call (to a few frames), one
            # without decodes its whole clip in one.
            frames = (x.shape[2] if call.cache is None else 1) * (
                getattr(self.model, "temporal_compression_ratio", None) or TEMPORAL_BOUND
            )
            self._plan = self._bands(middle.shape[-2], reach.scale**2 * middle.shape[-1] * frames, reach.halo)
        (start, stop), (low, high) = self._plan[self._band]
        rows = self.arch.decoder_banded(decoder, middle[..., low:high, :], call)
        return rows[..., (start - low) * reach.scale : (stop - low) * reach.scale, :]

    def encoder_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One call of the model's encode loop, for this pass's band: the band's rows gathered; in the last pass the whole
        part on all of them (earlier passes answer zeros of its shape, which the combination drops)."""
        encoder, reach = self.model.encoder, encoder_reach(self.model, self.arch)
        call, number = Call.of(encoder, args, kwargs), self._call
        self._call += 1
        scale = reach.scale
        if self._band == 0 and number == 0:
            # Input pixels per latent row: a model with causal caches takes one frame, then up to TEMPORAL_BOUND, per call.
            frames = x.shape[2] if call.cache is None else TEMPORAL_BOUND
            self._plan = self._bands(x.shape[-2] // scale, scale * x.shape[-1] * frames, reach.halo)
        (start, stop), (low, high) = self._plan[self._band]
        rows = self.arch.encoder_banded(encoder, x[..., low * scale : high * scale, :], call)[
            ..., start - low : stop - low, :
        ]
        if self._band == 0:
            self._kept.append(rows.new_empty(*rows.shape[:-2], x.shape[-2] // scale, rows.shape[-1]))
        gathered = self._kept[number]
        gathered[..., start:stop, :] = rows
        if self._band + 1 < len(self._plan):
            return gathered.new_zeros(gathered.shape[0], first_conv(encoder.conv_out).out_channels, *gathered.shape[2:])
        return self.arch.encoder_whole(encoder, gathered, call)

    def _bands(self, rows: int, pixels_per_row: int, halo: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """(latent rows, the rows read with the halo) of bands covering `rows`, of near equal height (no thin last band
        that would cost two halos for a few rows)."""
        height = max(self.band_pixels // max(1, pixels_per_row), self.min_band_halos * halo, 1)
        count = math.ceil(rows / height)
        edges = [rows * band // count for band in range(count + 1)]
        return [
            ((start, stop), (max(0, start - halo), min(rows, stop + halo))) for start, stop in zip(edges, edges[1:])
        ]
