"""Loading: where a family's weights come from (a directory, baked weights, the Hub, or seeded random ones), its
diffusers class and dtype, and the model itself, checked against the family."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import requests
import torch
from diffusers.models.modeling_utils import ModelMixin
from huggingface_hub import hf_hub_download
from packaging.version import Version

from ..families import Family, config_latent_channels
from ..media import TENSOR_DTYPES
from ..vocabulary import COMPUTE_DTYPES, ModelLatents

log = logging.getLogger("remote_vae")

RANDOM_WEIGHTS_SEED = 0


class LoadError(RuntimeError):
    """A model that cannot be loaded as configured."""


class UnsupportedFamily(LoadError):
    """A family the installed diffusers cannot build (too old, or without its model class): that family is unavailable,
    the server's others serve."""


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
    if name not in COMPUTE_DTYPES:
        raise LoadError(f"unknown dtype {name!r}; expected auto, {', '.join(COMPUTE_DTYPES)}")
    return TENSOR_DTYPES[name]


def model_class(family: Family) -> type[ModelMixin]:
    """The family's diffusers class; UnsupportedFamily, naming the class and the release it needs, where this diffusers
    lacks it."""
    installed = diffusers.__version__
    needed = family.min_diffusers
    too_old = needed is not None and Version(installed) < Version(needed)
    try:
        cls = None if too_old else getattr(diffusers, family.model_class, None)
    except (ImportError, RuntimeError) as exc:  # diffusers' lazy import of the class's module failed
        raise UnsupportedFamily(
            f"family {family.name}: diffusers {installed} cannot import {family.model_class}: {exc}"
        ) from exc
    if cls is None:
        lacks = "is older than that" if too_old else f"has no {family.model_class}"
        wanted = f"diffusers >= {needed}" if needed else "a diffusers release that has it"
        raise UnsupportedFamily(
            f"family {family.name} needs {wanted} for its model class {family.model_class}; "
            f"the installed diffusers {installed} {lacks}"
        )
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise LoadError(f"family {family.name}: model_class {family.model_class!r} is not a diffusers model class")
    return cls


def unsupported(family: Family) -> str | None:
    """Why the installed diffusers cannot build the family (its VAE, or its vocoder), or None when it can."""
    try:
        model_class(family)
        if family.vocoder is not None:
            vocoder_class(family)
    except UnsupportedFamily as exc:
        return str(exc)
    return None


def _has_weights(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def weights_folder(family: Family, directory: Path) -> Path | None:
    """The folder under `directory` that holds the family's VAE: itself, or a pipeline's `vae/` (hub_subfolder); None if
    neither."""
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
    return family.hub_id


def network_failure(exc: BaseException | None) -> BaseException | None:
    """The network error in exc's chain of causes, when a load failed because the Hub could not be reached."""
    kinds: tuple[type[BaseException], ...] = (
        ConnectionError,
        TimeoutError,
        socket.gaierror,
        requests.ConnectionError,
        requests.Timeout,
    )
    try:
        import httpx  # huggingface_hub's own client from 1.0

        kinds += (httpx.TransportError,)
    except ImportError:
        pass
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def download_weights(family: Family, target: Path) -> Path:
    """Copy the family's VAE files from the Hub (through the cache) into `target`, a diffusers model directory."""
    folders = [(family.hub_subfolder, target)]
    if family.vocoder is not None:  # found beside the VAE's folder when loaded (load_vocoder)
        folders.append((family.vocoder["hub_subfolder"], target / family.vocoder["hub_subfolder"]))
    for subfolder, folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for name in WEIGHT_FILES:
            shutil.copyfile(hf_hub_download(family.hub_repo, name, subfolder=subfolder), folder / name)
    return target


def _pretrained_args(family: Family, source: str) -> tuple[str, dict]:
    """`from_pretrained` arguments for a local directory or a Hub id `org/name[/subfolder]`."""
    path = Path(source)
    if path.is_dir():
        folder = weights_folder(family, path)
        if folder is not None:
            return str(path), ({} if folder == path else {"subfolder": family.hub_subfolder})
        raise LoadError(
            f"{path} has no config.json (expected a diffusers model directory: config.json + "
            "diffusion_pytorch_model.safetensors)"
        )
    parts = source.strip("/").split("/")
    if len(parts) < 2 or source.startswith((".", "/")):
        raise LoadError(f"--model {source!r} is neither a directory nor a Hub id like org/name[/subfolder]")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    return repo_id, ({"subfolder": subfolder} if subfolder else {})


def weight_stats(family: Family, model: ModelMixin) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) per channel from the model's buffers, as the family's pipeline reads them
    (`latents_stats_in_weights`)."""
    names = family.latents_stats_in_weights
    if names is None:
        return None
    try:
        mean = model.get_buffer(names["mean"])
        if "std" in names:
            return mean.detach().cpu(), model.get_buffer(names["std"]).detach().cpu()
        # Flux.2: the batch norm's running variance and eps, combined in the model's dtype as Flux2Pipeline does.
        variance = model.get_buffer(names["variance"]).detach().cpu()
        return mean.detach().cpu(), torch.sqrt(variance + model.config[names["eps"]])
    except (AttributeError, KeyError) as exc:
        raise LoadError(f"family {family.name}: the model has no {exc} for latents_stats_in_weights {names}") from exc


def _warn_on_other_normalisation(family: Family, config, source: str) -> None:
    """do_scaling=True uses the family's factors; say so when the weights' own config disagrees."""
    if family.model_latents == ModelLatents.NORMALISED:
        return  # a preview decoder's config holds 1.0 / 0.0: its latents are the full family's, normalised
    pairs = [
        # Cosmos' factor is its scheduler's sigma_data; its VAE config's scaling_factor (1.0) is read by nothing
        ("scaling_factor", None if family.latents_stats_frames else family.scaling_factor),
        ("shift_factor", family.shift_factor),
        ("latents_mean", family.latents_mean),
        ("latents_std", family.latents_std),
    ]
    for key, ours in pairs:
        theirs = config.get(key)
        if ours is not None and theirs is not None and tuple(np.atleast_1d(theirs)) != tuple(np.atleast_1d(ours)):
            log.warning(
                "%s: the model config's %s is %s, family %s says %s; do_scaling=True uses the family's",
                source,
                key,
                theirs,
                family.name,
                ours,
            )


def load_model(family: Family, source: str | None, dtype: torch.dtype, random_weights: bool) -> tuple[ModelMixin, str]:
    """The family's model in `dtype` on the host, and where it came from; LoadError naming the cause."""
    cls = model_class(family)
    if random_weights:
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model, source = cls.from_config(family.architecture).to(dtype=dtype), "random weights"
    else:
        name, kwargs = _pretrained_args(family, source)
        log.info("loading %s from %s %s", family.name, name, kwargs or "")
        try:
            # torch_dtype here, not .to(dtype) later: diffusers keeps modules it must run in float32.
            model = cls.from_pretrained(name, torch_dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise _load_failure(family, source, exc) from exc
    channels = config_latent_channels(model.config)
    if channels is not None and channels != family.latent_channels:
        raise LoadError(
            f"{source} has {channels} latent channels, but family {family.name} expects {family.latent_channels}"
        )
    _warn_on_other_normalisation(family, model.config, source)
    return model, source


def vocoder_class(family: Family) -> type[ModelMixin]:
    """The class of the family's vocoder (`vocoder`), from the diffusers module its pipelines import it from."""
    spec = family.vocoder
    try:
        cls = getattr(importlib.import_module(spec["module"]), spec["model_class"], None)
    except (ImportError, RuntimeError) as exc:
        raise UnsupportedFamily(
            f"family {family.name}: cannot import its vocoder's module {spec['module']}: {exc}"
        ) from exc
    if cls is None:
        raise UnsupportedFamily(
            f"family {family.name}: the installed diffusers {diffusers.__version__} has no {spec['model_class']} in "
            f"{spec['module']}"
        )
    return cls


def load_vocoder(family: Family, source: str, dtype: torch.dtype, random_weights: bool) -> ModelMixin | None:
    """The model an audio family's decoded output runs through (LTX-2's vocoder), from the subfolder beside the VAE's:
    in a pipeline's directory, or beside the VAE's own folder, or in the Hub repo; None for a family without one."""
    spec = family.vocoder
    if spec is None:
        return None
    cls, subfolder = vocoder_class(family), spec["hub_subfolder"]
    if random_weights:
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return cls.from_config(spec["architecture"]).to(dtype=dtype).eval()
    path = Path(source)
    if path.is_dir():
        folder = next((p for p in (path / subfolder, path.parent / subfolder) if _has_weights(p)), None)
        if folder is None:
            raise LoadError(
                f"{path}: family {family.name} needs its {spec['model_class']} too, in {path / subfolder} or "
                f"{path.parent / subfolder} (config.json + diffusion_pytorch_model.safetensors)"
            )
        name, kwargs = str(folder), {}
    else:  # the repo of the VAE's Hub id, its vocoder's subfolder
        name, kwargs = _pretrained_args(family, source)[0], {"subfolder": subfolder}
    try:
        return cls.from_pretrained(name, torch_dtype=dtype, **kwargs).eval()
    except (OSError, ValueError) as exc:
        raise _load_failure(family, f"{name} {kwargs or ''}", exc) from exc


def _load_failure(family: Family, source: str, exc: Exception) -> LoadError:
    """Why from_pretrained failed: an unreachable Hub named as the cause (diffusers then says the repository "does not
    appear to have a file named config.json"), or what it said."""
    hint = "; without Hub access pass --model DIR (a diffusers model directory) or --random-weights"
    offline = os.environ.get("HF_HUB_OFFLINE")
    unreachable = None if offline else network_failure(exc)
    if unreachable is not None:
        return LoadError(
            f"cannot load {family.name}: the Hugging Face Hub could not be reached for {source} "
            f"({type(unreachable).__name__}: {unreachable}){hint}"
        )
    cached = " (HF_HUB_OFFLINE is set: the model must already be in the Hugging Face cache)" if offline else ""
    return LoadError(f"cannot load {family.name} from {source}{cached}: {exc}{hint}")


def _plain_config(model: ModelMixin) -> dict[str, Any]:
    """A model's config as JSON holds it, without diffusers' own `_` keys."""
    config = {name: value for name, value in model.config.items() if not name.startswith("_")}
    return json.loads(json.dumps(config, default=str))


def model_description(family: Family, model: ModelMixin, vocoder: ModelMixin | None = None) -> dict[str, Any]:
    """What a drop-in VAE (remote_vae.diffusers_vae) needs to stand in for this model in a pipeline: its class, its
    config as diffusers holds it, and the buffers the family's pipeline reads from the weights
    (`latents_stats_in_weights`: LTX's latents_mean, Flux.2's batch-norm statistics); and the config of the vocoder the
    server runs after it (LTX-2's audio), which a drop-in's stand-in holds."""
    names = family.latents_stats_in_weights or {}
    buffers = {
        name: model.get_buffer(name).detach().float().cpu().tolist() for key, name in names.items() if key != "eps"
    }
    return {
        "class": type(model).__name__,
        "config": _plain_config(model),
        "buffers": buffers,
        "frame_axis": family.layout.frame_axis,  # the model takes images as one-frame videos [B, C, 1, h, w]
        "frames_as_batch": family.frames_as_batch,  # the model takes a clip's frames as a batch of images (SVD)
        # the pipeline holds the latent frames (or steps) first, [B, T, C, ...]: a drop-in sends the VAE's latent so,
        # which the server reads as that however many channels T is (CogVideoX, ACE-Step)
        "frames_first": family.layout.frames_first,
        "decoded_frames_first": family.decoded_frames_first,  # its decode returns [B, F, 3, H, W] (Allegro)
        # what the model reads and writes: its own latent, or (a preview decoder) the full family's normalised one
        "latents": str(family.model_latents),
        "encoder_output": encoder_output(model),
        # the class of that distribution, where it is not diffusers' DiagonalGaussianDistribution (Oobleck's)
        "distribution": distribution_class(model),
        **({"vocoder": _plain_config(vocoder)} if vocoder is not None else {}),
    }


def _encode_output_field(model: ModelMixin) -> tuple[str, Any]:
    """(name, annotation) of the first field of the output class the model's encode is annotated to return."""
    encode = inspect.unwrap(type(model).encode)
    for name in re.findall(r"\w+Output", str(inspect.signature(encode).return_annotation)):
        output = encode.__globals__.get(name)
        if dataclasses.is_dataclass(output):
            first = dataclasses.fields(output)[0]
            return first.name, first.type
    return "latent_dist", None


def blends_tiles(model: ModelMixin) -> bool:
    """Whether the model has diffusers' blended tiling: a use_tiling switch its decode reads (tiled_decode, or
    taesd's and Oobleck's _tiled_decode). Cosmos sets the switch and has no tiled decode; SVD's enable_tiling raises."""
    return hasattr(model, "use_tiling") and (hasattr(model, "tiled_decode") or hasattr(model, "_tiled_decode"))


def encoder_output(model: ModelMixin) -> str:
    """The field of the model's encode output that holds its result: "latent_dist" (a distribution), or the latent
    itself ("latents": taesd's, SAME's; "latent": DC-AE's), read from the output class its encode is annotated to
    return."""
    return _encode_output_field(model)[0]


def distribution_class(model: ModelMixin) -> str | None:
    """ "module:Class" of the distribution the model's encode returns, where it is a class of its own
    (OobleckDiagonalGaussianDistribution, built from the encoder's mean and scale; IdentityDistribution, the latent);
    None: diffusers' DiagonalGaussianDistribution, or no distribution."""
    name, annotation = _encode_output_field(model)
    if name != "latent_dist":
        return None
    # The annotation where it names one; else the class the encode builds (Cosmos' IdentityDistribution, the latent
    # itself, under an encode annotated to return a tensor)
    named = re.findall(r"\w+Distribution", str(annotation)) or re.findall(
        r"(\w+Distribution)\(", inspect.getsource(type(model).encode)
    )
    if not named or named[0] == "DiagonalGaussianDistribution":
        return None
    module = inspect.getmodule(type(model))
    return f"{module.__name__}:{named[0]}" if hasattr(module, named[0]) else None
