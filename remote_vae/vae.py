"""The VAE stage: load a family's model, then encode and decode on its device.

Models are diffusers classes named by the family config. Batches run one
sample at a time (diffusers' slicing), so peak memory is that of one image
whatever the batch size; results are identical to a whole-batch call because
every layer of these VAEs treats samples independently.

Video models already decode a few latent frames at a time (HunyuanVideo's
frame-wise decoding, Wan's causal cache). On top of that, the model's own
spatial tiling is switched on per call when a frame is larger than the
family's `tile_above_pixels` (or --tile-above-pixels), so peak memory stays
bounded at high resolutions; below it, output is diffusers' untiled output.

A call that runs out of device memory frees the allocator's cache and, when
it was not tiled and the model can tile, runs once more tiled; otherwise it
is refused with a 503. Either way the process and the model live on.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers.models.modeling_utils import ModelMixin
from huggingface_hub import hf_hub_download

from .errors import RequestError
from .families import Family, config_latent_channels
from .media import TENSOR_DTYPES

log = logging.getLogger("remote_vae")

RANDOM_WEIGHTS_SEED = 0


class LoadError(RuntimeError):
    """A model that cannot be loaded as configured."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, family: Family, device: torch.device) -> torch.dtype:
    if name == "auto":
        name = family.dtype_for(device.type)
    if name not in ("float16", "bfloat16", "float32"):
        raise LoadError(f"unknown dtype {name!r}; expected auto, float16, bfloat16 or float32")
    return TENSOR_DTYPES[name]


def model_class(family: Family) -> type[ModelMixin]:
    cls = getattr(diffusers, family.model_class, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise LoadError(f"family {family.name}: model_class {family.model_class!r} is not a diffusers model class")
    return cls


def _has_weights(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def weights_folder(family: Family, directory: Path) -> Path | None:
    """The folder under `directory` that holds the family's VAE: itself, or a pipeline's `vae/` (hub_subfolder); None if neither."""
    if _has_weights(directory):
        return directory
    if family.hub_subfolder and _has_weights(directory / family.hub_subfolder):
        return directory / family.hub_subfolder
    return None


# What from_pretrained reads from a diffusers model directory; all a VAE needs.
WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def default_source(family: Family, model_dirs: Sequence[str | None], several: bool) -> str:
    """Where weights come from when --model is not given.

    The first of `model_dirs` that holds the family's weights wins: a mounted
    model repository (HF_MODEL_DIR, /repository on Inference Endpoints), then
    weights baked into an image (--weights-dir). A directory holds them in its
    subdirectory named after the family, or, when serving one family, at its
    root (also as a pipeline's `vae/` subfolder). Else the family's Hub repository.
    """
    for model_dir in filter(None, model_dirs):
        root = Path(model_dir)
        for candidate in [root / family.name] if several else [root, root / family.name]:
            if weights_folder(family, candidate):
                return str(candidate)
    return hub_id(family)


def hub_id(family: Family) -> str:
    return f"{family.hub_repo}/{family.hub_subfolder}" if family.hub_subfolder else family.hub_repo


def download_weights(family: Family, target: Path) -> Path:
    """Copy the family's VAE files from the Hub (through the cache) into `target`, a diffusers model directory."""
    target.mkdir(parents=True, exist_ok=True)
    for name in WEIGHT_FILES:
        cached = hf_hub_download(family.hub_repo, name, subfolder=family.hub_subfolder)
        shutil.copyfile(cached, target / name)
    return target


def _pretrained_args(family: Family, source: str) -> tuple[str, dict]:
    """`from_pretrained` arguments for a local directory or a Hub id `org/name[/subfolder]`."""
    path = Path(source)
    if path.is_dir():
        folder = weights_folder(family, path)
        if folder is not None:
            return str(path), ({} if folder == path else {"subfolder": family.hub_subfolder})
        raise LoadError(f"{path} has no config.json (expected a diffusers model directory: config.json + diffusion_pytorch_model.safetensors)")
    parts = source.strip("/").split("/")
    if len(parts) < 2 or source.startswith((".", "/")):
        raise LoadError(f"--model {source!r} is neither a directory nor a Hub id like org/name[/subfolder]")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    return repo_id, ({"subfolder": subfolder} if subfolder else {})


@dataclass
class LoadedVae:
    family: Family
    model: ModelMixin
    device: torch.device
    dtype: torch.dtype
    source: str
    tile_above_pixels: int | None = None  # None: never tile

    def __post_init__(self):
        # One inference at a time per model: the device is the bottleneck, and
        # interleaving two large decodes only doubles peak memory.
        self._lock = threading.Lock()
        self.can_tile = hasattr(self.model, "enable_tiling")
        # Out-of-memory events by outcome, read by /metrics.
        self.oom_events = {"retried_tiled": 0, "refused": 0}

    def tiles(self, frame_pixels: int) -> bool:
        """Whether an image or frame of this many pixels is decoded / encoded in tiles."""
        return self.can_tile and self.tile_above_pixels is not None and frame_pixels > self.tile_above_pixels

    def decode(self, latents: torch.Tensor, postprocess):
        """Decode [B, C, (T,) h, w] latents and postprocess on the device; returns what `postprocess` returns."""

        def run():
            return postprocess(self.model.decode(latents.to(self.device, self.dtype)).sample)

        return self._run(run, latents.shape[-2] * latents.shape[-1] * self.family.spatial_compression**2)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encode [B, 3, (F,) H, W] pixels in -1..1 to the latent distribution's mean (deterministic)."""
        return self._run(lambda: self.model.encode(images.to(self.device, self.dtype)).latent_dist.mean, images.shape[-2] * images.shape[-1])

    def _run(self, run, frame_pixels: int):
        with self._lock, torch.inference_mode():
            tiled = self.tiles(frame_pixels)
            result = self._attempt(run, tiled)
            if result is _OUT_OF_MEMORY and not tiled and self.can_tile:
                log.warning("%s: out of device memory on %d-pixel frames; retrying tiled", self.family.name, frame_pixels)
                self.oom_events["retried_tiled"] += 1
                result = self._attempt(run, True)
            if result is _OUT_OF_MEMORY:
                self.oom_events["refused"] += 1
                raise RequestError(
                    f"{self.family.name}: the device ran out of memory on this request{' even tiled' if self.can_tile else ''}; "
                    "retry later, or send a smaller batch or size", status=503, headers={"Retry-After": "10"})
            return result

    def _attempt(self, run, tiled: bool):
        """run() with tiling on or off; _OUT_OF_MEMORY, with the cache freed, if the device ran out."""
        if self.can_tile:
            self.model.use_tiling = tiled
        try:
            return run()
        except torch.cuda.OutOfMemoryError:
            pass
        # Outside the except block: the exception and its frames' tensors are gone, so their memory can be freed.
        free_device_memory(self.device)
        return _OUT_OF_MEMORY


_OUT_OF_MEMORY = object()


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_vae(
    family: Family,
    source: str | None,
    device: torch.device,
    dtype: torch.dtype,
    random_weights: bool = False,
    tile_above_pixels: int | None | str = "family",
) -> LoadedVae:
    """The family's model on its device; tile_above_pixels overrides the family's ("family" keeps it, None never tiles)."""
    cls = model_class(family)
    if random_weights:
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = cls.from_config(family.architecture)
        source = "random weights"
    else:
        name, kwargs = _pretrained_args(family, source)
        log.info("loading %s from %s %s", family.name, name, kwargs or "")
        try:
            # torch_dtype here, not .to(dtype) later: diffusers keeps modules it must run in float32.
            model = cls.from_pretrained(name, torch_dtype=dtype, **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            offline = " (HF_HUB_OFFLINE is set: the model must already be in the Hugging Face cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
            hint = "; without Hub access pass --model DIR (a diffusers model directory) or --random-weights"
            raise LoadError(f"cannot load {family.name} from {source}{offline}: {exc}{hint}") from exc
    channels = config_latent_channels(model.config)
    if channels is not None and channels != family.latent_channels:
        raise LoadError(f"{source} has {channels} latent channels, but family {family.name} expects {family.latent_channels}")
    if random_weights:
        model = model.to(dtype=dtype)
    model = model.to(device=device).eval()
    if hasattr(model, "enable_slicing"):
        model.enable_slicing()
    _warn_on_other_normalisation(family, model.config, source)
    tile_above = family.tile_above_pixels if tile_above_pixels == "family" else tile_above_pixels
    if not hasattr(model, "enable_tiling"):
        tile_above = None  # a model without tiling decodes whole, whatever the threshold
    else:
        # Tile sizes are set once; each call switches use_tiling (above the threshold, or after running out of memory).
        model.enable_tiling(**family.tiling_options)
        model.use_tiling = False
    log.info("loaded %s (%s) on %s as %s%s", family.name, source, device, str(dtype).removeprefix("torch."),
             f", tiling frames above {tile_above} pixels" if tile_above is not None else "")
    return LoadedVae(family, model, device, dtype, source, tile_above)


def _warn_on_other_normalisation(family: Family, config, source: str) -> None:
    """do_scaling=True uses the family's factors; say so when the weights' own config disagrees."""
    pairs = [("scaling_factor", family.scaling_factor), ("shift_factor", family.shift_factor),
             ("latents_mean", family.latents_mean), ("latents_std", family.latents_std)]
    for key, ours in pairs:
        theirs = config.get(key)
        if ours is not None and theirs is not None and tuple(np.atleast_1d(theirs)) != tuple(np.atleast_1d(ours)):
            log.warning("%s: the model config's %s is %s, family %s says %s; do_scaling=True uses the family's", source, key, theirs, family.name, ours)
