"""Media: tensor bytes on the wire, image and video files in and out, decoded pixels.

Postprocessing follows diffusers' VaeImageProcessor / VideoProcessor exactly
(denormalise, clamp, x255, round), so the service returns the pixels a local
pipeline would produce. Video files go through the ffmpeg that imageio-ffmpeg
ships: H.264 MP4 out, MP4 / WebM / GIF in.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import imageio_ffmpeg
import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.video_processor import VideoProcessor

from .errors import RequestError

# The names clients put in the `dtype` query parameter and response header.
TENSOR_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}
INPUT_DTYPES = ("float16", "bfloat16", "float32")

# Pillow format names by the names clients use (`image_format`, Accept).
IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}

# Magic numbers of the image files an encode request may carry.
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, allowed: tuple[str, ...] = INPUT_DTYPES) -> torch.dtype:
    key = name.strip().lower().removeprefix("torch.")
    if key not in allowed:
        raise RequestError(f"unknown dtype {name!r}; expected one of {', '.join(allowed)}")
    return TENSOR_DTYPES[key]


def byte_count(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def tensor_from_bytes(data: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor whose raw little-endian, C-contiguous memory is `data`."""
    expected = byte_count(shape, dtype)
    if len(data) != expected:
        raise RequestError(
            f"body is {len(data)} bytes, but shape {list(shape)} {dtype_name(dtype)} needs {expected} bytes "
            f"(the raw, C-contiguous memory of the tensor)"
        )
    # bytearray: torch.frombuffer wants a writable buffer.
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    # A uint8 view keeps bfloat16 exact (numpy has no bfloat16).
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def is_image_file(data: bytes) -> bool:
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def guard_decompression_bombs(max_pixels: int) -> None:
    """Pillow's own guard, process-wide: it refuses (DecompressionBombError) images over twice this size on open.

    open_image checks each image against the request's limit as well, before any pixel is decoded.
    """
    PIL.Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(data: bytes, max_pixels: int) -> PIL.Image.Image:
    """An RGB image from file bytes, refusing oversized images before decoding their pixels."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError as exc:
        raise RequestError(f"image is too large: {exc}", status=413) from exc
    except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(f"body is not a readable image ({exc}); expected a PNG, JPEG or WebP file") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(f"image is {width}x{height} = {width * height} pixels; this server accepts at most {max_pixels}", status=413)
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise RequestError(f"image data is corrupt or truncated ({exc}); expected a complete PNG, JPEG or WebP file") from exc


def encode_image(image: PIL.Image.Image, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "PNG":
        image.save(buffer, format="PNG")
    elif image_format == "JPEG":
        # 4:4:4 chroma: Pillow's default 4:2:0 caps fidelity near 22 dB PSNR
        # on detailed images whatever the quality setting.
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    else:
        image.save(buffer, format=image_format, quality=quality)
    return buffer.getvalue()


def stack_vertically(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """One image holding a batch, top to bottom: an image response carries a single file."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    sheet = PIL.Image.new("RGB", (width, height * len(images)))
    for index, image in enumerate(images):
        sheet.paste(image, (0, index * height))
    return sheet


def to_uint8(processor: VaeImageProcessor, sample: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] decoder output -> uint8 [N, H, W, 3], rounded exactly as VaeImageProcessor.numpy_to_pil rounds."""
    return (processor.postprocess(sample, output_type="np") * 255).round().astype("uint8")


class Postprocessor:
    """Turns a decoder's raw output ([B, 3, H, W], about -1..1) into what the client asked for."""

    def __init__(self, vae_scale_factor: int):
        self.processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)

    def raw(self, sample: torch.Tensor) -> torch.Tensor:
        return sample.cpu()

    def unit(self, sample: torch.Tensor) -> torch.Tensor:
        """Float [B, 3, H, W] in 0..1, the client multiplies by 255."""
        return self.processor.postprocess(sample, output_type="pt").cpu()

    def uint8(self, sample: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3]."""
        return torch.from_numpy(to_uint8(self.processor, sample))

    def image(self, sample: torch.Tensor) -> list[PIL.Image.Image]:
        return self.processor.postprocess(sample, output_type="pil")

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """[1, 3, H, W] in -1..1 from an RGB image, as a pipeline prepares an image to encode."""
        return self.processor.preprocess(image)


# -- video -------------------------------------------------------------------

# ffmpeg demuxers by magic number. The demuxer is forced, never probed, so a
# body cannot make ffmpeg open playlists, URLs or other files.
VIDEO_DEMUXERS = (
    (4, b"ftyp", "mov"),  # MP4 / MOV / M4V
    (0, b"\x1a\x45\xdf\xa3", "matroska"),  # WebM / MKV
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
)
VIDEO_TYPES = "an MP4, WebM or GIF file"


def video_demuxer(data: bytes) -> str | None:
    for offset, magic, demuxer in VIDEO_DEMUXERS:
        if data[offset : offset + len(magic)] == magic:
            return demuxer
    return None


def is_video_file(data: bytes) -> bool:
    return video_demuxer(data) in ("mov", "matroska")  # a GIF is an image too


@dataclass(frozen=True)
class Mp4Options:
    fps: float = 24.0
    # x264's constant rate factor: 0 is lossless, 18 is visually lossless, 23 is x264's default.
    crf: int = 18


def write_mp4(frames: Iterable[np.ndarray], width: int, height: int, options: Mp4Options) -> bytes:
    """An H.264 / yuv420p MP4 with the index first (+faststart), fed one uint8 [H, W, 3] frame at a time."""
    with tempfile.TemporaryDirectory(prefix="remote-vae-") as folder:
        # +faststart rewrites the file once it is complete, so ffmpeg needs a seekable file, not a pipe.
        path = Path(folder) / "video.mp4"
        writer = imageio_ffmpeg.write_frames(
            str(path), (width, height), fps=options.fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
            macro_block_size=2,  # yuv420p needs even sides; ours are multiples of 8, so nothing is rescaled
            output_params=["-crf", str(options.crf), "-movflags", "+faststart"], ffmpeg_log_level="error",
        )
        writer.send(None)
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()
        return path.read_bytes()


class VideoFile:
    """A video body handed to ffmpeg: its frame size first, then its frames, read within a limit."""

    def __init__(self, data: bytes):
        demuxer = video_demuxer(data)
        if demuxer is None:
            raise RequestError(f"body is not a video file; expected {VIDEO_TYPES}")
        self._folder = tempfile.mkdtemp(prefix="remote-vae-")
        path = Path(self._folder) / "input"
        path.write_bytes(data)
        self._reader = imageio_ffmpeg.read_frames(str(path), input_params=["-f", demuxer])
        try:
            meta = next(self._reader)
            self.width, self.height = (int(side) for side in meta["size"])
            if self.width < 1 or self.height < 1:
                raise ValueError(f"frame size {self.width}x{self.height}")
        except (OSError, RuntimeError, StopIteration, KeyError, TypeError, ValueError) as exc:
            self.close()
            raise RequestError(f"body is not a readable video ({_first_line(exc)}); expected {VIDEO_TYPES}") from None

    def frames(self, max_frames: int) -> np.ndarray:
        """uint8 [F, H, W, 3]; more than max_frames frames is a 413."""
        frames = []
        shape = (self.height, self.width, 3)
        try:
            for chunk in self._reader:
                if len(frames) == max_frames:
                    raise RequestError(
                        f"video has more than {max_frames} frames of {self.width}x{self.height}; "
                        f"this server accepts at most {max_frames} at that size",
                        status=413,
                    )
                frames.append(np.frombuffer(chunk, dtype=np.uint8).reshape(shape))
        except (OSError, RuntimeError, ValueError) as exc:
            raise RequestError(f"video data is corrupt or truncated ({_first_line(exc)}); expected {VIDEO_TYPES}") from None
        if not frames:
            raise RequestError(f"video has no frames; expected {VIDEO_TYPES}")
        return np.stack(frames)

    def close(self) -> None:
        self._reader.close()  # stops ffmpeg if frames are left unread
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> "VideoFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class VideoPostprocessor(Postprocessor):
    """Turns a video decoder's raw output ([B, 3, F, H, W], about -1..1) into what the client asked for.

    A batch's clips come back one after another along the frame axis, so
    [F, ...] outputs become [B*F, ...] and an MP4 plays the clips in turn.
    """

    def __init__(self, vae_scale_factor: int):
        self.processor = VideoProcessor(vae_scale_factor=vae_scale_factor)

    @staticmethod
    def _frames(sample: torch.Tensor) -> Iterator[torch.Tensor]:
        """[1, 3, H, W] frames, clip after clip."""
        for clip in sample:
            for frame in clip.unbind(1):
                yield frame[None]

    def unit(self, sample: torch.Tensor) -> torch.Tensor:
        """Float [B*F, 3, H, W] in 0..1, as VideoProcessor.postprocess_video gives per clip."""
        return torch.cat([self.processor.postprocess(clip.transpose(0, 1), output_type="pt").cpu() for clip in sample])

    def uint8(self, sample: torch.Tensor) -> torch.Tensor:
        """uint8 [B*F, H, W, 3], converted frame by frame (no float copy of the whole clip)."""
        batch, _, frames, height, width = sample.shape
        out = torch.empty((batch * frames, height, width, 3), dtype=torch.uint8)
        for index, frame in enumerate(self._frames(sample)):
            out[index] = torch.from_numpy(to_uint8(self.processor, frame)[0])
        return out

    @staticmethod
    def mp4(frames: torch.Tensor, options: Mp4Options) -> bytes:
        """uint8 [N, H, W, 3] frames (a batch's clips one after another) as one MP4."""
        height, width = frames.shape[1:3]
        return write_mp4((frame.numpy() for frame in frames), width, height, options)

    def preprocess_frames(self, frames: np.ndarray) -> torch.Tensor:
        """[1, 3, F, H, W] in -1..1 from uint8 [F, H, W, 3] frames, as VideoProcessor.preprocess_video prepares them."""
        return self.processor.preprocess_video(frames.astype(np.float32) / 255.0)
