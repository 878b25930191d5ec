"""The VAE stage: load a family's model, then encode and decode on its device.

Models are diffusers classes named by the family config, set up by the device
path (device.py: layout, cuDNN, pinned transfers, optional compile). A batch
(one request's, or several requests' coalesced by batching.py) runs in one
call when it fits the family's pixel budget on this device, else one sample
at a time (as diffusers' slicing does). Both give the same results to float rounding:
every layer of these VAEs treats samples independently.

Video models already decode a few latent frames at a time (HunyuanVideo's
frame-wise decoding, Wan's causal cache). On top of that, the model's own
spatial tiling is switched on per call when a frame is larger than the
family's `tile_above_pixels` (or --tile-above-pixels), so peak memory stays
bounded at high resolutions; below it, output is diffusers' untiled output.

A call that runs out of device memory frees the allocator's cache and runs
again one sample at a time, then tiled, as far as the model can; when nothing
is left to try it is refused with a 503. The process and the model live on.

What differs between models is read from the family's data, not branched on:
a model that must see one sample per call (`samples_per_call`), images taken
as one-frame videos (`latent_layout.frame_axis`), a decode timestep argument
(`decode_timestep`), normalisation statistics kept in the weights
(`latents_stats_in_weights`, read once at load), and encoders without a
distribution (taesd's, whose latent is returned as is).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import diffusers
import numpy as np
import torch
from diffusers.models.modeling_utils import ModelMixin
import requests
from huggingface_hub import hf_hub_download
from packaging.version import Version

from .device import (
    BatchBudget,
    DevicePath,
    PeakMemory,
    available_memory,
    compile_model,
    compiled_calls,
    set_up_model,
    to_device,
)
from .errors import RequestError
from .families import Family, config_latent_channels
from .latents import LatentLayout, Normalisation, own_normalisation
from .media import TENSOR_DTYPES

if TYPE_CHECKING:  # imported for real when a model is loaded (exact_tiler_for)
    from .halo_tiling import HaloTiler
    from .tiling import ExactTiler

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
    if name not in ("float16", "bfloat16", "float32"):
        raise LoadError(f"unknown dtype {name!r}; expected auto, float16, bfloat16 or float32")
    return TENSOR_DTYPES[name]


def model_class(family: Family) -> type[ModelMixin]:
    """The family's diffusers class; UnsupportedFamily, naming the class and the release it needs, where this diffusers lacks it."""
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
    """Why the installed diffusers cannot build the family, or None when it can."""
    try:
        model_class(family)
    except UnsupportedFamily as exc:
        return str(exc)
    return None


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
        raise LoadError(
            f"{path} has no config.json (expected a diffusers model directory: config.json + diffusion_pytorch_model.safetensors)"
        )
    parts = source.strip("/").split("/")
    if len(parts) < 2 or source.startswith((".", "/")):
        raise LoadError(f"--model {source!r} is neither a directory nor a Hub id like org/name[/subfolder]")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:]) or None
    return repo_id, ({"subfolder": subfolder} if subfolder else {})


class FrameSink(Protocol):
    """Receives a video decoder's output chunk by chunk, while the rest is still being decoded."""

    def chunk(self, frames: torch.Tensor) -> None:
        """[b, 3, f, H, W] finished frames on the device, in order: all rows of the call at once, or one row at a time."""

    def restart(self) -> None:
        """Forget what came so far: the call failed and runs again."""


@dataclass
class LoadedVae:
    family: Family
    model: ModelMixin
    device: torch.device
    dtype: torch.dtype
    source: str
    tile_above_pixels: int | None = None  # None: never tile
    path: DevicePath = field(default_factory=DevicePath)
    budget: BatchBudget = field(default_factory=BatchBudget)
    band_pixels: int | None = None  # output pixels per band of the exact tiled path; None: by device
    store_bytes: int | None = (
        None  # the most one whole activation of the exact tiled path may take in host memory; None: default
    )

    def __post_init__(self):
        # One inference at a time per model: the device is the bottleneck, and
        # interleaving two large decodes only doubles peak memory.
        self._lock = threading.Lock()
        self.exact_tiler = exact_tiler_for(self.model)
        self.exact_tiling = self.exact_tiler is not None
        self.band_pixels = self.band_pixels or DEFAULT_BAND_PIXELS.get(self.device.type, DEFAULT_BAND_PIXELS["cpu"])
        self.can_tile = hasattr(self.model, "enable_tiling") or self.exact_tiling
        self.layout = LatentLayout.of(self.family)
        self.samples_per_call = self.family.samples_per_call or 1 << 30
        # What do_scaling=True undoes: the family's factors or statistics, or those in the weights.
        self.normalisation: Normalisation = own_normalisation(self.family, weight_stats(self.family, self.model))
        # The decode keyword for a decode timestep, where the model is conditioned on one (LTX 0.9.1+).
        timestep = self.family.decode_timestep
        self.timestep_argument = timestep if timestep and self.model.config.get("timestep_conditioning", True) else None
        # Read by /metrics: out-of-memory events by outcome, model calls by how they ran.
        self.oom_events = {"retried_sliced": 0, "retried_tiled": 0, "refused": 0}
        self.calls = {"whole": 0, "sliced": 0, "tiled": 0}
        self.compiled = False
        self.warmed: set[tuple] = set()  # _compile_key()s with compiled graphs
        self._said_unwarmed: set[tuple] = set()
        self._warming = False  # warm_up is running: compiling new shapes is what it is for

    def tiles(self, frame_pixels: int) -> bool:
        """Whether an image or frame of this many pixels is decoded / encoded in tiles."""
        return self.can_tile and self.tile_above_pixels is not None and frame_pixels > self.tile_above_pixels

    def tiling_for(self, requested: str | None) -> str:
        """The tiling a call uses when it tiles: the requested one, else the family's default ('exact' where the model
        allows it), else diffusers' 'blend'."""
        if requested == "exact" and not self.exact_tiling:
            raise RequestError(
                f"{self.family.name} has no exact tiled path (its encoder and decoder are neither GroupNorm, convolutions and plain samplers nor row-local outside the mid block); send tiling=blend"
            )
        return requested or ("exact" if self.exact_tiling and self.family.default_tiling == "exact" else "blend")

    def _exactly(self, call: Callable, output_pixels: int) -> Callable:
        """call run with the exact tiler in place of the model's encoder and decoder."""

        def run(values: torch.Tensor, **extra) -> torch.Tensor:
            with self._tiler(values, output_pixels).installed():
                return call(values, **extra)

        return run

    def _tiler(self, inputs: torch.Tensor, output_pixels: int) -> ExactTiler | HaloTiler:
        """An exact tiler whose whole activations stay on the device while about three of them fit there, else wait in
        host memory, where one is held whole up to `store_bytes` and past that the bands are recomputed."""
        widest = max(getattr(self.model.config, "block_out_channels", None) or [128])
        whole = inputs.shape[0] * widest * output_pixels * self.dtype.itemsize
        if self.device.type == "cuda" and 3 * whole < available_memory(self.device) // 2:
            return self.exact_tiler(self.model, band_pixels=self.band_pixels, store=self.device)
        return self.exact_tiler(
            self.model,
            band_pixels=self.band_pixels,
            store=torch.device("cpu"),
            store_limit=DEFAULT_STORE_BYTES if self.store_bytes is None else self.store_bytes,
        )

    def decode(
        self,
        latents: torch.Tensor,
        frames: FrameSink | None = None,
        timestep: torch.Tensor | None = None,
        tiling: str | None = None,
    ) -> torch.Tensor:
        """Decode the VAE's latents [B, C, (T,) h, w] (scaled already; on the host) to the decoder's raw output, on the device.

        `frames`, for models whose untiled decoder emits finished frames call by call
        (the family's `streams_frames`), receives them as they come. `timestep` ([B])
        goes to models conditioned on a decode timestep. Images decoded as one-frame
        videos (`frame_axis`) come back as images [B, 3, H, W].
        """
        compression = self.family.spatial_compression
        frame_pixels = latents.shape[-2] * latents.shape[-1] * compression**2
        frame_count = self.family.frames_for(latents.shape[2]) if self.family.is_video else 1
        streams = frames if self.family.streams_frames else None
        extra = {self.timestep_argument: timestep} if self.timestep_argument and timestep is not None else {}
        call = lambda z, **kw: self.model.decode(z, **kw).sample  # noqa: E731
        exact = self._exactly(call, frame_pixels * frame_count) if self.tiling_for(tiling) == "exact" else None
        sample = self._run("decode", latents, frame_pixels, frame_count, call, streams, extra, exact)
        return sample.squeeze(2) if self.layout.frame_axis else sample

    def encode(self, images: torch.Tensor, tiling: str | None = None) -> torch.Tensor:
        """Encode [B, 3, (F,) H, W] pixels in -1..1 (on the host) to the VAE's latent, the distribution's mean (deterministic), on the device."""
        if self.layout.frame_axis:
            images = images.unsqueeze(2)
        frame_count = images.shape[2] if self.family.is_video else 1
        frame_pixels = images.shape[-2] * images.shape[-1]
        call = lambda x: latent_of(self.model.encode(x))  # noqa: E731
        exact = self._exactly(call, frame_pixels * frame_count) if self.tiling_for(tiling) == "exact" else None
        return self._run("encode", images, frame_pixels, frame_count, call, exact=exact)

    def _run(
        self,
        operation: str,
        inputs: torch.Tensor,
        frame_pixels: int,
        frame_count: int,
        call: Callable,
        frames: FrameSink | None = None,
        extra: dict[str, torch.Tensor] | None = None,
        exact: Callable | None = None,
    ):
        """call(inputs) whole, one sample at a time, or tiled (by `exact` where given, else the model's own blended tiling)."""
        batch = inputs.shape[0]
        with self._lock, torch.inference_mode(), self._compiled(operation, inputs):
            values = to_device(inputs, self.device, self.dtype, self.path)
            extra = {name: value.to(self.device, self.dtype) for name, value in (extra or {}).items()}
            tiled = self.tiles(frame_pixels)
            sliced = batch > self.samples_per_call or (
                batch > 1 and not self.budget.allows(batch * frame_count * frame_pixels, self.device)
            )
            while True:
                # Tiled, the decoder sees tiles or bands, not whole frames: nothing to stream (the frames go after).
                result = self._attempt(
                    exact if tiled and exact else call,
                    values,
                    sliced,
                    tiled and not exact,
                    None if tiled else frames,
                    extra,
                )
                if result is not _OUT_OF_MEMORY:
                    self.calls["tiled" if tiled else "sliced" if sliced else "whole"] += 1
                    return result
                if batch > 1 and not sliced:
                    sliced, outcome = True, "retried_sliced"
                elif self.can_tile and not tiled:
                    sliced, tiled, outcome = True, True, "retried_tiled"
                else:
                    self.oom_events["refused"] += 1
                    raise RequestError(
                        f"{self.family.name}: the device ran out of memory on this request{' even tiled' if self.can_tile else ''}; "
                        "retry later, or send a smaller batch or size",
                        status=503,
                        headers={"Retry-After": "10"},
                    )
                log.warning(
                    "%s: out of device memory on %d x %d-pixel %s; %s",
                    self.family.name,
                    batch,
                    frame_pixels,
                    operation,
                    outcome.replace("_", " "),
                )
                self.oom_events[outcome] += 1
                if frames is not None:
                    frames.restart()

    def _attempt(
        self, call: Callable, values: torch.Tensor, sliced: bool, tiled: bool, frames: FrameSink | None, extra: dict
    ):
        """call(values, **extra) sliced, and with the model's own tiling as asked; _OUT_OF_MEMORY, with the cache freed, if the device ran out.

        Sliced runs one sample per call, as diffusers' use_slicing does, but here for every
        model and with per-sample arguments (LTX's slicing drops its timestep).
        """
        if hasattr(self.model, "use_tiling"):
            self.model.use_tiling = tiled
        hook = self.model.decoder.register_forward_hook(lambda module, args, out: frames.chunk(out)) if frames else None
        try:
            if sliced and values.shape[0] > 1:
                rows = range(values.shape[0])
                return torch.cat([call(values[i : i + 1], **{k: v[i : i + 1] for k, v in extra.items()}) for i in rows])
            return call(values, **extra)
        except torch.cuda.OutOfMemoryError:
            pass
        finally:
            if hook is not None:
                hook.remove()
        # Outside the except block: the exception and its frames' tensors are gone, so their memory can be freed.
        free_device_memory(self.device)
        return _OUT_OF_MEMORY

    def _compiled(self, operation: str, inputs: torch.Tensor):
        """The compile stance around a call of a compiled model; says once per shape when a request's shape was not warmed up."""
        if not self.compiled:
            return nullcontext()
        key = _compile_key(operation, inputs)
        if not self._warming and key not in self.warmed and key not in self._said_unwarmed:
            self._said_unwarmed.add(key)
            log.warning(
                "%s: %s of %s x %s was not warmed up, so it runs eagerly rather than compiling inside a request; "
                "add its size to --warmup-sizes",
                self.family.name,
                operation,
                inputs.shape[0],
                list(inputs.shape[1:]),
            )
        return compiled_calls(self._warming)

    def warm_up(self, sizes: Sequence[tuple[int, ...]], batches: Sequence[int]) -> None:
        """Run every size (W, H) or (W, H, F) in pixels at every batch size through each operation the family serves.

        With compile on, this is when graphs are compiled. On CUDA it also loads the
        kernels, autotunes cuDNN, and measures the model's peak memory per pixel for the batch budget.
        """
        for size in sizes:
            width, height, *frames = size
            for operation in self.family.operations:
                for batch in batches:
                    inputs = self._warm_up_inputs(operation, batch, width, height, frames[0] if frames else None)
                    started = time.monotonic()
                    self._warming = True
                    try:
                        with PeakMemory(self.device) as peak:
                            self.decode(inputs) if operation == "decode" else self.encode(inputs)
                    finally:
                        self._warming = False
                    self.warmed.add(_compile_key(operation, inputs))
                    if peak.bytes and operation == "decode" and batch == 1 and self.budget.pixels is None:
                        pixels = max(1, width * height * (frames[0] if frames else 1))
                        self.budget.bytes_per_pixel = max(self.budget.bytes_per_pixel or 0, peak.bytes / pixels)
                    log.info(
                        "%s: warmed up %s of %s x %s in %.1f s%s",
                        self.family.name,
                        operation,
                        batch,
                        "x".join(map(str, size)),
                        time.monotonic() - started,
                        " (compiled)" if self.compiled else "",
                    )

    def _warm_up_inputs(self, operation: str, batch: int, width: int, height: int, frames: int | None) -> torch.Tensor:
        family = self.family
        frames = frames if family.is_video else None
        if operation == "encode":
            return torch.zeros((batch, 3) + ((frames,) if frames else ()) + (height, width))
        step = family.spatial_compression
        latent_frames = ((frames - 1) // family.temporal_compression + 1,) if frames else ()
        if latent_frames and family.latent_frames_odd:
            latent_frames = (latent_frames[0] | 1,)
        frame_axis = (1,) if self.layout.frame_axis else ()
        return torch.zeros(
            (batch, family.latent_channels) + latent_frames + frame_axis + (height // step, width // step)
        )


def latent_of(encoded) -> torch.Tensor:
    """An encoder's latent: the distribution's mean (deterministic), or the latent itself where the model has no distribution (taesd)."""
    distribution = getattr(encoded, "latent_dist", None)
    return distribution.mean if distribution is not None else encoded.latents


def weight_stats(family: Family, model: ModelMixin) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) per channel from the model's buffers, as the family's pipeline reads them (`latents_stats_in_weights`)."""
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


def _compile_key(operation: str, inputs: torch.Tensor) -> tuple:
    """What a compiled graph is for: the operation, one sample's input shape, and whether the batch is of one
    (torch specialises a batch of one; any larger batch shares one graph with a dynamic size)."""
    return (operation, tuple(inputs.shape[1:]), inputs.shape[0] == 1)


_OUT_OF_MEMORY = object()


def exact_tiler_for(model: ModelMixin) -> type[ExactTiler] | type[HaloTiler] | None:
    """The exact tiled path for a model, tried in order: GroupNorm models layer by layer, row-local ones band by band.

    Imported here, when a model is loaded, not with the server: they reach into diffusers' architecture modules,
    and a diffusers without one of those must cost that architecture its exact path, not every family its import.
    """
    from .halo_tiling import HaloTiler
    from .tiling import ExactTiler

    return next((tiler for tiler in (ExactTiler, HaloTiler) if tiler.supports(model)), None)


# Output pixels per band of the exact tiled path: what one step of device work is sized by.
DEFAULT_BAND_PIXELS = {"cuda": 1 << 20, "cpu": 1 << 16}
# Host memory one whole activation of the exact tiled path may take before its bands are recomputed instead:
# what keeps a large decode's memory flat (a 4096² image's widest SD activation is 8 GiB).
DEFAULT_STORE_BYTES = 256 << 20


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
    path: DevicePath | None = None,
    budget: BatchBudget | None = None,
    warmup_sizes: Sequence[tuple[int, ...]] = (),
    warmup_batches: Sequence[int] = (1,),
    band_pixels: int | None = None,
    store_bytes: int | None = None,
) -> LoadedVae:
    """The family's model on its device, set up and warmed up.

    tile_above_pixels overrides the family's ("family" keeps it, None never tiles). `path`
    defaults to the measured device path for `device`; `budget` to the device's own.
    """
    path = path or DevicePath.default(device)
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
            hint = "; without Hub access pass --model DIR (a diffusers model directory) or --random-weights"
            unreachable = None if os.environ.get("HF_HUB_OFFLINE") else network_failure(exc)
            if (
                unreachable is not None
            ):  # diffusers then says the repository "does not appear to have a file named config.json"
                raise LoadError(
                    f"cannot load {family.name}: the Hugging Face Hub could not be reached for {source} "
                    f"({type(unreachable).__name__}: {unreachable}){hint}"
                ) from exc
            offline = (
                " (HF_HUB_OFFLINE is set: the model must already be in the Hugging Face cache)"
                if os.environ.get("HF_HUB_OFFLINE")
                else ""
            )
            raise LoadError(f"cannot load {family.name} from {source}{offline}: {exc}{hint}") from exc
    channels = config_latent_channels(model.config)
    if channels is not None and channels != family.latent_channels:
        raise LoadError(
            f"{source} has {channels} latent channels, but family {family.name} expects {family.latent_channels}"
        )
    if random_weights:
        model = model.to(dtype=dtype)
    model = set_up_model(model, device, path)
    _warn_on_other_normalisation(family, model.config, source)
    tile_above = family.tile_above_pixels if tile_above_pixels == "family" else tile_above_pixels
    if not hasattr(model, "enable_tiling"):
        tile_above = None  # a model without tiling decodes whole, whatever the threshold
    else:
        # Tile sizes are set once; each call switches use_tiling (above the threshold, or after running out of memory).
        model.enable_tiling(**family.tiling_options)
        model.use_tiling = False
    vae = LoadedVae(
        family, model, device, dtype, source, tile_above, path, budget or BatchBudget(), band_pixels, store_bytes
    )
    if device.type == "cuda" and not warmup_sizes:
        warmup_sizes = [default_warmup_size(family)]  # load the kernels and measure memory before the first request
    if path.compile:
        uncompile = compile_model(model, len(warmup_sizes) * len(family.operations))
        vae.compiled = True
        try:
            vae.warm_up(warmup_sizes, warmup_batches)
        except Exception as exc:  # a model torch cannot compile is still served, eagerly
            log.error(
                "%s: compiling failed (%s: %s); serving it uncompiled",
                family.name,
                type(exc).__name__,
                str(exc).splitlines()[0][:300],
            )
            uncompile()
            vae.compiled = False
            vae.warmed.clear()
    if not vae.compiled:
        vae.warm_up(warmup_sizes, warmup_batches)
    log.info(
        "loaded %s (%s) on %s as %s%s%s",
        family.name,
        source,
        device,
        str(dtype).removeprefix("torch."),
        f", tiling frames above {tile_above} pixels" if tile_above is not None else "",
        ", compiled" if vae.compiled else "",
    )
    return vae


def default_warmup_size(family: Family) -> tuple[int, ...]:
    """A 256x256 image, or one 256x256 frame."""
    return (256, 256, 1) if family.is_video else (256, 256)


def _warn_on_other_normalisation(family: Family, config, source: str) -> None:
    """do_scaling=True uses the family's factors; say so when the weights' own config disagrees."""
    if family.model_latents == "normalised":
        return  # a preview decoder's config holds 1.0 / 0.0: its latents are the full family's, normalised
    pairs = [
        ("scaling_factor", family.scaling_factor),
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
