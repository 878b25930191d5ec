"""The device path: how a model is set up to run fast, how tensors reach it and come back.

Every switch is a measured choice (docs/benchmarks.md, "The device path, one switch at a time"):
  channels_last   the convolutions' preferred layout (NHWC, NDHWC for 3-D video
                  convolutions): faster on CPU (measured) and on CUDA tensor cores
  cudnn_benchmark CUDA: cuDNN times its algorithms once per shape, then keeps the fastest
  pinned_memory   CUDA: page-locked host buffers, so uploads and downloads are DMA copies
  compile         torch.compile of the encoder and decoder (off unless --compile). Shapes are
                  compiled at start-up (warm-up); afterwards torch runs any other shape
                  eagerly instead of compiling inside a request, and the log says so.
Postprocessing on the device (only uint8 copied back) is in media/postprocess.py.

It also decides when a batch runs whole: `BatchBudget`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

log = logging.getLogger("remote_vae")
# torch.compiler.set_stance (torch 2.6): without it a request of a new shape would compile inside the request.
COMPILE_STANCES = hasattr(torch.compiler, "set_stance")


@dataclass(frozen=True)
class DevicePath:
    channels_last: bool = True
    cudnn_benchmark: bool = True
    pinned_memory: bool = True
    compile: bool = False

    @classmethod
    def default(cls, device: torch.device, compile: bool = False, channels_last: str = "auto") -> DevicePath:
        """The measured defaults for a device; `channels_last` is 'auto', 'on' or 'off'. Compiling is off, said once, on
        a
        torch without compile stances (before 2.6), which is what keeps compiling out of requests."""
        cuda = device.type == "cuda"
        layout = {"on": True, "off": False}.get(channels_last, cuda)
        if compile and not COMPILE_STANCES:
            log.warning("--compile needs torch >= 2.6 (compile stances); torch %s serves uncompiled", torch.__version__)
        return cls(channels_last=layout, cudnn_benchmark=cuda, pinned_memory=cuda, compile=compile and COMPILE_STANCES)


def memory_format(ndim: int, path: DevicePath) -> torch.memory_format:
    """The layout of a model input or weight of `ndim` dimensions (4: images, 5: videos)."""
    if path.channels_last and ndim in (4, 5):
        return torch.channels_last if ndim == 4 else torch.channels_last_3d
    return torch.contiguous_format


def set_up_model(model: torch.nn.Module, device: torch.device, path: DevicePath) -> torch.nn.Module:
    """Move the model to its device, its convolution weights in the path's layout; switch on cuDNN autotuning."""
    model = model.to(device=device)
    with torch.no_grad():
        # Each weight by its own rank: video models mix 2-D and 3-D convolutions.
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.contiguous(memory_format=memory_format(tensor.ndim, path))
    if device.type == "cpu" and path.channels_last:
        # torch's channels-last GroupNorm on the CPU sums in float32 without care: on a 4096x4096 activation
        # it is off by 0.07 where the contiguous kernel is off by 5e-7 (float64 reference), enough to move
        # 1% of a 4096² SD decode's pixels by 2-4 levels. Normalise contiguous tensors; convolutions stay channels-last.
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.register_forward_pre_hook(_contiguous_input)
    if device.type == "cuda" and path.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    return model.eval()


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype, path: DevicePath) -> torch.Tensor:
    """A host tensor on the device, in the model's dtype and layout; through pinned memory on CUDA."""
    pinned = device.type == "cuda" and path.pinned_memory
    if pinned:
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=pinned).contiguous(memory_format=memory_format(tensor.ndim, path))


def to_host(tensor: torch.Tensor, path: DevicePath) -> torch.Tensor:
    """A device tensor on the host, contiguous; through a pinned buffer on CUDA."""
    if tensor.device.type == "cpu":
        return tensor.contiguous()
    if not path.pinned_memory:
        return tensor.contiguous().cpu()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    out.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()  # the copy is asynchronous: wait before the host reads it
    return out


# -- whole batches or one sample at a time -----------------------------------------

# Measured on CPU (docs/benchmarks.md): up to about 2^16 output pixels per call a whole batch
# runs faster than one sample at a time (1.2-2x), above it slower (cache-bound), for both
# the real SD architecture and the tiny test model.
CPU_WHOLE_BATCH_PIXELS = 1 << 16
# On CUDA a whole batch is faster whenever it fits: keep its activations within this share of
# the memory that is free now (what the driver reports plus torch's unused cache).
CUDA_MEMORY_SHARE = 0.8
# Until a warm-up has measured the model, assume the SD-family decoders' peak at fp16
# rounded up (about 2.5 KB of activations per output pixel).
DEFAULT_CUDA_BYTES_PER_PIXEL = 4096


@dataclass
class BatchBudget:
    """How many output (decode) or input (encode) pixels one model call may take whole.

    A batch over the budget runs one sample per model call (vae/policy.py slices it), as
    diffusers' `enable_slicing()` does; under it, the whole batch goes in one call.
    `pixels` fixed (--batch-pixel-budget) or None: found per call from the device.
    """

    pixels: int | None = None
    bytes_per_pixel: float | None = None  # the model's peak activation bytes per pixel, measured on CUDA at warm-up

    def allows(self, pixels: int, device: torch.device) -> bool:
        return pixels <= self.limit(device)

    def limit(self, device: torch.device) -> int:
        if self.pixels is not None:
            return self.pixels
        if device.type != "cuda":
            return CPU_WHOLE_BATCH_PIXELS
        return int(
            CUDA_MEMORY_SHARE * available_memory(device) / (self.bytes_per_pixel or DEFAULT_CUDA_BYTES_PER_PIXEL)
        )


def available_memory(device: torch.device) -> int:
    """Bytes a CUDA call can use now: free on the device plus what torch has cached but not allocated."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class PeakMemory:
    """The peak device memory of a block above what was allocated before it; None where it cannot be read (CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda" and exc_info[0] is None:
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before


# -- torch.compile ---------------------------------------------------------------


def compile_model(model: torch.nn.Module, shapes_to_warm: int) -> Callable[[], None]:
    """Put compiled wrappers in place of the model's encoder and decoder; returns what undoes it."""
    # Each warmed shape takes two graphs (batch 1, then any batch); more than the limit would fall back to eager.
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its name before torch 2.6
    setattr(config, limit, max(getattr(config, limit), 2 * shapes_to_warm + 4))
    originals = {
        name: getattr(model, name)
        for name in ("decoder", "encoder")
        if isinstance(getattr(model, name, None), torch.nn.Module)
    }
    for name, part in originals.items():
        setattr(model, name, torch.compile(part))

    def undo() -> None:
        for name, part in originals.items():
            setattr(model, name, part)

    return undo


# torch's compile stance is process-wide; one family may serve while another warms up.
_stance_lock = threading.Lock()


@contextmanager
def compiled_calls(warming: bool) -> Iterator[None]:
    """Calls of a compiled model. Warming up compiles each new shape; afterwards a shape
    with a compiled graph uses it and any other runs eagerly: nothing compiles inside a request."""
    with _stance_lock, torch.compiler.set_stance("default" if warming else "eager_on_recompile"):
        yield
