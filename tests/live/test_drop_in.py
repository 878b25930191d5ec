"""The drop-in VAE (remote_vae.diffusers_vae.RemoteVae): each shipped family's real diffusers pipeline, with tiny
components, run twice with the same seeds, once with the local VAE and once with RemoteVae against a live server
serving the same weights: the same pixels. The image-to-image and image-to-video pipelines sample the encoder's
distribution with the user's generator: the same pixels too."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest
import requests
import tiny_pipelines
import torch
import uvicorn
from conftest import ROOT, TINY_MODELS, free_port, offline_env, seeded, wait_until
from diffusers import StableDiffusionPipeline
from PIL import Image

from remote_vae import RemoteVae
from remote_vae.client import RemoteVaeError
from remote_vae.families import available, load_family
from remote_vae.server import Registry, Slot, create_app

FAMILIES = available()


@pytest.fixture(scope="module")
def server(every_family_server):
    return every_family_server


def local_vae(reference, family: str):
    return reference[family]


def as_uint8(images) -> np.ndarray:
    """A pipeline's np output (float 0..1) as the uint8 pixels its PIL output holds."""
    return (np.asarray(images) * 255).round().astype(np.int16)


def assert_same_pixels(remote, local) -> None:
    difference = np.abs(as_uint8(remote) - as_uint8(local))
    assert difference.max() <= 1, f"max |Δ| {difference.max()} on {np.mean(difference > 0):.2%} of pixels"


def test_every_shipped_family_has_a_pipeline_here():
    assert set(FAMILIES) == set(TINY_MODELS) == set(tiny_pipelines.PIPELINES)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pipeline_with_the_drop_in_makes_the_local_pixels(server, reference, family):
    local = tiny_pipelines.run(family, local_vae(reference, family), "np")
    remote = tiny_pipelines.run(family, RemoteVae(f"{server.url}/{family}/"), "np")
    assert np.asarray(remote).shape == np.asarray(local).shape
    if load_family(family).is_audio:  # a waveform: the same samples
        np.testing.assert_allclose(remote, local, atol=1e-5)
        return
    assert_same_pixels(remote, local)


def test_ltx_decodes_at_the_pipelines_timestep_with_the_pipelines_own_noise(server, reference):
    """LTXPipeline mixes its noise into the latent and passes the timestep: the server adds no noise of its own."""
    conditioning = dict(decode_timestep=0.05, decode_noise_scale=0.025)
    local = tiny_pipelines.run("ltxvideo", reference["ltxvideo"], "np", **conditioning)
    remote = tiny_pipelines.run("ltxvideo", RemoteVae(f"{server.url}/ltxvideo/"), "np", **conditioning)
    assert_same_pixels(remote, local)
    unconditioned = tiny_pipelines.run("ltxvideo", reference["ltxvideo"], "np")
    assert np.abs(as_uint8(unconditioned) - as_uint8(local)).max() > 1  # the timestep and noise change the pixels


@pytest.mark.parametrize("family", sorted(tiny_pipelines.IMAGE_PIPELINES))
def test_image_to_image_pipelines_sample_the_remote_distribution_with_the_users_generator(server, reference, family):
    local = tiny_pipelines.run_from_image(family, local_vae(reference, family), "np")
    remote = tiny_pipelines.run_from_image(family, RemoteVae(f"{server.url}/{family}/"), "np")
    assert_same_pixels(remote, local)


def test_pil_output_and_both_reply_forms(server, reference):
    """output_type="pil" gives the very PIL pixels; the uint8 reply moves a quarter of the float32 reply's bytes."""
    local = tiny_pipelines.run("sd15", reference["sd15"], "pil")[0]
    for pixels in ("uint8", "raw"):
        remote = tiny_pipelines.run("sd15", RemoteVae(f"{server.url}/sd15/", pixels=pixels), "pil")[0]
        assert_same_pixels(np.asarray(remote) / 255, np.asarray(local) / 255)


def test_the_vae_passes_from_pretrained_components_and_assignment(server, reference, tmp_path):
    torch.manual_seed(0)
    pipe, arguments = tiny_pipelines.taesd(reference["sd15"])
    pipe.save_pretrained(tmp_path / "pipe")
    vae = RemoteVae(f"{server.url}/sd15/")
    absent = dict.fromkeys(["text_encoder", "tokenizer", "safety_checker", "feature_extractor", "image_encoder"])
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", vae=vae, **absent)  # it checks a ModelMixin
    assert loaded.vae is vae and loaded.vae_scale_factor == 8
    again = StableDiffusionPipeline(**{**pipe.components, "vae": vae})
    again.vae = RemoteVae(f"{server.url}/sd15/")
    assert again.vae.config.scaling_factor == reference["sd15"].config.scaling_factor
    assert list(vae.config.block_out_channels) == list(reference["sd15"].config.block_out_channels)
    assert sum(p.numel() for p in vae.parameters()) + sum(b.numel() for b in vae.buffers()) == 0  # no weights
    again.to("cpu", torch.float16)
    assert again.vae.dtype == torch.float16 and again.vae.device.type == "cpu"


def test_model_cpu_offload_on_a_pipeline_holding_it(server, reference):
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    pipe, arguments = tiny_pipelines.taesd(RemoteVae(f"{server.url}/sd15/"))
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(**arguments, num_inference_steps=1, output_type="np").images
    assert np.asarray(images).shape == (1, tiny_pipelines.HEIGHT, tiny_pipelines.WIDTH, 3)


def test_the_attributes_pipelines_read_are_the_local_models(server, reference):
    for family, names in {
        "wan21": ("temperal_downsample", "z_dim"),
        "ltxvideo": ("spatial_compression_ratio", "temporal_compression_ratio"),
        "hunyuanvideo": ("spatial_compression_ratio", "temporal_compression_ratio"),
    }.items():
        vae, model = RemoteVae(f"{server.url}/{family}/"), reference[family]
        for name in names:
            assert getattr(vae, name) == getattr(model, name), (family, name)
    ltx, model = RemoteVae(f"{server.url}/ltxvideo/"), reference["ltxvideo"]
    torch.testing.assert_close(ltx.latents_mean, model.latents_mean)
    flux2, model = RemoteVae(f"{server.url}/flux2/"), reference["flux2"]
    torch.testing.assert_close(flux2.bn.running_var, model.bn.running_var)


def test_tiling_switches_are_sent_and_slicing_changes_nothing(server, reference):
    vae = RemoteVae(f"{server.url}/sd15/")
    latents = seeded(2, 4, 8, 8, seed=8)
    whole = vae.decode(latents).sample
    vae.enable_slicing()
    assert torch.equal(vae.decode(latents).sample, whole)
    vae.enable_tiling()
    assert vae._tiling() == {"tiling": "blend"}
    assert vae.decode(latents).sample.shape == whole.shape


def test_encode_distribution_parameters_on_the_wire(server, reference):
    """latent_dist=parameters: mean and log-variance, the VAE's own; off by default; refused with scaling, or where the
    encoder has no distribution."""
    image = seeded(1, 3, 64, 32, seed=9).clamp(-1, 1)
    body = image.numpy().tobytes()

    def post(family: str, **params):
        return requests.post(
            f"{server.url}/{family}/encode",
            params={"shape": list(image.shape), "dtype": "float32", **params},
            data=body,
            headers={"Content-Type": "tensor/binary", "Accept": "tensor/binary"},
            timeout=60,
        )

    reply = post("sd15", latent_dist="parameters")
    assert reply.status_code == 200 and json.loads(reply.headers["shape"]) == [1, 8, 8, 4]
    parameters = torch.frombuffer(bytearray(reply.content), dtype=torch.float32).reshape(1, 8, 8, 4)
    with torch.no_grad():
        local = reference["sd15"].encode(image).latent_dist
    torch.testing.assert_close(parameters, local.parameters, atol=1e-4, rtol=1e-4)
    default = post("sd15")
    assert json.loads(default.headers["shape"]) == [1, 4, 8, 4]  # the mean, as the stock clients expect
    refused = post("sd15", latent_dist="parameters", scaling_factor=0.18215)
    assert refused.status_code == 400 and "no scaling" in refused.json()["error"]
    assert post("sd15", latent_dist="median").status_code == 400
    # taesd's model reads and writes sd15's normalised latents: its own space is the family's scaling
    no_distribution = post("taesd", latent_dist="parameters", **load_family("taesd").client_scaling())
    assert no_distribution.status_code == 400 and "not a distribution" in no_distribution.json()["error"]
    # the drop-in answers the latent itself for such an encoder, under its real output's name, indexable as diffusers'
    taesd = RemoteVae(f"{server.url}/taesd/").encode(image)
    assert taesd.latents.shape == (1, 4, 8, 4) and taesd[0] is taesd.latents
    sana = RemoteVae(f"{server.url}/sana/").encode(image)  # DC-AE: Sana's img2img pipelines read `.latent`
    with torch.no_grad():
        torch.testing.assert_close(sana.latent, reference["sana"].encode(image).latent, atol=1e-4, rtol=1e-4)


def test_a_pipeline_of_another_family_gets_a_clear_error(server):
    vae = RemoteVae(f"{server.url}/flux/")
    with pytest.raises(ValueError, match="serves flux .*16 latent channels"):
        vae.decode(seeded(1, 4, 8, 8, seed=1))


def test_a_server_root_needs_the_family_named(server):
    with pytest.raises(ValueError, match="name one with family="):
        RemoteVae(server.url)
    assert RemoteVae(server.url, family="wan21").config.z_dim == 16
    with pytest.raises(RemoteVaeError):
        RemoteVae(server.url + "/no-such-family/")


def documented_example() -> str:
    """The fenced block after `<!-- example: drop-in -->` in docs/drop-in.md."""
    text = (ROOT / "docs" / "drop-in.md").read_text()
    match = re.search(r"<!-- example: drop-in -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/drop-in.md has no drop-in example"
    return match.group(1)


def test_the_documented_example_runs_as_written(server, reference, tmp_path, monkeypatch):
    """docs/drop-in.md's example, with the URL and the Hub repository swapped for the live server and a tiny SD
    pipeline (a tiny CLIP text encoder and tokenizer included) saved on disk: the image is the local VAE's."""
    folder = tmp_path / "sd"
    torch.manual_seed(0)
    pipe, _ = tiny_pipelines.taesd(reference["sd15"])
    encoder, tokenizer = tiny_pipelines.tiny_clip(tmp_path / "tokenizer")
    pipe.text_encoder, pipe.tokenizer = encoder, tokenizer
    pipe.register_modules(text_encoder=encoder, tokenizer=tokenizer)
    pipe.save_pretrained(folder)
    source = documented_example()
    assert 'RemoteVae("https://vae.example.com/sd15/"' in source and "vae=vae" in source
    source = source.replace("https://vae.example.com/", server.url + "/").replace(
        '"stable-diffusion-v1-5/stable-diffusion-v1-5"', repr(str(folder))
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REMOTE_VAE_API_KEY", raising=False)
    torch.manual_seed(1)
    exec(compile(source, "docs/drop-in.md", "exec"), {})
    torch.manual_seed(1)
    local = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    local.set_progress_bar_config(disable=True)
    expected = local("a photo of a cat", num_inference_steps=25).images[0]
    assert_same_pixels(np.asarray(Image.open(tmp_path / "cat.png")) / 255, np.asarray(expected) / 255)


def test_a_family_still_loading_is_asked_again_a_bounded_number_of_times():
    registry = Registry({"sd15": Slot(load_family("sd15"))})  # never loads
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(registry), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, lambda: "the in-process server did not start")
        started = time.monotonic()
        with pytest.raises(RemoteVaeError, match="loading; retry when the server has loaded it"):
            RemoteVae(f"http://127.0.0.1:{port}/", retries=2, max_retry_wait=0.2)
        assert 0.3 <= time.monotonic() - started < 10  # two waits of 0.2 s, then the error
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_uint8_replies_come_back_through_a_pipelines_postprocess_as_the_same_pixels():
    """Why the drop-in asks for uint8 pixels: made float again (p / 127.5 - 1), VaeImageProcessor's postprocess returns
    them to the server's very integers, for every value a decoder can give; float16 would not always."""
    from diffusers.image_processor import VaeImageProcessor

    from remote_vae.diffusers_vae import _unit_range
    from remote_vae.media.pixels import uint8_images

    decoded = torch.linspace(-1.2, 1.2, 3 * 64 * 64 * 4).reshape(4, 3, 64, 64)  # every uint8 level, and clipped ones
    server = uint8_images(decoded)  # [B, H, W, 3], as the server replies
    local = VaeImageProcessor().postprocess(_unit_range(server, decoded, video=False), output_type="np")
    assert np.array_equal((local * 255).round().astype(np.uint8), server.numpy())
    halved = VaeImageProcessor().postprocess(decoded.half().float(), output_type="np")
    assert not np.array_equal((halved * 255).round().astype(np.uint8), server.numpy())


def test_a_pipeline_class_or_a_hub_repo_finds_its_family(server):
    """GET /families lists each family's pipelines and repos: the client (and so the CLI's --family and the drop-in)
    takes either where it takes a family's name."""
    assert RemoteVae(server.url, family="FluxImg2ImgPipeline").family == "flux"
    assert RemoteVae(server.url, family="stabilityai/stable-diffusion-xl-base-1.0").family == "sdxl"
    assert RemoteVae(server.url, family="Wan-AI/Wan2.2-TI2V-5B-Diffusers").family == "wan22"
    with pytest.raises(ValueError, match="WanPipeline uses the VAE of wan21 or wan22"):
        RemoteVae(server.url, family="WanPipeline")
    with pytest.raises(ValueError, match="does not serve 'NoSuchPipeline'"):
        RemoteVae(server.url, family="NoSuchPipeline")


def test_the_cli_takes_a_hub_repo_for_the_family(server, reference, tmp_path):
    """`remote-vae decode --family` goes through the same lookup: a pipeline's repo names the family, and the PNG is
    the local VAE's decode of the pipeline's latent."""
    from diffusers_reference import run_cli
    from safetensors.torch import save_file

    latents = seeded(1, 4, 8, 4, seed=12)
    save_file({"latents": latents}, tmp_path / "a.safetensors")
    out = tmp_path / "a.png"
    done = run_cli(
        "decode", str(tmp_path / "a.safetensors"), "-o", str(out), "--url", server.url,
        "--family", "stabilityai/stable-diffusion-xl-base-1.0", env=offline_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        local = reference["sdxl"].decode(latents / reference["sdxl"].config.scaling_factor).sample
    expected = ((local / 2 + 0.5).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy() / 255
    assert_same_pixels(np.asarray(Image.open(out)) / 255, expected)
