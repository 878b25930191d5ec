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

import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn

from .architectures import Architecture, Call, architecture_of
from .steps import first_conv

# Frames out per latent frame, for a model that does not say (its `temporal_compression_ratio`): sizes bands, never
# results.
TEMPORAL_BOUND = 4


# -- what runs whole and what runs per band, per architecture ---------------------------


# -- the halo: how many latent rows beyond a band its output rows read ------------------


@dataclass(frozen=True)
class Reach:
    halo: int  # latent rows each side of a band
    scale: int  # pixel rows per latent row: out of the decoder, into the encoder


# A decoder's or encoder's reach, measured when it is first tiled, each on its own: a decode touches no encoder weights
# (on the CPU, weights mapped from a file stay unread, out of memory, until a run touches them).
_REACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_reach(model: nn.Module, arch: Architecture) -> Reach:
    """The decoder's halo, from one tiny run of its banded part recording every convolution's kernel, stride and
    resolution."""
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
    """A call with an empty cache (an entry for every conv) and a timestep, for a run that must not touch the model's
    own."""
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
    strided, where padding may be one-sided), divided by its input's rows per latent row. latent_rows None: the
    output's."""
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

    keeps_activations = False  # nothing waits between layers: every band runs through to the output

    def __init__(self, model: nn.Module, band_pixels: int):
        self.model = model
        self.arch = architecture_of(model)
        self.band_pixels = max(1, band_pixels)  # output (decode) or input (encode) pixels per band
        self.bands = 0  # band passes run (read by tests)
        self._plan: list[tuple[tuple[int, int], tuple[int, int]]] = []  # this clip's bands: (rows, rows read with halo)
        self._band = 0  # the pass running
        self._call = 0  # the model's decoder / encoder calls so far in this pass
        # Per call: the decoder's whole part's output and cache index, or the encoder's gathered rows.
        self._kept: list = []

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
        """One call of the model's decode loop, for this pass's band: the whole part (from the first pass), then the
        band."""
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
        """One call of the model's encode loop, for this pass's band: the band's rows gathered; in the last pass the
        whole
        part on all of them (earlier passes answer zeros of its shape, which the combination drops)."""
        encoder, reach = self.model.encoder, encoder_reach(self.model, self.arch)
        call, number = Call.of(encoder, args, kwargs), self._call
        self._call += 1
        scale = reach.scale
        if self._band == 0 and number == 0:
            # Input pixels per latent row: a model with causal caches takes one frame, then up to TEMPORAL_BOUND, per
            # call.
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
            ((start, stop), (max(0, start - halo), min(rows, stop + halo))) for start, stop in itertools.pairwise(edges)
        ]
