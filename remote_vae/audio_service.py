"""The inference core for audio families: the same stages as service.py, for sound.

latents [B, C, T] (checked, scaled as the client asks) -> the VAE -> a waveform [B, channels, T * hop_length]: the
decoder's raw samples (output_type=pt), or one WAV or FLAC file (media/audio.py). An encode takes a waveform tensor
[B, channels, N] in -1..1 or a WAV or FLAC file (decoders/audio.py) and returns the encoder's latent.

Limits: each sample of each channel counts as a pixel against --max-pixels (the default's 16M on CPU is 3 minutes of
44.1 kHz stereo; a GPU's 67M, 12 minutes), and a batch against --max-batch. Everything batching, the out-of-memory
ladder and the reply stage do is service.py's, shared.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import torch

from . import latents as latent_ops
from .decoders import AUDIO_TYPES, AudioHeader
from .errors import RequestError
from .jobs import LATENT_COPIES, Checked, DecodeRequest, EncodeRequest, Job, RawTensor, tensor_reply_bytes
from .media import check_byte_count, dtype_name, parse_dtype, tensor_from_bytes, write_audio
from .service import SCALED_FINITE, VaeService
from .vocabulary import AUDIO_FORMS, LatentDist, OutputForm

# Host bytes per sample of an audio reply: the float32 copy (4), its interleaved clips (4), ffmpeg's clipped input or
# the WAV's bytes (4), the file read back (4) and the reply's body (4).
AUDIO_REPLY_BYTES_PER_SAMPLE = 20
# Host bytes per sample of an audio file to encode: ffmpeg's float32 output (4), its channels copied (4), the model's
# input in float32 (4).
AUDIO_DECODE_BYTES_PER_SAMPLE = 12


class AudioService(VaeService):
    """VaeService for a family whose `audio` says its sound: sampling rate, channels and samples per latent step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.audio = self.family.audio
        self.forms = AUDIO_FORMS

    def _limit(self, clips: int, samples: int, what: str) -> int:
        """Samples over every channel of `clips` clips of `samples` each, refused past --max-pixels (413)."""
        latent_ops.check_batch(clips, self.limits.max_images_per_request)
        values = clips * samples * self.audio.channels
        if values > self.max_pixels:
            seconds = samples / self.audio.sampling_rate
            raise RequestError(
                f"{what} {clips} clip(s) of {samples} samples ({seconds:.1f} s) x {self.audio.channels} channels = "
                f"{values} samples; this server takes at most {self.max_pixels} (--max-pixels counts each sample of "
                "each channel)",
                status=413,
            )
        return values

    def check_decode(self, request: DecodeRequest, reply_encoding: str = "binary") -> Checked:
        self._require("decode")
        raw = request.latent
        plan = latent_ops.plan_decode(raw.shape, self.family, None, None)
        values = self._limit(plan.batch, self.audio.samples_for(plan.width), f"latent {list(raw.shape)} decodes to")
        if request.form not in self.forms:
            raise RequestError(
                f"{self.family.name} decodes audio: ask for output_type=wav or flac (an audio file) or pt (the "
                "waveform tensor [B, channels, samples])"
            )
        check_byte_count(raw.data, raw.shape, parse_dtype(raw.dtype))
        self._decode_timestep(request)
        latents = math.prod(raw.shape) * LATENT_COPIES * max(4, self.vae.dtype.itemsize)
        if request.form == OutputForm.AUDIO:
            result = values * AUDIO_REPLY_BYTES_PER_SAMPLE
        else:
            result = tensor_reply_bytes(values, self.vae.dtype.itemsize, reply_encoding)
        return Checked(latents + result, f"a decode to {values} audio samples as {request.form}", plan=plan)

    def prepare_decode(self, request: DecodeRequest, checked: Checked | None = None) -> Job:
        plan = (checked or self.check_decode(request)).plan
        raw = request.latent
        tiling = self.vae.checked_tiling(request.tiling)
        latents = tensor_from_bytes(raw.data, raw.shape, parse_dtype(raw.dtype))
        latent_ops.check_finite(latents, "latent")
        latents = latent_ops.to_canonical(latents, plan, self.vae.layout)
        latents = self._to_model_space(
            request.scaling.normalisation(self.vae.normalisation), latents.to(self.vae.dtype)
        )
        latent_ops.check_finite(latents, "latent after scaling", SCALED_FINITE.format(dtype=dtype_name(self.vae.dtype)))
        rate = self.audio.sampling_rate
        job = partial(
            Job,
            "decode",
            latents,
            count=plan.batch,
            pixels=plan.batch * self.audio.samples_for(plan.width),
            tiling=tiling,
            sampling_rate=rate,
        )
        if request.form == OutputForm.AUDIO:
            options = replace(request.audio, sampling_rate=rate)
            return job(self.to_host, finish=partial(write_audio, options=options))
        return job(self.to_host)

    def check_encode(self, request: EncodeRequest, reply_encoding: str = "binary") -> Checked:
        self._require("encode")
        channels = self.audio.channels
        if request.tensor is not None:
            shape = request.tensor.shape
            latent_ops.check_dims(shape)
            if len(shape) != 3 or shape[1] != channels:
                raise RequestError(
                    f"waveform tensor {list(shape)}; {self.family.name} encodes [B, {channels}, samples] in -1..1"
                )
            check_byte_count(request.tensor.data, shape, parse_dtype(request.tensor.dtype))
            count, samples, header = shape[0], shape[2], None
            values = self._limit(count, samples, "waveform of")
            held = values * (parse_dtype(request.tensor.dtype).itemsize + max(4, self.vae.dtype.itemsize))
        else:
            if not request.image:
                raise RequestError(
                    f"nothing to encode: send {AUDIO_TYPES} or a [B, {channels}, samples] tensor with shape and dtype"
                )
            header = AudioHeader.read(request.image)
            count, samples = 1, header.frames_at(self.audio.sampling_rate)
            values = self._limit(count, samples, "the audio file holds")
            held = values * AUDIO_DECODE_BYTES_PER_SAMPLE
        steps = math.ceil(samples / self.audio.hop_length)
        latent_values = count * steps * self.family.latent_channels
        latent_values *= 2 if request.latent_dist == LatentDist.PARAMETERS else 1
        held += tensor_reply_bytes(latent_values, 4, reply_encoding) + latent_values * 4
        return Checked(held, f"an encode of {count} clip(s) of {samples} samples", header)

    def prepare_encode(self, request: EncodeRequest, checked: Checked | None = None) -> Job:
        checked = checked or self.check_encode(request)
        if request.tensor is not None:
            inputs = self._waveform(request.tensor)
        else:
            rate, channels = self.audio.sampling_rate, self.audio.channels
            inputs = torch.from_numpy(checked.header.samples(rate, channels, self.limits.decode_cpu_seconds))[None]
        inputs = inputs.to(self.vae.dtype)
        normalisation = request.scaling.normalisation(self.vae.normalisation)
        if request.latent_dist == LatentDist.PARAMETERS:
            self.vae.check_distribution(normalisation)  # before the model runs

        def respond(latents: torch.Tensor) -> torch.Tensor:
            if request.latent_dist == LatentDist.PARAMETERS:
                return self.to_host(latents)
            scaled = self._from_model_space(normalisation, latents)
            latent_ops.check_finite(
                scaled, "latent after scaling", SCALED_FINITE.format(dtype=dtype_name(scaled.dtype))
            )
            return self.to_host(self.vae.layout.as_pipeline_holds(scaled))

        return Job(
            "encode",
            inputs,
            respond,
            inputs.shape[0],
            inputs.shape[0] * inputs.shape[2],
            tiling=self.vae.checked_tiling(request.tiling),
            latent_dist=request.latent_dist,
            sampling_rate=self.audio.sampling_rate,
        )

    def _waveform(self, raw: RawTensor) -> torch.Tensor:
        waveform = tensor_from_bytes(raw.data, raw.shape, parse_dtype(raw.dtype))
        latent_ops.check_finite(waveform, "waveform tensor", "in -1..1")
        return waveform
