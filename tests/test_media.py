"""The media stage: tensor bytes, image files, postprocessing against diffusers."""

import io

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from remote_vae.errors import RequestError
from remote_vae.media import (
    Mp4Options,
    Postprocessor,
    VideoFile,
    VideoPostprocessor,
    is_image_file,
    open_image,
    tensor_from_bytes,
    tensor_to_bytes,
    video_demuxer,
    write_mp4,
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.uint8])
def test_tensor_bytes_round_trip(dtype):
    tensor = (torch.randn(2, 3, 5) * 50).to(dtype)
    data = tensor_to_bytes(tensor)
    assert len(data) == tensor.numel() * tensor.element_size()
    assert torch.equal(tensor_from_bytes(data, (2, 3, 5), dtype), tensor)


def test_wire_bytes_are_what_diffusers_sends():
    import safetensors.torch

    tensor = torch.randn(1, 4, 2, 2, dtype=torch.bfloat16)
    assert tensor_to_bytes(tensor) == safetensors.torch._to_ndarray(tensor)[0].tobytes()


def test_postprocess_matches_vae_image_processor():
    sample = torch.randn(2, 3, 16, 8) * 1.5
    post, reference = Postprocessor(8), VaeImageProcessor(vae_scale_factor=8)
    expected = np.stack([np.asarray(image) for image in reference.postprocess(sample, output_type="pil")])
    assert np.array_equal(post.uint8(sample).numpy(), expected)
    assert np.array_equal(np.stack([np.asarray(image) for image in post.image(sample)]), expected)
    assert torch.equal(post.unit(sample), reference.postprocess(sample, output_type="pt"))


def test_open_image_refuses_oversized_before_decoding():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    assert open_image(buffer.getvalue(), 64 * 64).size == (64, 64)
    with pytest.raises(RequestError) as error:
        open_image(buffer.getvalue(), 64 * 63)
    assert error.value.status == 413


def test_image_magic():
    assert is_image_file(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
    assert not is_image_file(b"\x00" * 16)


def test_video_demuxer_is_chosen_by_magic_number():
    assert video_demuxer(b"\x00\x00\x00\x18ftypmp42") == "mov"
    assert video_demuxer(b"\x1a\x45\xdf\xa3") == "matroska"
    assert video_demuxer(b"GIF89a...") == "gif"
    # Never probed: a playlist or anything else is not handed to ffmpeg at all.
    for other in (b"#EXTM3U\nhttp://127.0.0.1/x.ts", b"ffconcat version 1.0", b"\x89PNG\r\n\x1a\n"):
        assert video_demuxer(other) is None
        with pytest.raises(RequestError, match="not a video file"):
            VideoFile(other)


def test_mp4_written_frame_by_frame_reads_back():
    frames = [np.full((16, 24, 3), 20 * index, dtype=np.uint8) for index in range(5)]
    data = write_mp4(iter(frames), 24, 16, Mp4Options(crf=0))
    with VideoFile(data) as video:
        assert (video.width, video.height) == (24, 16)
        back = video.frames(max_frames=5)
    assert back.shape == (5, 16, 24, 3)
    assert np.abs(back.astype(int) - np.stack(frames)).max() <= 2  # flat grey survives yuv420p almost exactly


def test_video_frame_limit_is_413():
    data = write_mp4(iter([np.zeros((8, 8, 3), np.uint8)] * 6), 8, 8, Mp4Options())
    with VideoFile(data) as video, pytest.raises(RequestError) as error:
        video.frames(max_frames=5)
    assert error.value.status == 413


def test_video_postprocess_matches_video_processor():
    from diffusers.video_processor import VideoProcessor

    sample = torch.randn(2, 3, 5, 16, 24) * 1.2
    post, reference = VideoPostprocessor(8), VideoProcessor(vae_scale_factor=8)
    expected = reference.postprocess_video(sample, output_type="pt")  # [B, F, 3, H, W]
    torch.testing.assert_close(post.unit(sample), expected.reshape(10, 3, 16, 24))
    expected_uint8 = (reference.postprocess_video(sample, output_type="np") * 255).round().astype("uint8")
    assert np.array_equal(post.uint8(sample).numpy(), expected_uint8.reshape(10, 16, 24, 3))
