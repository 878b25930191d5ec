"""What the halo tiler needs of each row-local architecture (Wan, Qwen-Image, HunyuanVideo 1.5, LTX-Video, LTX-2): how
its decoder and encoder split at the mid block into a part run whole and a part run in bands, and which module types
the banded part may hold. Registered by the diffusers module that defines the architecture (`_BUILDERS`), and built the
first time a model from that module is loaded.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


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
        given = {
            name: value for name, value in (dict(zip(names, args, strict=False)) | kwargs).items() if value is not None
        }
        if unknown := set(given) - set(cls._NAMES):
            raise TypeError(
                f"{type(part).__name__}.forward got {sorted(unknown)}, which the banded path does not pass on"
            )
        return cls(**{cls._NAMES[name]: value for name, value in given.items()})


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


def _ltx_time_shift(decoder, x, temb):
    """The decoder's output scale and shift from its time embedding, where it is timestep-conditioned."""
    if decoder.time_embedder is None:
        return x
    embedded = decoder.time_embedder(
        timestep=temb.flatten(), resolution=None, aspect_ratio=None, batch_size=x.shape[0], hidden_dtype=x.dtype
    )
    shift, scale = (
        embedded.view(x.shape[0], 2, -1, 1, 1, 1) + decoder.scale_shift_table[None, ..., None, None, None]
    ).unbind(dim=1)
    return x * (1 + scale) + shift


def _ltx_unpatchify(decoder, x):
    """The decoder's output patches back to pixels, as the decoder does, in its order."""
    p, p_t = decoder.patch_size, decoder.patch_size_t
    batch, _, frames, height, width = x.shape
    x = x.reshape(batch, -1, p_t, p, p, frames, height, width)
    return x.permute(0, 1, 5, 2, 6, 4, 7, 3).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _ltx_patchify(encoder, x):
    """Pixels into the encoder's patches, as the encoder does, in its order."""
    p, p_t = encoder.patch_size, encoder.patch_size_t
    batch, channels, frames, height, width = x.shape
    x = x.reshape(batch, channels, frames // p_t, p_t, height // p, p, width // p, p)
    return x.permute(0, 1, 3, 7, 5, 2, 4, 6).flatten(1, 4)


def _ltx_last_channel_repeated(x):
    """The encoder's output with its last channel repeated, as the encoder returns it (one log-variance for all)."""
    return torch.cat([x, x[:, -1:].repeat(1, x.shape[1] - 2, 1, 1, 1)], dim=1)


def _ltx_decoder_banded(decoder, x, call):
    temb = _ltx_temb(decoder, call)
    for block in decoder.up_blocks:
        x = block(x, temb)
    x = _ltx_time_shift(decoder, _ltx_norm(decoder.norm_out, x), temb)
    return _ltx_unpatchify(decoder, decoder.conv_out(decoder.conv_act(x)))


def _ltx_encoder_banded(encoder, x, call):
    x = encoder.conv_in(_ltx_patchify(encoder, x))
    for block in encoder.down_blocks:
        x = block(x)
    return x


def _ltx_encoder_whole(encoder, x, call):
    return _ltx_last_channel_repeated(
        encoder.conv_out(encoder.conv_act(_ltx_norm(encoder.norm_out, encoder.mid_block(x))))
    )


def _ltx2_temb(decoder, call):
    return None if call.temb is None else _ltx_temb(decoder, call)  # LTX-2's VAE is not timestep-conditioned


# LTX-2's: LTX-Video's split, its convolutions told whether they are causal (the part's own `is_causal`, which its
# forward uses when the model passes none), its norms per pixel over channels already
def _ltx2_decoder_whole(decoder, x, call):
    causal = decoder.is_causal
    return decoder.mid_block(decoder.conv_in(x, causal=causal), _ltx2_temb(decoder, call), causal=causal)


def _ltx2_decoder_banded(decoder, x, call):
    causal, temb = decoder.is_causal, _ltx2_temb(decoder, call)
    for block in decoder.up_blocks:
        x = block(x, temb, causal=causal)
    x = _ltx_time_shift(decoder, decoder.norm_out(x), temb)
    return _ltx_unpatchify(decoder, decoder.conv_out(decoder.conv_act(x), causal=causal))


def _ltx2_encoder_banded(encoder, x, call):
    causal = encoder.is_causal
    x = encoder.conv_in(_ltx_patchify(encoder, x), causal=causal)
    for block in encoder.down_blocks:
        x = block(x, causal=causal)
    return x


def _ltx2_encoder_whole(encoder, x, call):
    causal = encoder.is_causal
    x = encoder.conv_out(encoder.conv_act(encoder.norm_out(encoder.mid_block(x, causal=causal))), causal=causal)
    return _ltx_last_channel_repeated(x)


def _draws_no_noise(module: nn.Module) -> bool:
    """LTX 0.9.1's decoder can add spatial noise per resnet, drawn for the shape it sees: a band would draw other
    noise."""
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
    # And each module, as configured, gives a band its own rows
    band_safe: Callable[[nn.Module], bool] = lambda module: True

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


def _time_embeddings() -> tuple[type, ...]:
    """LTX's time-embedding modules and their norms and projections: each works on a sample's timestep, not on rows."""
    from diffusers.models import embeddings

    return (
        nn.LayerNorm,
        nn.Linear,
        embeddings.PixArtAlphaCombinedTimestepSizeEmbeddings,
        embeddings.Timesteps,
        embeddings.TimestepEmbedding,
    )


def _ltx(ltx) -> Architecture:
    from diffusers.models import normalization

    return Architecture(
        ltx.LTXVideoDecoder3d,
        ltx.LTXVideoEncoder3d,
        _ltx_decoder_whole,
        _ltx_decoder_banded,
        _ltx_encoder_banded,
        _ltx_encoder_whole,
        _CONTAINERS
        # Its norms normalise each pixel's channels; time embeddings, a sample's
        + (
            ltx.LTXVideoCausalConv3d,
            ltx.LTXVideoResnetBlock3d,
            ltx.LTXVideoUpsampler3d,
            ltx.LTXVideoDownsampler3d,
            ltx.LTXVideoUpBlock3d,
            ltx.LTXVideoDownBlock3D,
            ltx.LTXVideo095DownBlock3D,
            normalization.RMSNorm,
            *_time_embeddings(),
        ),
        _draws_no_noise,
    )


def _ltx2(ltx2) -> Architecture:
    # Its samplers: LTX2Video*sampler3d in newer diffusers, LTXVideo*sampler3d (LTX-2's own, of that name) in 0.37
    names = ("LTX2VideoUpsampler3d", "LTX2VideoDownsampler3d", "LTXVideoUpsampler3d", "LTXVideoDownsampler3d")
    samplers = tuple(getattr(ltx2, name) for name in names if hasattr(ltx2, name))
    return Architecture(
        ltx2.LTX2VideoDecoder3d,
        ltx2.LTX2VideoEncoder3d,
        _ltx2_decoder_whole,
        _ltx2_decoder_banded,
        _ltx2_encoder_banded,
        _ltx2_encoder_whole,
        _CONTAINERS
        # Its norms normalise each pixel's channels (its convolutions pad by reflection or zeros: either way a band's
        # padded edge lies in its halo); time embeddings, a sample's
        + (
            *samplers,
            ltx2.LTX2VideoCausalConv3d,
            ltx2.LTX2VideoResnetBlock3d,
            ltx2.LTX2VideoUpBlock3d,
            ltx2.LTX2VideoDownBlock3D,
            ltx2.PerChannelRMSNorm,
            *_time_embeddings(),
        ),
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
    "diffusers.models.autoencoders.autoencoder_kl_ltx2": _ltx2,
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
