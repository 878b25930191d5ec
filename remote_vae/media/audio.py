"""Audio out: a decode's waveform [B, C, N] as one WAV or FLAC file, the clips of a batch one after another.

WAV is 32-bit float: the decoder's samples exactly, unclipped (a pipeline's own output is not clipped either).
FLAC is 24-bit integer through the ffmpeg imageio-ffmpeg ships: lossless to 2^-23 of full scale, clipped to -1..1.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

from ..decoders.deadline import limit_cpu
from ..errors import RequestError

FLAC_SECONDS_PER_SAMPLE = 1e-7  # ffmpeg's FLAC encoder writes ~30M samples a second on one core; 10x margin
FLAC_FLOOR_SECONDS = 5.0


@dataclass(frozen=True)
class AudioFile:
    """What an audio reply is written as."""

    format: str = "wav"  # "wav" or "flac" (vocabulary.AUDIO_FORMATS)
    sampling_rate: int = 44100


def interleaved(waveforms: torch.Tensor) -> np.ndarray:
    """[B, C, N] on the host -> float32 [B*N, C]: the batch's clips one after another, channels interleaved."""
    clips = waveforms.float().permute(0, 2, 1).reshape(-1, waveforms.shape[1])
    return np.ascontiguousarray(clips.numpy(), dtype=np.float32)


def write_audio(waveforms: torch.Tensor, options: AudioFile) -> bytes:
    samples = interleaved(waveforms)
    return wav_bytes(samples, options.sampling_rate) if options.format == "wav" else flac_bytes(samples, options)


def wav_bytes(samples: np.ndarray, sampling_rate: int) -> bytes:
    """float32 [N, C] -> a WAVE_FORMAT_IEEE_FLOAT file (fmt of 18 bytes and a fact chunk, as the format asks)."""
    frames, channels = samples.shape
    data = samples.astype("<f4", copy=False).tobytes()
    fmt = struct.pack("<HHIIHHH", 3, channels, sampling_rate, sampling_rate * channels * 4, channels * 4, 32, 0)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<II", 4, frames)
    chunks += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def flac_bytes(samples: np.ndarray, options: AudioFile) -> bytes:
    """float32 [N, C] -> 24-bit FLAC, written by ffmpeg from the raw samples on its stdin (to a file: a FLAC's header
    holds its length, which ffmpeg writes last, seeking back)."""
    folder = tempfile.mkdtemp(prefix="remote-vae-")
    try:
        path = Path(folder) / "reply.flac"
        _run_ffmpeg(_flac_command(samples.shape[1], options.sampling_rate, path), samples)
        return path.read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _flac_command(channels: int, sampling_rate: int, path: Path) -> list[str]:
    return [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "error",
        "-f",
        "f32le",
        "-ar",
        str(sampling_rate),
        "-ac",
        str(channels),
        "-i",
        "pipe:0",
        "-c:a",
        "flac",
        "-sample_fmt",
        "s32",
        "-bits_per_raw_sample",
        "24",
        "-f",
        "flac",
        str(path),
    ]


def _run_ffmpeg(command: list[str], samples: np.ndarray) -> None:
    seconds = max(FLAC_FLOOR_SECONDS, samples.size * FLAC_SECONDS_PER_SAMPLE)
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    limit_cpu(process, seconds)
    try:
        _, errors = process.communicate(np.clip(samples, -1.0, 1.0).tobytes(), timeout=seconds * 4)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RequestError("the FLAC reply took too long to write; ask for output_type=wav", status=503) from None
    if process.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write FLAC: {errors.decode(errors='replace')[-500:]}")
