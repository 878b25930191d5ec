"""Audio files in: WAV and FLAC, their length, rate and channels read from the header before any sample is decoded.

A WAV whose rate is the family's is read here, sample for sample (integer PCM scaled by 2^(bits-1), as soundfile and
ffmpeg do; float as it is). FLAC, and any file at another rate, goes through the ffmpeg imageio-ffmpeg ships, its
demuxer forced (never probed), resampled by ffmpeg's swresample where the rates differ, into one float32 array.
A mono file sent to a stereo family is copied to both channels, as Stable Audio's pipelines repeat a mono waveform.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from ..errors import RequestError
from .deadline import DEFAULT_DECODE_CPU_SECONDS, KILLED, decode_cpu_seconds, last_line, run_into, too_slow

AUDIO_TYPES = "a WAV or FLAC file"

MAX_WAV_CHUNKS = 64  # chunks before "data": a real file has a handful (fmt, fact, LIST, bext)
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def audio_format(data: bytes) -> str | None:
    """ "wav" or "flac" by magic number; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    return None


def is_audio_file(data: bytes) -> bool:
    return audio_format(data) is not None


@dataclass
class AudioHeader:
    """An audio body, its header read: the stream's rate, channels and length in samples per channel."""

    data: bytes
    format: str
    sampling_rate: int
    channels: int
    frames: int  # samples per channel
    sample_format: tuple[int, int] | None = None  # a WAV's (format tag, bits per sample)
    data_offset: int = 0  # a WAV's first sample byte

    @classmethod
    def read(cls, data: bytes) -> AudioHeader:
        kind = audio_format(data)
        if kind is None:
            raise RequestError(f"body is not an audio file; expected {AUDIO_TYPES}")
        header = _wav_header(data) if kind == "wav" else _flac_header(data)
        if header.channels < 1 or header.sampling_rate < 1 or header.frames < 1:
            raise RequestError(
                f"the {kind.upper()} file says {header.channels} channel(s) at {header.sampling_rate} Hz and "
                f"{header.frames} samples; expected {AUDIO_TYPES} with at least one sample"
            )
        return header

    def frames_at(self, sampling_rate: int) -> int:
        """Samples per channel once resampled to `sampling_rate`."""
        return -(-self.frames * sampling_rate // self.sampling_rate)

    def samples(self, sampling_rate: int, channels: int, cap: float = DEFAULT_DECODE_CPU_SECONDS) -> np.ndarray:
        """float32 [channels, N] at `sampling_rate`: the file's own channels, or a mono file's copied to each."""
        if self.channels not in (channels, 1):
            raise RequestError(
                f"the audio file has {self.channels} channels; this family takes {channels} (or a mono file, copied "
                "to each)"
            )
        if self.format == "wav" and self.sampling_rate == sampling_rate:
            waveform = _wav_samples(self)
        else:
            waveform = self._through_ffmpeg(sampling_rate, cap)
        return np.repeat(waveform, channels // waveform.shape[0], axis=0)  # a new, writable array

    def _through_ffmpeg(self, sampling_rate: int, cap: float) -> np.ndarray:
        frames = self.frames_at(sampling_rate)
        out = np.empty((frames + 64, self.channels), dtype=np.float32)  # resampling may add a few samples
        seconds = decode_cpu_seconds(frames * self.channels, cap)
        folder = tempfile.mkdtemp(prefix="remote-vae-")
        try:
            path = Path(folder) / "input"
            path.write_bytes(self.data)
            command = [
                imageio_ffmpeg.get_ffmpeg_exe(),
                "-hide_banner",
                "-nostdin",
                "-loglevel",
                "error",
                "-f",
                self.format,
                "-i",
                str(path),
                "-map",
                "0:a:0",
                "-ar",
                str(sampling_rate),
                "-f",
                "f32le",
                "pipe:1",
            ]
            filled, returncode, message = run_into(out, command, seconds)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if returncode in KILLED:
            raise too_slow("audio", seconds)
        decoded = min(frames, filled // (4 * self.channels))
        if returncode != 0 or decoded == 0:
            raise RequestError(f"audio data is corrupt or truncated ({last_line(message)}); expected {AUDIO_TYPES}")
        return out[:decoded].T


def _wav_header(data: bytes) -> AudioHeader:
    """The fmt and data chunks of a RIFF/WAVE body (chunks walked in order, at most MAX_WAV_CHUNKS)."""
    offset, fmt = 12, None
    for _ in range(MAX_WAV_CHUNKS):
        if offset + 8 > len(data):
            break
        kind, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        body = offset + 8
        if kind == b"fmt " and size >= 16:
            tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == _EXTENSIBLE and size >= 26:
                tag = struct.unpack_from("<H", data, body + 24)[0]  # the sub-format GUID's first two bytes
            fmt = (tag, channels, rate, align, bits)
        elif kind == b"data":
            if fmt is None:
                break
            tag, channels, rate, align, bits = fmt
            if (tag, bits) not in ((_PCM, 8), (_PCM, 16), (_PCM, 24), (_PCM, 32), (_FLOAT, 32), (_FLOAT, 64)):
                raise RequestError(
                    f"WAV sample format {tag} with {bits} bits is not read; expected PCM of 8, 16, 24 or 32 bits or "
                    "float of 32 or 64"
                )
            if align != channels * bits // 8:
                raise RequestError(f"WAV block align {align} does not match {channels} channels of {bits} bits")
            available = min(size, len(data) - body)  # streaming writers leave the size at 0xFFFFFFFF
            return AudioHeader(data, "wav", rate, channels, available // max(1, align), (tag, bits), body)
        offset = body + size + (size & 1)
    raise RequestError(f"WAV file has no fmt chunk before its data chunk; expected {AUDIO_TYPES}")


def _flac_header(data: bytes) -> AudioHeader:
    """STREAMINFO, the first metadata block of every FLAC stream: rate, channels and total samples."""
    if len(data) < 42 or data[4] & 0x7F != 0:
        raise RequestError(f"FLAC file has no STREAMINFO block; expected {AUDIO_TYPES}")
    bits = int.from_bytes(data[18:26], "big")
    rate, channels, total = bits >> 44, ((bits >> 41) & 0x7) + 1, bits & ((1 << 36) - 1)
    if total == 0:
        raise RequestError("the FLAC file does not say how many samples it holds; write it with its length")
    return AudioHeader(data, "flac", rate, channels, total)


def _wav_samples(header: AudioHeader) -> np.ndarray:
    """float32 [channels, N] of a WAV's samples, scaled as soundfile reads them."""
    tag, bits = header.sample_format
    count = header.frames * header.channels
    raw = np.frombuffer(header.data, dtype=np.uint8, count=count * bits // 8, offset=header.data_offset)
    if tag == _FLOAT:
        values = raw.view("<f4" if bits == 32 else "<f8").astype(np.float32)
    elif bits == 8:
        values = (raw.astype(np.float32) - 128) / 128
    elif bits == 24:
        triples = raw.reshape(-1, 3).astype(np.int32)
        signed = (triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)) << 8 >> 8
        values = signed.astype(np.float32) / (1 << 23)
    else:
        values = raw.view("<i2" if bits == 16 else "<i4").astype(np.float32) / (1 << (bits - 1))
    return values.reshape(header.frames, header.channels).T
