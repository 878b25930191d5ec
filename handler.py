"""Hugging Face Inference Endpoints custom handler: a thin adapter over remote_vae.

The toolkit calls `EndpointHandler(path)` once, then `handler(data)` per
request with `data = {"inputs": ..., "parameters": {...}}`. `inputs` may be a
torch tensor, raw bytes, a base64 string or a PIL image. Tensor results come
back as `{"inputs": "<base64>", "parameters": {"shape": [...], "dtype": "..."}}`,
image results as a PIL image carrying the server's JPEG/PNG/WebP settings (the toolkit encodes it for an
image/* Accept, or as base64 PNG inside JSON),
MP4 and audio results as `{"inputs": "<base64 of the file>", "parameters": {"media_type": "video/mp4", ...}}`
(audio/wav, audio/flac).

The stock toolkit passes only JSON and image bodies; serving `tensor/binary`
needs the package's own HTTP server (`python -m remote_vae serve`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from remote_vae import families
from remote_vae.errors import RequestError
from remote_vae.launch import load_service
from remote_vae.media import ImageFile, dtype_name, encode_image, save_options, stack_vertically, tensor_to_bytes
from remote_vae.settings import read_settings
from remote_vae.vae import default_source
from remote_vae.vocabulary import AUDIO_FORMATS, OutputForm
from remote_vae.wire import Params, WireRequest, dispatch, first_accepted


def _family_for(path: str, names: list[str]) -> families.Family:
    if names:
        return families.load_family(names[0])
    config = Path(path) / "config.json"
    if not config.is_file():
        raise families.FamilyError(f"{path} has no config.json; set REMOTE_VAE_FAMILIES to a family name")
    return families.match_model_config(json.loads(config.read_text()))


class EndpointHandler:
    def __init__(self, path: str = ""):
        # The same settings `serve` reads from REMOTE_VAE_* environment variables.
        settings = read_settings()
        family = _family_for(path, settings.families)
        source = default_source(family, [path or os.environ.get("HF_MODEL_DIR"), settings.weights_dir], several=False)
        self.service = load_service(family, source, settings)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any] | PIL.Image.Image:
        inputs = data.get("inputs", data) if isinstance(data, dict) else data
        parameters = dict(data.get("parameters") or {}) if isinstance(data, dict) else {}
        operation = parameters.pop("operation", None)
        accept = first_accepted(parameters.pop("accept", ""))
        payload, content_type = self._payload(inputs, parameters)
        params = Params()
        params.overlay_json(parameters)
        outcome = dispatch(self.service, WireRequest(params, payload, content_type, accept, operation))
        if outcome.form == OutputForm.PIL:
            image = stack_vertically(outcome.value)
            # The toolkit writes the image itself (save(format=...) for an image/* Accept, PNG inside JSON), with
            # Pillow's defaults: JPEG quality 75 at 4:2:0, about 18 dB against the server's 30. Pillow (11.1 on) merges
            # an image's own `encoderinfo` into save()'s options, so the server's settings for every format go with it.
            image.encoderinfo = {
                **save_options(ImageFile("JPEG")),
                **save_options(ImageFile("PNG", png_compression=self.service.png_compression)),
            }
            return image
        counts = {name.replace("-", "_"): int(value) for name, value in outcome.headers.items()}
        files = {OutputForm.MP4: "video/mp4", OutputForm.AUDIO: AUDIO_FORMATS.get(outcome.reply.audio.format)}
        if outcome.form in files:
            return {
                "inputs": base64.b64encode(outcome.value).decode(),
                "parameters": {"media_type": files[outcome.form], **counts},
            }
        tensor = outcome.value
        return {
            "inputs": base64.b64encode(tensor_to_bytes(tensor)).decode(),
            "parameters": {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), **counts},
        }

    @staticmethod
    def _payload(inputs: Any, parameters: dict[str, Any]) -> tuple[bytes, str]:
        """Raw bytes and a content type for the wire, from whatever the toolkit handed over."""
        if isinstance(inputs, torch.Tensor):
            parameters.setdefault("shape", list(inputs.shape))
            parameters.setdefault("dtype", dtype_name(inputs.dtype))
            return tensor_to_bytes(inputs), ""  # latent or pixels (or a waveform): the wire tells them by the shape
        if isinstance(inputs, PIL.Image.Image):
            return encode_image(inputs, ImageFile("PNG", png_compression=0)), "image/png"
        if isinstance(inputs, (bytes, bytearray)):
            return bytes(inputs), ""
        if isinstance(inputs, str):
            try:
                return base64.b64decode(inputs, validate=True), ""
            except (binascii.Error, ValueError) as exc:
                raise RequestError(f'"inputs" is not valid base64 ({exc})') from None
        raise RequestError(
            f'"inputs" is a {type(inputs).__name__}; expected a tensor, bytes, a base64 string or a PIL image'
        )
