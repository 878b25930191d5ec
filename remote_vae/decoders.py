"""Media in: the image and video files an encode may carry, read within limits set before any pixel is decoded.

Decoders are the code a request reaches most directly, so each is allowed in
on purpose and bounded three ways:
- **formats**: PNG, JPEG and WebP images (what diffusers' remote_encode, the
  ComfyUI nodes, browsers and cameras send), decoded by Pillow with every other
  format it knows switched off (TIFF, TGA, PCX, EPS through Ghostscript...);
  MP4/MOV, WebM/MKV and GIF videos, with ffmpeg's demuxer forced from the magic
  number (never probed), so a body cannot make ffmpeg open playlists, URLs or
  other files;
- **size**, from the headers: an image's sides from its header (Pillow reads no
  pixels on open); a video's frame size from its stream header and its frame
  count by demuxing it (`-c copy`: packets are counted, none decoded). Both are
  checked, and the memory they need reserved, before the decode starts;
- **work**: a JPEG may have at most MAX_JPEG_SCANS scans (each progressive scan
  is a pass over the whole image: a 797 KB file of repeated scans took 56 s of
  CPU) and MAX_METADATA_BYTES of APPn/COM segments; and every decode has a CPU
  deadline in proportion to its pixels (`cpu_seconds`), enforced between
  Pillow's reads and by RLIMIT_CPU on ffmpeg.
Frames are decoded by ffmpeg straight into one array: no frame is held twice.
"""

from __future__ import annotations

import io
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import PIL.Image
import PIL.PngImagePlugin

from .errors import RequestError
from .settings import Limits

log = logging.getLogger("remote_vae")

# Magic numbers of the image files an encode request may carry (GIF and BMP too, to be told apart and refused by name).
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
IMAGE_DECODERS = ("PNG", "JPEG", "WEBP")
IMAGE_TYPES = "a PNG, JPEG or WebP file"

MAX_JPEG_SCANS = 100  # libjpeg's own progressive scripts use 10; optimised encoders rarely pass 20
MAX_METADATA_BYTES = 16 << 20  # EXIF, ICC profiles, XMP, comments: Pillow keeps them all in memory
# PNG text and compressed ICC chunks, which Pillow inflates and keeps (its defaults allow 64 MB); none is needed here.
MAX_PNG_TEXT_BYTES = 1 << 20

# The CPU a decode may use: a floor, plus 5x the slowest measured cost per pixel (Pillow's PNG, 48 ns/px with the
# conversion to RGB on this project's CI machine; JPEG 18, WebP 41, ffmpeg's H.264 under 10), capped by the setting.
DECODE_FLOOR_SECONDS = 1.0
DECODE_SECONDS_PER_PIXEL = 250e-9
DEFAULT_DECODE_CPU_SECONDS = Limits.decode_cpu_seconds


def decode_cpu_seconds(pixels: int, cap: float = DEFAULT_DECODE_CPU_SECONDS) -> float:
    """CPU seconds allowed to decode `pixels` pixels (over every frame)."""
    return min(cap, DECODE_FLOOR_SECONDS + pixels * DECODE_SECONDS_PER_PIXEL)


def guard_decompression_bombs(max_pixels: int) -> None:
    """Pillow's own guards, process-wide: it refuses (DecompressionBombError) images over twice this size on open, and
    PNG text beyond a small bound. open_image checks each image against the request's limit as well."""
    PIL.Image.MAX_IMAGE_PIXELS = max_pixels
    PIL.PngImagePlugin.MAX_TEXT_CHUNK = MAX_PNG_TEXT_BYTES
    PIL.PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES


def is_image_file(data: bytes) -> bool:
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def too_slow(what: str, seconds: float) -> RequestError:
    return RequestError(
        f"decoding the {what} took more than its {seconds:.3g} s of CPU (1 s plus 250 ns a pixel, at most "
        "--decode-cpu-seconds); send a simpler file of the same pixels (e.g. a baseline JPEG or a PNG)",
        status=413,
    )


# -- images ------------------------------------------------------------------------


PROGRESSIVE_FRAMES = (0xC2, 0xC6, 0xCA, 0xCE)  # SOFn markers of progressive JPEGs


def check_jpeg(data: bytes) -> bool:
    """Walk a JPEG's markers (no decoding): at most MAX_JPEG_SCANS scans and MAX_METADATA_BYTES of metadata.
    Whether it is progressive."""
    scans = metadata = 0
    progressive = False
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return progressive  # not where a marker should be: Pillow says what is wrong
        while position < end and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= end:
            return progressive
        marker = data[position]
        position += 1
        if marker == 0xD9:  # end of image
            return progressive
        progressive = progressive or marker in PROGRESSIVE_FRAMES
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0x00):  # no length
            continue
        length = int.from_bytes(data[position : position + 2], "big")
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            metadata += length
            if metadata > MAX_METADATA_BYTES:
                raise RequestError(
                    f"the JPEG carries more than {MAX_METADATA_BYTES >> 20} MiB of metadata (APPn and COM "
                    "segments); strip it (e.g. save the image again without EXIF)",
                    status=413,
                )
        position += length
        # Start of scan: entropy-coded data follows, up to the next marker that is not 0xFF00 or RSTn
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise RequestError(
                    f"the JPEG has more than {MAX_JPEG_SCANS} scans, each a pass over the whole image; "
                    "expected a baseline or ordinary progressive JPEG (libjpeg writes 10 scans)",
                    status=413,
                )
            while True:
                position = data.find(b"\xff", position)
                if position < 0 or position + 1 >= end:
                    return progressive
                following = data[position + 1]
                if following != 0 and not 0xD0 <= following <= 0xD7:
                    break
                position += 2
    return progressive


class _DecodeDeadline(Exception):
    pass


class DeadlineReader(io.BytesIO):
    """File bytes for Pillow that end its decode once the thread has used `seconds` of CPU from `start()`.

    Pillow decodes as it reads, a block at a time, so the check between reads bounds the work."""

    deadline: float | None = None

    def start(self, seconds: float) -> None:
        self.deadline = time.thread_time() + seconds

    def read(self, size: int | None = -1) -> bytes:
        if self.deadline is not None and time.thread_time() > self.deadline:
            raise _DecodeDeadline()
        return super().read(size)


# A progressive JPEG is decoded by Pillow in a child process: libjpeg does the work of all its scans in one call after
# the last byte is read, which no check in this process can interrupt; RLIMIT_CPU ends the child. The same Pillow, so
# the same pixels; 50-80 ms to start. Every other format decodes as it reads, and is checked between reads here.
PILLOW_CHILD = (
    "import sys, PIL.Image as I; I.MAX_IMAGE_PIXELS = None; "
    "sys.stdout.buffer.write(I.open(sys.argv[1], formats=['JPEG']).convert('RGB').tobytes())"
)


@dataclass
class ImageHeader:
    """An image file opened, its size read from its header, not a pixel decoded."""

    image: PIL.Image.Image
    reader: DeadlineReader | None  # None: an image handed over decoded already (handler.py)
    width: int
    height: int
    progressive_jpeg: bytes | None = None  # the file, when it is a progressive JPEG

    def pixels(self, cap: float = DEFAULT_DECODE_CPU_SECONDS) -> np.ndarray:
        """uint8 [H, W, 3] RGB, decoded within its CPU deadline."""
        seconds = decode_cpu_seconds(self.width * self.height, cap)
        if self.progressive_jpeg is not None:
            self.image.close()
            return self._pixels_in_child(seconds)
        if self.reader is not None:
            self.reader.start(seconds)
        self.image.decodermaxblock = 16384  # a check every 16 KB of input
        try:
            self.image.load()
            rgb = self.image if self.image.mode == "RGB" else self.image.convert("RGB")
            pixels = np.asarray(rgb)  # Pillow holds 4 bytes a pixel; this is a packed copy of 3
            self.image.close()  # frees Pillow's copy now, not when the request ends
            return pixels
        except _DecodeDeadline:
            raise too_slow("image", seconds) from None
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
            raise RequestError(f"image data is corrupt or truncated ({exc}); expected {IMAGE_TYPES}, complete") from exc
        finally:
            if self.reader is not None:
                self.reader.deadline = None

    def _pixels_in_child(self, seconds: float) -> np.ndarray:
        out = np.empty((self.height, self.width, 3), dtype=np.uint8)
        with tempfile.TemporaryDirectory(prefix="remote-vae-") as folder:
            path = Path(folder) / "image.jpg"
            path.write_bytes(self.progressive_jpeg)
            filled, returncode, errors = run_into(out, [sys.executable, "-c", PILLOW_CHILD, str(path)], seconds)
        if returncode in KILLED:
            raise too_slow("image", seconds)
        if returncode != 0 or filled != out.nbytes:
            raise RequestError(
                f"image data is corrupt or truncated ({_last_line(errors)}); expected {IMAGE_TYPES}, complete"
            )
        return out


def read_image_header(data: bytes, max_pixels: int) -> ImageHeader:
    """Open an image file and check its size and structure, refusing it before any pixel is decoded."""
    progressive = data[:3] == b"\xff\xd8\xff" and check_jpeg(data)
    reader = DeadlineReader(data)
    try:
        image = PIL.Image.open(reader, formats=IMAGE_DECODERS)
    except PIL.Image.DecompressionBombError as exc:
        raise RequestError(f"image is too large: {exc}", status=413) from exc
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RequestError(f"body is not a readable image ({exc}); expected {IMAGE_TYPES}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            f"image is {width}x{height} = {width * height} pixels; this server accepts at most {max_pixels}", status=413
        )
    return ImageHeader(image, reader, width, height, data if progressive else None)


def open_image(data: bytes, max_pixels: int) -> PIL.Image.Image:
    """An RGB image from file bytes, refusing oversized or over-complex files before decoding their pixels."""
    return PIL.Image.fromarray(read_image_header(data, max_pixels).pixels())


# -- videos ------------------------------------------------------------------------

# ffmpeg demuxers by magic number, forced (never probed).
VIDEO_DEMUXERS = (
    (4, b"ftyp", "mov"),  # MP4 / MOV / M4V
    (0, b"\x1a\x45\xdf\xa3", "matroska"),  # WebM / MKV
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
)
VIDEO_TYPES = "an MP4, WebM or GIF file"
PROBE_CPU_SECONDS = 5  # demuxing only: milliseconds for any file the body limit allows
# Anchored at a line's start: a metadata value (printed indented) cannot pass for a stream.
STREAM_SIZE = re.compile(r"^\s*Stream #0:\d+[^\n]*?: Video: [^\n]*? (\d+)x(\d+)[, \[]", re.MULTILINE)
PACKETS = re.compile(rb"frame=\s*(\d+)")


def video_demuxer(data: bytes) -> str | None:
    for offset, magic, demuxer in VIDEO_DEMUXERS:
        if data[offset : offset + len(magic)] == magic:
            return demuxer
    return None


def is_video_file(data: bytes) -> bool:
    return video_demuxer(data) in ("mov", "matroska")  # a GIF is an image too


def _limit_cpu(process: subprocess.Popen, seconds: float) -> None:
    """RLIMIT_CPU on a child just started: SIGXCPU, then SIGKILL a second later, if it decodes past its deadline."""
    limit = max(1, int(seconds + 0.999))
    try:
        resource.prlimit(process.pid, resource.RLIMIT_CPU, (limit, limit + 1))
    except (OSError, ValueError, AttributeError):  # not Linux, or the child has exited already
        pass


KILLED = (-9, -24)  # SIGKILL (the watchdog, or RLIMIT_CPU's hard limit), SIGXCPU (its soft limit): past the deadline


def run_into(out: np.ndarray, command: list[str], cpu_seconds: float) -> tuple[int, int, str]:
    """Run a decoder that writes raw pixels to its stdout straight into `out` (no copy held twice), under RLIMIT_CPU and a
    wall-clock watchdog (a stalled pipe, not just CPU, ends it). (bytes filled, return code, the last of its stderr)."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    _limit_cpu(process, cpu_seconds)
    errors = bytearray()

    def read_errors() -> None:  # all of it, so the child never blocks on a full pipe; the last 64 KB kept
        while chunk := process.stderr.read(1 << 16):
            errors[:] = (errors + chunk)[-(1 << 16) :]

    reader = threading.Thread(target=read_errors, name="decoder-errors", daemon=True)
    reader.start()
    finished = threading.Event()
    killed = []

    def watch() -> None:  # RLIMIT_CPU counts whole seconds: the child's CPU time is read here every 20 ms as well
        wall_deadline = time.monotonic() + cpu_seconds * 4 + 5
        while not finished.wait(0.02):
            if _cpu_seconds(process.pid) > cpu_seconds or time.monotonic() > wall_deadline:
                killed.append(True)
                process.kill()
                return

    watchdog = threading.Thread(target=watch, name="decoder-deadline", daemon=True)
    watchdog.start()
    filled = 0
    try:
        view = memoryview(out).cast("B")
        while filled < len(view):
            count = process.stdout.readinto(view[filled:])
            if not count:
                break
            filled += count
        process.stdout.close()
        returncode = process.wait()
    finally:
        finished.set()
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        watchdog.join(timeout=5)
    return filled, KILLED[0] if killed else returncode, bytes(errors).decode("utf-8", errors="replace")


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float:
    """A running child's user + system CPU time, all its threads (Linux /proc; 0 elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def _last_line(text: str) -> str:
    """A child's last words on stderr: ffmpeg and Python both end with the error that stopped them."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "ffmpeg failed")[:300]


class VideoFile:
    """A video body: its first video stream's frame size and frame count from the container, then its frames."""

    def __init__(self, data: bytes):
        self.demuxer = video_demuxer(data)
        if self.demuxer is None:
            raise RequestError(f"body is not a video file; expected {VIDEO_TYPES}")
        self._folder = tempfile.mkdtemp(prefix="remote-vae-")
        self.path = Path(self._folder) / "input"
        self.path.write_bytes(data)
        try:
            self.width, self.height, self.frame_count = self._probe()
        except BaseException:
            self.close()
            raise

    def _ffmpeg(self, *arguments: str, cpu_seconds: float, **popen) -> subprocess.Popen:
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", *arguments]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, **popen)
        _limit_cpu(process, cpu_seconds)
        return process

    def _probe(self) -> tuple[int, int, int]:
        """(width, height, frames): the stream header's size and the container's video packets, demuxed, not decoded."""
        process = self._ffmpeg(
            "-f",
            self.demuxer,
            "-i",
            str(self.path),
            "-map",
            "0:v:0",
            "-c",
            "copy",
            "-f",
            "null",
            "-",
            cpu_seconds=PROBE_CPU_SECONDS,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, report = process.communicate(timeout=PROBE_CPU_SECONDS * 4)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RequestError(
                f"the video's container could not be read within {PROBE_CPU_SECONDS * 4} s; expected {VIDEO_TYPES}"
            ) from None
        text = report.decode("utf-8", errors="replace")
        size = STREAM_SIZE.search(text)
        packets = PACKETS.findall(report)
        if process.returncode != 0 or size is None or not packets:
            raise RequestError(f"body is not a readable video ({_last_line(text)}); expected {VIDEO_TYPES}")
        width, height, frames = int(size[1]), int(size[2]), int(packets[-1])
        if width < 1 or height < 1:
            raise RequestError(
                f"the video's frames are {width}x{height}; expected {VIDEO_TYPES} with frames of at least 1x1"
            )
        if frames < 1:
            raise RequestError(f"video has no frames; expected {VIDEO_TYPES}")
        return width, height, frames

    def frames(self, max_frames: int, cap: float = DEFAULT_DECODE_CPU_SECONDS) -> np.ndarray:
        """uint8 [F, H, W, 3], decoded into one array; more than max_frames frames is a 413, before any is decoded."""
        if self.frame_count > max_frames:
            raise RequestError(
                f"video has {self.frame_count} frames of {self.width}x{self.height}; "
                f"this server accepts at most {max_frames} at that size",
                status=413,
            )
        pixels = self.frame_count * self.width * self.height
        seconds = decode_cpu_seconds(pixels, cap)
        frame_bytes = self.width * self.height * 3
        out = np.empty((self.frame_count, self.height, self.width, 3), dtype=np.uint8)
        # The decoder refuses any frame far larger than the header said (its buffers are padded: a margin of twice that).
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-max_pixels",
            str(2 * self.width * self.height + (1 << 16)),
            "-f",
            self.demuxer,
            "-i",
            str(self.path),
            "-map",
            "0:v:0",
            "-frames:v",
            str(self.frame_count),
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "pipe:1",
        ]
        filled, returncode, message = run_into(out, command, seconds)
        if returncode in KILLED:
            raise too_slow("video", seconds)
        complete = filled // frame_bytes
        if returncode != 0 and complete < self.frame_count:
            raise RequestError(f"video data is corrupt or truncated ({_last_line(message)}); expected {VIDEO_TYPES}")
        if complete == 0:
            raise RequestError(f"video has no frames that decode; expected {VIDEO_TYPES}")
        return out[:complete]  # a view: fewer frames decoded than packets (rare) costs no copy

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> "VideoFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
