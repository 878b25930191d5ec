"""The project's words: each closed set of values once, typed, with what each value means.

They are `str` enums, so a value compares equal to its word on the wire and in the family configs
(`Operation.DECODE == "decode"`), and JSON and f-strings write the word. Nothing here imports torch.
"""

from __future__ import annotations

from enum import Enum


class Word(str, Enum):
    """A value that is also its word."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def words(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Operation(Word):
    DECODE = "decode"  # latents -> pixels
    ENCODE = "encode"  # pixels -> latents


class OutputForm(Word):
    """What a decode returns, before the wire writes it (images / videos; a video batch's clips follow one another)."""

    RAW = "raw"  # the decoder's output, -1..1, in the model dtype: [B, 3, H, W] / [B, 3, F, H, W] (output_type=pt)
    UINT8 = "uint8"  # pixels 0..255, channels last: [B, H, W, 3] / [B*F, H, W, 3] (partial_postprocess=true)
    UNIT = "unit"  # float pixels 0..1, [B, 3, H, W] / [B*F, 3, H, W], for a client-side processor (output_type=pil,
    # Accept: tensor/binary)
    IMAGE = "image"  # one image file's bytes, the batch stacked top to bottom (output_type=pil)
    PIL = "pil"  # PIL images (handler.py, whose toolkit writes the file)
    MP4 = "mp4"  # an H.264 video's bytes (output_type=mp4)
    AUDIO = "audio"  # an audio file's bytes (output_type=wav or flac)
    LATENTS = "latents"  # an encode's result


IMAGE_FORMS = (OutputForm.RAW, OutputForm.UINT8, OutputForm.UNIT, OutputForm.IMAGE, OutputForm.PIL)
VIDEO_FORMS = (OutputForm.RAW, OutputForm.UINT8, OutputForm.UNIT, OutputForm.MP4)
AUDIO_FORMS = (OutputForm.RAW, OutputForm.AUDIO)


class LatentDist(Word):
    """What an encode returns of the encoder's distribution (diffusers' `latent_dist`)."""

    MEAN = "mean"  # its mean, normalised as the client asks: what diffusers' remote_encode expects
    # Mean and log-variance concatenated on the channel axis, the VAE's own (diffusers' DiagonalGaussianDistribution
    # parameters): a client samples from it with its own generator, as a local pipeline does.
    PARAMETERS = "parameters"


class Tiling(Word):
    EXACT = "exact"  # tiles whose result equals the untiled one (tiling/)
    BLEND = "blend"  # diffusers' enable_tiling(): overlapping tiles, seams blended


class Packing(Word):
    """How a pipeline packs its latent into a token sequence."""

    PATCHES = "patches"  # 2x2 cells per token (FluxPipeline._pack_latents)
    TOKENS = "tokens"  # one cell per token (Flux.2, LTX)
    NONE = "none"


class PackedMemory(Word):
    """Which way a packed token sequence lies in memory, as sent."""

    CHANNELS_FIRST = "channels_first"
    TOKENS_FIRST = "tokens_first"


class ModelLatents(Word):
    """What a family's model reads and writes."""

    RAW = "raw"  # the VAE's own latent
    NORMALISED = "normalised"  # a preview decoder (taesd) that works in the full family's normalised space


class Arrangement(Word):
    """Which of a family's accepted shapes a decode's latent arrived in (latents.plan_decode)."""

    CANONICAL = "canonical"  # [B, C, (T,) h, w]
    FRAMES_FIRST = "frames_first"  # [B, T, C, h, w] (CogVideoX's pipeline)
    NO_FRAME_AXIS = "no_frame_axis"  # [B, C, h, w] for a VAE that takes one-frame videos
    UNFOLDED = "unfolded"  # the VAE's own [B, C, p*h, p*w] where the pipeline folds patches into channels
    PATCHES = "patches"  # packed 2x2 patches [B, seq, 4C]
    TOKENS = "tokens"  # packed tokens [B, seq, C]


# Tensor dtypes by their wire names (the `dtype` query parameter and reply header): the float ones a tensor may be
# sent in and a model may compute in, and uint8 for pixels.
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
WIRE_DTYPES = (*COMPUTE_DTYPES, "uint8")

# Image files: Pillow's format names by the names clients use (`image_format`, Accept), and their media types.
IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# A body of several named tensors (a video's latents and its sound's, LTX-2), and a reply of several (the video and its
# waveforms): a safetensors file, with these names (LTX2Pipeline's own keywords for them) and dtypes
SAFETENSORS_TYPE = "application/safetensors"
SOUND_LATENT_NAMES = ("latents", "audio_latents")
SOUND_REPLY_NAMES = ("video", "audio")
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Audio files by output_type, and their media types (Accept may name any of them).
AUDIO_FORMATS = {"wav": "audio/wav", "flac": "audio/flac"}
AUDIO_MEDIA_TYPES = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/flac": "flac"}

# Pillow's mode for a family's pixel channels (its `pixel_channels`): RGB, or RGBA (Qwen-Image 2.1's VAE)
PIXEL_MODES = {3: "RGB", 4: "RGBA"}
