"""Media: tensor bytes on the wire, image and video files in and out, decoded pixels.

Postprocessing follows diffusers' VaeImageProcessor / VideoProcessor exactly
(denormalise, clamp, x255, round), so the service returns the pixels a local
pipeline would produce. It runs on the model's device, and only the uint8
pixels are copied back. Images are written by Pillow (PNG at a fast zlib level
by default), or, on CUDA with torchvision, JPEG by nvJPEG on the device. Video
files go through the ffmpeg that imageio-ffmpeg ships: H.264 MP4 out (written
by a thread of its own while frames still decode). Files in are decoders.py's.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import tempfile
import threading
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import imageio_ffmpeg
import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.video_processor import VideoProcessor

from .device import DevicePath, to_host
from .errors import RequestError
from .settings import Settings
from .vocabulary import COMPUTE_DTYPES, WIRE_DTYPES

log = logging.getLogger("remote_vae")

# torch's dtypes by their wire names.
TENSOR_DTYPES = {name: getattr(torch, name) for name in WIRE_DTYPES}
INPUT_DTYPES = COMPUTE_DTYPES


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, allowed: tuple[str, ...] = INPUT_DTYPES) -> torch.dtype:
    key = name.strip().lower().removeprefix("torch.")
    if key not in allowed:
        raise RequestError(f"unknown dtype {name!r}; expected one of {', '.join(allowed)}")
    return TENSOR_DTYPES[key]


def byte_count(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def check_byte_count(data: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    expected = byte_count(shape, dtype)
    if len(data) != expected:
        raise RequestError(
            f"body is {len(data)} bytes, but shape {list(shape)} {dtype_name(dtype)} needs {expected} bytes "
            f"(the raw, C-contiguous memory of the tensor)"
        )


def tensor_from_bytes(data: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor whose raw little-endian, C-contiguous memory is `data`."""
    check_byte_count(data, shape, dtype)
    # bytearray: torch.frombuffer wants a writable buffer.
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing a decoded file's pixels, which may be read-only (Pillow's bytes): only ever read, never copied."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    # A uint8 view keeps bfloat16 exact (numpy has no bfloat16).
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


# zlib level of PNG replies. Measured on photos (docs/benchmarks.md): level 1 writes 3.3-4.6x faster
# than Pillow's default 6 for 7-10% more bytes; 0 is twice as fast again but 60-85% larger.
PNG_COMPRESSION = Settings.png_compression


@dataclass(frozen=True)
class ImageFile:
    """How an image reply is written: Pillow's format name and that format's setting."""

    format: str = "JPEG"
    quality: int = 90  # JPEG and WebP
    png_compression: int = PNG_COMPRESSION  # zlib level 0-9; the pixels are the same at every level


def save_options(options: ImageFile) -> dict:
    """Pillow's save() keywords for an image reply in options.format."""
    if options.format == "PNG":
        return {"compress_level": options.png_compression}
    if options.format == "JPEG":
        # 4:4:4 chroma: Pillow's default 4:2:0 caps fidelity near 22 dB PSNR
        # on detailed images whatever the quality setting.
        return {"quality": options.quality, "subsampling": 0}
    return {"quality": options.quality}


def encode_image(image: PIL.Image.Image | np.ndarray, options: ImageFile) -> bytes:
    """An image file from a PIL image or uint8 [H, W, 3] pixels."""
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=options.format, **save_options(options))
    return buffer.getvalue()


def encode_pixels(pixels: bytes | np.ndarray, options: ImageFile) -> bytes:
    """An image reply's file: uint8 pixels encoded now, or a file the device already wrote."""
    return pixels if isinstance(pixels, bytes) else encode_image(pixels, options)


JpegEncoder = Callable[[torch.Tensor, int], bytes]


def _torchvision_encode_jpeg():
    # Optional: images with CUDA torch ship it; pip has no CPU build to test with
    from torchvision.io import encode_jpeg

    return encode_jpeg


def jpeg_encoder_for(device: torch.device, find_encoder: Callable = _torchvision_encode_jpeg) -> JpegEncoder | None:
    """nvJPEG (torchvision.io.encode_jpeg on a CUDA tensor) for a model on CUDA; None: Pillow writes JPEGs on the host.

    nvJPEG writes 4:4:4, as the Pillow path does, at the same quality.
    """
    if device.type != "cuda":
        return None
    try:
        encode_jpeg = find_encoder()
    except (ImportError, RuntimeError, OSError) as exc:  # absent, or built for another torch
        log.info("JPEG replies are written by Pillow on the host: torchvision's nvJPEG is unavailable (%s)", exc)
        return None

    def encode(pixels: torch.Tensor, quality: int) -> bytes:
        """uint8 [H, W, 3] pixels on the device."""
        return encode_jpeg(pixels.permute(2, 0, 1).contiguous(), quality=quality).cpu().numpy().tobytes()

    return encode


def stack_vertically(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """One image holding a batch, top to bottom: an image response carries a single file."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    sheet = PIL.Image.new("RGB", (width, height * len(images)))
    for index, image in enumerate(images):
        sheet.paste(image, (0, index * height))
    return sheet


def denormalize(sample: torch.Tensor) -> torch.Tensor:
    """-1..1 to 0..1, clamped, in the sample's dtype: VaeImageProcessor.denormalize."""
    return (sample * 0.5 + 0.5).clamp(0, 1)


def uint8_images(sample: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] decoder output -> uint8 [N, H, W, 3] on the same device.

    Exactly VaeImageProcessor's rounding: denormalise in the sample's dtype, then
    float32 x 255, rounded half to even (numpy's round), as postprocess + numpy_to_pil do.
    """
    return (denormalize(sample).float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


HostCopy = Callable[[torch.Tensor], torch.Tensor]
PREPROCESS_PIXELS = 1 << 20  # pixels an encode's input is made float in at a time


# Without a device path: a plain copy back, no pinned buffer.
_host_copy: HostCopy = partial(to_host, path=DevicePath(pinned_memory=False))


class Postprocessor:
    """Turns a decoder's raw output ([B, 3, H, W], about -1..1, on the device) into what the client asked for, on the host.

    `to_host` copies a device tensor back (device.to_host); `jpeg` writes JPEGs on the device, when it can.
    """

    def __init__(self, vae_scale_factor: int, to_host: HostCopy = _host_copy, jpeg: JpegEncoder | None = None):
        self.processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        self.to_host = to_host
        self.jpeg = jpeg

    def raw(self, sample: torch.Tensor) -> torch.Tensor:
        return self.to_host(sample)

    def unit(self, sample: torch.Tensor) -> torch.Tensor:
        """Float [B, 3, H, W] in 0..1, the client multiplies by 255."""
        return self.to_host(denormalize(sample))

    def uint8(self, sample: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3]."""
        return self.to_host(uint8_images(sample))

    def pil(self, sample: torch.Tensor) -> list[PIL.Image.Image]:
        return [PIL.Image.fromarray(pixels) for pixels in self.uint8(sample).numpy()]

    def image(self, sample: torch.Tensor, options: ImageFile) -> bytes | np.ndarray:
        """The batch as one image, samples stacked top to bottom: a JPEG written on the device
        when it can be, else uint8 [B*H, W, 3] pixels for encode_pixels (after the device is free)."""
        pixels = uint8_images(sample)
        sheet = pixels.reshape(-1, pixels.shape[2], 3)
        if options.format == "JPEG" and self.jpeg is not None:  # set only for a model on CUDA (jpeg_encoder_for)
            return self.jpeg(sheet, options.quality)
        return self.to_host(sheet).numpy()

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """[1, 3, H, W] in -1..1 from an RGB image, as a pipeline prepares an image to encode."""
        return self.processor.preprocess(image)

    def preprocess_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in -1..1 from uint8 [B, H, W, 3], as `preprocess` prepares those pixels as an image
        (VaeImageProcessor: x / 255 in float32, then 2x - 1), a band of rows at a time: no float copies of the whole."""
        batch, height, width, _ = pixels.shape
        out = torch.empty((batch, 3, height, width), dtype=torch.float32)
        step = self.processor.config.vae_scale_factor
        rows = max(step, PREPROCESS_PIXELS // max(1, width) // step * step)  # whole cells: the processor keeps the size
        for index in range(batch):
            for top in range(0, height, rows):
                band = pixels[index, top : top + rows].numpy()
                out[index : index + 1, :, top : top + rows] = self.processor.preprocess(band.astype(np.float32) / 255.0)
        return out


# -- video -------------------------------------------------------------------


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
            str(path),
            (width, height),
            fps=options.fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=2,  # yuv420p needs even sides; ours are multiples of 8, so nothing is rescaled
            output_params=["-crf", str(options.crf), "-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        writer.send(None)
        try:
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()
        return path.read_bytes()


class VideoPostprocessor(Postprocessor):
    """Turns a video decoder's raw output ([B, 3, F, H, W], about -1..1) into what the client asked for.

    A batch's clips come back one after another along the frame axis, so
    [F, ...] outputs become [B*F, ...] and an MP4 plays the clips in turn.
    Frames are converted a few at a time: no float copy of the whole clip.
    """

    FRAMES_AT_ONCE = 8

    def __init__(self, vae_scale_factor: int, to_host: HostCopy = _host_copy, jpeg: JpegEncoder | None = None):
        super().__init__(vae_scale_factor, to_host, jpeg)
        self.processor = VideoProcessor(vae_scale_factor=vae_scale_factor)

    def _chunks(self, clip: torch.Tensor) -> Iterator[torch.Tensor]:
        """[f, 3, H, W] runs of a [3, F, H, W] clip's frames."""
        for start in range(0, clip.shape[1], self.FRAMES_AT_ONCE):
            yield clip[:, start : start + self.FRAMES_AT_ONCE].transpose(0, 1)

    def unit(self, sample: torch.Tensor) -> torch.Tensor:
        """Float [B*F, 3, H, W] in 0..1, as VideoProcessor.postprocess_video gives per clip."""
        return torch.cat([self.to_host(denormalize(frames)) for clip in sample for frames in self._chunks(clip)])

    def uint8(self, sample: torch.Tensor) -> torch.Tensor:
        """uint8 [B*F, H, W, 3]."""
        return torch.cat([frames for _, frames in self.clip_frames(sample)])

    def clip_frames(self, sample: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(clip number, uint8 [f, H, W, 3] host frames), clip after clip, a few frames at a time."""
        for number, clip in enumerate(sample):
            for frames in self._chunks(clip):
                yield number, self.to_host(uint8_images(frames))

    def mp4(self, sample: torch.Tensor, stream: "Mp4Stream") -> "Mp4Stream":
        """Hand the clips' frames to the stream (unless it has them all from the decoder already)."""
        if not stream.complete:
            stream.restart()
            for clip, frames in self.clip_frames(sample):
                stream.add(clip, frames.numpy())
        return stream

    def preprocess_frames(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in -1..1 from uint8 [B, F, H, W, 3], as VideoProcessor.preprocess_video prepares x / 255,
        a few frames at a time: no float copies of the whole clip."""
        batch, frames, height, width, _ = videos.shape
        out = torch.empty((batch, 3, frames, height, width), dtype=torch.float32)
        for index in range(batch):
            for start in range(0, frames, self.FRAMES_AT_ONCE):
                chunk = videos[index, start : start + self.FRAMES_AT_ONCE].numpy()
                out[index : index + 1, :, start : start + self.FRAMES_AT_ONCE] = self.processor.preprocess_video(
                    chunk.astype(np.float32) / 255.0
                )
        return out


_END = object()


class Mp4Stream:
    """An MP4 of `clips` clips of `frames_per_clip` frames each, played one after another, written
    by ffmpeg in a thread of its own while frames arrive, so encoding overlaps decoding.

    Frames of the clip being written go to ffmpeg at once; frames of later clips
    (a batch's clips may arrive side by side) wait in memory for their turn.
    """

    def __init__(self, clips: int, frames_per_clip: int, width: int, height: int, options: Mp4Options):
        self.clips, self.frames_per_clip = clips, frames_per_clip
        self.width, self.height, self.options = width, height, options
        self._thread: threading.Thread | None = None
        self._reset()

    def _reset(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._received = [0] * self.clips
        self._held: list[list[np.ndarray]] = [[] for _ in range(self.clips)]
        self._writing = 0  # the clip whose frames go to ffmpeg now
        self._data: bytes | None = None
        self._error: BaseException | None = None

    @property
    def complete(self) -> bool:
        return self._writing == self.clips

    def add(self, clip: int, frames: np.ndarray) -> None:
        """uint8 [f, H, W, 3] frames, the next ones of `clip`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._write, args=(self._queue,), name="mp4-writer", daemon=True)
            self._thread.start()
        self._received[clip] += len(frames)
        if clip == self._writing:
            self._queue.put(frames)
        else:
            self._held[clip].append(frames)
        while self._writing < self.clips and self._received[self._writing] >= self.frames_per_clip:
            self._writing += 1
            if self._writing < self.clips:
                for held in self._held[self._writing]:
                    self._queue.put(held)
                self._held[self._writing] = []
        if self.complete:
            self._queue.put(_END)

    def _write(self, frames: queue.SimpleQueue) -> None:
        def feed() -> Iterator[np.ndarray]:
            while (item := frames.get()) is not _END:
                yield from item

        try:
            self._data = write_mp4(feed(), self.width, self.height, self.options)
        except BaseException as exc:  # reported by result()
            self._error = exc

    def restart(self) -> None:
        """Drop what was written so far (the decode runs again, or the frames come another way)."""
        self.close()
        self._thread = None
        self._reset()

    def close(self) -> None:
        """End the writer: stop ffmpeg if it still waits for frames, and wait until it is done."""
        if self._thread is not None:
            if not self.complete:
                self._queue.put(_END)
            self._thread.join()

    def result(self) -> bytes:
        """The MP4's bytes, once ffmpeg has written the last frame."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self._data is None:
            raise RuntimeError("the MP4 stream ended before all its frames arrived")
        return self._data


class FrameRouter:
    """A vae.FrameSink: sends each chunk a video decoder emits to the MP4 streams of the clips it holds.

    `rows` names, for each clip of the model call in batch order, its stream and its
    clip number there (None: a clip no stream wants). The decoder emits all rows at
    once, or (sliced) one row at a time in order.
    """

    def __init__(self, rows: list[tuple[Mp4Stream, int] | None], frames_per_row: int, to_host: HostCopy = _host_copy):
        self.rows = rows
        self.frames_per_row = frames_per_row
        self.to_host = to_host
        self.received = [0] * len(rows)

    def chunk(self, frames: torch.Tensor) -> None:
        if frames.shape[0] == len(self.rows):
            indices = range(len(self.rows))
        else:
            indices = [
                next(index for index, count in enumerate(self.received) if count < self.frames_per_row)
            ]  # sliced: the row being decoded
        for index, clip in zip(indices, frames):
            self.received[index] += clip.shape[1]
            if self.rows[index] is not None:
                stream, number = self.rows[index]
                stream.add(number, self.to_host(uint8_images(clip.transpose(0, 1))).numpy())

    def restart(self) -> None:
        self.received = [0] * len(self.rows)
        for stream in {id(row[0]): row[0] for row in self.rows if row is not None}.values():
            stream.restart()
