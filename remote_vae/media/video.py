"""MP4 out: H.264 through the ffmpeg that imageio-ffmpeg ships, written by a thread of its own while the decoder
still emits frames (FrameRouter sends each clip's frames to its stream)."""

from __future__ import annotations

import queue
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

from .pixels import uint8_images
from .tensors import HostCopy, host_copy


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

    def __init__(self, rows: list[tuple[Mp4Stream, int] | None], frames_per_row: int, to_host: HostCopy = host_copy):
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
        for index, clip in zip(indices, frames, strict=False):
            self.received[index] += clip.shape[1]
            if self.rows[index] is not None:
                stream, number = self.rows[index]
                stream.add(number, self.to_host(uint8_images(clip.transpose(0, 1))).numpy())

    def restart(self) -> None:
        self.received = [0] * len(self.rows)
        for stream in {id(row[0]): row[0] for row in self.rows if row is not None}.values():
            stream.restart()
