"""Audio out: a decode's waveform [B, C, N] as one WAV or FLAC file, the clips of a batch one after another; or as
the sound track of a video's MP4 (`with_sound`: LTX-2's video and its audio, in one reply).

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


SOUND_BITRATE = "192k"  # AAC, as MP4 players expect; LTX-2's own export writes AAC too


def with_sound(mp4: bytes, waveforms: torch.Tensor, sampling_rate: int, clip_seconds: float) -> bytes:
    """An MP4 (its clips one after another, each `clip_seconds` long) with `waveforms` [B, C, N] as its AAC sound track:
    each clip's sound cut or padded with silence to its clip's length, so every clip keeps its sound in step. The video
    stream is copied as it is."""
    per_clip = round(clip_seconds * sampling_rate)
    fitted = torch.zeros(waveforms.shape[0], waveforms.shape[1], per_clip)
    kept = min(per_clip, waveforms.shape[2])
    fitted[:, :, :kept] = waveforms[:, :, :kept].float()
    samples = interleaved(fitted)
    folder = tempfile.mkdtemp(prefix="remote-vae-")
    try:
        video, sound, out = (Path(folder) / name for name in ("video.mp4", "sound.wav", "reply.mp4"))
        video.write_bytes(mp4)
        sound.write_bytes(wav_bytes(samples, sampling_rate))
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error"]
        command += ["-i", str(video), "-f", "wav", "-i", str(sound), "-map", "0:v", "-map", "1:a", "-c:v", "copy"]
        command += ["-c:a", "aac", "-b:a", SOUND_BITRATE, "-movflags", "+faststart", "-f", "mp4", str(out)]
        _run_ffmpeg(command, np.zeros((0, 1), np.float32), seconds=max(FLAC_FLOOR_SECONDS, samples.size * 1e-6))
        return out.read_bytes()
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


def _run_ffmpeg(command: list[str], samples: np.ndarray, seconds: float | None = None) -> None:
    """ffmpeg run on `samples` (its stdin), within a CPU-time cap."""
    seconds = seconds or max(FLAC_FLOOR_SECONDS, samples.size * FLAC_SECONDS_PER_SAMPLE)
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    limit_cpu(process, seconds)
    try:
        _, errors = process.communicate(np.clip(samples, -1.0, 1.0).tobytes(), timeout=seconds * 4)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RequestError("the audio took too long to write; ask for a WAV or output_type=pt", status=503) from None
    if process.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write the audio: {errors.decode(errors='replace')[-500:]}")
