"""Media in, on its own: sizes and frame counts from the headers before any pixel is decoded, the JPEG scan and
metadata limits, and the CPU deadline; the pixels are Pillow's and ffmpeg's own."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from remote_vae.decoders import STREAM_SIZE, VideoFile, check_jpeg, decode_cpu_seconds, read_image_header
from remote_vae.errors import RequestError
from remote_vae.media import Mp4Options, write_mp4


def jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


NOISE = (np.random.default_rng(0).random((96, 64, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_pixels_are_pillows_own(progressive):
    data = jpeg(NOISE, quality=80, progressive=progressive)
    header = read_image_header(data, 1 << 20)
    assert (header.width, header.height) == (64, 96) and (header.progressive_jpeg is not None) == progressive
    assert np.array_equal(header.pixels(), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_jpeg_scans_and_metadata_are_counted_from_the_markers():
    data = jpeg(NOISE, progressive=True)
    assert check_jpeg(data) is True and check_jpeg(jpeg(NOISE)) is False
    scans = [index for index in range(len(data) - 1) if data[index : index + 2] == b"\xff\xda"]
    repeated = data[:-2] + data[scans[-1] : -2] * 100 + b"\xff\xd9"
    with pytest.raises(RequestError, match="more than 100 scans") as refused:
        check_jpeg(repeated)
    assert refused.value.status == 413
    comment = b"\xff\xfe" + (65535).to_bytes(2, "big") + bytes(65533)
    bloated = data[:2] + comment * 300 + data[2:]  # 19 MB of comments
    with pytest.raises(RequestError, match="MiB of metadata"):
        check_jpeg(bloated)


def test_a_progressive_decode_past_its_cpu_deadline_is_413():
    blocks = (np.random.default_rng(1).random((256, 256, 3)) * 255).astype(np.uint8)
    data = jpeg(np.kron(blocks, np.ones((8, 8, 1), np.uint8)), quality=90, progressive=True)
    scans = [index for index in range(len(data) - 1) if data[index : index + 2] == b"\xff\xda"]
    heavy = data[:-2] + data[scans[1] : scans[2]] * 85 + b"\xff\xd9"
    started = time.monotonic()
    with pytest.raises(RequestError, match="its 0.05 s of CPU") as refused:
        read_image_header(heavy, 1 << 24).pixels(cap=0.05)
    assert refused.value.status == 413 and time.monotonic() - started < 2
    assert decode_cpu_seconds(4 << 20) == pytest.approx(1 + (4 << 20) * 250e-9) and decode_cpu_seconds(1 << 30) == 10


def test_a_png_past_its_deadline_is_stopped_between_reads():
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(2).random((1024, 1024, 3)) * 255).astype(np.uint8)).save(
        buffer, format="PNG"
    )
    with pytest.raises(RequestError, match="of CPU"):
        read_image_header(buffer.getvalue(), 1 << 24).pixels(cap=0.001)


def test_a_video_s_size_and_frames_come_from_its_container():
    data = write_mp4(
        iter([np.full((32, 48, 3), 10 * index, np.uint8) for index in range(7)]), 48, 32, Mp4Options(crf=0)
    )
    with VideoFile(data) as video:
        assert (video.width, video.height, video.frame_count) == (48, 32, 7)
        with pytest.raises(RequestError, match="has 7 frames") as refused:
            video.frames(max_frames=6)  # refused from the count: nothing decoded
        assert refused.value.status == 413
        frames = video.frames(max_frames=7)
    assert frames.shape == (7, 32, 48, 3) and frames.flags.c_contiguous
    assert np.abs(frames[:, :, :, 0].astype(int).mean(axis=(1, 2)) - np.arange(7) * 10).max() <= 2


def test_a_stream_size_in_metadata_cannot_pass_for_the_stream():
    report = (
        "Input #0, mov\n  Metadata:\n    title           : Stream #0:0: Video: h264, 1x1, 24 fps\n"
        "  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p, 1024x768 [SAR 1:1 DAR 4:3], 24 fps\n"
    )
    match = STREAM_SIZE.search(report)
    assert (int(match[1]), int(match[2])) == (1024, 768)
