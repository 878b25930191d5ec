"""Media: tensor bytes on the wire, image files in and out, decoded pixels.

Postprocessing follows diffusers' VaeImageProcessor exactly (denormalise,
clamp, x255, round), so the service returns the pixels a local pipeline
would produce.
"""

from __future__ import annotations

import io
import math

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from .errors import RequestError

# The names clients put in the `dtype` query parameter and response header.
TENSOR_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}
INPUT_DTYPES = ("float16", "bfloat16", "float32")

# Pillow format names by the names clients use (`image_format`, Accept).
IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}

# Magic numbers of the image files an encode request may carry.
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, allowed: tuple[str, ...] = INPUT_DTYPES) -> torch.dtype:
    key = name.strip().lower().removeprefix("torch.")
    if key not in allowed:
        raise RequestError(f"unknown dtype {name!r}; expected one of {', '.join(allowed)}")
    return TENSOR_DTYPES[key]


def byte_count(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def tensor_from_bytes(data: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor whose raw little-endian, C-contiguous memory is `data`."""
    expected = byte_count(shape, dtype)
    if len(data) != expected:
        raise RequestError(
            f"body is {len(data)} bytes, but shape {list(shape)} {dtype_name(dtype)} needs {expected} bytes "
            f"(the raw, C-contiguous memory of the tensor)"
        )
    # bytearray: torch.frombuffer wants a writable buffer.
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    # A uint8 view keeps bfloat16 exact (numpy has no bfloat16).
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def is_image_file(data: bytes) -> bool:
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def open_image(data: bytes, max_pixels: int) -> PIL.Image.Image:
    """An RGB image from file bytes, refusing oversized images before decoding their pixels."""
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.Image.DecompressionBombError as exc:
        raise RequestError(f"image is too large: {exc}", status=413) from exc
    except (PIL.UnidentifiedImageError, OSError, ValueError) as exc:
        raise RequestError(f"body is not a readable image ({exc}); expected a PNG, JPEG or WebP file") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(f"image is {width}x{height} = {width * height} pixels; this server accepts at most {max_pixels}", status=413)
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise RequestError(f"image data is corrupt or truncated ({exc}); expected a complete PNG, JPEG or WebP file") from exc


def encode_image(image: PIL.Image.Image, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "PNG":
        image.save(buffer, format="PNG")
    elif image_format == "JPEG":
        # 4:4:4 chroma: Pillow's default 4:2:0 caps fidelity near 22 dB PSNR
        # on detailed images whatever the quality setting.
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    else:
        image.save(buffer, format=image_format, quality=quality)
    return buffer.getvalue()


def stack_vertically(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """One image holding a batch, top to bottom: an image response carries a single file."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    sheet = PIL.Image.new("RGB", (width, height * len(images)))
    for index, image in enumerate(images):
        sheet.paste(image, (0, index * height))
    return sheet


class Postprocessor:
    """Turns a decoder's raw output ([B, 3, H, W], about -1..1) into what the client asked for."""

    def __init__(self, vae_scale_factor: int):
        self.processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)

    def raw(self, sample: torch.Tensor) -> torch.Tensor:
        return sample.cpu()

    def unit(self, sample: torch.Tensor) -> torch.Tensor:
        """Float [B, 3, H, W] in 0..1, the client multiplies by 255."""
        return self.processor.postprocess(sample, output_type="pt").cpu()

    def uint8(self, sample: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3], rounded exactly as VaeImageProcessor.numpy_to_pil rounds."""
        images = self.processor.postprocess(sample, output_type="np")
        return torch.from_numpy((images * 255).round().astype("uint8"))

    def image(self, sample: torch.Tensor) -> list[PIL.Image.Image]:
        return self.processor.postprocess(sample, output_type="pil")

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """[1, 3, H, W] in -1..1 from an RGB image, as a pipeline prepares an image to encode."""
        return self.processor.preprocess(image)
