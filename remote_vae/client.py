"""A client for remote-vae (and any server speaking the remote-VAE protocol), with what diffusers' lacks.

    from remote_vae.client import Client

    with Client("https://vae.example.com/", api_key=os.environ["REMOTE_VAE_API_KEY"]) as vae:
        image = vae.decode(latents)                  # as the pipeline hands them: output_type="latent"
        latents = vae.encode(image)
        clip = vae.decode(video_latents, family="wan21", output="mp4")   # several families on one server

Against diffusers' `remote_decode` / `remote_encode` it adds: an API key and any
headers; a timeout; bounded retries that honour 503 `Retry-After` (a full queue,
a model still loading) and connection resets; one kept-alive connection; any
tensor sent as its own contiguous bytes (diffusers' `remote_encode` sends freed
memory for a non-contiguous one); errors raised as `RemoteVaeError` carrying the
server's JSON message; and each family's scaling read from the server
(`GET /families`), so nobody copies factors by hand.

Images travel back as raw uint8 pixels, not PNG: the same pixels, without
encoding and decoding a file on each side.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import requests
import torch

from . import vocabulary

WIRE_DTYPES = {getattr(torch, name): name for name in vocabulary.WIRE_DTYPES}
REPLY_DTYPES = {name: dtype for dtype, name in WIRE_DTYPES.items()}
FILE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".gif": "image/gif",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
}
OUTPUTS = ("pil", "uint8", "pt", "mp4", *vocabulary.AUDIO_FORMATS)
FILE_OUTPUTS = {"mp4": "video/mp4", **vocabulary.AUDIO_FORMATS}  # outputs that are a file's bytes, by media type
DEFAULT_OUTPUTS = {"image": "pil", "video": "mp4", "audio": "pt"}  # by the family's kind


class RemoteVaeError(Exception):
    """The server refused or failed a request: `status`, its JSON `error` message, and the request id to look up in its
    log."""

    def __init__(self, status: int, message: str, url: str, request_id: str | None = None):
        super().__init__(f"{status} from {url}: {message}")
        self.status, self.message, self.url, self.request_id = status, message, url, request_id


class Client:
    """A remote-vae server at `url`: its root, or one family's path (`https://host/flux/`).

    timeout: seconds to connect and then between bytes of the reply (None: wait forever).
    retries: how many times a 503 (queue full, model loading) or a dropped connection is
    retried, each after the server's Retry-After (at most `max_retry_wait` seconds).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float | None = 300.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        headers: dict[str, str] | None = None,
        verify: bool | str = True,
    ):
        self.url = url if url.endswith("/") else url + "/"
        self.timeout, self.retries, self.max_retry_wait = timeout, max(0, retries), max_retry_wait
        self.session = requests.Session()  # one connection, kept alive across calls
        self.verify = verify  # per request: requests lets REQUESTS_CA_BUNDLE override a session's own
        self.session.headers.update(headers or {})
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self._families: dict[str, dict[str, Any]] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    # -- what the server serves -----------------------------------------------------------

    def families(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """The families served at this URL, by name: path, kind, latent forms and the scaling a client sends (GET
        families; asked once, or again with `refresh`)."""
        if self._families is None or refresh:
            self._families = self._request("GET", "families").json()["families"]
        return self._families

    def family(self, name: str | None = None) -> dict[str, Any]:
        """One family's description: the one named (a family, a diffusers pipeline class such as "FluxPipeline", or a
        Hub repository such as "black-forest-labs/FLUX.1-dev"), or the only one served at this URL."""
        served = self.families()
        if name is None:
            if len(served) != 1:
                raise ValueError(f"{self.url} serves {', '.join(served)}; name one with family=")
            return next(iter(served.values()))
        if name in served:
            return served[name]
        # A pipeline or a repository: several families may list a pipeline (WanPipeline runs Wan 2.1 and 2.2)
        found = [family for family, doc in served.items() if name in doc.get("hub_repos", [])] or [
            family for family, doc in served.items() if name in doc.get("pipelines", [])
        ]
        if len(found) == 1:
            return served[found[0]]
        if found:
            raise ValueError(f"{name} uses the VAE of {' or '.join(found)}; name the family or the Hub repository")
        raise ValueError(
            f"{self.url} does not serve {name!r} (a family, pipeline or repo); it serves {', '.join(served)}"
        )

    # -- decode ---------------------------------------------------------------------------

    def decode(
        self,
        latents: torch.Tensor,
        family: str | None = None,
        output: str | None = None,
        *,
        normalised: bool = True,
        height: int | None = None,
        width: int | None = None,
        audio_latents: torch.Tensor | None = None,
        **options: Any,
    ):
        """Decode latents to pixels.

        latents: as the family's pipeline hands them with output_type="latent" (normalised:
        the server undoes the family's scaling), or, with normalised=False, the VAE's own.
        Packed latents (Flux, Flux.2, Qwen-Image, LTX) need the pixel `height` and `width`.
        output: "pil" (a PIL image, or a list for a batch; a video's frames as a list), "uint8"
        (a uint8 tensor [B, H, W, 3], or [F, H, W, 3] for a video), "pt" (the VAE's output,
        float, about -1..1; an audio family's waveform [B, channels, samples]), "mp4" (bytes), "wav" or
        "flac" (an audio file's bytes); default "mp4" for video families, "pt" for audio families, else "pil".
        audio_latents: the video's sound latent, where the family has one (LTX-2: the `audio` its pipeline returns
        with output_type="latent"), sent with `latents` in one safetensors body: "mp4" is then the video with its
        sound track, and the other outputs a pair (the video as asked, the waveforms [B, channels, samples]).
        options: further query parameters (fps, crf, tiling, decode_timestep, ...), see docs/api.md.
        """
        described = self.family(family)
        output = output or DEFAULT_OUTPUTS[family_kind(described)]
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}; expected one of {', '.join(OUTPUTS)}")
        params: dict[str, Any] = {**(described["scaling"] if normalised else {}), **options}
        if height is not None and width is not None:
            params.update(height=height, width=width)
        if output in FILE_OUTPUTS:
            params["output_type"], accept = output, FILE_OUTPUTS[output]
        else:
            params.update(output_type="pt", partial_postprocess=output != "pt")
            accept = "tensor/binary"
        body, content_type = decode_body(latents, audio_latents, params)
        headers = {"Content-Type": content_type, "Accept": accept}
        reply = self._request("POST", described["path"], params=params, data=body, headers=headers)
        if output in FILE_OUTPUTS:
            return reply.content
        if audio_latents is not None:
            from safetensors.torch import load

            video, waveforms = (load(reply.content)[name] for name in vocabulary.SOUND_REPLY_NAMES)
            return as_output(video, output, described), waveforms
        return as_output(reply_tensor(reply), output, described)

    # -- encode ---------------------------------------------------------------------------

    def encode(self, images, family: str | None = None, *, normalised: bool = True, **options: Any) -> torch.Tensor:
        """Encode to latents, normalised as the family's pipeline holds them (normalised=False: the VAE's own).

        images: a PIL image or a list of them (same size), a float tensor [B, 3, H, W] (a video:
        [B, 3, F, H, W]; an audio family's waveform [B, channels, samples]) in -1..1, or an image, video or audio
        file (a path, or bytes with a `content_type=` option).
        """
        described = self.family(family)
        params: dict[str, Any] = dict(described["scaling"] if normalised else {})
        content_type = options.pop("content_type", None)
        params.update(options)
        if isinstance(images, (str, Path)):
            path = Path(images)
            body, content_type = (
                path.read_bytes(),
                content_type or FILE_TYPES.get(path.suffix.lower(), "application/octet-stream"),
            )
        elif isinstance(images, (bytes, bytearray)):
            body, content_type = bytes(images), content_type or "application/octet-stream"
        else:
            tensor = (
                images
                if isinstance(images, torch.Tensor)
                else pil_to_tensor(images, described["spatial_compression"], described.get("pixel_channels", 3))
            )
            body, shape, dtype = tensor_bytes(tensor)
            params.update(shape=list(shape), dtype=dtype)
            content_type = "tensor/binary"
        reply = self._request(
            "POST",
            described["path"] + "encode",
            params=params,
            data=body,
            headers={"Content-Type": content_type, "Accept": "tensor/binary"},
        )
        return reply_tensor(reply)

    # -- transport ------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        """One call, retried on 503 and dropped connections; a non-2xx answer raises RemoteVaeError."""
        url = self.url + path.lstrip("/")
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                reply = self.session.request(method, url, timeout=self.timeout, verify=self.verify, **kwargs)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
                if last:
                    raise
                time.sleep(min(self.max_retry_wait, 2.0**attempt))
                continue
            if reply.status_code == 503 and not last:
                time.sleep(min(self.max_retry_wait, retry_after(reply)))
                continue
            if not reply.ok:
                raise RemoteVaeError(reply.status_code, error_message(reply), url, reply.headers.get("x-request-id"))
            return reply
        raise AssertionError("unreachable")


def family_kind(described: dict[str, Any]) -> str:
    """A family document's kind: "image", "video" or "audio" (servers before audio said only whether it was video)."""
    return described.get("kind") or ("video" if described["video"] else "image")


def tensor_bytes(tensor: torch.Tensor) -> tuple[bytes, tuple[int, ...], str]:
    """A tensor's wire form: its own C-contiguous bytes (a copy the caller owns), shape and dtype name.

    Float dtypes the protocol does not carry (float64) are sent as float32.
    """
    tensor = tensor.detach().cpu()
    tensor = tensor.to(_wire_dtype(tensor))
    contiguous = tensor.contiguous()
    # Bytes are read from `contiguous`, which lives until they are copied (diffusers reads a freed temporary).
    return contiguous.view(torch.uint8).numpy().tobytes(), tuple(tensor.shape), WIRE_DTYPES[tensor.dtype]


def decode_body(latents: torch.Tensor, audio_latents: torch.Tensor | None, params: dict[str, Any]) -> tuple[bytes, str]:
    """(body, content type) of a decode: the latent's bytes (its shape and dtype added to `params`), or with a sound
    latent both in one safetensors body, by the names LTX2Pipeline gives them."""
    if audio_latents is None:
        body, shape, dtype = tensor_bytes(latents)
        params.update(shape=list(shape), dtype=dtype)
        return body, "tensor/binary"
    video_name, sound_name = vocabulary.SOUND_LATENT_NAMES
    return named_tensors_bytes({video_name: latents, sound_name: audio_latents}), vocabulary.SAFETENSORS_TYPE


def as_output(tensor: torch.Tensor, output: str, described: dict[str, Any]):
    """A decode's tensor as the output asked for: itself, or (pil) its images, or a video's frames as images."""
    if output != "pil":
        return tensor
    images = [PIL.Image.fromarray(pixels.numpy()) for pixels in tensor]
    return images[0] if len(images) == 1 and not described["video"] else images


def named_tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Several tensors as one safetensors body, each in a dtype the protocol carries (float64 sent as float32)."""
    from safetensors.torch import save

    return save({name: tensor.detach().cpu().to(_wire_dtype(tensor)).contiguous() for name, tensor in tensors.items()})


def _wire_dtype(tensor: torch.Tensor) -> torch.dtype:
    if tensor.dtype == torch.float64:
        return torch.float32
    if tensor.dtype not in WIRE_DTYPES:
        raise ValueError(f"a {tensor.dtype} tensor cannot be sent; expected {', '.join(vocabulary.COMPUTE_DTYPES)}")
    return tensor.dtype


def reply_tensor(reply: requests.Response) -> torch.Tensor:
    """A tensor reply: raw bytes with `shape` (a JSON list) and `dtype` headers."""
    shape, dtype = json.loads(reply.headers["shape"]), REPLY_DTYPES[reply.headers["dtype"]]
    return torch.frombuffer(bytearray(reply.content), dtype=dtype).reshape(shape)


def pil_to_tensor(images, spatial_compression: int, channels: int = 3) -> torch.Tensor:
    """PIL image(s) -> [B, 3, H, W] float32 in -1..1 ([B, 4, H, W] RGBA for a four-channel family): diffusers'
    VaeImageProcessor, as the pipelines and the server prepare them."""
    from diffusers.image_processor import VaeImageProcessor

    images = [images] if isinstance(images, PIL.Image.Image) else list(images)
    return VaeImageProcessor(vae_scale_factor=spatial_compression).preprocess(
        [image.convert(vocabulary.PIXEL_MODES[channels]) for image in images]
    )


def retry_after(reply: requests.Response) -> float:
    try:
        return max(0.0, float(reply.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def error_message(reply: requests.Response) -> str:
    try:
        return str(reply.json()["error"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:500] or reply.reason


def load_latents(path: str | Path, key: str | None = None) -> torch.Tensor:
    """A latent saved by a pipeline user: .safetensors (safetensors.torch.save_file; `key`, or the only
    tensor), .pt / .pth (torch.save of a tensor or a dict of them), or .npy."""
    return _named(_saved_tensors(Path(path)), path, key)


def load_with_sound(path: str | Path, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A file's `latents` and `audio_latents` (LTX-2's pair, as its pipeline names them) where it holds both and no
    `key` is named; else its latent as load_latents reads it, and no sound. The file is read once."""
    tensors = _saved_tensors(Path(path))
    if key is None and set(vocabulary.SOUND_LATENT_NAMES) <= set(tensors):
        video, sound = (tensors[name] for name in vocabulary.SOUND_LATENT_NAMES)
        return video, sound
    return _named(tensors, path, key), None


def _named(tensors: dict[str, torch.Tensor], path: str | Path, key: str | None) -> torch.Tensor:
    """The file's tensor `key`, or its only one."""
    if key is not None:
        if key not in tensors:
            raise ValueError(f"{path} holds no tensor {key!r}; it holds {', '.join(tensors) or 'none'}")
        return tensors[key]
    if len(tensors) != 1:
        raise ValueError(f"{path} holds {len(tensors)} tensors ({', '.join(tensors)}); name one with --key")
    return next(iter(tensors.values()))


def _saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return {"": torch.from_numpy(np.load(path))}
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
    elif suffix in (".pt", ".pth"):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        tensors = loaded if isinstance(loaded, dict) else {"": loaded}
    else:
        raise ValueError(f"{path}: expected a .safetensors, .pt or .npy file")
    return {name: value for name, value in tensors.items() if isinstance(value, torch.Tensor)}


def save_output(result, path: Path) -> list[Path]:
    """A decode's result to `path`: images by its suffix (one file per image or frame: name-0.png, name-1.png, ...
    when there are several), an MP4's bytes, or a tensor to .safetensors (key "pixels"; a video with its sound: keys
    "pixels" and "audio"). Returns the files written."""
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(result, bytes):
        path.write_bytes(result)
        return [path]
    if isinstance(result, tuple) and isinstance(result[0], torch.Tensor):  # a video tensor and its sound's waveforms
        from safetensors.torch import save_file

        save_file({"pixels": result[0].contiguous(), "audio": result[1].contiguous()}, path)
        return [path]
    if isinstance(result, tuple):  # images, and their sound's waveforms beside them
        return save_output(result[0], path) + save_output(result[1], path.with_suffix(".safetensors"))
    if isinstance(result, torch.Tensor):
        from safetensors.torch import save_file

        save_file({"pixels": result.contiguous()}, path)
        return [path]
    from .media import ImageFile, save_options
    from .vocabulary import IMAGE_FORMATS

    images: Sequence[PIL.Image.Image] = [result] if isinstance(result, PIL.Image.Image) else result
    file_format = IMAGE_FORMATS.get(suffix.lstrip("."))
    # The server's JPEG / WebP / PNG settings, not Pillow's defaults
    options = save_options(ImageFile(file_format)) if file_format else {}
    paths = (
        [path] if len(images) == 1 else [path.with_name(f"{path.stem}-{index}{suffix}") for index in range(len(images))]
    )
    for image, target in zip(images, paths, strict=True):
        image.save(target, format=file_format, **options)
    return paths
