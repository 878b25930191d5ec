"""Exact tiled decode and encode: the untiled result, to float rounding, with bounded memory.

diffusers' `enable_tiling()` decodes overlapping tiles independently and blends
their seams; every tile's GroupNorm then sees its own statistics, so tones shift
from tile to tile. Here the full-resolution part of the network (the decoder
after its mid block, the encoder before it) is a program of steps run over
bands of rows:

- a convolution (or an up- or downsampler) is row-local: a band of output rows
  is computed from a slice of input rows with a halo wide enough for the
  receptive field, and the halo's rows are cropped;
- every GroupNorm first gathers its statistics over all bands (sums in
  float64), then normalises each band with those global statistics;
- the mid block (with its attention) runs whole, at latent resolution, where an
  8192² image is a 1024² latent.

Whole activations are held in `store` (the device while they fit, else host
memory) at checkpoints before GroupNorms, while what a checkpoint holds (the
activation and the residuals held across it) costs at most `store_limit` bytes.
Past a checkpoint the program streams: to gather a GroupNorm's statistics the
bands are recomputed from the last checkpoint, so nothing larger than the limit
is ever held and memory stays flat as the image grows, for some recomputation.
A segment that keeps the resolution writes its output over its input, a band
once no later band reads its rows. The device holds one band's work at a time.

The tiler replaces the model's `decoder` / `encoder` forward for one call
(`installed()`), so the model's own decode and encode (quant convs, HunyuanVideo's
frame batches) run around it unchanged. It applies to diffusers' 2-D
`Encoder` / `Decoder` (AutoencoderKL and the families built on it: SD1.5, SDXL,
SD3, Flux, Flux.2) and to HunyuanVideo's causal 3-D ones, spatially;
`GroupNormTiler.supports` checks the structure, not a name. The VAEs that normalise
each pixel on its own (Wan, Qwen-Image, HunyuanVideo 1.5, LTX-Video) tile more simply, in
halo.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from ..memory import trim_heaps
from .steps import (
    DOWNSAMPLERS,
    PAIRS,
    RESNETS,
    UPSAMPLERS,
    Add,
    Layer,
    Norm,
    Save,
    Step,
    accumulate,
    decoder_tail,
    encoder_head,
    finish_statistics,
    group_norm,
    layer_heights,
    plain_attention,
    resnet_steps,
    rows_needed,
)

# -- the program: what a slice of rows goes through ------------------------------------


# -- the tiler ------------------------------------------------------------------------


class GroupNormTiler:
    """Runs a model's encoder and decoder band by band, exactly (see the module's docstring)."""

    keeps_activations = True  # whole activations wait at checkpoints, in `store`, up to `store_limit` bytes

    def __init__(
        self, model: nn.Module, band_pixels: int, store: torch.device | None = None, store_limit: int | None = None
    ):
        self.model = model
        self.band_pixels = max(1, band_pixels)  # output pixels per band: what bounds the device's work
        self.device = next(model.parameters()).device
        self.store = store or self.device
        # Bytes a cut may hold whole in `store` (activation and residuals across it); None: no limit
        self.store_limit = store_limit
        # Passes that recompute layers to gather a GroupNorm's statistics (read by tests and the benchmark)
        self.recomputed = 0
        self.overwritten = 0  # segments whose output overwrote their input in place (read by tests)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether the model's encoder and decoder are built only of the pieces this tiler runs exactly."""
        decoder, encoder = getattr(model, "decoder", None), getattr(model, "encoder", None)
        if (type(decoder), type(encoder)) not in PAIRS:
            return False
        if not isinstance(decoder.conv_norm_out, nn.GroupNorm) or not isinstance(encoder.conv_norm_out, nn.GroupNorm):
            return False  # a spatial norm (MoVQ) conditions on the latent
        for block in list(decoder.up_blocks) + list(encoder.down_blocks):
            for resnet in block.resnets:
                if (
                    type(resnet) not in RESNETS
                    or getattr(resnet, "upsample", None) is not None
                    or getattr(resnet, "downsample", None) is not None
                ):
                    return False
                if not (isinstance(resnet.norm1, nn.GroupNorm) and isinstance(resnet.norm2, nn.GroupNorm)):
                    return False
            for sampler in list(getattr(block, "upsamplers", None) or []) + list(
                getattr(block, "downsamplers", None) or []
            ):
                if type(sampler) not in UPSAMPLERS + DOWNSAMPLERS:
                    return False
                if type(sampler) in (Upsample2D, Downsample2D) and (sampler.norm is not None or not sampler.use_conv):
                    return False
                if type(sampler) is Upsample2D and (sampler.use_conv_transpose or not sampler.interpolate):
                    return False
        return True

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Within: the model's decoder and encoder forward are this tiler's, so model.decode / model.encode run exactly
        tiled."""
        decoder, encoder = self.model.decoder, self.model.encoder
        decoder.forward, encoder.forward = self.decoder_forward, self.encoder_forward
        try:
            yield
        finally:
            del decoder.forward, encoder.forward  # back to the class's own

    def decoder_forward(self, sample: torch.Tensor, *extra) -> torch.Tensor:
        """The decoder's forward: conv in whole (latent resolution), the rest streamed, the mid block's attention over
        all of it."""
        decoder = self.model.decoder
        sample, mid = decoder.conv_in(sample), decoder.mid_block
        if not plain_attention(mid):
            sample = mid(sample, *([None] if isinstance(decoder, Decoder) else []))  # whole, as diffusers runs it
            return self.run(decoder_tail(decoder), sample).to(self.device)
        sample = self.run(resnet_steps(mid.resnets[0], "mid.0"), sample)
        for index, (attention, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True), start=1):
            sample = self.attention(attention, sample) if attention is not None else sample
            last = index == len(mid.resnets) - 1
            sample = self.run(resnet_steps(resnet, f"mid.{index}") + (decoder_tail(decoder) if last else []), sample)
        return sample.to(self.device)

    def attention(self, attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """diffusers' 2-D self-attention (AttnProcessor2_0) over the whole of x, with queries taken a band of rows at a
        time.

        Keys and values are whole on the device; each query row attends to all of them, as untiled.
        The output overwrites x band by band: a band's rows of x are read (queries, residual) before they are written.
        """
        batch, channels, height, width = x.shape
        norm = attention.group_norm
        mean, rstd = self._statistics([], x, {}, {}, norm) if norm is not None else (None, None)

        def tokens(start: int, stop: int) -> torch.Tensor:
            rows = x[..., start:stop, :].to(self.device)
            if norm is not None:
                rows = group_norm(norm, rows, mean, rstd)
            return rows.reshape(batch, channels, -1).transpose(1, 2)

        heads = attention.heads
        key = value = None  # filled in place: a list joined by torch.cat would hold them twice
        for start, stop in self._row_chunks(height, width, 1 << 20):
            hidden = tokens(start, stop)
            rows_key, rows_value = attention.to_k(hidden), attention.to_v(hidden)
            if key is None:
                key = rows_key.new_empty(batch, height * width, rows_key.shape[-1])
                value = rows_value.new_empty(batch, height * width, rows_value.shape[-1])
            key[:, start * width : stop * width], value[:, start * width : stop * width] = rows_key, rows_value
        head_dim = key.shape[-1] // heads
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
        for start, stop in self._row_chunks(height, width, max(1, (1 << 28) // (height * width * heads))):
            query = attention.to_q(tokens(start, stop))
            query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
            hidden = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            hidden = hidden.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
            hidden = attention.to_out[1](attention.to_out[0](hidden))
            hidden = hidden.transpose(-1, -2).reshape(batch, channels, stop - start, width)
            if attention.residual_connection:
                hidden = hidden + x[..., start:stop, :].to(self.device)
            x[..., start:stop, :] = hidden / attention.rescale_output_factor
        return x

    def _row_chunks(self, height: int, width: int, tokens: int) -> list[tuple[int, int]]:
        rows = max(1, tokens // max(1, width))
        return [(start, min(height, start + rows)) for start in range(0, height, rows)]

    def encoder_forward(self, sample: torch.Tensor) -> torch.Tensor:
        """The encoder's forward: conv in and down blocks streamed, the mid block and the rest whole (latent
        resolution)."""
        encoder = self.model.encoder
        sample = encoder.mid_block(self.run(encoder_head(encoder), sample).to(self.device))
        return encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(sample)))

    # -- running a program ----------------------------------------------------------------

    def run(self, steps: list[Step], x: torch.Tensor) -> torch.Tensor:
        """steps applied to the whole of x, band by band; the result whole, in `store`.

        The program is cut into segments before GroupNorms whose input fits `store_limit`
        whole; each segment's output is held whole, everything inside one streams.
        """
        x = caller = x.to(self.store)
        held: dict[str, torch.Tensor] = {}  # saved values, whole, that a later segment's residual reads
        start, statistics = 0, None
        while start < len(steps):
            stop = self._segment_end(steps, start, x, held)
            x, statistics = self._assemble(steps, start, stop, x, held, statistics, caller)
            later = {step.name for step in steps[stop:] if isinstance(step, Add)}
            held = {name: value for name, value in held.items() if name in later}
            start = stop
        return x

    def _segment_end(self, steps: list[Step], start: int, x: torch.Tensor, held) -> int:
        """Where the segment from `start` ends: before the next GroupNorm where what stays held fits store_limit (else
        at the end)."""
        first_computing = next(i for i in range(start, len(steps)) if not isinstance(steps[i], Save))
        for stop in range(first_computing + 1, len(steps)):
            if isinstance(steps[stop], Norm) and (
                self.store_limit is None or self._held_bytes(steps, start, stop, x, held) <= self.store_limit
            ):
                return stop
        return len(steps)

    def _held_bytes(self, steps: list[Step], start: int, stop: int, x: torch.Tensor, held) -> int:
        """What a cut before steps[stop] holds whole: the activation there and every other residual a later step
        adds."""
        total = self._bytes(steps[start:stop], x, held)
        for name in {step.name for step in steps[stop:] if isinstance(step, Add)}:
            saved = [j for j in range(start, stop) if isinstance(steps[j], Save) and steps[j].name == name]
            if not saved:
                total += held[name].numel() * held[name].element_size() if name in held else 0
            elif any(
                not isinstance(step, Save) for step in steps[saved[-1] + 1 : stop]
            ):  # else it is the activation itself
                total += self._bytes(steps[start : saved[-1]], x, held)
        return total

    def _bytes(self, steps: list[Step], x: torch.Tensor, held) -> int:
        """What steps(x) takes whole, from one probed band of rows (Norms and missing residuals skipped: only the shape
        counts)."""
        if not any(isinstance(step, Layer) for step in steps):
            return x.numel() * x.element_size()
        first, last = rows_needed(steps, 0, 1, x.shape[-2])
        probe, _, _ = self._slice(steps, x, first, last, held, None)
        return (
            math.prod(probe.shape[:-2]) * layer_heights(steps, x.shape[-2])[-1] * probe.shape[-1] * probe.element_size()
        )

    # long: one walk over the bands writes the output, the held residuals and the next GroupNorm's sums together;
    # split, each part would walk (and recompute) the bands again
    def _assemble(
        self, steps: list[Step], start: int, stop: int, x: torch.Tensor, held, statistics, caller: torch.Tensor
    ):
        """steps[start:stop](x), whole; with the statistics of the GroupNorm that follows, gathered on the way.

        Values saved in this segment for a residual in a later one are held whole too.
        """
        segment, following = steps[start:stop], steps[stop] if stop < len(steps) else None
        later = {step.name for step in steps[stop:] if isinstance(step, Add)}
        computing = [i for i, step in enumerate(segment) if not isinstance(step, Save)]
        leading, trailing, middle = [], [], []
        for i, step in enumerate(segment):
            if isinstance(step, Save) and step.name in later:
                (leading if i < computing[0] else trailing if i > computing[-1] else middle).append(step.name)
        held.update({name: x for name in leading})
        stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, step in enumerate(segment):
            if isinstance(step, Norm):
                stats[index] = (
                    statistics
                    if index == computing[0] and statistics is not None
                    else self._statistics(segment[:index], x, held, stats, step.norm)
                )
        out = self._into(segment, x, held, caller)
        over_x = out is None and self._may_overwrite(segment, x, {held.get(name) for name in later}, caller)
        sums, pending = None, None  # pending, when the output overwrites x: bands whose rows later bands still read
        for (first_row, last_row), first_read, rows, saved in self._bands(segment, x, held, stats):
            if out is None:
                height = layer_heights(segment, x.shape[-2])[-1]
                if over_x and rows.shape[:-2] + (height, rows.shape[-1]) == x.shape and rows.dtype == x.dtype:
                    out, pending = x, []
                    self.overwritten += 1
                else:
                    out = torch.empty(rows.shape[:-2] + (height, rows.shape[-1]), dtype=rows.dtype, device=self.store)
            for name in middle:
                value, top = saved[name]
                if name not in held:
                    held[name] = torch.empty(value.shape[:-2] + out.shape[-2:], dtype=value.dtype, device=self.store)
                held[name][..., first_row:last_row, :] = value[..., first_row - top : last_row - top, :]
            if isinstance(following, Norm):
                sums = accumulate(sums, rows, following.norm.num_groups)
            if pending is None:
                out[..., first_row:last_row, :] = rows
                continue
            # Over x: a band is written once no later band reads its rows (later bands read from first_read down).
            pending.append((first_row, last_row, rows))
            while pending and pending[0][1] <= first_read:
                done_first, done_last, done = pending.pop(0)
                out[..., done_first:done_last, :] = done
        for done_first, done_last, done in pending or []:
            out[..., done_first:done_last, :] = done
        held.update({name: out for name in trailing})
        return out, (finish_statistics(sums, following.norm) if sums is not None else None)

    @staticmethod
    def _may_overwrite(segment: list[Step], x: torch.Tensor, read_later: set, caller: torch.Tensor) -> bool:
        """Whether the segment's output may take x's place: x is this tiler's own, nothing after the segment reads it,
        and no layer changes the resolution (so output rows are x's rows)."""
        if x is caller or any(value is x for value in read_later):
            return False
        return all(step.scale == 1 for step in segment if isinstance(step, Layer))

    def _into(self, segment: list[Step], x: torch.Tensor, held, caller: torch.Tensor) -> torch.Tensor | None:
        """A held residual the segment's output may overwrite band by band, or None.

        When the segment ends adding a residual held whole that nothing later reads, without a
        shortcut conv: the residual is read pointwise, so each band reads its own rows before
        writing them (the rows above it, already overwritten, feed only cropped halo rows).
        """
        last = segment[-1]
        if (
            not isinstance(last, Add)
            or last.shortcut is not None
            or last.name not in held
            or held[last.name] is x
            or held[last.name] is caller
        ):
            return None
        if any(isinstance(step, Save) and step.name == last.name for step in segment):
            return None
        residual = held[last.name]
        return residual if residual.dtype == x.dtype else None

    def _statistics(
        self, prefix: list[Step], x: torch.Tensor, held, stats, norm: nn.GroupNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The GroupNorm's mean and 1/sqrt(var + eps), per sample and group, over the whole of prefix(x) (recomputed
        band by band)."""
        sums = None
        self.recomputed += any(isinstance(step, Layer) for step in prefix)
        for _, _, rows, _ in self._bands(prefix, x, held, stats):
            sums = accumulate(sums, rows, norm.num_groups)
        return finish_statistics(sums, norm)

    def _bands(self, steps: list[Step], x: torch.Tensor, held, stats):
        """((start, stop), first input row read, output rows start..stop of steps(x) on the device, saved values), for
        bands
        covering the output in order."""
        heights = layer_heights(steps, x.shape[-2])
        ratio = heights[-1] / heights[0]  # output rows per input row
        width = max(1, int(x.shape[-1] * ratio))
        first, last = rows_needed(steps, 0, 1, x.shape[-2])
        margin = (last - first) * ratio  # the halo behind one output row, in output rows
        widest = max(heights) / heights[-1]  # the largest resolution inside, relative to the output
        step_rows = 2 if any(isinstance(step, Layer) and step.scale > 1 for step in steps) else 1
        rows = int(max(self.band_pixels / (width * widest**2), 4 * margin, step_rows)) // step_rows * step_rows
        for start in range(0, heights[-1], rows):
            stop = min(heights[-1], start + rows)
            first, last = rows_needed(steps, start, stop, x.shape[-2])
            out, top, saved = self._slice(steps, x, first, last, held, stats)
            large = out.numel() * out.element_size() >= RELEASE_BAND_BYTES
            yield (start, stop), first, out[..., start - top : stop - top, :], saved
            del out, saved
            if large and self.device.type == "cpu":
                trim_heaps()

    def _slice(self, steps: list[Step], x: torch.Tensor, first: int, last: int, held, stats):
        """steps over input rows first..last of x: (rows, the first row's index, saved values); rows near a cut edge are
        wrong, for cropping.

        stats None probes the shape only: GroupNorms and residuals not at hand are skipped.
        """
        rows, top = x[..., first:last, :].to(self.device), first
        saved: dict[str, tuple[torch.Tensor, int]] = {}
        for index, step in enumerate(steps):
            if isinstance(step, Layer):
                rows, top = step.run(rows), int(top * step.scale)
            elif isinstance(step, Norm):
                rows = step.act(group_norm(step.norm, rows, *stats[index]) if stats is not None else rows)
            elif isinstance(step, Save):
                saved[step.name] = (rows, top)
            elif step.name in saved or step.name in held:
                skip, skip_top = saved[step.name] if step.name in saved else (held[step.name], 0)
                skip = skip[..., top - skip_top : top - skip_top + rows.shape[-2], :].to(self.device)
                rows = ((step.shortcut(skip) if step.shortcut is not None else skip) + rows) / step.divide
            elif stats is not None:
                raise KeyError(f"residual {step.name} is neither saved nor held")
        return rows, top, saved


# glibc keeps the freed buffers of a band's layers in its heap, fragmented, so a process working through large
# bands grows with the image although what it holds does not. After a band this large, free pages go back to
# the system: at 4096² (tiny SD, CPU) the peak falls from 1461 to 1079 MiB for 28% more time; smaller bands
# skip it (a call costs about a millisecond, and their buffers are reused).
RELEASE_BAND_BYTES = 8 << 20
