"""Image files out: JPEG, PNG or WebP by Pillow (PNG at a fast zlib level by default), or JPEG by nvJPEG on the
device on CUDA with torchvision; a batch stacked top to bottom into one file."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from ..settings import Settings

log = logging.getLogger("remote_vae")


# zlib level of PNG replies. Measured on photos (docs/benchmarks.md): level 1 writes 3.3-4.6x faster
# than Pillow's default 6 for 7-10% more bytes; 0 is twice as fast again but 60-85% larger.
PNG_COMPRESSION = Settings.png_compression


@dataclass(frozen=True)
class ImageFile:
    """How an image reply is written: Pillow's format name and that format's setting."""

    format: str = "JPEG"
    quality: int = 90  # JPEG and WebP
    png_compression: int = PNG_COMPRESSION  # zlib level 0-9; the pixels are the same at every level


def save_options(options: ImageFile) -> dict:
    """Pillow's save() keywords for an image reply in options.format."""
    if options.format == "PNG":
        return {"compress_level": options.png_compression}
    if options.format == "JPEG":
        # 4:4:4 chroma: Pillow's default 4:2:0 caps fidelity near 22 dB PSNR
        # on detailed images whatever the quality setting.
        return {"quality": options.quality, "subsampling": 0}
    return {"quality": options.quality}


def encode_image(image: PIL.Image.Image | np.ndarray, options: ImageFile) -> bytes:
    """An image file from a PIL image or uint8 [H, W, 3] pixels."""
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=options.format, **save_options(options))
    return buffer.getvalue()


def encode_pixels(pixels: bytes | np.ndarray, options: ImageFile) -> bytes:
    """An image reply's file: uint8 pixels encoded now, or a file the device already wrote."""
    return pixels if isinstance(pixels, bytes) else encode_image(pixels, options)


def _torchvision_encode_jpeg():
    # Optional: images with CUDA torch ship it; pip has no CPU build to test with
    from torchvision.io import encode_jpeg

    return encode_jpeg


def jpeg_encoder_for(device: torch.device, find_encoder: Callable = _torchvision_encode_jpeg) -> JpegEncoder | None:
    """nvJPEG (torchvision.io.encode_jpeg on a CUDA tensor) for a model on CUDA; None: Pillow writes JPEGs on the host.

    nvJPEG writes 4:4:4, as the Pillow path does, at the same quality.
    """
    if device.type != "cuda":
        return None
    try:
        encode_jpeg = find_encoder()
    except (ImportError, RuntimeError, OSError) as exc:  # absent, or built for another torch
        log.info("JPEG replies are written by Pillow on the host: torchvision's nvJPEG is unavailable (%s)", exc)
        return None

    def encode(pixels: torch.Tensor, quality: int) -> bytes:
        """uint8 [H, W, 3] pixels on the device."""
        return encode_jpeg(pixels.permute(2, 0, 1).contiguous(), quality=quality).cpu().numpy().tobytes()

    return encode


def stack_vertically(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """One image holding a batch, top to bottom: an image response carries a single file."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    sheet = PIL.Image.new(images[0].mode, (width, height * len(images)))
    for index, image in enumerate(images):
        sheet.paste(image, (0, index * height))
    return sheet


JpegEncoder = Callable[[torch.Tensor, int], bytes]
