"""remote-vae for ComfyUI: a VAE served over HTTP, for the stock VAE nodes and our own.

"Remote VAE Loader" returns an object ComfyUI's stock "VAE Decode", "VAE Encode",
their tiled forms and the video nodes (Wan, LTX-Video, HunyuanVideo image-to-video)
take in place of a loaded VAE: a workflow changes only its loader. They call
decode / encode / *_tiled, the compression methods and `latent_channels`
(comfy/sd.py, class VAE), which this object answers from the server's
GET /families. "Remote VAE Decode" and "Remote VAE Encode" do the same with a
progress bar over the reply.

A LATENT holds what ComfyUI's own VAE would return for the family (for most, the
VAE's raw latent; Flux.2's and LTX's normalised ones): the server says, per family,
which parameters to send with it (`comfyui` in its /families document).

Depends only on what ComfyUI has: torch, numpy and the standard library.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

try:  # inside ComfyUI: its progress bar (which also stops a cancelled run)
    from comfy.utils import ProgressBar
except ImportError:  # outside it (tests, scripts)
    ProgressBar = None

DEFAULT_URL = os.environ.get("REMOTE_VAE_URL", "http://127.0.0.1:8000/")
KEY_VARIABLE = "REMOTE_VAE_API_KEY"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8}
TILINGS = ("auto", "exact", "blend")
CHUNK = 1 << 20
RETRIES = 3


class RemoteVaeError(RuntimeError):
    """The server refused or failed a call; the message is the server's, shown by ComfyUI as the node's error."""


class Connection:
    """A remote-vae server (or one family's path of it) over urllib: an API key, a timeout, retries on 503 and dropped
    connections."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 600.0, retries: int = RETRIES):
        self.url = url if url.endswith("/") else url + "/"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.retries = timeout, retries

    def call(self, method, path, params=None, body=None, headers=None, progress=None) -> tuple[dict, bytes]:
        """(reply headers, reply body); RemoteVaeError with the server's message on a non-2xx answer."""
        query = urllib.parse.urlencode(params or {}, doseq=True)
        url = self.url + path.lstrip("/") + (f"?{query}" if query else "")
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=body, method=method, headers={**self.headers, **(headers or {})})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return dict(reply.headers.items()), _read(reply, progress)
            except urllib.error.HTTPError as exc:
                with exc:  # its socket closes here, retried or not
                    if exc.code == 503 and attempt < self.retries:
                        time.sleep(_retry_after(exc.headers.get("Retry-After")))
                        continue
                    raise RemoteVaeError(f"{exc.code} from {url.split('?')[0]}: {_message(exc)}") from None
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
                if attempt == self.retries:
                    raise RemoteVaeError(f"cannot reach {self.url}: {getattr(exc, 'reason', exc)}") from None
                time.sleep(2.0**attempt)
        raise AssertionError("unreachable")

    def families(self) -> dict:
        """The server's image and video families (not its audio ones, SVD's frames-as-batch latents, RGBA ones
        (ComfyUI's IMAGE is RGB), decode-only ones, nor those with sound (ComfyUI holds LTX-2's video and sound as one
        LATENT), yet: docs/comfyui.md)."""
        served = json.loads(self.call("GET", "families")[1])["families"]
        return {
            name: document
            for name, document in served.items()
            if document.get("kind") != "audio"
            and not document.get("model", {}).get("frames_as_batch")
            and document.get("pixel_channels", 3) == 3
            and not document.get("sound")
            and "encode" in document.get("operations", ["encode"])  # a ComfyUI VAE encodes too (Allegro does not)
        }


def _read(reply, progress) -> bytes:
    total = int(reply.headers.get("Content-Length") or 0)
    bar = ProgressBar(total) if progress and ProgressBar is not None and total else None
    chunks, done = [], 0
    while chunk := reply.read(CHUNK):
        chunks.append(chunk)
        done += len(chunk)
        if bar is not None:
            bar.update_absolute(done, total)
    return b"".join(chunks)


def _retry_after(value: str | None) -> float:
    try:
        return min(30.0, max(0.0, float(value or 1)))
    except ValueError:  # an HTTP date: wait a second
        return 1.0


def _message(error: urllib.error.HTTPError) -> str:
    text = error.read().decode("utf-8", "replace")
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text[:500] or error.reason


def _tensor_body(tensor: torch.Tensor) -> tuple[bytes, dict]:
    tensor = tensor.detach().to("cpu", torch.float32).contiguous()
    return tensor.numpy().tobytes(), {"shape": list(tensor.shape), "dtype": "float32"}


def _reply_tensor(headers: dict, body: bytes) -> torch.Tensor:
    lower = {name.lower(): value for name, value in headers.items()}
    shape, dtype = json.loads(lower["shape"]), DTYPES[lower["dtype"]]
    return torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)


class RemoteVAE:
    """One family at a server, answering what ComfyUI's nodes ask of a VAE (comfy/sd.py VAE)."""

    def __init__(self, connection: Connection, family: str, document: dict, pixels: str = "uint8"):
        self.connection, self.family, self.document, self.pixels = connection, family, document, pixels
        self.path = document["path"]
        comfy = document["comfyui"]
        self.latent_channels, self.compression = comfy["latent_channels"], comfy["spatial_compression"]
        self.video = bool(document["video"])
        self.temporal = document.get("temporal_compression") or 1
        self.latent_dim = 3 if self.video else 2
        self.output_channels = 3
        # As comfy/sd.py holds them: frame counts as functions of the latent's, then the spatial ratios
        temporal = self.temporal
        if self.video:
            self.downscale_ratio = (
                lambda frames: max(0, (frames + temporal - 1) // temporal),
                *(self.compression,) * 2,
            )
            self.upscale_ratio = (lambda frames: max(0, frames * temporal - (temporal - 1)), *(self.compression,) * 2)
        else:
            self.downscale_ratio = self.upscale_ratio = self.compression
        self.downscale_index_formula = self.upscale_index_formula = (temporal, self.compression, self.compression)

    def __repr__(self) -> str:
        return f"RemoteVAE({self.family} at {self.connection.url})"

    # -- what the stock nodes call -------------------------------------------------------

    def throw_exception_if_invalid(self) -> None:
        """Always valid: the server checks its own model."""

    def spacial_compression_decode(self) -> int:
        return self.compression

    def spacial_compression_encode(self) -> int:
        return self.compression

    def temporal_compression_decode(self) -> int | None:
        return self.temporal if self.video else None

    def decode(self, samples_in: torch.Tensor, vae_options=None, tiling: str = "auto", progress: bool = False):
        """IMAGE pixels [B, H, W, 3] in 0..1 (a video family: [B, F, H, W, 3]) for a LATENT's samples."""
        body, params = _tensor_body(samples_in)
        params.update(self.document["comfyui"]["decode"], output_type="pt", partial_postprocess=self.pixels == "uint8")
        if tiling != "auto":
            params["tiling"] = tiling
        headers = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
        reply = _reply_tensor(*self.connection.call("POST", self.path, params, body, headers, progress))
        if self.pixels == "uint8":  # [B, H, W, 3], a video's clips one after another: [B*F, H, W, 3]
            images = reply.to(torch.float32) / 255.0
        else:  # the decoder's own output, [B, 3, (F,) H, W] in about -1..1
            images = ((reply.to(torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
        if self.video and images.ndim == 4:
            images = images.reshape(samples_in.shape[0], -1, *images.shape[1:])
        return images

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """Tiled for memory on the server, with tiles whose result is the untiled one where the model has them (else its
        default): the tile sizes are the server's own."""
        return self.decode(samples, tiling=self._exact_or_default)

    def encode(self, pixel_samples: torch.Tensor, tiling: str = "auto", progress: bool = False) -> torch.Tensor:
        """A LATENT's samples for IMAGE pixels [B, H, W, C] (a video family: the batch is one video's frames, or
        [B, F, H, W, C] videos), cropped to whole latent cells at the centre as ComfyUI does."""
        pixels = self._cropped(pixel_samples)[..., :3].to(torch.float32) * 2.0 - 1.0
        if self.video:  # as ComfyUI's own video VAEs, the frames past the last whole k * step + 1 are not encoded
            step = self.document["comfyui"]["frame_step"]
            frames = pixels.shape[-4]
            pixels = pixels[..., : (frames - 1) // step * step + 1, :, :, :]
        if self.video:
            pixels = pixels.unsqueeze(0) if pixels.ndim == 4 else pixels
            pixels = pixels.movedim(-1, 1)  # [B, F, H, W, 3] -> [B, 3, F, H, W]
        else:
            pixels = pixels.movedim(-1, 1)
        body, params = _tensor_body(pixels)
        params.update(self.document["comfyui"]["encode"])
        if tiling != "auto":
            params["tiling"] = tiling
        headers = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
        path = self.path + "encode"
        latents = _reply_tensor(*self.connection.call("POST", path, params, body, headers, progress)).to(torch.float32)
        if self.document["comfyui"].get("paired_frames"):  # the refiner's [B, 2C, 1, h, w]: ComfyUI holds the second C
            latents = latents[:, latents.shape[1] // 2 :]
        return latents.transpose(1, 2) if self.document["comfyui"].get("frames_first") else latents

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self.encode(pixel_samples, tiling=self._exact_or_default)

    @property
    def _exact_or_default(self) -> str:
        return "exact" if self.document.get("exact_tiling") else "auto"

    def get_sd(self):
        raise RemoteVaeError("a remote VAE holds no weights to save; its weights are on the server")

    def _cropped(self, pixels: torch.Tensor) -> torch.Tensor:
        step = self.compression
        height, width = pixels.shape[-3] // step * step, pixels.shape[-2] // step * step
        top, left = (pixels.shape[-3] - height) // 2, (pixels.shape[-2] - width) // 2
        return pixels[..., top : top + height, left : left + width, :]


# -- the nodes --------------------------------------------------------------------------


def _listed_families() -> list[str]:
    """The families at REMOTE_VAE_URL for the loader's list (asked once a second at most, briefly), after "auto"."""
    now = time.monotonic()
    if now - _listed_families.at > 1.0:
        _listed_families.at = now
        try:
            _listed_families.names = sorted(Connection(DEFAULT_URL, timeout=2.0, retries=0).families())
        except Exception:  # no server there (yet): any name is accepted, and checked when the loader runs
            pass
    return ["auto", *_listed_families.names]


_listed_families.at, _listed_families.names = -10.0, []


class RemoteVAELoader:
    """A VAE on a remote-vae server: `url` is a family's path (https://host/flux/) or the server's root with a family
    named. The API key is given, or read from the environment variable named."""

    CATEGORY = "loaders/remote-vae"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "url": ("STRING", {"default": DEFAULT_URL}),
                "family": (_listed_families(), {"default": "auto"}),
            },
            "optional": {
                "api_key": ("STRING", {"default": ""}),
                "api_key_variable": ("STRING", {"default": KEY_VARIABLE}),
                "pixels": (["uint8", "float"], {"default": "uint8"}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, family):
        return True  # a family the list did not show (another server's): the server says whether it serves it

    def load(self, url, family="auto", api_key="", api_key_variable=KEY_VARIABLE, pixels="uint8"):
        connection = Connection(url, api_key or os.environ.get(api_key_variable or KEY_VARIABLE, ""))
        served = connection.families()
        if family == "auto":
            if len(served) != 1:
                raise RemoteVaeError(f"{url} serves {', '.join(sorted(served))}: choose one as family")
            family = next(iter(served))
        if family not in served:
            raise RemoteVaeError(f"{url} does not serve {family!r}; it serves {', '.join(sorted(served))}")
        if "comfyui" not in served[family]:
            raise RemoteVaeError(f"{url} does not describe how ComfyUI holds {family}'s latents: upgrade the server")
        return (RemoteVAE(connection, family, served[family], "uint8" if pixels == "uint8" else "float"),)


class RemoteVAEDecode:
    CATEGORY = "latent/remote-vae"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"samples": ("LATENT",), "vae": ("VAE",)},
            "optional": {"tiling": (list(TILINGS), {"default": "auto"})},
        }

    def decode(self, samples, vae, tiling="auto"):
        if not isinstance(vae, RemoteVAE):
            raise RemoteVaeError("this node decodes with a Remote VAE Loader's VAE; use VAE Decode for a local one")
        images = vae.decode(samples["samples"], tiling=tiling, progress=True)
        return (images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images,)


class RemoteVAEEncode:
    CATEGORY = "latent/remote-vae"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"pixels": ("IMAGE",), "vae": ("VAE",)},
            "optional": {"tiling": (list(TILINGS), {"default": "auto"})},
        }

    def encode(self, pixels, vae, tiling="auto"):
        if not isinstance(vae, RemoteVAE):
            raise RemoteVaeError("this node encodes with a Remote VAE Loader's VAE; use VAE Encode for a local one")
        return ({"samples": vae.encode(pixels, tiling=tiling, progress=True)},)


NODE_CLASS_MAPPINGS = {
    "RemoteVAELoader": RemoteVAELoader,
    "RemoteVAEDecode": RemoteVAEDecode,
    "RemoteVAEEncode": RemoteVAEEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RemoteVAELoader": "Remote VAE Loader",
    "RemoteVAEDecode": "Remote VAE Decode",
    "RemoteVAEEncode": "Remote VAE Encode",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "RemoteVAE", "RemoteVaeError"]
