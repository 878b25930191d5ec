"""remote_vae.client and the `remote-vae decode` / `encode` commands against the live server (HTTPS, an API key),
each result compared with diffusers in-process on the same weights."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import threading

import numpy as np
import pytest
import requests
import torch
from conftest import FAULTY_LAUNCHER, LiveServer, offline_env, seeded, self_signed_certificate, wait_until
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers_reference import assert_pixels_close, decode_locally, encode_locally, uint8_locally
from PIL import Image
from safetensors.torch import load_file, save_file

from remote_vae.client import Client, RemoteVaeError, tensor_bytes

KEY = "client-test-key-0123456789abcdef"
SD, FLUX, HUNYUAN = 0.18215, (0.3611, 0.1159), 0.476986


@pytest.fixture(scope="module")
def secure(model_dirs, tmp_path_factory):
    """sd15, flux and hunyuanvideo over HTTPS with an API key, each under /<family>/."""
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    names = ["sd15", "flux", "hunyuanvideo"]
    args = names + [option for name in names for option in ("--model", f"{name}={model_dirs[name]}")]
    args += ["--api-key", KEY, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    server = LiveServer(args, offline_env(), tmp_path_factory.mktemp("logs") / "client.log", verify=str(cert))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(secure):
    with Client(secure.url, api_key=KEY, verify=secure.verify) as client:
        yield client


def test_the_client_learns_each_familys_scaling_from_the_server(client, secure):
    families = client.families()
    assert set(families) == {"sd15", "flux", "hunyuanvideo"}
    assert families["sd15"]["scaling"] == {"scaling_factor": SD} and families["sd15"]["path"] == "sd15/"
    assert (
        families["flux"]["scaling"] == dict(zip(("scaling_factor", "shift_factor"), FLUX, strict=True))
        and families["flux"]["packed"]
    )
    assert families["hunyuanvideo"]["video"] and families["hunyuanvideo"]["scaling"] == {"scaling_factor": HUNYUAN}
    with Client(
        secure.url + "/flux/", api_key=KEY, verify=secure.verify
    ) as one:  # a family's own URL describes it alone
        assert list(one.families()) == ["flux"] and one.family()["path"] == ""
    with pytest.raises(ValueError, match="name one with family="):
        client.family()


def test_decode_to_pil_is_diffusers_pixels_with_the_scaling_read_from_the_server(client, reference):
    latents = seeded(2, 4, 8, 8, seed=81)
    images = client.decode(latents, "sd15")
    expected = uint8_locally(decode_locally(reference["sd15"], latents, SD))
    assert len(images) == 2
    for image, pixels in zip(images, expected, strict=True):
        assert_pixels_close(np.asarray(image), pixels)
    single = client.decode(latents[:1], "sd15")
    assert isinstance(single, Image.Image)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_dtype_is_sent_as_its_own_bytes(client, reference, dtype):
    latents = seeded(1, 4, 8, 8, seed=82).to(dtype)
    decoded = client.decode(latents, "sd15", output="pt")
    expected = decode_locally(reference["sd15"], latents.float() if dtype == torch.float64 else latents, SD)
    torch.testing.assert_close(decoded, expected, atol=1e-3, rtol=1e-3)


def test_non_contiguous_tensors_are_sent_correctly(client, reference):
    """diffusers' remote_encode sends the memory of a freed temporary for these; the client sends the tensor's
    values."""
    latents = seeded(1, 8, 8, 4, seed=83).permute(0, 3, 1, 2)  # [1, 4, 8, 8], channels last in memory
    assert not latents.is_contiguous()
    expected = decode_locally(reference["sd15"], latents.contiguous(), SD)
    torch.testing.assert_close(client.decode(latents, "sd15", output="pt"), expected, atol=1e-4, rtol=1e-4)
    images = seeded(1, 64, 64, 3, seed=84).clamp(-1, 1).permute(0, 3, 1, 2)[..., ::2]  # [1, 3, 64, 32], strided
    assert not images.is_contiguous()
    encoded = client.encode(images, "sd15")
    torch.testing.assert_close(
        encoded, encode_locally(reference["sd15"], images.contiguous(), SD), atol=1e-4, rtol=1e-4
    )
    body, shape, dtype = tensor_bytes(images)
    assert body == images.contiguous().numpy().tobytes() and shape == (1, 3, 64, 32) and dtype == "float32"


def test_encode_a_pil_image_a_file_and_raw_latents(client, reference, tmp_path):
    pixels = (seeded(64, 48, 3, seed=85).clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    as_tensor = torch.from_numpy(pixels).float().div(255).permute(2, 0, 1)[None] * 2 - 1
    expected = encode_locally(reference["sd15"], as_tensor, SD)
    torch.testing.assert_close(client.encode(image, "sd15"), expected, atol=1e-4, rtol=1e-4)
    image.save(tmp_path / "image.png")
    torch.testing.assert_close(client.encode(tmp_path / "image.png", "sd15"), expected, atol=1e-4, rtol=1e-4)
    raw = client.encode(image, "sd15", normalised=False)
    torch.testing.assert_close(raw, encode_locally(reference["sd15"], as_tensor), atol=1e-4, rtol=1e-4)


def test_packed_flux_latents_with_the_pixel_size(client, reference):
    packed = seeded(1, 16, 64, seed=86)  # a 64x64 image: (64/16)^2 tokens of 2x2x16 features
    decoded = client.decode(packed, "flux", "pt", height=64, width=64)
    unpacked = FluxPipeline._unpack_latents(packed, 64, 64, 8)
    torch.testing.assert_close(decoded, decode_locally(reference["flux"], unpacked, *FLUX), atol=1e-4, rtol=1e-4)


def test_video_as_mp4_and_as_frames(client, reference):
    latents = seeded(1, 16, 2, 8, 8, seed=87)
    mp4 = client.decode(latents, "hunyuanvideo")
    assert isinstance(mp4, bytes) and mp4[4:8] == b"ftyp"
    frames = client.decode(latents, "hunyuanvideo", "pil")
    with torch.no_grad():
        sample = reference["hunyuanvideo"].decode(latents / HUNYUAN).sample
    expected = ((sample[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert len(frames) == 5
    for frame, pixels in zip(frames, expected, strict=True):
        assert_pixels_close(np.asarray(frame), pixels)


def test_a_refusal_raises_with_the_servers_message_and_the_key_is_needed(client, secure):
    with pytest.raises(RemoteVaeError) as refused:
        client.decode(seeded(1, 3, 8, 8), "sd15")
    assert refused.value.status == 400 and "channels" in refused.value.message and refused.value.request_id
    with Client(secure.url, verify=secure.verify) as keyless, pytest.raises(RemoteVaeError) as unauthorised:
        keyless.decode(seeded(1, 4, 8, 8), "sd15")
    assert unauthorised.value.status == 401


def test_one_connection_is_kept_alive_across_calls(secure):
    with Client(secure.url, api_key=KEY, verify=secure.verify) as client:
        for _ in range(3):
            client.decode(seeded(1, 4, 8, 8), "sd15", "uint8")
        pools = client.session.get_adapter(secure.url).poolmanager.pools
        keys = list(pools.keys())
        assert len(keys) == 1 and pools[keys[0]].num_connections == 1


# -- 503 and retries -----------------------------------------------------------------


@pytest.fixture(scope="module")
def busy(model_dirs, faults_file, tmp_path_factory):
    """sd15 with no queue at all: a request that arrives while one runs gets 503 at once."""
    args = ["sd15", "--model", str(model_dirs["sd15"]), "--max-queue", "0"]
    server = LiveServer(
        args,
        offline_env(FAULTS_FILE=str(faults_file)),
        tmp_path_factory.mktemp("logs") / "busy.log",
        launcher=FAULTY_LAUNCHER,
    )
    yield server
    server.stop()


def occupy(server, seconds_of_work) -> threading.Thread:
    """Start one slow decode and return once it is on the device."""
    latent = seeded(1, 4, 8, 8)
    runner = threading.Thread(
        target=lambda: requests.post(
            server.url + "/",
            data=latent.numpy().tobytes(),
            timeout=60,
            headers={"Content-Type": "tensor/binary"},
            params={"shape": [1, 4, 8, 8], "dtype": "float32", "output_type": "pt"},
        )
    )
    runner.start()
    wait_until(lambda: server.metric("remote_vae_running") == 1)
    return runner


def test_503_is_retried_after_retry_after_and_then_served(busy, set_faults, reference):
    set_faults(delay=1.5)
    refused_before = busy.metric("remote_vae_requests_total", family="sd15", operation="-", status="503")
    runner = occupy(busy, 1.5)
    latents = seeded(1, 4, 8, 8, seed=88)
    with Client(busy.url, retries=4, max_retry_wait=1.0) as client:
        decoded = client.decode(latents, output="pt")
    runner.join(timeout=60)
    assert busy.metric("remote_vae_requests_total", family="sd15", operation="-", status="503") > refused_before
    torch.testing.assert_close(decoded, decode_locally(reference["sd15"], latents, SD), atol=1e-4, rtol=1e-4)


def test_retries_are_bounded(busy, set_faults):
    set_faults(delay=3)
    runner = occupy(busy, 3)
    with Client(busy.url, retries=0) as client, pytest.raises(RemoteVaeError) as refused:
        client.decode(seeded(1, 4, 8, 8), output="pt")
    runner.join(timeout=60)
    assert refused.value.status == 503 and "busy" in refused.value.message


def test_an_unreachable_server_raises_after_its_retries(tmp_path):
    from conftest import free_port

    with (
        Client(f"http://127.0.0.1:{free_port()}/", retries=1, max_retry_wait=0.1, timeout=5) as client,
        pytest.raises(requests.ConnectionError),
    ):
        client.families()


# -- the command line ---------------------------------------------------------------


def remote_vae(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`remote-vae ARGS` run in this process (its exit status, stdout and stderr), with only `env`'s REMOTE_VAE_*
    variables set: the same main() the console script runs (tests/deploy/test_packaging.py runs that one), without
    a torch import per call."""
    from remote_vae.cli import main

    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("REMOTE_VAE_")}
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit:  # argparse's own refusals
                code = exit.code
    finally:
        for name in [name for name in os.environ if name.startswith("REMOTE_VAE_")]:
            del os.environ[name]
        os.environ.update(saved)
    return subprocess.CompletedProcess(["remote-vae", *args], code, out.getvalue(), err.getvalue())


def test_decode_command_writes_each_latent_file_as_diffusers_pixels(secure, reference, tmp_path):
    latents = {name: seeded(1, 4, 8, 8, seed=90 + index) for index, name in enumerate(("a", "b", "c"))}
    save_file({"latents": latents["a"]}, tmp_path / "a.safetensors")
    torch.save(latents["b"], tmp_path / "b.pt")
    np.save(tmp_path / "c.npy", latents["c"].numpy())
    done = remote_vae(
        "decode",
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.pt"),
        str(tmp_path / "c.npy"),
        "-o",
        str(tmp_path / "out" / "{name}.png"),
        "--url",
        secure.url + "/sd15/",
        "--ca-cert",
        secure.verify,
        env={"REMOTE_VAE_API_KEY": KEY},
    )
    assert done.returncode == 0, done.stderr
    assert "3/3" in done.stderr  # the progress bar
    for name, latent in latents.items():
        written = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert_pixels_close(written, uint8_locally(decode_locally(reference["sd15"], latent, SD))[0])
        assert str(tmp_path / "out" / f"{name}.png") in done.stdout


def test_decode_command_writes_jpeg_and_webp_as_the_server_does(secure, reference, tmp_path):
    """.jpg and .webp with the server's settings (JPEG quality 90 at 4:4:4, WebP 90), not Pillow's defaults (75,
    4:2:0)."""
    from remote_vae.media import ImageFile, encode_image

    latent = seeded(1, 4, 24, 24, seed=97)
    save_file({"latents": latent}, tmp_path / "image.safetensors")
    local = uint8_locally(decode_locally(reference["sd15"], latent, SD))[0]
    for suffix, file_format in ((".jpg", "JPEG"), (".webp", "WEBP")):
        done = remote_vae(
            "decode",
            str(tmp_path / "image.safetensors"),
            "-o",
            str(tmp_path / f"out{suffix}"),
            "--url",
            secure.url + "/sd15/",
            "--ca-cert",
            secure.verify,
            env={"REMOTE_VAE_API_KEY": KEY},
        )
        assert done.returncode == 0, done.stderr
        written = np.asarray(Image.open(tmp_path / f"out{suffix}").convert("RGB")).astype(int)
        servers = np.asarray(Image.open(io.BytesIO(encode_image(local, ImageFile(file_format)))).convert("RGB")).astype(
            int
        )
        assert np.abs(written - servers).max() <= 3, suffix  # the same settings on pixels at most 1 level apart


def test_decode_command_to_mp4_and_to_a_tensor(secure, reference, tmp_path):
    save_file({"latents": seeded(1, 16, 2, 8, 8, seed=95)}, tmp_path / "video.safetensors")
    done = remote_vae(
        "decode",
        str(tmp_path / "video.safetensors"),
        "-o",
        str(tmp_path / "clip.mp4"),
        "--url",
        secure.url,
        "--family",
        "hunyuanvideo",
        "--ca-cert",
        secure.verify,
        "--fps",
        "8",
        env={"REMOTE_VAE_API_KEY": KEY},
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "clip.mp4").read_bytes()[4:8] == b"ftyp"
    latent = seeded(1, 4, 8, 8, seed=96)
    save_file({"latents": latent}, tmp_path / "image.safetensors")
    done = remote_vae(
        "decode",
        str(tmp_path / "image.safetensors"),
        "-o",
        str(tmp_path / "pixels.safetensors"),
        "--url",
        secure.url,
        "--family",
        "sd15",
        "--ca-cert",
        secure.verify,
        env={"REMOTE_VAE_API_KEY": KEY},
    )
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(
        load_file(tmp_path / "pixels.safetensors")["pixels"],
        decode_locally(reference["sd15"], latent, SD),
        atol=1e-4,
        rtol=1e-4,
    )


def test_encode_command_writes_latents(secure, reference, tmp_path):
    pixels = (seeded(48, 64, 3, seed=97).clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    done = remote_vae(
        "encode",
        str(tmp_path / "photo.png"),
        "-o",
        str(tmp_path / "latents") + os.sep,
        "--url",
        secure.url,
        "--family",
        "sd15",
        "--ca-cert",
        secure.verify,
        env={"REMOTE_VAE_API_KEY": KEY},
    )
    assert done.returncode == 0, done.stderr
    as_tensor = torch.from_numpy(pixels).float().div(255).permute(2, 0, 1)[None] * 2 - 1
    encoded = load_file(tmp_path / "latents" / "photo.safetensors")["latents"]
    torch.testing.assert_close(encoded, encode_locally(reference["sd15"], as_tensor, SD), atol=1e-4, rtol=1e-4)


def test_command_failures_say_what_went_wrong_with_their_exit_codes(secure, tmp_path):
    save_file({"latents": seeded(1, 3, 8, 8)}, tmp_path / "bad.safetensors")
    url = ["--url", secure.url + "/sd15/", "--ca-cert", secure.verify]
    refused = remote_vae(
        "decode",
        str(tmp_path / "bad.safetensors"),
        "-o",
        str(tmp_path / "x.png"),
        *url,
        env={"REMOTE_VAE_API_KEY": KEY},
    )
    assert refused.returncode == 1 and "400" in refused.stderr and "channels" in refused.stderr
    keyless = remote_vae("decode", str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "x.png"), *url)
    assert keyless.returncode == 1 and "401" in keyless.stderr
    missing = remote_vae("decode", str(tmp_path / "nothing.safetensors"), "-o", str(tmp_path / "x.png"), *url)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    unset = remote_vae(
        "decode",
        str(tmp_path / "bad.safetensors"),
        "-o",
        str(tmp_path / "x.png"),
        *url,
        "--api-key-env",
        "NO_SUCH_VARIABLE_SET",
    )
    assert unset.returncode == 2 and "NO_SUCH_VARIABLE_SET" in unset.stderr
    two = remote_vae(
        "decode",
        str(tmp_path / "bad.safetensors"),
        str(tmp_path / "bad.safetensors"),
        "-o",
        str(tmp_path / "x.png"),
        *url,
    )
    assert two.returncode == 2 and "{name}" in two.stderr
    from conftest import free_port

    down = remote_vae(
        "decode",
        str(tmp_path / "bad.safetensors"),
        "-o",
        str(tmp_path / "x.png"),
        "--url",
        f"http://127.0.0.1:{free_port()}/",
        "--retries",
        "0",
    )
    assert down.returncode == 1 and "error" in down.stderr and "Traceback" not in down.stderr


def test_saved_latents_are_read_as_pipelines_write_them(tmp_path):
    from remote_vae.client import load_latents

    latent = seeded(1, 4, 8, 8)
    save_file({"latents": latent, "extra": latent * 2}, tmp_path / "two.safetensors")
    torch.testing.assert_close(load_latents(tmp_path / "two.safetensors", "extra"), latent * 2)
    with pytest.raises(ValueError, match="name one with --key"):
        load_latents(tmp_path / "two.safetensors")
    torch.save({"latents": latent}, tmp_path / "dict.pt")
    torch.testing.assert_close(load_latents(tmp_path / "dict.pt"), latent)
    (tmp_path / "latent.txt").write_text("no")
    with pytest.raises(ValueError, match="expected a .safetensors"):
        load_latents(tmp_path / "latent.txt")
