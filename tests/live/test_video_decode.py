"""Video decode through the real server with diffusers' remote_decode: every row of docs/protocol.md §2's video
table."""

import numpy as np
import pytest
import requests
import tiny_pipelines
import torch
from conftest import MODEL_CLASSES, TEST_TILING, psnr, seeded, tensor_of
from diffusers.utils.remote_utils import remote_decode
from diffusers.video_processor import VideoProcessor
from diffusers_reference import read_mp4

from remote_vae.families import load_family

VIDEO = ("hunyuanvideo", "wan21")
HUNYUAN_FACTOR = load_family("hunyuanvideo").scaling_factor
PROCESSOR = VideoProcessor(vae_scale_factor=8)
LATENT = (1, 16, 3, 4, 6)  # 9 frames of 32x48


def url(video_server, family: str) -> str:
    return f"{video_server.url}/{family}/"


def local_decode(model, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(latents).sample


def local_uint8(sample: torch.Tensor) -> np.ndarray:
    """[B, F, H, W, 3] uint8 as diffusers' VideoProcessor + numpy_to_pil round them."""
    return (PROCESSOR.postprocess_video(sample, output_type="np") * 255).round().astype("uint8")


@pytest.mark.parametrize("family", VIDEO)
@pytest.mark.parametrize("shape", [LATENT, (1, 16, 6, 2, 2), (2, 16, 2, 3, 2)], ids=["9x32x48", "21-frames", "batch-2"])
def test_raw_pt_matches_diffusers(video_server, reference, family, shape):
    latents = seeded(*shape, seed=11)
    out = remote_decode(url(video_server, family), tensor=latents, output_type="pt", return_type="pt", do_scaling=False)
    frames = 4 * (shape[2] - 1) + 1
    assert out.shape == (shape[0], 3, frames, shape[3] * 8, shape[4] * 8)
    torch.testing.assert_close(out, local_decode(reference[family], latents), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", VIDEO)
def test_raw_pt_with_video_processor_gives_frames(video_server, reference, family):
    latents = seeded(*LATENT, seed=12)
    frames = remote_decode(
        url(video_server, family),
        tensor=latents,
        processor=PROCESSOR,
        output_type="pt",
        return_type="pil",
        do_scaling=False,
    )
    expected = local_uint8(local_decode(reference[family], latents))[0]
    assert len(frames) == 9 and frames[0].size == (48, 32)
    assert np.abs(np.stack([np.asarray(f) for f in frames]).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("family", VIDEO)
def test_partial_postprocess_is_uint8_frames(video_server, reference, family):
    latents = seeded(*LATENT, seed=13)
    out = remote_decode(
        url(video_server, family),
        tensor=latents,
        output_type="pt",
        partial_postprocess=True,
        return_type="pt",
        do_scaling=False,
    )
    assert out.dtype == torch.uint8 and out.shape == (9, 32, 48, 3)
    expected = local_uint8(local_decode(reference[family], latents))[0]
    assert np.abs(out.numpy().astype(int) - expected).max() <= 1
    images = remote_decode(
        url(video_server, family),
        tensor=latents,
        output_type="pt",
        partial_postprocess=True,
        return_type="pil",
        do_scaling=False,
    )
    assert len(images) == 9 and images[0].size == (48, 32)


@pytest.mark.parametrize("family", VIDEO)
def test_pil_with_processor_is_unit_frames(video_server, reference, family):
    latents = seeded(*LATENT, seed=14)
    out = remote_decode(
        url(video_server, family),
        tensor=latents,
        processor=PROCESSOR,
        output_type="pil",
        return_type="pt",
        do_scaling=False,
    )
    expected = PROCESSOR.postprocess_video(local_decode(reference[family], latents), output_type="pt")[0]
    assert out.shape == (9, 3, 32, 48)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    images = remote_decode(
        url(video_server, family),
        tensor=latents,
        processor=PROCESSOR,
        output_type="pil",
        return_type="pil",
        do_scaling=False,
    )
    assert len(images) == 9


@pytest.mark.parametrize(
    "family, served, shape", [(name, name, LATENT) for name in VIDEO] + [("wan21", "wan21-tiled", (1, 16, 2, 44, 4))]
)
def test_mp4_is_h264_with_every_frame(video_server, reference, family, served, shape, tmp_path):
    """Wan streams its frames to the MP4 as it decodes them; tiled (exactly, in two bands here), they go in after."""
    latents = seeded(*shape, seed=15)
    data = remote_decode(
        url(video_server, served), tensor=latents, output_type="mp4", return_type="mp4", do_scaling=False
    )
    assert isinstance(data, bytes) and data[4:8] == b"ftyp"
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart: the index comes first, browsers play while loading
    frames, meta = read_mp4(data, tmp_path)
    assert frames.shape == (4 * (shape[2] - 1) + 1, 8 * shape[3], 8 * shape[4], 3)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 24
    expected = local_uint8(local_decode(reference[family], latents))[0]
    assert psnr(torch.from_numpy(frames), torch.from_numpy(expected)) >= 30


def test_mp4_fps_and_quality(video_server, tmp_path):
    latents = seeded(*LATENT, seed=16)
    endpoint = url(video_server, "hunyuanvideo")
    params = dict(shape=list(LATENT), dtype="float32", output_type="mp4")

    def post(**extra):
        response = requests.post(
            endpoint,
            params={**params, **extra},
            data=latents.numpy().tobytes(),
            headers={"Content-Type": "tensor/binary", "Accept": "text/plain"},
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "video/mp4" and response.headers["frame-count"] == "9"
        return response.content

    _, meta = read_mp4(post(fps=12), tmp_path)
    assert meta["fps"] == 12
    lossless, default, rough = post(crf=0), post(), post(crf=40)
    assert len(lossless) > len(default) > len(rough)
    assert post(quality=10) == lossless  # imageio's 0..10 scale: 10 is crf 0
    for bad, message in [(dict(fps=0), "fps"), (dict(crf=60), "crf"), (dict(quality=90), "0..10")]:
        response = requests.post(
            endpoint,
            params={**params, **bad},
            data=latents.numpy().tobytes(),
            headers={"Content-Type": "tensor/binary"},
        )
        assert response.status_code == 400 and message in response.json()["error"]


def test_batch_of_two_clips_follow_each_other(video_server, reference, tmp_path):
    """B > 1: [B*F, ...] for frame outputs, one MP4 playing the clips in turn."""
    latents = seeded(2, 16, 2, 2, 3, seed=17)
    endpoint = url(video_server, "wan21")
    expected = local_uint8(local_decode(reference["wan21"], latents)).reshape(10, 16, 24, 3)
    out = remote_decode(
        endpoint, tensor=latents, output_type="pt", partial_postprocess=True, return_type="pt", do_scaling=False
    )
    assert out.shape == (10, 16, 24, 3)
    assert np.abs(out.numpy().astype(int) - expected).max() <= 1
    unit = remote_decode(
        endpoint, tensor=latents, processor=PROCESSOR, output_type="pil", return_type="pt", do_scaling=False
    )
    assert unit.shape == (10, 3, 16, 24)
    response = requests.post(
        endpoint,
        params=dict(shape=list(latents.shape), dtype="float32", output_type="mp4"),
        data=latents.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "text/plain"},
    )
    assert response.headers["video-count"] == "2" and response.headers["frame-count"] == "5"
    frames, _ = read_mp4(response.content, tmp_path)
    assert frames.shape == (10, 16, 24, 3)
    assert psnr(torch.from_numpy(frames), torch.from_numpy(expected)) >= 30


def test_hunyuan_scaling_factor(video_server, reference):
    latents = seeded(*LATENT, seed=18)
    expected = local_decode(reference["hunyuanvideo"], latents / HUNYUAN_FACTOR)  # HunyuanVideoPipeline's own step
    for kwargs in (dict(do_scaling=True), dict(scaling_factor=HUNYUAN_FACTOR)):
        out = remote_decode(
            url(video_server, "hunyuanvideo"), tensor=latents, output_type="pt", return_type="pt", **kwargs
        )
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def wan_pipeline(reference):
    """diffusers' WanPipeline around the tiny Wan VAE, with a tiny transformer and no text encoder
    (tests/tiny_pipelines.py)."""
    torch.manual_seed(4)
    pipe, _ = tiny_pipelines.wan22(reference["wan21"])  # 16 channels: Wan 2.1's WanPipeline
    pipe.transformer.eval()
    return pipe


def test_wan_do_scaling_is_the_pipelines_per_channel_normalisation(video_server, wan_pipeline):
    """do_scaling=True on Wan == what WanPipeline does with its latents before decoding."""
    arguments = dict(
        prompt_embeds=seeded(1, 8, 16, seed=19),
        guidance_scale=1.0,
        num_inference_steps=1,
        height=32,
        width=48,
        num_frames=9,
    )
    latents = wan_pipeline(**arguments, output_type="latent", generator=torch.Generator().manual_seed(6)).frames
    video = wan_pipeline(
        **arguments, output_type="pt", generator=torch.Generator().manual_seed(6)
    ).frames  # [1, F, 3, H, W] in 0..1
    out = remote_decode(
        url(video_server, "wan21"),
        tensor=latents,
        processor=PROCESSOR,
        output_type="pil",
        return_type="pt",
        do_scaling=True,
    )
    torch.testing.assert_close(out, video[0], atol=1e-4, rtol=1e-4)
    unscaled = remote_decode(
        url(video_server, "wan21"),
        tensor=latents,
        processor=PROCESSOR,
        output_type="pil",
        return_type="pt",
        do_scaling=False,
    )
    assert (unscaled - video[0]).abs().max() > 0.01  # the normalisation really is applied


def test_wan_explicit_scalar_factors(video_server, reference):
    latents = seeded(*LATENT, seed=20)
    out = remote_decode(
        url(video_server, "wan21"),
        tensor=latents,
        output_type="pt",
        return_type="pt",
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    torch.testing.assert_close(out, local_decode(reference["wan21"], latents / 0.5 + 0.1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", VIDEO)
def test_tiled_decode_is_exact_and_blend_is_diffusers_tiled_decode(video_server, model_dirs, family):
    """Above a family's tile_above_pixels both tile exactly, so their frames are the untiled ones: HunyuanVideo layer by
    layer (tiling/group_norm.py) through diffusers' own frame batches, Wan in bands with their own frame caches
    (tiling/halo.py,
    44 latent rows: two bands). tiling=blend decodes as diffusers does with enable_tiling()."""
    # 5 latent frames: past HunyuanVideo's 4, diffusers decodes in frame batches; 64x64 frames, or 352x32 ones; tiles of
    # 32
    latents = seeded(1, 16, 5, 8, 8, seed=21) if family == "hunyuanvideo" else seeded(1, 16, 2, 44, 4, seed=21)
    out = remote_decode(
        url(video_server, f"{family}-tiled"), tensor=latents, output_type="pt", return_type="pt", do_scaling=False
    )
    blend = tensor_of(
        requests.post(
            url(video_server, f"{family}-tiled"),
            params={"shape": list(latents.shape), "dtype": "float32", "output_type": "pt", "tiling": "blend"},
            data=latents.numpy().tobytes(),
            headers={"Content-Type": "tensor/binary"},
            timeout=120,
        )
    )
    model = MODEL_CLASSES[family].from_pretrained(model_dirs[family]).eval()
    untiled = local_decode(model, latents)
    model.enable_tiling(**TEST_TILING[family])
    tiled = local_decode(model, latents)
    assert (tiled - untiled).abs().max() > 1e-3  # tiling really happened
    torch.testing.assert_close(blend.reshape(tiled.shape), tiled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, untiled, atol=1e-4, rtol=1e-4)
    assert video_server.metric("remote_vae_model_calls_total", family=f"{family}-tiled", mode="tiled") >= 2


def test_ltx_tiles_blended_by_default_and_exactly_on_request_with_its_timestep(video_server, model_dirs):
    """LTX-Video's config keeps diffusers' blended tiles as its default (the real client's call, decode timestep 0);
    tiling=exact gives the untiled frame in bands (24 latent rows: two bands of at least four 5-row halos), its decode
    timestep reaching every band."""
    latents, served = seeded(1, 128, 1, 24, 1, seed=23), url(video_server, "ltxvideo-tiled")  # one 768x32 frame
    blend = remote_decode(served, tensor=latents, output_type="pt", return_type="pt", do_scaling=False)
    exact = tensor_of(
        requests.post(
            served,
            params={
                "shape": list(latents.shape),
                "dtype": "float32",
                "output_type": "pt",
                "tiling": "exact",
                "do_scaling": "false",
                "decode_timestep": 0.05,
                "decode_noise_scale": 0,
            },
            data=latents.numpy().tobytes(),
            headers={"Content-Type": "tensor/binary"},
            timeout=120,
        )
    )
    model = MODEL_CLASSES["ltxvideo"].from_pretrained(model_dirs["ltxvideo"]).eval()
    with torch.no_grad():
        untiled, untiled_at_0 = (model.decode(latents, temb=torch.tensor([t])).sample for t in (0.05, 0.0))
        model.enable_tiling(**TEST_TILING["ltxvideo"])
        tiled_at_0 = model.decode(latents, temb=torch.tensor([0.0])).sample
    assert (tiled_at_0 - untiled_at_0).abs().max() > 1e-3  # tiling really happened
    torch.testing.assert_close(blend.reshape(tiled_at_0.shape), tiled_at_0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exact.reshape(untiled.shape), untiled, atol=1e-4, rtol=1e-4)
    assert video_server.metric("remote_vae_model_calls_total", family="ltxvideo-tiled", mode="tiled") == 2


def test_video_headers_and_json_reply(video_server):
    latents = seeded(*LATENT, seed=22)
    response = requests.post(
        url(video_server, "hunyuanvideo"),
        params=dict(shape=list(LATENT), dtype="float32", output_type="pt", partial_postprocess=True),
        data=latents.numpy().tobytes(),
        headers={"Content-Type": "tensor/binary", "Accept": "tensor/base64"},
    )
    assert response.status_code == 200
    assert response.headers["frame-count"] == "9" and response.headers["video-count"] == "1"
    assert response.json()["parameters"] == {"shape": [9, 32, 48, 3], "dtype": "uint8"}
