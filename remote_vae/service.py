"""The inference core: one request in, one result out, for any front end.

The HTTP server (server.py via wire.py) and the Inference Endpoints adapter
(handler.py) both build a DecodeRequest or EncodeRequest and call a
VaeService, so there is one path from request to pixels. Stages in order:
latents (check, unpack, scale) -> vae (decode / encode) -> media (postprocess).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image
import torch

from . import latents as latent_ops
from .errors import RequestError
from .families import Family
from .media import Postprocessor, open_image, parse_dtype, tensor_from_bytes
from .vae import LoadedVae

# What a decode returns, by name:
#   raw:   [B, 3, H, W] decoder output in the model dtype (about -1..1)
#   uint8: [B, H, W, 3] denormalised 0..255
#   unit:  [B, 3, H, W] float in 0..1
#   image: PIL images (the wire encodes them as JPEG / PNG / WebP)
DECODE_FORMS = ("raw", "uint8", "unit", "image")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 256 * 1024 * 1024
    # Pixels over the whole batch, of a decode's output or an encode's input.
    max_pixels: int = 4 * 2048 * 2048


@dataclass
class RawTensor:
    """A tensor as the wire carries it: shape, dtype name and raw memory."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes


@dataclass
class DecodeRequest:
    latent: RawTensor
    form: str = "image"
    scaling: latent_ops.Scaling = field(default_factory=latent_ops.Scaling)
    height: int | None = None
    width: int | None = None


@dataclass
class EncodeRequest:
    image: PIL.Image.Image | bytes | None = None  # an image, or its file bytes
    tensor: RawTensor | None = None  # or [B, 3, H, W] in -1..1
    scaling: latent_ops.Scaling = field(default_factory=latent_ops.Scaling)


class VaeService:
    def __init__(self, vae: LoadedVae, limits: Limits):
        self.vae = vae
        self.family: Family = vae.family
        self.limits = limits
        self.post = Postprocessor(self.family.spatial_compression)

    def _require(self, operation: str) -> None:
        if not self.family.serves(operation):
            raise RequestError(f"family {self.family.name} does not {operation}; it serves: {', '.join(self.family.operations)}")

    def decode(self, request: DecodeRequest) -> torch.Tensor | list[PIL.Image.Image]:
        self._require("decode")
        if request.form == "mp4":
            raise RequestError(f"output_type=mp4 is for video families; {self.family.name} decodes images: use output_type=pil or pt")
        if request.form not in DECODE_FORMS:
            raise RequestError(f"unknown decode output {request.form!r}; expected one of {DECODE_FORMS}")
        raw = request.latent
        plan = latent_ops.plan_decode(raw.shape, self.family, request.height, request.width)
        latent_ops.check_output_size(plan, self.family, self.limits.max_pixels)
        latents = tensor_from_bytes(raw.data, raw.shape, parse_dtype(raw.dtype))
        latents = latent_ops.unpack(latents, plan)
        # Convert, then scale: on CPU a float16 latent is scaled in float32, not in float16.
        latents = latents.to(self.vae.dtype)
        latents = latent_ops.unscale(latents, request.scaling.factors(self.family))
        return self.vae.decode(latents, getattr(self.post, request.form))

    def encode(self, request: EncodeRequest) -> torch.Tensor:
        self._require("encode")
        images = self._images(request)
        latents = self.vae.encode(images)
        return latent_ops.scale(latents, request.scaling.factors(self.family)).cpu()

    def _images(self, request: EncodeRequest) -> torch.Tensor:
        if request.tensor is not None:
            raw = request.tensor
            latent_ops.check_dims(raw.shape)
            if len(raw.shape) != 4 or raw.shape[1] != 3:
                raise RequestError(f"image tensor has shape {list(raw.shape)}; expected [B, 3, H, W] in -1..1")
            latent_ops.check_image_size(raw.shape[0], raw.shape[2], raw.shape[3], self.family, self.limits.max_pixels)
            images = tensor_from_bytes(raw.data, raw.shape, parse_dtype(raw.dtype))
            if not torch.isfinite(images).all():
                raise RequestError("image tensor holds NaN or infinite values; expected finite values in -1..1")
            return images
        image = request.image
        if image is None:
            raise RequestError("nothing to encode: send an image file (PNG, JPEG, WebP) or a tensor with shape and dtype")
        if isinstance(image, (bytes, bytearray)):
            image = open_image(bytes(image), self.limits.max_pixels)
        else:
            image = image.convert("RGB")
        latent_ops.check_image_size(1, image.height, image.width, self.family, self.limits.max_pixels)
        return self.post.preprocess(image)
