"""The requests themselves: decode or encode, the latent or pixels and their scaling, and the reply a decode
negotiates from output_type, partial_postprocess, image_format and Accept (docs/protocol.md §2, §3, §6)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..decoders import is_audio_file, is_image_file, is_video_file
from ..errors import RequestError
from ..latents import Scaling
from ..media import AudioFile, ImageFile, Mp4Options
from ..service import DecodeRequest, DecodeTimestep, EncodeRequest, RawTensor
from ..vocabulary import (
    AUDIO_FORMATS,
    AUDIO_MEDIA_TYPES,
    IMAGE_FORMATS,
    SAFETENSORS_DTYPES,
    SAFETENSORS_TYPE,
    SOUND_LATENT_NAMES,
    LatentDist,
    OutputForm,
    PackedMemory,
    Tiling,
)
from .http import FORMATS_BY_MEDIA_TYPE, JSON_TYPES
from .parameters import Params


def is_file_upload(content_type: str, data: bytes) -> bool:
    """An image, video or audio file, by its Content-Type or its magic bytes."""
    return (
        content_type.startswith(("image/", "video/", "audio/"))
        or is_image_file(data)
        or is_video_file(data)
        or is_audio_file(data)
    )


def infer_operation(
    content_type: str,
    data: bytes,
    shape: tuple[int, ...] | None,
    audio_channels: int | None = None,
    pixel_channels: int = 3,
) -> str:
    """Decode or encode on the shared routes (docs/protocol.md §1, §3); `audio_channels` for an audio family,
    `pixel_channels` 4 for an RGBA one."""
    if content_type.startswith("tensor/") or content_type == SAFETENSORS_TYPE:
        return "decode"
    if is_file_upload(content_type, data):
        return "encode"
    if shape is not None:
        # An image tensor has 3 channels (4: RGBA), a waveform the family's audio channels; no latent does.
        if audio_channels is not None:
            return "encode" if len(shape) == 3 and shape[1] == audio_channels else "decode"
        return "encode" if len(shape) >= 4 and shape[1] == pixel_channels else "decode"
    raise RequestError(
        "cannot tell what to do with this request: to decode, send Content-Type: tensor/binary with "
        "shape and dtype; to encode, send an image file (PNG, JPEG, WebP), a video file (MP4, WebM, GIF), "
        "an audio file (WAV, FLAC) or a [B, 3, H, W] / [B, 3, F, H, W] / [B, channels, samples] tensor with shape "
        "and dtype"
    )


def raw_tensor(params: Params, data: bytes) -> RawTensor:
    shape = params.shape()
    if shape is None:
        raise RequestError("shape is missing; send it as repeated query keys, e.g. shape=1&shape=4&shape=64&shape=64")
    dtype = params.text("dtype")
    if dtype is None:
        raise RequestError("dtype is missing; expected dtype=float16, bfloat16 or float32")
    return RawTensor(shape, dtype, data)


def scaling(params: Params) -> Scaling:
    factor = params.number("scaling_factor")
    if factor == 0:
        raise RequestError("scaling_factor=0 would divide by zero; expected e.g. 0.18215")
    return Scaling(factor, params.number("shift_factor"), params.flag("do_scaling"))


@dataclass
class ReplyShape:
    """What the reply body will be: a tensor (binary or base64 JSON), an image file, an MP4 or an audio file."""

    tensor_encoding: str = "binary"  # or the base64 media type
    image: ImageFile = field(default_factory=ImageFile)
    audio: AudioFile = field(default_factory=AudioFile)


def negotiate_decode(
    params: Params, accept: str, png_compression: int = ImageFile.png_compression, audio: bool = False
) -> tuple[OutputForm, ReplyShape]:
    """(decode form, reply shape) from output_type, partial_postprocess, image_format, quality, png_compression and
    Accept; `audio` for an audio family, whose file replies are audio files (WAV unless asked otherwise)."""
    output_type = params.choice("output_type")
    reply = ReplyShape(tensor_encoding=accept if accept in JSON_TYPES else "binary")
    wants_tensor = accept.startswith("tensor/") or accept in JSON_TYPES
    if output_type is None:
        # Old clients send no output_type: Accept says what they want.
        output_type = (
            "mp4"
            if accept == "video/mp4"
            else "pt"
            if wants_tensor
            else AUDIO_MEDIA_TYPES.get(accept, "wav")
            if audio
            else "pil"
        )
    if output_type in AUDIO_FORMATS:
        reply.audio = AudioFile(format=output_type)
        return OutputForm.AUDIO, reply
    if output_type == "mp4":
        return OutputForm.MP4, reply
    if output_type == "pt":
        return (OutputForm.UINT8 if params.flag("partial_postprocess") else OutputForm.RAW), reply
    if wants_tensor:
        return OutputForm.UNIT, reply  # pil with a client-side processor
    requested = params.choice("image_format") or "jpg"
    level = params.integer("png_compression")
    reply.image = ImageFile(
        format=FORMATS_BY_MEDIA_TYPE.get(accept) or IMAGE_FORMATS[requested],
        quality=params.integer("quality", 1, 100) or ImageFile.quality,
        png_compression=png_compression if level is None else level,
    )
    return OutputForm.IMAGE, reply


def mp4_options(params: Params) -> Mp4Options:
    """fps, and crf (x264's 0..51, lower is better) or quality (imageio's 0..10, higher is better)."""
    fps = params.number("fps")
    if fps is not None and not 1 <= fps <= 240:
        raise RequestError(
            f"fps={fps:g} is out of range; expected a frame rate from 1 to 240 (default {Mp4Options.fps:g})"
        )
    crf = params.integer("crf")
    quality = params.number("quality")
    if crf is None and quality is not None:
        if not 0 <= quality <= 10:
            raise RequestError(
                f"quality={quality:g} is out of range for mp4; expected 0..10 (imageio's scale, 10 best) or crf=0..51"
            )
        crf = int((1 - quality / 10) * 51)  # imageio-ffmpeg's own mapping, as in diffusers' export_to_video
    return Mp4Options(fps=fps or Mp4Options.fps, crf=Mp4Options.crf if crf is None else crf)


MAX_SAFETENSORS_HEADER = 64 * 1024


def named_latents(data: bytes) -> tuple[RawTensor, RawTensor | None]:
    """A safetensors body's `latents` and, where it has them, `audio_latents` (docs/protocol.md §2.2)."""
    from safetensors import SafetensorError, deserialize

    expected = f"a safetensors file of {' and '.join(SOUND_LATENT_NAMES)} ({', '.join(SAFETENSORS_DTYPES)})"
    # Its JSON header names two tensors in a few hundred bytes; safetensors would parse one of up to 100 MB
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if header > MAX_SAFETENSORS_HEADER:
        raise RequestError(
            f"body is not a safetensors file this server takes (its header length says {header} bytes, at most "
            f"{MAX_SAFETENSORS_HEADER}); expected {expected}"
        )
    try:
        tensors = dict(deserialize(data))
    except SafetensorError as exc:
        raise RequestError(f"body is not a safetensors file ({exc}); expected {expected}") from None
    unknown = sorted(set(tensors) - set(SOUND_LATENT_NAMES))
    if SOUND_LATENT_NAMES[0] not in tensors or unknown:
        raise RequestError(f"the safetensors body holds {sorted(tensors)}; expected {expected}")

    def raw(name: str) -> RawTensor:
        info = tensors[name]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise RequestError(f"{name} is {info['dtype']}; expected {expected}")
        return RawTensor(tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]], info["data"])  # its one copy

    return raw(SOUND_LATENT_NAMES[0]), raw(SOUND_LATENT_NAMES[1]) if SOUND_LATENT_NAMES[1] in tensors else None


def parse_decode(params: Params, data: bytes, content_type: str = "") -> DecodeRequest:
    sound = None
    if content_type == SAFETENSORS_TYPE:
        latent, sound = named_latents(data)
    else:
        latent = raw_tensor(params, data)
    request = DecodeRequest(latent=latent, scaling=scaling(params), sound=sound)
    if len(latent.shape) == 3:
        # Only packed latents need pixel sizes; other clients send nonsense ones.
        request.height = params.integer("height")
        request.width = params.integer("width")
        request.packed_memory = params.choice("packed_memory", PackedMemory)
    request.decode_timestep = decode_timestep(params)
    request.tiling = params.choice("tiling", Tiling)
    return request


def decode_timestep(params: Params) -> DecodeTimestep | None:
    """LTX's decode_timestep, decode_noise_scale and decode_noise_seed; None when none is sent."""
    timestep, scale = params.number("decode_timestep"), params.number("decode_noise_scale")
    seed = params.integer("decode_noise_seed", high=(1 << 63) - 1)
    if timestep is None and scale is None and seed is None:
        return None
    for name, value in (("decode_timestep", timestep), ("decode_noise_scale", scale)):
        if value is not None and not 0 <= value <= 1:
            raise RequestError(
                f"{name}={value} is outside 0..1; LTX pipelines use e.g. decode_timestep=0.05, decode_noise_scale=0.025"
            )
    return DecodeTimestep(timestep or 0.0, scale, seed or 0)


def parse_encode(content_type: str, params: Params, data: bytes) -> EncodeRequest:
    request = EncodeRequest(
        scaling=scaling(params),
        tiling=params.choice("tiling", Tiling),
        latent_dist=params.choice("latent_dist", LatentDist) or LatentDist.MEAN,
    )
    if is_file_upload(content_type, data) or params.shape() is None:
        request.image = data
    else:
        request.tensor = raw_tensor(params, data)
    return request
