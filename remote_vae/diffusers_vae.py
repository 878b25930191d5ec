"""A drop-in VAE for diffusers pipelines: offloading the VAE is one line.

    from remote_vae import RemoteVae

    vae = RemoteVae("https://vae.example.com/flux/", api_key=os.environ["REMOTE_VAE_API_KEY"])
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", vae=vae, torch_dtype=torch.bfloat16)
    image = pipe(prompt).images[0]

`RemoteVae` is a diffusers `ModelMixin` holding no weights: the server's model
config (`vae.config.scaling_factor`, `block_out_channels`, `latents_mean`, ...),
the plain attributes its class sets (`temperal_downsample`,
`spatial_compression_ratio`, ...: read from the real class built on the meta
device, so nothing is allocated), and the few buffers pipelines read from the
weights (LTX's `latents_mean`, Flux.2's `bn.running_var`). A zero-element
buffer carries its device and dtype through `.to()` and model offloading.

`decode` sends the latents the pipeline hands its VAE (already denormalised) and
returns what the local VAE would, on the caller's device and dtype. By default
the reply is the server's uint8 pixels, made float again (p / 127.5 - 1): a
pipeline's postprocess turns them back into those very pixels, at a quarter of
float32's bytes (`pixels="raw"`: the server's float output, for float outputs).
An audio VAE whose pipeline runs a vocoder after it (LTX-2's `audio_vae`, then `vocoder`) decodes to the waveform
on the server, vocoder included: its `vocoder` attribute is what the pipeline's `vocoder` becomes, one line more
(`LTX2Pipeline.from_pretrained(..., audio_vae=sound, vocoder=sound.vocoder)`).
`encode` returns the encoder's distribution (the server's mean and
log-variance, `latent_dist=parameters`), so `latent_dist.sample(generator)` draws
what the local VAE would with the same generator.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from .client import Client, RemoteVaeError, family_kind

__all__ = ["PIXEL_REPLIES", "RemoteVae"]

log = logging.getLogger("remote_vae")

PIXEL_REPLIES = ("uint8", "raw")  # what a decode asks the server for
PLAIN_TYPES = (bool, int, float, str, type(None))


class RemoteVae(ModelMixin, ConfigMixin):
    """The VAE at `url` (a family's path, or a server's root with `family=`: a family, a pipeline class such as
    "FluxPipeline", or a Hub repository), as a pipeline's `vae`.

    pixels: "uint8" (default: exact after the pipeline's postprocess, 1 byte a channel) or "raw"
    (the server's float output, in its compute dtype). Other keyword arguments (timeout, retries,
    headers, verify) go to `remote_vae.client.Client`.
    """

    config_name = "config.json"

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        family: str | None = None,
        *,
        pixels: str = "uint8",
        client: Client | None = None,
        **client_options: Any,
    ):
        super().__init__()
        if pixels not in PIXEL_REPLIES:
            raise ValueError(f"pixels={pixels!r}; expected one of {', '.join(PIXEL_REPLIES)}")
        self.client = client or Client(url, api_key=api_key, **client_options)
        described = _loaded(self.client, family)
        # The family's own name (`family` may name a pipeline class or a Hub repo instead)
        self.family = next(name for name, document in self.client.families().items() if document is described)
        kind = family_kind(described)
        # An audio family's reply is its waveform, float: no pixels to send as uint8
        self.pixels, self.video = ("raw" if kind == "audio" else pixels), kind == "video"
        self.remote_class, self.frame_axis = described["model"]["class"], described["model"]["frame_axis"]
        # The model takes a clip's frames as a batch of images (SVD): sent to the server as the clips they are
        self.frames_as_batch = described["model"].get("frames_as_batch", False)
        self.frames_first = described["model"].get("frames_first", False)
        self.decoded_frames_first = described["model"].get("decoded_frames_first", False)
        # The server passes the model's own latents through untouched: sent as raw, or for a preview decoder (taesd),
        # whose latents are the full family's normalised ones, with the family's own scaling
        self.wire_scaling = {"normalised": described["model"]["latents"] == "normalised"}
        self.register_to_config(**described["model"]["config"])
        self.__dict__.update(_class_attributes(self.remote_class, described["model"]["config"]))
        self.use_tiling = self.use_slicing = False
        # The field the real encode output holds its result in: a distribution, or taesd's `latents`, DC-AE's `latent`
        self.encoder_output = described["model"]["encoder_output"]
        self.distribution = _distribution(described["model"].get("distribution"))
        # The device and dtype, moved by .to(); a parameter, as pipelines read `next(vae.parameters()).dtype` (SA3's)
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        for name, values in described["model"]["buffers"].items():
            _holder(self, name).register_buffer(name.rpartition(".")[2], torch.tensor(values), persistent=False)
        if "post_quant_conv" in self.__dict__.pop("_submodules", ()):
            # SDXL's pipelines cast latents to `next(vae.post_quant_conv.parameters()).dtype` after upcasting
            self.post_quant_conv = _DtypeCarrier()
        # The server runs the family's vocoder after its VAE (LTX-2): the pipeline's own vocoder step passes it on
        vocoder = described["model"].get("vocoder")
        self.vocoder = RanOnTheServer(vocoder) if vocoder else None

    # -- what pipelines switch ------------------------------------------------------------

    def enable_tiling(self, *args, **kwargs) -> None:
        """The server tiles with diffusers' blended tiles (`tiling=blend`) where a local enable_tiling() would: that
        call's output, with the server's tile sizes (the model's own defaults)."""
        if args or kwargs:
            log.warning("RemoteVae.enable_tiling: tile sizes are the server's; %s %s not sent", args, kwargs)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Recorded only: the server batches or slices as its memory allows, with the same result."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def forward(self, *args, **kwargs):
        raise NotImplementedError("RemoteVae decodes and encodes remotely: call decode() or encode()")

    # -- decode / encode ------------------------------------------------------------------

    @apply_forward_hook
    def decode(self, z: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any):
        """The local VAE's decode of `z`: DecoderOutput(sample=[B, 3, (F,) H, W], an audio family's waveform
        [B, channels, N]) on z's device in this VAE's dtype.
        A timestep (LTX's `temb`, positional or by name) is sent as the decode timestep."""
        timestep, num_frames = kwargs.pop("temb", None), kwargs.pop("num_frames", None)
        for arg in args:  # decode(z, temb), decode(z, False)
            if isinstance(arg, bool):
                return_dict = arg
            elif isinstance(arg, (torch.Tensor, float, int)):
                timestep = arg
        self._check_latents(z)
        if self.frames_as_batch and z.ndim == 4:  # [k*n, C, h, w]: k clips of n frames, as SVD's decode_latents
            frames = num_frames or z.shape[0]
            clips = self._decode(z.reshape(-1, frames, *z.shape[1:]), None)  # sent frames first, the pipeline's form
            sample = (
                clips.permute(0, 2, 1, 3, 4).reshape(-1, *clips.shape[1:2], *clips.shape[3:]).to(z.device, self.dtype)
            )
            return DecoderOutput(sample=sample) if return_dict else (sample,)
        samples = [self._decode(part, step) for part, step in _by_timestep(z, timestep)]
        sample = (samples[0] if len(samples) == 1 else torch.cat(samples)).to(z.device, self.dtype)
        if self.decoded_frames_first:  # as the model returns it, which its pipeline permutes back (Allegro)
            sample = sample.permute(0, 2, 1, 3, 4)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """The local VAE's encode of `x` ([B, 3, (F,) H, W] or a waveform [B, channels, N], in -1..1): the encoder's
        distribution (the model's own class of it), on x's device in
        this VAE's dtype (or, for an encoder without one, its latent under its real name: `.latents`, `.latent`)."""
        images = x.squeeze(2) if self.frame_axis and x.ndim == 5 else x
        options = {**self.wire_scaling, **self._tiling()}
        if self.frames_as_batch and x.ndim == 4:  # images to a model that encodes frames as a batch: one clip of them
            images = x.permute(1, 0, 2, 3)[None]
        if self.encoder_output == "latent_dist":
            parameters = self.client.encode(images, self.family, latent_dist="parameters", **options)
            if self.frames_as_batch and x.ndim == 4:
                parameters = parameters[0].permute(1, 0, 2, 3)
            distribution = self.distribution(self._placed(parameters, x.device))
            return AutoencoderKLOutput(latent_dist=distribution) if return_dict else (distribution,)
        latents = self._placed(self.client.encode(images, self.family, **options), x.device)
        return LatentOutput(**{self.encoder_output: latents}) if return_dict else (latents,)

    def _decode(self, z: torch.Tensor, timestep: float | None) -> torch.Tensor:
        latents = z.squeeze(2) if self.frame_axis and z.ndim == 5 else z
        if self.frames_first:  # as the pipeline holds it, which the server takes for that whatever the sizes
            latents = latents.transpose(1, 2)
        options = {**self.wire_scaling, **self._tiling()}
        if timestep is not None:  # the pipeline has mixed its own noise in already: the server adds none
            options.update(decode_timestep=timestep, decode_noise_scale=0)
        if self.pixels == "raw":
            sample = self.client.decode(latents, self.family, "pt", **options)
        else:
            sample = _unit_range(self.client.decode(latents, self.family, "uint8", **options), latents, self.video)
        return sample.unsqueeze(2) if self.frame_axis else sample

    def _tiling(self) -> dict[str, str]:
        return {"tiling": "blend"} if self.use_tiling else {}

    def _placed(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return tensor.to(device, self.dtype)

    def _check_latents(self, z: torch.Tensor) -> None:
        channels = self.config.get("latent_channels") or self.config.get("z_dim")
        if channels and z.ndim >= 4 and z.shape[1] != channels and not (z.ndim == 5 and z.shape[2] == channels):
            raise ValueError(
                f"this RemoteVae serves {self.family} ({self.remote_class}, {channels} latent channels); the pipeline "
                f"sent latents {list(z.shape)}: point it at the server path of the pipeline's own VAE"
            )


def _loaded(client: Client, family: str | None) -> dict[str, Any]:
    """The family's description once its model is loaded (a server still loading it is asked again, as the client
    retries a 503: `retries` times, waiting 1, 2, 4, ... s up to `max_retry_wait`)."""
    for attempt in range(client.retries + 1):
        if attempt:
            time.sleep(min(client.max_retry_wait, 2.0 ** (attempt - 1)))
            client.families(refresh=True)
        described = client.family(family)
        if "model" in described:
            return described
        if described.get("status") == "ready":  # loaded, and no model described: a server from before the drop-in
            raise RemoteVaeError(
                501, "this server does not describe its models (GET /families has no 'model')", client.url
            )
    status = described.get("status", "not ready")
    raise RemoteVaeError(503, f"the family is {status}; retry when the server has loaded it", client.url)


def _distribution(named: str | None) -> type:
    """The distribution class the server's model returns ("module:Class", a diffusers module's), built here from the
    parameters it sends; diffusers' DiagonalGaussianDistribution where it names none."""
    if not named:
        return DiagonalGaussianDistribution
    module, _, name = named.partition(":")
    if module.split(".")[0] != "diffusers":  # a server names a diffusers class; nothing else is imported on its word
        raise RemoteVaeError(502, f"the server names the distribution {named!r}, not a diffusers class", "")
    return getattr(importlib.import_module(module), name)


def _unit_range(pixels: torch.Tensor, latents: torch.Tensor, video: bool) -> torch.Tensor:
    """uint8 pixels [B, H, W, 3] (a video: [B*F, H, W, 3]) as the decoder's float output [B, 3, (F,) H, W]: p / 127.5
    - 1, which a pipeline's postprocess ((x / 2 + 0.5) * 255, rounded) returns to p exactly."""
    values = pixels.to(torch.float32) / 127.5 - 1.0
    if not video:
        return values.permute(0, 3, 1, 2)
    return values.reshape(latents.shape[0], -1, *values.shape[1:]).permute(0, 4, 1, 2, 3)


def _by_timestep(z: torch.Tensor, timestep: torch.Tensor | None):
    """(latents, timestep) pairs: the whole batch at one timestep, or each sample at its own."""
    if timestep is None:
        yield z, None
        return
    steps = torch.as_tensor(timestep).detach().float().cpu().reshape(-1)
    if steps.numel() == 1 or bool((steps == steps[0]).all()):
        yield z, float(steps[0])
        return
    for index in range(z.shape[0]):
        yield z[index : index + 1], float(steps[index])


@dataclass
class LatentOutput(BaseOutput):
    """An encoder's latent (no distribution), under the name its real output class gives it: taesd's `latents`,
    DC-AE's `latent`."""

    latents: torch.Tensor | None = None
    latent: torch.Tensor | None = None


class RanOnTheServer(ModelMixin, ConfigMixin):
    """A pipeline's vocoder where the server has run it already (a RemoteVae of LTX-2's audio decodes to the
    waveform): returns what it is given, and holds the real vocoder's config (`output_sampling_rate`, ...)."""

    config_name = "config.json"

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.register_to_config(**{name: value for name, value in config.items() if not name.startswith("_")})
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, waveforms: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return waveforms


class _DtypeCarrier(nn.Module):
    """A submodule with one zero-element parameter, for pipelines that read a VAE layer's dtype."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)


def _holder(root: nn.Module, dotted: str) -> nn.Module:
    """The (new, empty) submodule at `dotted`'s parent path: "bn.running_var" -> root.bn."""
    module = root
    for part in dotted.split(".")[:-1]:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module


def _class_attributes(class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The plain attributes (numbers, strings, lists of them) an instance of diffusers' `class_name` sets from
    `config`, built on the meta device (nothing allocated); `_submodules` names its child modules. Empty where this
    diffusers has no such class."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        return {}
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # config keys this diffusers does not know are dropped, not warned about
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as exc:  # an older diffusers that cannot build this config: the config alone must do
        log.debug("%s could not be built on the meta device (%s); its config alone stands in", class_name, exc)
        return {}
    finally:
        quiet.setLevel(level)
    plain = {
        name: value
        for name, value in vars(model).items()
        if not name.startswith("_") and name != "training" and _is_plain(value)
    }
    return {**plain, "_submodules": set(model._modules)}


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    return isinstance(value, PLAIN_TYPES)
