"""Audio families through the live server: Stable Audio Open's Oobleck VAE and Stable Audio 3's SAME decode latents
[B, C, T] to the waveform diffusers makes in-process (as a tensor, a float WAV holding the very samples, a 24-bit FLAC
within 2^-23), encode waveform tensors and WAV / FLAC files to the encoder's own latent, and each pipeline's latent
decodes to that pipeline's audio; bad latents and bad files get 4xx JSON."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest
import requests
import tiny_pipelines
import torch
from conftest import TINY_MODELS, seeded, tensor_of
from diffusers.utils.remote_utils import remote_decode, remote_encode

from remote_vae import RemoteVae
from remote_vae.cli import client_call
from remote_vae.client import Client, RemoteVaeError
from remote_vae.decoders import AudioHeader
from remote_vae.families import load_family
from remote_vae.media import AudioFile, write_audio

FAMILY = "stableaudio"
RATE, CHANNELS, HOP = 44100, 2, 2048
# Latent channels and samples per step; ACE-Step's Oobleck (48 kHz) holds its latent steps first
AUDIO_FAMILIES = {
    name: (channels, hop)
    for name, channels, hop in (("stableaudio", 64, 2048), ("stableaudio3", 256, 4096), ("acestep", 64, 1920))
    if name in TINY_MODELS
}
FLAC_STEP = 2.0**-23  # one step of a 24-bit sample


@pytest.fixture(scope="module")
def url(every_family_server) -> str:
    return f"{every_family_server.url}/{FAMILY}/"


@pytest.fixture(scope="module")
def model(reference):
    return reference[FAMILY]


def local_decode(model, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(latents).sample


def local_mean(model, waveform: torch.Tensor) -> torch.Tensor:
    """The encoder's deterministic latent: a distribution's mean, or SAME's latent."""
    with torch.no_grad():
        encoded = model.encode(waveform)
    return encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents


def post(url: str, path: str, body: bytes, **params) -> requests.Response:
    return requests.post(url + path, params=params, data=body, headers={"Content-Type": "tensor/binary"}, timeout=60)


def decode_reply(url: str, latents: torch.Tensor, **params) -> requests.Response:
    return post(url, "decode", latents.numpy().tobytes(), shape=list(latents.shape), dtype="float32", **params)


def pcm16_wav(waveform: np.ndarray, rate: int = RATE) -> bytes:
    """[C, N] in -1..1 -> a 16-bit PCM WAV, as most recorders write one."""
    channels, frames = waveform.shape
    data = (np.clip(waveform.T, -1, 1) * 32767).round().astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


@pytest.mark.parametrize("family", AUDIO_FAMILIES)
@pytest.mark.parametrize("batch, steps", [(1, 3), (2, 1), (3, 5)])
def test_decode_is_the_waveform_diffusers_makes(every_family_server, reference, family, batch, steps):
    channels, hop = AUDIO_FAMILIES[family]
    url = f"{every_family_server.url}/{family}/"
    latents = seeded(batch, channels, steps, seed=41)
    out = eval(client_call(load_family(family)), {"remote_decode": remote_decode, "url": url, "latents": latents})
    expected = local_decode(reference[family], latents)
    assert out.shape == expected.shape == (batch, CHANNELS, steps * hop)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with Client(url) as client:
        torch.testing.assert_close(client.decode(latents), expected, atol=1e-5, rtol=1e-5)
        wav = AudioHeader.read(client.decode(latents, output="wav"))
        clips = expected.permute(1, 0, 2).reshape(CHANNELS, -1).numpy()
        rate = load_family(family).audio.sampling_rate
        np.testing.assert_allclose(wav.samples(rate, CHANNELS), clips, atol=1e-6)
        if load_family(family).layout.frames_first:  # as its pipeline holds it, [B, T, C]: the same
            torch.testing.assert_close(client.decode(latents.transpose(1, 2)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", AUDIO_FAMILIES)
def test_encode_is_the_encoders_latent(every_family_server, reference, family):
    channels, hop = AUDIO_FAMILIES[family]
    url = f"{every_family_server.url}/{family}/"
    waveform = local_decode(reference[family], seeded(2, channels, 2, seed=47)).clamp(-1, 1)
    expected = local_mean(reference[family], waveform)
    held = load_family(family).layout.as_pipeline_holds(expected)  # ACE-Step's pipeline holds [B, T, C]
    torch.testing.assert_close(remote_encode(url, waveform), held, atol=1e-5, rtol=1e-5)
    drop_in = RemoteVae(url)
    assert next(drop_in.parameters()).dtype == torch.float32  # SA3's pipelines read the VAE's dtype this way
    square = seeded(1, channels, channels, seed=48)  # as many latent steps as channels: the drop-in says which is which
    torch.testing.assert_close(
        drop_in.decode(square).sample, local_decode(reference[family], square), atol=1e-5, rtol=1e-5
    )
    encoded = drop_in.encode(waveform)
    got = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_wav_holds_the_decoders_samples_and_flac_them_within_a_24_bit_step(url, model):
    latents = seeded(2, 64, 2, seed=42)
    expected = local_decode(model, latents)
    clips = expected.permute(1, 0, 2).reshape(CHANNELS, -1).numpy()  # the batch's clips one after another
    for output_type, media_type, tolerance in (("wav", "audio/wav", 1e-6), ("flac", "audio/flac", FLAC_STEP)):
        reply = decode_reply(url, latents, output_type=output_type)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == media_type
        assert reply.headers["audio-count"] == "2" and reply.headers["sample-count"] == str(2 * HOP)
        assert reply.headers["sample-rate"] == str(RATE)
        header = AudioHeader.read(reply.content)
        assert (header.format, header.sampling_rate, header.channels) == (output_type, RATE, CHANNELS)
        samples = header.samples(RATE, CHANNELS)
        np.testing.assert_allclose(samples, np.clip(clips, -1, 1) if output_type == "flac" else clips, atol=tolerance)
    default = decode_reply(url, latents)  # no output_type, no Accept: a WAV, an audio family's file
    assert default.headers["content-type"] == "audio/wav"
    accepted = requests.post(
        url,
        params={"shape": [2, 64, 2], "dtype": "float32"},
        data=latents.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "audio/flac"},
        timeout=60,
    )
    assert accepted.headers["content-type"] == "audio/flac"


def test_the_pipelines_latent_decodes_to_the_pipelines_audio(url, model):
    """StableAudioPipeline's output_type="latent", through the printed client call, then cropped as the pipeline crops
    to audio_end_in_s: the pipeline's own audio."""
    latents = tiny_pipelines.run(FAMILY, model, "latent")
    audio = tiny_pipelines.run(FAMILY, model, "pt")
    out = eval(client_call(load_family(FAMILY)), {"remote_decode": remote_decode, "url": url, "latents": latents})
    torch.testing.assert_close(out[:, :, : audio.shape[-1]], audio, atol=1e-5, rtol=1e-5)


def test_encode_a_waveform_tensor_and_audio_files(url, model):
    waveform = local_decode(model, seeded(1, 64, 2, seed=43)).clamp(-1, 1)
    expected = local_mean(model, waveform)
    # diffusers' remote_encode sends the tensor with its shape: [1, 2, N] is a waveform for a stereo family
    torch.testing.assert_close(remote_encode(url, waveform), expected, atol=1e-5, rtol=1e-5)
    with Client(url) as client:
        for fmt in ("wav", "flac"):
            file = write_audio(waveform, AudioFile(fmt, RATE))
            got = client.encode(file, content_type=f"audio/{fmt}")
            tolerance = 1e-5 if fmt == "wav" else 1e-4  # FLAC's 24-bit samples, through the encoder
            torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
        pcm = pcm16_wav(waveform[0].numpy())
        quantised = torch.from_numpy(AudioHeader.read(pcm).samples(RATE, CHANNELS))[None]
        torch.testing.assert_close(client.encode(pcm), local_mean(model, quantised), atol=1e-5, rtol=1e-5)
        mono = pcm16_wav(waveform[0, :1].numpy())  # copied to both channels, as the pipelines repeat a mono clip
        repeated = torch.from_numpy(AudioHeader.read(mono).samples(RATE, 1)).repeat(2, 1)[None]
        torch.testing.assert_close(client.encode(mono), local_mean(model, repeated), atol=1e-5, rtol=1e-5)
        half_rate = client.encode(pcm16_wav(waveform[0, :, ::2].numpy(), RATE // 2))  # resampled to 44.1 kHz
        assert half_rate.shape == expected.shape and torch.isfinite(half_rate).all()


def test_the_drop_in_samples_the_remote_distribution_with_the_users_generator(url, model):
    """Oobleck's distribution is its own (mean and a softplus scale): RemoteVae builds that class from the server's
    parameters, so a sample with the user's generator is the local one."""
    waveform = local_decode(model, seeded(2, 64, 2, seed=44)).clamp(-1, 1)
    remote = RemoteVae(url)
    assert (remote.hop_length, remote.sampling_rate, remote.config.audio_channels) == (HOP, RATE, CHANNELS)
    drawn = remote.encode(waveform).latent_dist.sample(torch.Generator().manual_seed(7))
    with torch.no_grad():
        local = model.encode(waveform).latent_dist.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(drawn, local, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remote.decode(drawn).sample, local_decode(model, drawn), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, params, message",
    [
        ((1, 16, 3), {}, "latent has 16 channels, but this family (stableaudio) decodes audio latents [B, 64, T]"),
        ((1, 64, 3, 2), {}, "got a 4-D latent [1, 64, 3, 2]"),
        ((1, 64, 3), {"output_type": "pil"}, "decodes audio: ask for output_type=wav or flac"),
        ((1, 64, 3), {"output_type": "pt", "partial_postprocess": "true"}, "decodes audio"),
        ((1, 64, 3), {"decode_timestep": "0.05"}, "takes no decode timestep"),
    ],
)
def test_bad_latents_are_refused_with_what_was_expected(url, shape, params, message):
    body = np.zeros(shape, dtype=np.float32).tobytes()
    reply = post(url, "decode", body, shape=list(shape), dtype="float32", **params)
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text


def test_bad_waveforms_and_files_are_refused(url, every_family_server):
    reply = post(url, "encode", np.zeros((1, 3, 100), np.float32).tobytes(), shape=[1, 3, 100], dtype="float32")
    assert reply.status_code == 400 and "encodes [B, 2, samples]" in reply.json()["error"]
    # A FLAC whose STREAMINFO claims 2^35 samples (a week of sound): refused from its header, nothing decoded
    flac = bytearray(write_audio(torch.zeros(1, 2, 4096), AudioFile("flac", RATE)))
    info = int.from_bytes(flac[18:26], "big") & ~((1 << 36) - 1) | (1 << 35)
    flac[18:26] = info.to_bytes(8, "big")
    refused = requests.post(url + "encode", data=bytes(flac), headers={"Content-Type": "audio/flac"}, timeout=30)
    assert refused.status_code == 413 and "--max-pixels counts each sample" in refused.json()["error"]
    for body in (b"RIFF\x00\x00\x00\x00WAVEjunk", b"fLaC\x00\x00\x00\x22" + b"\x00" * 40, b"RIFF" + b"\xff" * 60):
        reply = requests.post(url + "encode", data=body, headers={"Content-Type": "audio/wav"}, timeout=30)
        assert 400 <= reply.status_code < 500 and "error" in reply.json(), (body[:12], reply.text)
    truncated_flac = write_audio(torch.zeros(1, 2, 4096), AudioFile("flac", RATE))[:200]
    reply = requests.post(url + "encode", data=truncated_flac, headers={"Content-Type": "audio/flac"}, timeout=30)
    assert 400 <= reply.status_code < 500 and "error" in reply.json()
    assert requests.get(f"{every_family_server.url}/health", timeout=10).status_code == 200


def test_too_long_a_decode_is_refused_before_it_runs(url):
    steps = 1 << 14  # 2^14 steps x 2048 samples x 2 channels: 64M samples, past the CPU default of 16M
    reply = post(url, "decode", b"", shape=[1, 64, steps], dtype="float32")
    assert reply.status_code == 413 and "--max-pixels counts each sample" in reply.json()["error"]


def test_families_document_and_client_say_it_is_audio(url):
    with Client(url) as client:
        described = client.family()
        assert described["kind"] == "audio" and not described["video"]
        assert described["audio"] == {"sampling_rate": RATE, "channels": CHANNELS, "hop_length": HOP}
        assert described["model"]["distribution"].endswith(":OobleckDiagonalGaussianDistribution")
        wav = client.decode(seeded(1, 64, 1, seed=45), output="wav")
        assert AudioHeader.read(wav).frames == HOP
        with pytest.raises(RemoteVaeError, match="decodes audio"):
            client.decode(seeded(1, 64, 1, seed=45), output="pil")


def test_the_json_form_carries_audio_as_base64(url, model):
    latents = seeded(1, 64, 2, seed=46)
    parameters = {"shape": [1, 64, 2], "dtype": "float32", "output_type": "pt"}
    reply = requests.post(
        url,
        json={"inputs": base64.b64encode(latents.numpy().tobytes()).decode(), "parameters": parameters},
        headers={"Accept": "tensor/binary"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    torch.testing.assert_close(tensor_of(reply), local_decode(model, latents), atol=1e-5, rtol=1e-5)
