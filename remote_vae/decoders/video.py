"""Video files in: MP4/MOV, WebM/MKV and GIF through the ffmpeg imageio-ffmpeg ships, the demuxer forced from the
magic number; the frame size from the stream header and the frame count by demuxing, both checked before any frame
is decoded, and the frames decoded straight into one array."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from ..errors import RequestError
from .deadline import DEFAULT_DECODE_CPU_SECONDS, KILLED, decode_cpu_seconds, last_line, limit_cpu, run_into, too_slow

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
        limit_cpu(process, cpu_seconds)
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
            raise RequestError(f"body is not a readable video ({last_line(text)}); expected {VIDEO_TYPES}")
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
        # The decoder refuses any frame far larger than the header said (its buffers are padded: a margin of twice
        # that).
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
            raise RequestError(f"video data is corrupt or truncated ({last_line(message)}); expected {VIDEO_TYPES}")
        if complete == 0:
            raise RequestError(f"video has no frames that decode; expected {VIDEO_TYPES}")
        return out[:complete]  # a view: fewer frames decoded than packets (rare) costs no copy

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> VideoFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
