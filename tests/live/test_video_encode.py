"""Video encode through the real server: MP4 / WebM / GIF bodies and tensors to latents, and bad video input."""

import types

import imageio.v2 as imageio
import numpy as np
import PIL.Image
import PIL.ImageSequence
import pytest
import requests
import torch
from conftest import MAX_VIDEO_PIXELS, seeded, tensor_of
from diffusers import WanVideoToVideoPipeline
from diffusers.utils.remote_utils import remote_decode, remote_encode
from diffusers.video_processor import VideoProcessor

from remote_vae.families import load_family

VIDEO = ("hunyuanvideo", "wan21")
PROCESSOR = VideoProcessor(vae_scale_factor=8)
WAN = load_family("wan21")


def url(video_server, family: str, route: str = "encode") -> str:
    return f"{video_server.url}/{family}/{route}"


def moving_frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
    """uint8 [F, H, W, 3]: a colour gradient with a square that moves, like a (very) short real clip."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for index in range(count):
        frame = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 + 20 * index)], axis=-1)
        frame[8:20, 4 + 3 * index : 16 + 3 * index] = (250, 240, 20)
        frames.append(frame.astype(np.uint8))
    return np.stack(frames)


def write_video(path, frames: np.ndarray, **options) -> bytes:
    writer = imageio.get_writer(path, format="FFMPEG", fps=24, macro_block_size=1, **options)
    for frame in frames:
        writer.append_data(frame)
    writer.close()
    return path.read_bytes()


def read_video(path) -> np.ndarray:
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack(list(reader.iter_data()))
    finally:
        reader.close()


def local_encode(model, frames: np.ndarray) -> torch.Tensor:
    """diffusers' way: VideoProcessor.preprocess_video, then the latent distribution's mean."""
    video = PROCESSOR.preprocess_video([PIL.Image.fromarray(frame) for frame in frames])
    with torch.no_grad():
        return model.encode(video).latent_dist.mean


def post_file(endpoint: str, data: bytes, **params) -> torch.Tensor:
    return tensor_of(requests.post(endpoint, data=data, params=params))  # no Content-Type, as remote_encode sends


@pytest.mark.parametrize("family", VIDEO)
def test_mp4_round_trips_to_diffusers_latents(video_server, reference, family, tmp_path):
    data = write_video(tmp_path / "clip.mp4", moving_frames(9), codec="libx264", quality=8)
    latents = post_file(url(video_server, family), data)
    # The frames diffusers would see: the same file, read back by imageio's ffmpeg.
    expected = local_encode(reference[family], read_video(tmp_path / "clip.mp4"))
    assert latents.shape == (1, 16, 3, 4, 6)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("container", ["webm", "gif"])
def test_webm_and_gif_bodies(video_server, reference, container, tmp_path):
    frames = moving_frames(5)
    path = tmp_path / f"clip.{container}"
    if container == "webm":
        data = write_video(path, frames, codec="libvpx-vp9")
        frames = read_video(path)
    else:
        images = [PIL.Image.fromarray(frame) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)
        data = path.read_bytes()
        with PIL.Image.open(path) as gif:  # Pillow, not ffmpeg, says what the frames are
            frames = np.stack([np.asarray(frame.convert("RGB")) for frame in PIL.ImageSequence.Iterator(gif)])
    assert frames.shape[0] == 5
    latents = post_file(url(video_server, "hunyuanvideo"), data)
    torch.testing.assert_close(latents, local_encode(reference["hunyuanvideo"], frames), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", VIDEO)
def test_tensor_encode_with_remote_encode(video_server, reference, family):
    video = seeded(2, 3, 5, 16, 24, seed=30).clamp(-1, 1)
    latents = remote_encode(url(video_server, family), video)
    with torch.no_grad():
        expected = reference[family].encode(video).latent_dist.mean
    assert latents.shape == (2, 16, 2, 2, 3)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", VIDEO)
def test_tiled_encode_is_the_untiled_encode(video_server, reference, family):
    """Both families' '-tiled' twins tile every frame, exactly: HunyuanVideo layer by layer, Wan in bands (352 rows:
    two)."""
    video = seeded(1, 3, 5, 352, 32, seed=33).clamp(-1, 1)
    latents = remote_encode(url(video_server, f"{family}-tiled"), video)
    with torch.no_grad():
        expected = reference[family].encode(video).latent_dist.mean
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
    assert video_server.metric("remote_vae_model_calls_total", family=f"{family}-tiled", mode="tiled") >= 1


def test_hunyuan_encode_scaling(video_server, reference):
    video = seeded(1, 3, 5, 16, 16, seed=31).clamp(-1, 1)
    factor = load_family("hunyuanvideo").scaling_factor
    latents = remote_encode(url(video_server, "hunyuanvideo"), video, scaling_factor=factor)
    with torch.no_grad():
        expected = reference["hunyuanvideo"].encode(video).latent_dist.mean * factor
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


class KeepLatents:
    """A scheduler stand-in whose add_noise returns the clean latents, so prepare_latents shows them."""

    def add_noise(self, latents, noise, timestep):
        return latents


def test_wan_encode_do_scaling_is_the_pipelines_normalisation(video_server, reference, tmp_path):
    """do_scaling=True on encode == WanVideoToVideoPipeline.prepare_latents' own (z - mean) / std."""
    data = write_video(tmp_path / "clip.mp4", moving_frames(9), codec="libx264", quality=8)
    latents = post_file(url(video_server, "wan21"), data, do_scaling=True)
    video = PROCESSOR.preprocess_video([PIL.Image.fromarray(frame) for frame in read_video(tmp_path / "clip.mp4")])
    pipeline = types.SimpleNamespace(
        vae=reference["wan21"], vae_scale_factor_temporal=4, vae_scale_factor_spatial=8, scheduler=KeepLatents()
    )
    with torch.no_grad():
        expected = WanVideoToVideoPipeline.prepare_latents(
            pipeline, video, 1, 16, 32, 48, torch.float32, torch.device("cpu"), timestep=torch.tensor([0])
        )
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
    # and decoding with do_scaling=True undoes it: the round trip the pipelines make
    raw = post_file(url(video_server, "wan21"), data)
    torch.testing.assert_close(
        latents,
        (raw - torch.tensor(WAN.latents_mean).view(1, 16, 1, 1, 1))
        / torch.tensor(WAN.latents_std).view(1, 16, 1, 1, 1),
        atol=1e-4,
        rtol=1e-4,
    )


def test_an_image_is_a_one_frame_video(video_server, reference):
    frame = moving_frames(1)[0]
    image = PIL.Image.fromarray(frame)
    latents = remote_encode(url(video_server, "wan21"), image)
    assert latents.shape == (1, 16, 1, 4, 6)
    torch.testing.assert_close(latents, local_encode(reference["wan21"], frame[None]), atol=1e-4, rtol=1e-4)


def test_encode_then_decode_through_the_service(video_server, tmp_path):
    """An MP4 in, latents out, the same latents back to an MP4 of as many frames."""
    data = write_video(tmp_path / "clip.mp4", moving_frames(9), codec="libx264", quality=8)
    latents = post_file(url(video_server, "hunyuanvideo", "predict"), data)
    mp4 = remote_decode(
        url(video_server, "hunyuanvideo", ""), tensor=latents, output_type="mp4", return_type="mp4", do_scaling=False
    )
    path = tmp_path / "back.mp4"
    path.write_bytes(mp4)
    assert read_video(path).shape == (9, 32, 48, 3)


# -- bad input ---------------------------------------------------------------


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


def test_wrong_frame_counts_name_the_nearest_valid_ones(video_server, tmp_path):
    data = write_video(tmp_path / "eight.mp4", moving_frames(8), codec="libx264")
    message = error_of(requests.post(url(video_server, "hunyuanvideo"), data=data), 400)
    assert "8 frames" in message and "5 or 9" in message
    tensor = torch.zeros(1, 3, 10, 16, 16)
    response = requests.post(
        url(video_server, "wan21"),
        data=tensor.numpy().tobytes(),
        params=dict(shape=[1, 3, 10, 16, 16], dtype="float32"),
    )
    assert "9 or 13" in error_of(response, 400)


@pytest.mark.parametrize(
    "case", ["garbage after ftyp", "truncated", "garbage after EBML", "video content type, not a video"]
)
def test_corrupt_videos_are_400(video_server, tmp_path, case):
    good = write_video(tmp_path / "clip.mp4", moving_frames(9), codec="libx264")
    body, headers = {
        "garbage after ftyp": (good[:12] + bytes(range(256)) * 8, {}),
        "truncated": (good[: len(good) // 3], {}),
        "garbage after EBML": (b"\x1a\x45\xdf\xa3" + b"\x00" * 500, {}),
        "video content type, not a video": (b"hello", {"Content-Type": "video/mp4"}),
    }[case]
    message = error_of(requests.post(url(video_server, "wan21"), data=body, headers=headers), 400)
    assert "video" in message
    assert video_server.healthy()


def test_latent_of_the_wrong_kind_is_400(video_server):
    for shape, needle in [
        ((1, 16, 8, 8), "image latent"),
        ((1, 64, 64), "packed latent"),
        ((1, 4, 3, 8, 8), "channels"),
    ]:
        latents = torch.zeros(shape)
        response = requests.post(
            url(video_server, "hunyuanvideo", ""),
            data=latents.numpy().tobytes(),
            params=dict(shape=list(shape), dtype="float32", height=64, width=64),
            headers={"Content-Type": "tensor/binary"},
        )
        message = error_of(response, 400)
        assert needle in message and "[B, 16, T, h, w]" in message
    out = remote_decode(
        url(video_server, "hunyuanvideo", ""),
        tensor=torch.zeros(1, 16, 1, 2, 2),
        output_type="pt",
        return_type="pt",
        do_scaling=False,
    )
    assert out.shape == (1, 3, 1, 16, 16)  # and it still decodes


def test_huge_latents_and_videos_are_413_before_any_work(video_server, tmp_path):
    # A latent of a million frames: refused from its shape, without reading a body.
    response = requests.post(
        url(video_server, "wan21", ""),
        data=b"",
        params=dict(shape=[1, 16, 10**6, 8, 8], dtype="float16", output_type="mp4"),
        headers={"Content-Type": "tensor/binary"},
    )
    assert "at most" in error_of(response, 413)
    # An MP4 with more frames than --max-video-pixels allows: refused while reading, not after.
    frames = MAX_VIDEO_PIXELS // (32 * 48) + 4
    frames += (1 - frames) % 4  # a valid count, so only the size is wrong
    data = write_video(tmp_path / "long.mp4", np.repeat(moving_frames(1), frames, axis=0), codec="libx264")
    assert "at most" in error_of(requests.post(url(video_server, "hunyuanvideo"), data=data), 413)
    assert video_server.healthy()


def test_frame_sides_must_be_multiples_of_8(video_server, tmp_path):
    data = write_video(tmp_path / "odd.mp4", moving_frames(5, height=36, width=44), codec="libx264")
    assert "multiples of 8" in error_of(requests.post(url(video_server, "wan21"), data=data), 400)


def test_image_outputs_are_not_defined_for_video(video_server):
    latents = torch.zeros(1, 16, 2, 2, 2)
    with pytest.raises(RuntimeError, match="output_type=mp4"):
        remote_decode(url(video_server, "wan21", ""), tensor=latents, output_type="pil", do_scaling=False)


def test_video_to_an_image_family_is_400(multi_server, tmp_path):
    data = write_video(tmp_path / "clip.mp4", moving_frames(5), codec="libx264")
    assert "video file" in error_of(requests.post(multi_server.url + "/sd15/encode", data=data), 400)
    assert multi_server.healthy()
