"""Every current diffusers VAE (SD3, Flux.2, Qwen-Image, Wan 2.2, HunyuanVideo 1.5, LTX-Video, CogVideoX,
taesd/taesdxl/taef1)
through the live server: decode and encode equal to diffusers in-process on the same weights, and each pipeline's
own latent (output_type="latent") decoded to the pixels that pipeline makes itself."""

import numpy as np
import pytest
import requests
import tiny_pipelines
import torch
from conftest import NEW_FAMILIES, ROOT, seeded, tensor_of
from diffusers import Flux2Pipeline, HunyuanImageRefinerPipeline, LTXPipeline
from diffusers.utils.remote_utils import remote_decode, remote_encode
from diffusers_reference import decode_as_family, encode_as_family

from remote_vae.cli import client_call, client_table
from remote_vae.families import available, load_family
from remote_vae.vae import latent_of as encoder_latent

IMAGE_FAMILIES = [name for name in NEW_FAMILIES if not load_family(name).is_video]
VIDEO_FAMILIES = [name for name in NEW_FAMILIES if load_family(name).is_video]
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


def url(server, family: str) -> str:
    return f"{server.url}/{family}/"


def raw_decode(server, family: str, latents: torch.Tensor, **options) -> torch.Tensor:
    return remote_decode(
        url(server, family), tensor=latents, output_type="pt", partial_postprocess=False, return_type="pt", **options
    )


def vae_decode(model, latents: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(latents, **kwargs).sample


# One latent per family as the VAE itself takes it, the form it may be sent in, and diffusers' decode of it.
def native_case(family: str, model):
    if family == "flux2":  # the pipeline's folded form: 128 channels of 2x2 cells
        folded = seeded(1, 128, 4, 3, seed=31)
        return folded, vae_decode(model, Flux2Pipeline._unpatchify_latents(folded))
    if load_family(family).layout.frame_axis:  # Qwen-Image (2.1): an image as a one-frame video
        latents = seeded(1, load_family(family).latent_channels, 1, 8, 6, seed=31)
        return latents, vae_decode(model, latents)[:, :, 0]
    if family == "cogvideox":  # as CogVideoXPipeline holds it: frames first
        latents = seeded(1, 3, 16, 8, 4, seed=31)
        return latents, vae_decode(model, latents.permute(0, 2, 1, 3, 4))
    if family == "svd":  # frames first, as its pipeline holds them; the model takes them as a batch and their count
        latents = seeded(1, 3, 4, 8, 4, seed=31)
        frames = vae_decode(model, latents.flatten(0, 1), num_frames=3)
        return latents, frames[None].permute(0, 2, 1, 3, 4)
    if load_family(family).tiled_only:  # Allegro: a latent of one tile at least, decoded in its tiles
        latents = seeded(1, 4, 6, 16, 16, seed=31)
        return latents, decode_as_family(family, model, latents)
    if family == "ltxvideo":  # conditioned on a decode timestep, 0 by default as in LTXPipeline
        latents = seeded(1, 128, 3, 2, 1, seed=31)
        return latents, vae_decode(model, latents, temb=torch.zeros(1))
    channels, video = load_family(family).latent_channels, load_family(family).is_video
    latents = seeded(
        1, channels, *((3,) if video else ()), *((4, 2) if family in ("wan22", "hunyuanvideo15") else (8, 4)), seed=31
    )
    return latents, vae_decode(model, latents)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_decode_equals_diffusers(families_server, reference, family):
    latents, expected = native_case(family, reference[family])
    # A preview decoder reads normalised latents: sent with the full family's factors, they reach it unchanged.
    scaling = (
        load_family(family).client_scaling()
        if load_family(family).model_latents == "normalised"
        else {"do_scaling": False}
    )
    out = raw_decode(families_server, family, latents, **scaling)
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_decode_uint8_equals_diffusers_postprocessing(families_server, reference, family):
    latents, expected = native_case(family, reference[family])
    scaling = (
        load_family(family).client_scaling()
        if load_family(family).model_latents == "normalised"
        else {"do_scaling": False}
    )
    out = remote_decode(
        url(families_server, family),
        tensor=latents,
        output_type="pt",
        partial_postprocess=True,
        return_type="pt",
        **scaling,
    )
    local = ((expected / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    assert (out.to(torch.int16) - local.to(torch.int16)).abs().max() <= 1


@pytest.fixture(scope="module")
def pipeline_outputs(reference):
    """Each pipeline's latent and its own pixels ([B, 3, H, W] or [B, F, 3, H, W] in 0..1), computed once."""
    cache = {}

    def outputs(family: str):
        if family not in cache:
            vae = reference[family]
            cache[family] = (tiny_pipelines.run(family, vae, "latent"), tiny_pipelines.run(family, vae, "pt"))
        return cache[family]

    return outputs


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_pipelines_latent_decodes_to_the_pipelines_pixels(families_server, pipeline_outputs, family):
    """output_type="latent" from the family's pipeline, sent with the family's client call, gives output_type="pt"."""
    latents, pixels = pipeline_outputs(family)
    size = dict(height=tiny_pipelines.HEIGHT, width=tiny_pipelines.WIDTH)  # only packed latents use them
    scaling = load_family(family).client_scaling()
    raw = raw_decode(families_server, family, latents, **size, **scaling)
    out = (raw / 2 + 0.5).clamp(0, 1)
    if out.ndim == 5:
        out = out.permute(0, 2, 1, 3, 4)  # [B, 3, F, H, W] -> the pipeline's [B, F, 3, H, W]
    torch.testing.assert_close(out, pixels, **tiny_pipelines.PIXEL_TOLERANCE.get(family, TOLERANCE))
    # the call's scaling matters: the other one (LTX-2's pipeline hands out latents already denormalised) differs
    other = {"do_scaling": scaling == {"do_scaling": False}}
    if scaling != {"scaling_factor": 1.0}:  # CogView 4's normalisation is the identity
        assert (raw_decode(families_server, family, latents, **size, **other) - raw).abs().max() > 1e-3


# What each family's img2img / image-to-video pipeline does with the encoder's mean.
def pipeline_normalised(family: str, model, latent: torch.Tensor) -> torch.Tensor:
    spec = load_family(family)
    if family == "flux2":  # Flux2Pipeline._encode_vae_image
        folded = Flux2Pipeline._patchify_latents(latent)
        mean = model.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
        return (folded - mean) / std
    if family in ("ltxvideo", "ltx2"):  # LTXImageToVideoPipeline.prepare_latents, LTX2ImageToVideoPipeline's too
        return LTXPipeline._normalize_latents(
            latent, model.latents_mean, model.latents_std, model.config.scaling_factor
        )
    if spec.layout.paired_frames:  # HunyuanImageRefinerPipeline._encode_vae_image: the frame paired, times the factor
        return HunyuanImageRefinerPipeline._reorder_image_tokens(latent) * spec.scaling_factor
    if spec.latents_stats_frames:  # CosmosVideoToWorldPipeline.prepare_latents: per channel and frame, sigma_data
        view = (1, spec.latent_channels, -1, 1, 1)
        stats = (spec.latents_mean, spec.latents_std)
        mean, std = (torch.tensor(values).view(view)[:, :, : latent.shape[2]] for values in stats)
        return (latent - mean) * spec.scaling_factor / std
    if spec.latents_mean is not None:  # Wan 2.2, Qwen-Image: times 1/std
        view = (1, -1) + (1,) * (latent.ndim - 2)
        mean, inverse_std = torch.tensor(spec.latents_mean).view(view), 1.0 / torch.tensor(spec.latents_std).view(view)
        return (latent - mean) * inverse_std
    if spec.layout.frames_first:  # CogVideoXImageToVideoPipeline (and SVD's latents): frames first, times the factor
        return spec.scaling_factor * latent.permute(0, 2, 1, 3, 4)
    if spec.model_latents == "normalised":  # taesd: the encoder's latent is already the pipeline's
        return latent
    return (latent - (spec.shift_factor or 0)) * spec.scaling_factor


def sample_pixels(family: str, batch: int = 1) -> torch.Tensor:
    spec = load_family(family)
    frames = (2 * spec.temporal_compression + 1,) if spec.is_video else ()
    return seeded(batch, spec.pixel_channels, *frames, 64, 32, seed=41).clamp(-1, 1)


def post_tensor(server, family: str, pixels: torch.Tensor, **params) -> requests.Response:
    query = {"shape": list(pixels.shape), "dtype": "float32", **params}
    return requests.post(url(server, family), params=query, data=pixels.numpy().tobytes(), timeout=120)


ENCODERS = [name for name in NEW_FAMILIES if "encode" in load_family(name).operations]  # Allegro decodes only


@pytest.mark.parametrize("family", ENCODERS)
def test_encode_is_the_pipelines_normalised_latent(families_server, reference, family):
    model, pixels = reference[family], sample_pixels(family)
    latent = encode_as_family(family, model, pixels.unsqueeze(2) if load_family(family).layout.frame_axis else pixels)
    expected = pipeline_normalised(family, model, latent)
    out = tensor_of(post_tensor(families_server, family, pixels, do_scaling=True))
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("family", ["sd3", "taesd", "taef1"])
def test_remote_encode_with_the_familys_factors(families_server, reference, family):
    """diffusers' remote_encode sends scalar factors; for a preview encoder they are the space its latent is already
    in."""
    pixels, spec = sample_pixels(family), load_family(family)
    out = remote_encode(
        url(families_server, family), pixels, scaling_factor=spec.scaling_factor, shift_factor=spec.shift_factor
    )
    with torch.no_grad():
        encoded = reference[family].encode(pixels)
    latent = encoder_latent(encoded)
    torch.testing.assert_close(out, pipeline_normalised(family, reference[family], latent), **TOLERANCE)


def test_preview_decoder_of_unnormalised_latents(families_server, reference):
    """do_scaling=False says the latent is the full VAE's own; taesd then gets it normalised, as its pipeline would."""
    latents = seeded(1, 4, 8, 4, seed=33)
    out = raw_decode(families_server, "taesd", latents, do_scaling=False)
    torch.testing.assert_close(out, vae_decode(reference["taesd"], latents * 0.18215), **TOLERANCE)


def test_packed_and_folded_flux2_latents_are_one_latent(families_server, reference):
    """Flux.2's packed tokens, its folded 128-channel latent and the VAE's own 32-channel latent decode alike."""
    folded = seeded(2, 128, 4, 3, seed=34)
    packed = Flux2Pipeline._pack_latents(folded)  # [2, 12, 128], a transposed view, as the pipeline hands it out
    unfolded = Flux2Pipeline._unpatchify_latents(folded)  # [2, 32, 8, 6]
    expected = vae_decode(reference["flux2"], unfolded)
    for latent in (folded, packed, unfolded):
        out = raw_decode(families_server, "flux2", latent, height=64, width=48, do_scaling=False)
        torch.testing.assert_close(out, expected, **TOLERANCE)
    out = tensor_of(
        post_latent(families_server, "flux2", packed.contiguous(), height=64, width=48, packed_memory="tokens_first")
    )
    torch.testing.assert_close(out, expected, **TOLERANCE)


def post_latent(server, family: str, latents: torch.Tensor, **params) -> requests.Response:
    """A decode as raw requests sends it: the tensor's C-contiguous bytes."""
    query = {"shape": list(latents.shape), "dtype": "float32", "output_type": "pt", **params}
    return requests.post(
        url(server, family),
        params=query,
        data=latents.contiguous().numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "tensor/binary"},
        timeout=120,
    )


def test_packed_ltx_latents(families_server, reference):
    latents = seeded(1, 128, 2, 2, 1, seed=35)
    packed = LTXPipeline._pack_latents(latents)  # [1, 4, 128], C-contiguous: sent so, it is read tokens first
    expected = vae_decode(reference["ltxvideo"], latents, temb=torch.zeros(1))
    out = tensor_of(post_latent(families_server, "ltxvideo", packed, height=64, width=32, packed_memory="tokens_first"))
    torch.testing.assert_close(out, expected, **TOLERANCE)
    # Laid out as LTXPipeline's own output is (a transposed view), diffusers' client needs no hint.
    as_pipeline_holds = latents.flatten(2).transpose(1, 2)
    assert torch.equal(as_pipeline_holds, packed) and not as_pipeline_holds.is_contiguous()
    out = raw_decode(families_server, "ltxvideo", as_pipeline_holds, height=64, width=32, do_scaling=False)
    torch.testing.assert_close(out, expected, **TOLERANCE)


def test_ltx_decode_timestep_and_noise(families_server, reference):
    """decode_timestep / decode_noise_scale as LTXPipeline applies them, with noise drawn from decode_noise_seed."""
    latents = seeded(1, 128, 2, 2, 1, seed=36)
    response = post_latent(
        families_server, "ltxvideo", latents, decode_timestep=0.05, decode_noise_scale=0.025, decode_noise_seed=7
    )
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    expected = vae_decode(reference["ltxvideo"], (1 - 0.025) * latents + 0.025 * noise, temb=torch.tensor([0.05]))
    torch.testing.assert_close(tensor_of(response), expected, **TOLERANCE)
    unconditioned = vae_decode(reference["ltxvideo"], latents, temb=torch.zeros(1))
    assert (expected - unconditioned).abs().max() > 1e-3


def test_hunyuanvideo15_batches_run_one_sample_at_a_time(families_server, reference):
    """diffusers' HunyuanVideo 1.5 attention breaks on a batch of 2; the service decodes it sample by sample."""
    latents = seeded(2, 32, 2, 2, 2, seed=37)
    out = raw_decode(families_server, "hunyuanvideo15", latents, do_scaling=False)
    expected = torch.cat([vae_decode(reference["hunyuanvideo15"], latent[None]) for latent in latents])
    torch.testing.assert_close(out, expected, **TOLERANCE)


def test_ltx_batch_carries_a_timestep_per_sample(families_server, reference):
    latents = seeded(2, 128, 1, 2, 1, seed=38)
    out = raw_decode(families_server, "ltxvideo", latents, do_scaling=False)
    torch.testing.assert_close(out, vae_decode(reference["ltxvideo"], latents, temb=torch.zeros(2)), **TOLERANCE)


BAD_LATENTS = [
    ("sd3", (1, 4, 8, 8), "has 4 channels"),
    ("sd3", (1, 16, 2, 8, 8), "5-D"),
    ("flux2", (1, 32, 7, 6), "multiples of 2"),
    ("flux2", (1, 64, 4, 4), "128"),
    ("flux2", (1, 12, 64), "features per token"),
    ("qwenimage", (1, 16, 2, 8, 8), "1, h, w"),
    ("wan22", (1, 16, 3, 4, 4), "48"),
    ("wan22", (1, 48, 4, 4), "image latent"),
    ("hunyuanvideo15", (1, 16, 3, 4, 4), "32"),
    ("ltxvideo", (1, 5, 128), "tokens"),
    ("cogvideox", (1, 2, 16, 8, 4), "odd number"),
    ("cogvideox", (1, 3, 8, 8, 4), "16"),
    ("taef1", (1, 4, 8, 8), "16"),
]


@pytest.mark.parametrize(
    "family, shape, message", BAD_LATENTS, ids=[f"{f}-{'x'.join(map(str, s))}" for f, s, _ in BAD_LATENTS]
)
def test_bad_latents_are_refused_with_what_was_expected(families_server, family, shape, message):
    response = post_latent(families_server, family, torch.zeros(shape), height=64, width=32)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    "family, size, message",
    [
        ("flux2", (1, 3, 40, 32), "multiples of 16"),
        ("wan22", (1, 3, 5, 40, 32), "multiples of 16"),
        ("ltxvideo", (1, 3, 9, 48, 32), "multiples of 32"),
        ("cogvideox", (1, 3, 5, 64, 32), "9"),
    ],
)
def test_bad_encode_sizes_are_refused(families_server, family, size, message):
    response = post_tensor(families_server, family, torch.zeros(size))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_cosmos_statistics_normalise_at_most_the_sixteen_latent_frames_they_cover(families_server, reference):
    """Its pipeline views the statistics as [C, 16] and slices the clip's frames from them: a longer clip, normalised,
    is a 400 before anything runs, each way; raw latents of any length decode as the model does."""
    longer = seeded(1, 16, 17, 2, 1, seed=61)
    refused = post_latent(families_server, "cosmos", longer, do_scaling=True)
    assert refused.status_code == 400 and "cover 16 latent frames" in refused.json()["error"], refused.text
    torch.testing.assert_close(
        raw_decode(families_server, "cosmos", longer, do_scaling=False), vae_decode(reference["cosmos"], longer)
    )
    clip = torch.zeros(1, 3, 8 * 16 + 1, 16, 16)  # 17 latent frames
    refused = post_tensor(families_server, "cosmos", clip, do_scaling=True)
    assert refused.status_code == 400 and "cover 16 latent frames" in refused.json()["error"], refused.text
    assert post_tensor(families_server, "cosmos", clip[:, :, :121], do_scaling=True).status_code == 200  # 16: covered
    assert families_server.healthy()


def test_allegro_decodes_in_its_tiles_and_refuses_a_latent_smaller_than_one(families_server, reference):
    """Its untiled decode raises; every call runs its tiles (two here, blended across one latent row), 4T frames; a
    latent smaller than one tile is a 400 that gives the tile's size; it has no encode."""
    latents = seeded(1, 4, 6, 17, 16, seed=62)
    torch.testing.assert_close(
        raw_decode(families_server, "allegro", latents, do_scaling=False),
        decode_as_family("allegro", reference["allegro"], latents),
        **TOLERANCE,
    )
    small = post_latent(families_server, "allegro", seeded(1, 4, 5, 16, 16, seed=63), do_scaling=False)
    assert small.status_code == 400 and "6 x 16 x 16 latent cells" in small.json()["error"], small.text
    encode = post_tensor(families_server, "allegro", torch.zeros(1, 3, 24, 128, 128))
    assert encode.status_code in (400, 405) and "encode" in encode.json()["error"], encode.text
    assert families_server.healthy()


def test_decode_timestep_for_a_family_without_one_is_refused(families_server):
    response = post_latent(families_server, "sd3", torch.zeros(1, 16, 4, 4), decode_timestep=0.05)
    assert response.status_code == 400 and "no decode timestep" in response.json()["error"]
    assert families_server.healthy()


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_families_answer_mp4_with_every_frame(families_server, pipeline_outputs, family, tmp_path):
    """The pipeline's latent, as an MP4: every frame its pipeline makes, in order (H.264 is lossy: compared by PSNR)."""
    from diffusers_reference import read_mp4

    latents, pixels = pipeline_outputs(family)
    data = remote_decode(
        url(families_server, family),
        tensor=latents,
        output_type="mp4",
        return_type="mp4",
        height=tiny_pipelines.HEIGHT,
        width=tiny_pipelines.WIDTH,
        **load_family(family).client_scaling(),
    )
    frames, _ = read_mp4(data, tmp_path)
    expected = (pixels[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    assert frames.shape == expected.shape
    error = np.mean((frames.astype(np.float64) - expected) ** 2)
    assert 10 * np.log10(255**2 / max(error, 1e-12)) >= 25


@pytest.mark.parametrize("family", available())
def test_the_printed_client_call_gives_the_pipelines_pixels_exactly(every_family_server, reference, family):
    """`remote-vae families` (and docs/families.md) print a call per family: run as printed on the latent the family's
    pipeline hands out, it gives that pipeline's own pixels (a JPEG or an MP4 would not)."""
    vae = reference[family]
    latents, pixels = tiny_pipelines.run(family, vae, "latent"), tiny_pipelines.run(family, vae, "pt")
    names = {"remote_decode": remote_decode, "url": url(every_family_server, family), "latents": latents}
    out = eval(client_call(load_family(family)), names | {"H": tiny_pipelines.HEIGHT, "W": tiny_pipelines.WIDTH})
    if load_family(family).is_audio:  # the waveform, which the pipeline crops (and clips) as the docs say
        kept = tiny_pipelines.AUDIO_AFTER_DECODE[family](out, pixels.shape[-1])
        torch.testing.assert_close(kept, pixels, atol=1e-5, rtol=1e-5)
        return
    local = (pixels * 255).round().to(torch.int16)
    if load_family(family).is_video:  # uint8 frames [F, H, W, 3]; the pipeline's [B, F, 3, H, W]
        got, local = out.to(torch.int16), local[0].permute(0, 2, 3, 1)
    elif load_family(family).pixel_channels == 4:  # uint8 RGBA [1, H, W, 4]; the pipeline's [B, 4, H, W]
        got, local = out[0].to(torch.int16), local[0].permute(1, 2, 0)
    else:  # a PNG: the PIL image
        got, local = torch.from_numpy(np.asarray(out)).to(torch.int16), local[0].permute(1, 2, 0)
    assert got.shape == local.shape and (got - local).abs().max() <= 1


def test_docs_show_the_client_calls_the_command_prints():
    text = (ROOT / "docs" / "families.md").read_text()
    assert client_table([load_family(name) for name in available()]) in text


def test_hunyuanvideo15_decodes_as_its_pipeline_tiled_or_not(every_family_server, reference):
    """Its pipeline does not tile: a clip past the 256² threshold decodes in exact bands, to the untiled pixels (blended
    tiles were 60 levels off at 288²). Asked for blended tiles, the server tiles where a local enable_tiling() would
    (a side past 256), not by pixel count (320×128 is under 256² but tiles locally)."""
    model = reference["hunyuanvideo15"]
    square = seeded(1, 32, 2, 18, 18, seed=51)  # 288×288, 5 frames
    untiled = uint8_frames(vae_decode(model, square))
    assert (
        uint8_frames(raw_decode(every_family_server, "hunyuanvideo15", square, do_scaling=False)) - untiled
    ).abs().max() <= 1
    wide = seeded(1, 32, 2, 8, 20, seed=52)  # 128×320
    model.enable_tiling()
    try:
        tiled_locally = vae_decode(model, wide)
    finally:
        model.disable_tiling()
    assert (tiled_locally - vae_decode(model, wide)).abs().max() > 1e-3  # diffusers does tile it
    reply = requests.post(
        url(every_family_server, "hunyuanvideo15"),
        params={"shape": list(wide.shape), "dtype": "float32", "output_type": "pt", "tiling": "blend"},
        data=wide.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "tensor/binary"},
        timeout=120,
    )
    torch.testing.assert_close(tensor_of(reply), tiled_locally, **TOLERANCE)


def uint8_frames(decoded: torch.Tensor) -> torch.Tensor:
    return ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.int16)


def test_qwenimage21_answers_and_reads_rgba(families_server, reference, pipeline_outputs):
    """Qwen-Image 2.1's VAE makes and reads four channels: its pipeline's PIL image is RGBA, as the PNG reply is; a JPEG
    (no alpha) is a 400 that says so; an encode converts an image file to RGBA, as the pipeline converts its inputs."""
    import io

    from PIL import Image

    latents, pixels = pipeline_outputs("qwenimage21")
    size = dict(height=tiny_pipelines.HEIGHT, width=tiny_pipelines.WIDTH)
    png = remote_decode(
        url(families_server, "qwenimage21"),
        tensor=latents,
        image_format="png",
        output_type="pt",
        return_type="pt",
        partial_postprocess=True,
        **size,
    )
    reply = requests.post(
        url(families_server, "qwenimage21"),
        params={
            "shape": list(latents.shape),
            "dtype": "float32",
            "image_format": "png",
            "do_scaling": "true",
            "packed_memory": "tokens_first",
            **size,
        },
        data=latents.contiguous().numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "image/png"},
        timeout=60,
    )
    image = Image.open(io.BytesIO(reply.content))
    local = tiny_pipelines.run("qwenimage21", reference["qwenimage21"], "pil")[0]
    assert image.mode == local.mode == "RGBA" and png.shape[-1] == 4
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(local, dtype=np.int16)).max() <= 1
    assert np.asarray(local)[..., 3].std() > 0  # the alpha channel carries the decoder's output, not a constant
    jpeg = requests.post(  # diffusers' remote_decode default: a JPEG
        url(families_server, "qwenimage21"),
        params={"shape": list(latents.shape), "dtype": "float32", "output_type": "pil", "image_format": "jpg", **size},
        data=latents.contiguous().numpy().tobytes(),
        headers={"Content-Type": "tensor/binary"},
        timeout=60,
    )
    assert jpeg.status_code == 400 and "no alpha channel" in jpeg.json()["error"], jpeg.text

    rgba = Image.fromarray((np.random.default_rng(7).random((64, 32, 4)) * 255).astype(np.uint8), "RGBA")
    for picture in (rgba, rgba.convert("RGB")):  # an RGB file is made RGBA (opaque), as the pipeline does
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        out = tensor_of(
            requests.post(
                url(families_server, "qwenimage21"), data=buffer.getvalue(), params={"do_scaling": "true"}, timeout=60
            )
        )
        expected = encode_as_family(
            "qwenimage21",
            reference["qwenimage21"],
            tiny_pipelines.d.VaeImageProcessor(vae_scale_factor=16).preprocess(picture.convert("RGBA")).unsqueeze(2),
        )
        torch.testing.assert_close(
            out, pipeline_normalised("qwenimage21", reference["qwenimage21"], expected), **TOLERANCE
        )
    rgb = torch.zeros(1, 3, 64, 32)  # to /encode: on the shared route three channels read as a (wrong) latent
    three = requests.post(
        url(families_server, "qwenimage21") + "encode",
        params={"shape": list(rgb.shape), "dtype": "float32"},
        data=rgb.numpy().tobytes(),
        timeout=60,
    )
    assert three.status_code == 400 and "[B, 4, H, W]" in three.json()["error"], three.text
