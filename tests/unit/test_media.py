"""The media stage: tensor bytes, image files, postprocessing against diffusers."""

import io

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from remote_vae.decoders import VideoFile, is_image_file, open_image, video_demuxer
from remote_vae.errors import RequestError
from remote_vae.media import (
    FrameRouter,
    ImageFile,
    Mp4Options,
    Mp4Stream,
    Postprocessor,
    VideoPostprocessor,
    encode_image,
    encode_pixels,
    jpeg_encoder_for,
    tensor_from_bytes,
    tensor_to_bytes,
    uint8_images,
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


def diffusers_pixels(sample: torch.Tensor) -> np.ndarray:
    """What a pipeline's postprocess(output_type="pil") holds, as uint8 [B, H, W, 3]."""
    return np.stack(
        [np.asarray(image) for image in VaeImageProcessor(vae_scale_factor=8).postprocess(sample, output_type="pil")]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_uint8_on_the_device_is_exactly_diffusers_rounding(dtype, layout):
    # Values on the rounding edges too: k/255 +- half a step, and beyond the clamp.
    edges = torch.tensor([(k + offset) / 255 * 2 - 1 for k in range(256) for offset in (-0.5, 0, 0.5)] + [-3.0, 3.0])
    sample = torch.cat([torch.randn(2 * 3 * 16 * 8) * 1.5, edges])[: 2 * 3 * 16 * 8].reshape(2, 3, 16, 8)
    sample[0, 0, 0, :] = edges[:8]
    sample = sample.to(dtype).contiguous(memory_format=layout)
    assert np.array_equal(uint8_images(sample).numpy(), diffusers_pixels(sample))


def test_postprocess_forms_match_vae_image_processor():
    sample = torch.randn(2, 3, 16, 8) * 1.5
    post, reference = Postprocessor(8), VaeImageProcessor(vae_scale_factor=8)
    expected = diffusers_pixels(sample)
    assert np.array_equal(post.uint8(sample).numpy(), expected)
    assert np.array_equal(np.stack([np.asarray(image) for image in post.pil(sample)]), expected)
    assert torch.equal(post.unit(sample), reference.postprocess(sample, output_type="pt"))
    assert torch.equal(post.raw(sample), sample)
    # An image reply stacks the batch top to bottom: pixels for Pillow when no device encoder is there.
    sheet = post.image(sample, ImageFile("JPEG"))
    assert isinstance(sheet, np.ndarray) and np.array_equal(sheet, expected.reshape(32, 8, 3))


def test_jpeg_on_the_device_is_used_for_jpeg_replies_only():
    calls = []

    def fake_nvjpeg(pixels, quality):
        calls.append((pixels.shape, pixels.dtype, quality))
        return b"jpeg from the device"

    post = Postprocessor(8, jpeg=fake_nvjpeg)
    sample = torch.randn(2, 3, 16, 8)
    assert post.image(sample, ImageFile("JPEG", quality=77)) == b"jpeg from the device"
    assert calls == [((32, 8, 3), torch.uint8, 77)]  # the stacked sheet, uint8 [H, W, 3]
    png = post.image(sample, ImageFile("PNG"))  # PNG and WebP: Pillow, after the device is free
    assert isinstance(png, np.ndarray) and len(calls) == 1
    assert encode_pixels(b"jpeg from the device", ImageFile("JPEG")) == b"jpeg from the device"


def test_jpeg_encoder_choice():
    seen = []

    def torchvision_encode_jpeg(chw, quality):
        seen.append((chw.shape, chw.is_contiguous(), quality))
        return torch.tensor([0xFF, 0xD8], dtype=torch.uint8)

    assert jpeg_encoder_for(torch.device("cpu"), find_encoder=lambda: torchvision_encode_jpeg) is None  # Pillow on CPU
    encode = jpeg_encoder_for(torch.device("cuda"), find_encoder=lambda: torchvision_encode_jpeg)
    assert encode(torch.zeros(6, 4, 3, dtype=torch.uint8), 90) == b"\xff\xd8"
    assert seen == [((3, 6, 4), True, 90)]  # torchvision takes contiguous CHW

    def missing():
        raise ImportError("No module named 'torchvision'")

    assert jpeg_encoder_for(torch.device("cuda"), find_encoder=missing) is None


def test_png_pixels_are_the_same_at_every_level():
    ramp = np.add.outer(np.arange(24), np.arange(40))  # smooth, so zlib has something to do
    pixels = np.stack([ramp * 5, ramp * 3 + 7, (ramp * 11) % 256], axis=-1).astype(np.uint8)
    sizes = []
    for level in range(10):
        data = encode_image(pixels, ImageFile("PNG", png_compression=level))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), pixels)
        sizes.append(len(data))
    assert sizes[0] > sizes[9]  # the level is really applied


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

    sample = torch.randn(2, 3, 11, 16, 24) * 1.2  # more frames than are converted at once
    post, reference = VideoPostprocessor(8), VideoProcessor(vae_scale_factor=8)
    expected = reference.postprocess_video(sample, output_type="pt")  # [B, F, 3, H, W]
    torch.testing.assert_close(post.unit(sample), expected.reshape(22, 3, 16, 24))
    expected_uint8 = (reference.postprocess_video(sample, output_type="np") * 255).round().astype("uint8")
    assert np.array_equal(post.uint8(sample).numpy(), expected_uint8.reshape(22, 16, 24, 3))


def read_mp4(data: bytes, frames: int) -> np.ndarray:
    with VideoFile(data) as video:
        return video.frames(max_frames=frames)


def grey_clips(clips: int, frames: int) -> np.ndarray:
    """uint8 [clips, frames, 16, 24, 3], every frame a different flat grey."""
    levels = np.arange(clips * frames, dtype=np.uint8).reshape(clips, frames) * 9 + 10
    return np.broadcast_to(levels[:, :, None, None, None], (clips, frames, 16, 24, 3)).copy()


def test_mp4_stream_plays_clips_in_order_whatever_order_their_frames_arrive_in():
    clips = grey_clips(2, 5)
    stream = Mp4Stream(2, 5, 24, 16, Mp4Options(crf=0))
    # Side by side, as a batched decoder emits them: clip 1's frames wait for clip 0 to finish.
    for start, stop in ((0, 1), (1, 3), (3, 5)):
        stream.add(0, clips[0, start:stop])
        stream.add(1, clips[1, start:stop])
    assert stream.complete
    back = read_mp4(stream.result(), 10)
    assert back.shape == (10, 16, 24, 3)
    assert np.abs(back.astype(int) - clips.reshape(10, 16, 24, 3)).max() <= 2


def test_mp4_stream_restart_drops_what_came_before():
    clips = grey_clips(1, 5)
    stream = Mp4Stream(1, 5, 24, 16, Mp4Options(crf=0))
    stream.add(0, clips[0, :3][::-1].copy())  # a failed attempt's frames
    stream.restart()
    assert not stream.complete
    stream.add(0, clips[0])
    back = read_mp4(stream.result(), 5)
    assert np.abs(back.astype(int) - clips[0]).max() <= 2


def test_an_mp4_stream_that_never_got_its_frames_says_so():
    stream = Mp4Stream(1, 5, 24, 16, Mp4Options())
    stream.add(0, grey_clips(1, 2)[0])
    stream.close()
    with pytest.raises(RuntimeError, match="before all its frames"):
        Mp4Stream(1, 5, 24, 16, Mp4Options()).result()


@pytest.mark.parametrize("sliced", [False, True])
def test_frame_router_sends_each_clip_its_frames(sliced):
    class Recorder:
        def __init__(self):
            self.frames, self.restarts = {}, 0

        def add(self, clip, frames):
            self.frames.setdefault(clip, []).append(frames)

        def restart(self):
            self.restarts += 1

    first, second = Recorder(), Recorder()
    sample = torch.randn(3, 3, 9, 16, 8)  # three clips: one job of two (first), one row nobody streams, ...
    router = FrameRouter([(first, 0), (first, 1), None], frames_per_row=9)
    chunks = (
        [(row, start) for row in range(3) for start in (0, 1, 5)] if sliced else [(None, start) for start in (0, 1, 5)]
    )
    for row, start in chunks:
        stop = start + (1 if start == 0 else 4)
        router.chunk(sample[row : row + 1, :, start:stop] if sliced else sample[:, :, start:stop])
    for clip in (0, 1):
        got = np.concatenate(first.frames[clip])
        assert np.array_equal(got, uint8_images(sample[clip].transpose(0, 1)).numpy())
    assert set(first.frames) == {0, 1} and not second.frames
    router.restart()
    assert first.restarts == 1 and router.received == [0, 0, 0]


def test_encode_inputs_made_float_in_bands_are_the_processors_own(monkeypatch):
    """Held as uint8 until the model call, then made float a band of rows (or a few frames) at a time: exactly what
    VaeImageProcessor makes of the PIL image and VideoProcessor of the frames x / 255, bit for bit."""
    from diffusers.video_processor import VideoProcessor

    import remote_vae.media as media

    # Bands of 40 rows: a 24-wide image in three and a bit
    monkeypatch.setattr(media.postprocess, "PREPROCESS_PIXELS", 40 * 24)
    pixels = (np.random.default_rng(5).random((2, 136, 24, 3)) * 255).astype(np.uint8)
    expected = VaeImageProcessor(vae_scale_factor=8).preprocess([Image.fromarray(image) for image in pixels])
    assert torch.equal(Postprocessor(8).preprocess_pixels(torch.from_numpy(pixels)), expected)
    frames = (np.random.default_rng(6).random((1, 11, 16, 24, 3)) * 255).astype(np.uint8)  # more frames than at once
    expected = VideoProcessor(vae_scale_factor=8).preprocess_video(frames[0].astype(np.float32) / 255.0)
    assert torch.equal(VideoPostprocessor(8).preprocess_frames(torch.from_numpy(frames)), expected)
