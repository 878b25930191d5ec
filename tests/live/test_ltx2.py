"""LTX-2 through the live server: its video and its sound in one request (a safetensors body of `latents` and
`audio_latents`), decoded to the frames and waveform LTX2Pipeline makes itself; the MP4 with its sound track; the
sound alone (ltx2audio); normalised latents; the CLI; and what is refused."""

import json
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import requests
import tiny_pipelines
import torch
from conftest import tiny_ltx2_vae
from diffusers import LTX2Pipeline
from safetensors.torch import load, save, save_file

from remote_vae.cli import main as cli
from remote_vae.client import Client

TOLERANCE = dict(atol=1e-4, rtol=1e-4)
FPS = 24  # LTX2Pipeline's frame_rate in tiny_pipelines.ltx2: the clip's sound lasts its frames at that rate


@pytest.fixture(scope="module")
def server(families_server):
    return families_server


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url) as client:
        yield client


@pytest.fixture(scope="module")
def pipeline():
    """LTX2Pipeline's latents (output_type="latent": video [1, 128, 2, 2, 2] and sound [1, 8, 9, 16]) and what it makes
    of them itself (output_type="pt": frames [1, 9, 3, 64, 64] in 0..1, waveforms [1, 2, 7920])."""
    vae = tiny_ltx2_vae()
    outputs = {}
    for output_type in ("latent", "pt"):
        torch.manual_seed(0)
        pipe, arguments = tiny_pipelines.ltx2(vae)
        pipe.set_progress_bar_config(disable=True)
        result = pipe(
            **arguments, num_inference_steps=1, output_type=output_type, generator=torch.Generator().manual_seed(3)
        )
        outputs[output_type] = (result.frames, result.audio)
    return outputs


def frames_of(raw: torch.Tensor) -> torch.Tensor:
    """The decoder's [B, 3, F, H, W] as the pipeline's output_type="pt" frames [B, F, 3, H, W] in 0..1."""
    return (raw / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


def test_the_pipelines_latents_decode_to_its_frames_and_its_sound_in_one_request(client, pipeline):
    (latents, audio_latents), (frames, audio) = pipeline["latent"], pipeline["pt"]
    raw, waveforms = client.decode(latents, "ltx2", "pt", audio_latents=audio_latents)
    torch.testing.assert_close(frames_of(raw), frames, **TOLERANCE)
    torch.testing.assert_close(waveforms, audio, **TOLERANCE)
    assert waveforms.shape == (1, 2, 7920)  # 9 latent steps: 1 + 8 x 4 mel frames of 240 samples


def test_the_pipelines_normalised_latents_decode_the_same_with_do_scaling(client, pipeline):
    """do_scaling=True undoes the weights' statistics: per channel for the video, per channel and mel bin for the
    sound (the pipeline's own normalisation of its packed audio tokens)."""
    (latents, audio_latents), (frames, audio) = pipeline["latent"], pipeline["pt"]
    vae, sound = tiny_ltx2_vae(), tiny_pipelines.ltx2(tiny_ltx2_vae())[0].audio_vae
    normalised = LTX2Pipeline._normalize_latents(latents, vae.latents_mean, vae.latents_std)
    packed = LTX2Pipeline._pack_audio_latents(audio_latents)
    audio_normalised = LTX2Pipeline._unpack_audio_latents(
        LTX2Pipeline._normalize_audio_latents(packed, sound.latents_mean, sound.latents_std),
        audio_latents.shape[2],
        num_mel_bins=audio_latents.shape[3],
    )
    raw, waveforms = client.decode(
        normalised, "ltx2", "pt", audio_latents=audio_normalised, normalised=False, do_scaling=True
    )
    torch.testing.assert_close(frames_of(raw), frames, **TOLERANCE)
    torch.testing.assert_close(waveforms, audio, **TOLERANCE)
    unscaled, _ = client.decode(normalised, "ltx2", "pt", audio_latents=audio_normalised, normalised=False)
    assert (unscaled - raw).abs().max() > 1e-2  # the statistics are applied


def probe(mp4: bytes, tmp_path) -> str:
    path = tmp_path / "reply.mp4"
    path.write_bytes(mp4)
    return subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    ).stderr


def sound_track(mp4: bytes, tmp_path) -> np.ndarray:
    """The MP4's sound, decoded by ffmpeg: float32 [samples, 2]."""
    path = tmp_path / "track.mp4"
    path.write_bytes(mp4)
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a", "-f", "f32le", "-"]
    return np.frombuffer(subprocess.run(command, capture_output=True, check=True).stdout, np.float32).reshape(-1, 2)


def test_the_mp4_carries_the_sound_in_step_with_the_frames(client, pipeline, tmp_path):
    (latents, audio_latents), (_, audio) = pipeline["latent"], pipeline["pt"]
    mp4 = client.decode(latents, "ltx2", "mp4", audio_latents=audio_latents, fps=FPS)
    described = probe(mp4, tmp_path)
    assert "Video: h264" in described and "Audio: aac" in described and "24000 Hz, stereo" in described
    track = sound_track(mp4, tmp_path)
    clip = round(9 / FPS * 24000)  # the clip's 9 frames at 24 fps: its sound cut to 9000 samples of the 7920 + silence
    assert abs(len(track) - clip) <= 1024  # AAC's frames of 1024 samples
    # AAC is lossy: the track follows the waveform (a correlation near 1), not its samples exactly
    expected = audio[0].T.numpy()
    offset = max(range(0, 2048), key=lambda shift: float(np.dot(track[shift : shift + 4000, 0], expected[:4000, 0])))
    heard, said = track[offset : offset + 6000].ravel(), expected[:6000].ravel()
    assert np.corrcoef(heard, said)[0, 1] > 0.9
    silent = client.decode(latents, "ltx2", "mp4", fps=FPS)  # the video's latent alone: no sound track
    assert "Audio:" not in probe(silent, tmp_path)


def test_the_sound_alone_decodes_to_the_pipelines_waveform(server, pipeline):
    (_, audio_latents), (_, audio) = pipeline["latent"], pipeline["pt"]
    reply = requests.post(
        f"{server.url}/ltx2audio/",
        data=audio_latents.numpy().tobytes(),
        params={"shape": list(audio_latents.shape), "dtype": "float32", "output_type": "wav"},
        headers={"Content-Type": "tensor/binary"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["sample-rate"] == "24000" and reply.headers["sample-count"] == "7920"
    samples = np.frombuffer(reply.content[-7920 * 2 * 4 :], "<f4").reshape(-1, 2)  # the WAV's float32 data chunk
    np.testing.assert_allclose(samples, audio[0].T.numpy(), **TOLERANCE)


def test_the_cli_decodes_a_file_of_both_to_the_video_and_its_sound(server, pipeline, tmp_path):
    (latents, audio_latents), (frames, audio) = pipeline["latent"], pipeline["pt"]
    source = tmp_path / "ltx2.safetensors"
    save_file({"latents": latents.contiguous(), "audio_latents": audio_latents.contiguous()}, source)
    target = tmp_path / "out.safetensors"
    assert cli(["decode", str(source), "-o", str(target), "--url", f"{server.url}/", "--family", "ltx2"]) == 0
    written = load(target.read_bytes())  # the decoder's output and the sound's waveforms
    torch.testing.assert_close(frames_of(written["pixels"]), frames, **TOLERANCE)
    torch.testing.assert_close(written["audio"], audio, **TOLERANCE)


def post(server, family: str, body: bytes, **params) -> requests.Response:
    return requests.post(
        f"{server.url}/{family}/",
        data=body,
        params={"output_type": "pt", **params},
        headers={"Content-Type": "application/safetensors"},
        timeout=60,
    )


@pytest.mark.parametrize(
    "family, tensors, message",
    [
        ("ltx2", None, "body is not a safetensors file"),
        ("ltx2", (1 << 40).to_bytes(8, "little") + b"{}", "its header length says 1099511627776 bytes"),
        ("ltx2", {"video": (1, 128, 2, 2, 2)}, "holds ['video']; expected a safetensors file of latents"),
        ("ltx2", {"latents": (1, 128, 2, 2, 2), "audio_latents": (2, 8, 9, 16)}, "hold 2 clips' sound, latents 1"),
        ("ltx2", {"latents": (1, 128, 2, 2, 2), "audio_latents": (1, 8, 9, 15)}, "latent has 15 bins"),
        ("ltx2", {"latents": (1, 128, 2, 2, 2), "audio_latents": (1, 4, 9, 16)}, "decodes audio latents [B, 8, T, 16]"),
        ("ltxvideo", {"latents": (1, 128, 2, 2, 1), "audio_latents": (1, 8, 9, 16)}, "ltxvideo has no sound"),
        ("ltx2", {"latents": (1, 128, 2, 2, 1)}, "ltx2's decoder takes at least 2 a side (64 pixels)"),  # reflection
    ],
)
def test_bad_bodies_are_refused_with_what_was_expected(server, family, tensors, message):
    if isinstance(tensors, bytes):
        body = tensors
    else:
        body = b"not a safetensors file" if tensors is None else save({k: torch.zeros(v) for k, v in tensors.items()})
    reply = post(server, family, body)
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_a_sound_decode_is_refused_an_image_reply_and_a_bad_dtype(server):
    body = save({"latents": torch.zeros(1, 128, 2, 2, 2), "audio_latents": torch.zeros(1, 8, 9, 16)})
    reply = post(server, "ltx2", body, output_type="pil")
    assert reply.status_code == 400 and "ltx2 decodes videos" in reply.json()["error"]
    body = save({"latents": torch.zeros(1, 128, 2, 2, 2, dtype=torch.int32)})
    reply = post(server, "ltx2", body)
    assert reply.status_code == 400 and "latents is I32" in reply.json()["error"]


def test_the_families_document_names_the_sound(server):
    document = requests.get(f"{server.url}/families", timeout=10).json()["families"]
    assert document["ltx2"]["sound"] == "ltx2audio" and document["ltx2"]["sound_served"] is True
    assert document["ltx2"]["scaling"] == {"do_scaling": False}  # the pipeline's latent is the VAE's own already
    assert document["ltx2audio"]["audio"]["sampling_rate"] == 24000
    assert json.dumps(document["ltx2audio"]["model"]["vocoder"])  # what a drop-in's vocoder stand-in holds
