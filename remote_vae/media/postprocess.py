"""Postprocessing and preprocessing as diffusers' VaeImageProcessor / VideoProcessor do them, so the service returns
the pixels a local pipeline would produce: run on the model's device, with only the uint8 pixels copied back; and an
encode's input made float in bands, bit for bit as the processors make it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.video_processor import VideoProcessor

from .images import ImageFile, JpegEncoder
from .pixels import denormalize, uint8_images
from .tensors import HostCopy, host_copy
from .video import Mp4Stream

log = logging.getLogger("remote_vae")


PREPROCESS_PIXELS = 1 << 20  # pixels an encode's input is made float in at a time


class Postprocessor:
    """Turns a decoder's raw output ([B, 3, H, W], about -1..1, on the device) into what the client asked for, on the
    host.

    `to_host` copies a device tensor back (device.to_host); `jpeg` writes JPEGs on the device, when it can.
    """

    def __init__(self, vae_scale_factor: int, to_host: HostCopy = host_copy, jpeg: JpegEncoder | None = None):
        self.processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        self.to_host = to_host
        self.jpeg = jpeg

    def raw(self, sample: torch.Tensor) -> torch.Tensor:
        return self.to_host(sample)

    def unit(self, sample: torch.Tensor) -> torch.Tensor:
        """Float [B, 3, H, W] in 0..1, the client multiplies by 255."""
        return self.to_host(denormalize(sample))

    def uint8(self, sample: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3]."""
        return self.to_host(uint8_images(sample))

    def pil(self, sample: torch.Tensor) -> list[PIL.Image.Image]:
        return [PIL.Image.fromarray(pixels) for pixels in self.uint8(sample).numpy()]

    def image(self, sample: torch.Tensor, options: ImageFile) -> bytes | np.ndarray:
        """The batch as one image, samples stacked top to bottom: a JPEG written on the device
        when it can be, else uint8 [B*H, W, 3] pixels for encode_pixels (after the device is free)."""
        pixels = uint8_images(sample)
        sheet = pixels.reshape(-1, *pixels.shape[2:])  # [B*H, W, 3] (4: RGBA)
        if options.format == "JPEG" and self.jpeg is not None:  # set only for a model on CUDA (jpeg_encoder_for)
            return self.jpeg(sheet, options.quality)
        return self.to_host(sheet).numpy()

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """[1, 3, H, W] in -1..1 from an RGB image, as a pipeline prepares an image to encode."""
        return self.processor.preprocess(image)

    def preprocess_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in -1..1 from uint8 [B, H, W, 3], as `preprocess` prepares those pixels as an image
        (VaeImageProcessor: x / 255 in float32, then 2x - 1), a band of rows at a time: no float copies of the whole."""
        batch, height, width, channels = pixels.shape
        out = torch.empty((batch, channels, height, width), dtype=torch.float32)
        step = self.processor.config.vae_scale_factor
        rows = max(step, PREPROCESS_PIXELS // max(1, width) // step * step)  # whole cells: the processor keeps the size
        for index in range(batch):
            for top in range(0, height, rows):
                band = pixels[index, top : top + rows].numpy()
                out[index : index + 1, :, top : top + rows] = self.processor.preprocess(band.astype(np.float32) / 255.0)
        return out


# -- video -------------------------------------------------------------------


class VideoPostprocessor(Postprocessor):
    """Turns a video decoder's raw output ([B, 3, F, H, W], about -1..1) into what the client asked for.

    A batch's clips come back one after another along the frame axis, so
    [F, ...] outputs become [B*F, ...] and an MP4 plays the clips in turn.
    Frames are converted a few at a time: no float copy of the whole clip.
    """

    FRAMES_AT_ONCE = 8

    def __init__(self, vae_scale_factor: int, to_host: HostCopy = host_copy, jpeg: JpegEncoder | None = None):
        super().__init__(vae_scale_factor, to_host, jpeg)
        self.processor = VideoProcessor(vae_scale_factor=vae_scale_factor)

    def _chunks(self, clip: torch.Tensor) -> Iterator[torch.Tensor]:
        """[f, 3, H, W] runs of a [3, F, H, W] clip's frames."""
        for start in range(0, clip.shape[1], self.FRAMES_AT_ONCE):
            yield clip[:, start : start + self.FRAMES_AT_ONCE].transpose(0, 1)

    def unit(self, sample: torch.Tensor) -> torch.Tensor:
        """Float [B*F, 3, H, W] in 0..1, as VideoProcessor.postprocess_video gives per clip."""
        return torch.cat([self.to_host(denormalize(frames)) for clip in sample for frames in self._chunks(clip)])

    def uint8(self, sample: torch.Tensor) -> torch.Tensor:
        """uint8 [B*F, H, W, 3]."""
        return torch.cat([frames for _, frames in self.clip_frames(sample)])

    def clip_frames(self, sample: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(clip number, uint8 [f, H, W, 3] host frames), clip after clip, a few frames at a time."""
        for number, clip in enumerate(sample):
            for frames in self._chunks(clip):
                yield number, self.to_host(uint8_images(frames))

    def mp4(self, sample: torch.Tensor, stream: Mp4Stream) -> Mp4Stream:
        """Hand the clips' frames to the stream (unless it has them all from the decoder already)."""
        if not stream.complete:
            stream.restart()
            for clip, frames in self.clip_frames(sample):
                stream.add(clip, frames.numpy())
        return stream

    def preprocess_frames(self, videos: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in -1..1 from uint8 [B, F, H, W, 3], as VideoProcessor.preprocess_video prepares x / 255,
        about PREPROCESS_PIXELS at a time: no float copies of the whole clip."""
        batch, frames, height, width, _ = videos.shape
        out = torch.empty((batch, 3, frames, height, width), dtype=torch.float32)
        step = max(1, PREPROCESS_PIXELS // max(1, height * width))  # the processor's float copies stay small
        for index in range(batch):
            for start in range(0, frames, step):
                chunk = videos[index, start : start + step].numpy()
                out[index : index + 1, :, start : start + step] = self.processor.preprocess_video(
                    chunk.astype(np.float32) / 255.0
                )
        return out
