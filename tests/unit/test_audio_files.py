"""Audio files in and out (decoders/audio.py, media/audio.py): headers read before any sample, every WAV sample
format scaled as ffmpeg reads it, FLAC and resampling through ffmpeg, and replies that read back as written."""

from __future__ import annotations

import struct
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from remote_vae.decoders import AudioHeader, audio_format
from remote_vae.errors import RequestError
from remote_vae.media import AudioFile, write_audio

RATE = 44100


def wav(
    samples: np.ndarray, tag: int, bits: int, rate: int = RATE, extensible: bool = False, extra: bytes = b"", channels=0
) -> bytes:
    """[N, C] already in the file's sample type -> a WAV, optionally WAVE_FORMAT_EXTENSIBLE and with chunks before
    its data."""
    channels = channels or samples.shape[1]
    align = channels * bits // 8
    if extensible:
        guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * align, align, bits, 22, bits, 3) + guid
    else:
        fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    data = samples.tobytes()
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def ffmpeg_samples(data: bytes, channels: int) -> np.ndarray:
    """What ffmpeg itself reads from a file, as float32 [C, N]: the reference for every sample format."""
    out = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", "pipe:0", "-f", "f32le", "pipe:1"],
        input=data,
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(out, np.float32).reshape(-1, channels).T


@pytest.mark.parametrize(
    "dtype, tag, bits, extensible",
    [
        ("<i2", 1, 16, False),
        ("<i4", 1, 32, False),
        ("u1", 1, 8, False),
        ("<f4", 3, 32, False),
        ("<f8", 3, 64, False),
        ("<i2", 1, 16, True),
        ("<f4", 3, 32, True),
    ],
)
def test_wav_samples_are_the_ones_ffmpeg_reads(dtype, tag, bits, extensible):
    rng = np.random.default_rng(1)
    if dtype.lstrip("<").startswith("f"):
        samples = (rng.random((500, 2)) * 1.8 - 0.9).astype(dtype)
    else:
        info = np.iinfo(np.dtype(dtype))
        samples = rng.integers(info.min, info.max, (500, 2), endpoint=True).astype(dtype)
    data = wav(samples, tag, bits, extensible=extensible, extra=b"JUNK\x03\x00\x00\x00abc\x00")  # an odd chunk
    header = AudioHeader.read(data)
    assert (header.format, header.sampling_rate, header.channels, header.frames) == ("wav", RATE, 2, 500)
    np.testing.assert_allclose(header.samples(RATE, 2), ffmpeg_samples(data, 2), atol=1e-7)


def test_24_bit_wav_is_sign_extended():
    values = np.array([0, 1, -1, (1 << 23) - 1, -(1 << 23)], dtype=np.int32)
    packed = np.stack([values & 0xFF, (values >> 8) & 0xFF, (values >> 16) & 0xFF], axis=1).astype(np.uint8)
    header = AudioHeader.read(wav(packed, 1, 24, channels=1))
    np.testing.assert_array_equal(header.samples(RATE, 1)[0], values / (1 << 23))


def test_replies_read_back_wav_exactly_and_flac_within_a_24_bit_step():
    waveforms = torch.from_numpy(np.random.default_rng(2).normal(0, 0.6, (2, 2, 3000)).astype(np.float32))
    clips = waveforms.permute(1, 0, 2).reshape(2, -1).numpy()  # clips one after another
    wav_reply = write_audio(waveforms, AudioFile("wav", RATE))
    np.testing.assert_array_equal(AudioHeader.read(wav_reply).samples(RATE, 2), clips)  # unclipped float
    np.testing.assert_array_equal(ffmpeg_samples(wav_reply, 2), clips)  # and any reader agrees
    flac_reply = write_audio(waveforms, AudioFile("flac", RATE))
    header = AudioHeader.read(flac_reply)
    assert (header.format, header.channels, header.frames) == ("flac", 2, 6000)
    np.testing.assert_allclose(header.samples(RATE, 2), np.clip(clips, -1, 1), atol=2.0**-23)


def test_other_rates_are_resampled_and_mono_copied_to_each_channel():
    tone = np.sin(np.arange(22050) / 22050 * 2 * np.pi * 440).astype(np.float32)[:, None]
    header = AudioHeader.read(wav(tone, 3, 32, rate=22050))
    assert header.frames_at(RATE) == 44100
    stereo = header.samples(RATE, 2)
    assert stereo.shape[0] == 2 and abs(stereo.shape[1] - 44100) <= 64
    np.testing.assert_array_equal(stereo[0], stereo[1])
    with pytest.raises(RequestError, match="has 2 channels; this family takes 1"):
        AudioHeader.read(wav(np.zeros((10, 2), "<f4"), 3, 32)).samples(RATE, 1)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"RIFF\x00\x00\x00\x00WAVE", "no fmt chunk"),
        (b"RIFF\x00\x00\x00\x00WAVEdata\x04\x00\x00\x00\x00\x00\x00\x00", "no fmt chunk"),
        (wav(np.zeros((4, 1), "<i2"), 6, 16), "sample format 6"),  # A-law
        (wav(np.zeros((0, 1), "<i2"), 1, 16), "at least one sample"),
        (b"fLaC\x00\x00\x00\x22" + b"\x00" * 34, "does not say how many samples"),
        (b"fLaC\x04\x00\x00\x08" + b"\x00" * 40, "no STREAMINFO"),
        (b"OggS" + b"\x00" * 40, "not an audio file"),
    ],
)
def test_bad_audio_files_say_what_was_expected(data, message):
    with pytest.raises(RequestError, match=message):
        AudioHeader.read(data)


def test_a_corrupt_flac_is_a_request_error():
    flac = write_audio(torch.zeros(1, 2, 4096), AudioFile("flac", RATE))
    with pytest.raises(RequestError, match="corrupt or truncated"):
        AudioHeader.read(flac[:60] + b"\xff" * 200).samples(RATE, 2)


def test_audio_format_by_magic_number():
    assert [audio_format(data) for data in (b"RIFF\0\0\0\0WAVE", b"fLaC", b"RIFF\0\0\0\0AVI ", b"ID3")] == [
        "wav",
        "flac",
        None,
        None,
    ]
