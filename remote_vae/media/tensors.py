"""Tensors to and from the wire's raw bytes (little-endian, by dtype name), and copies to the host."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from ..device import DevicePath, to_host
from ..errors import RequestError
from ..vocabulary import COMPUTE_DTYPES, WIRE_DTYPES

# torch's dtypes by their wire names.
TENSOR_DTYPES = {name: getattr(torch, name) for name in WIRE_DTYPES}


INPUT_DTYPES = COMPUTE_DTYPES


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, allowed: tuple[str, ...] = INPUT_DTYPES) -> torch.dtype:
    key = name.strip().lower().removeprefix("torch.")
    if key not in allowed:
        raise RequestError(f"unknown dtype {name!r}; expected one of {', '.join(allowed)}")
    return TENSOR_DTYPES[key]


def byte_count(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def check_byte_count(data: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    expected = byte_count(shape, dtype)
    if len(data) != expected:
        raise RequestError(
            f"body is {len(data)} bytes, but shape {list(shape)} {dtype_name(dtype)} needs {expected} bytes "
            f"(the raw, C-contiguous memory of the tensor)"
        )


def tensor_from_bytes(data: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor whose raw little-endian, C-contiguous memory is `data`."""
    check_byte_count(data, shape, dtype)
    # bytearray: torch.frombuffer wants a writable buffer.
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing a decoded file's pixels, which may be read-only (Pillow's bytes): only ever read, never
    copied."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    # A uint8 view keeps bfloat16 exact (numpy has no bfloat16).
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


HostCopy = Callable[[torch.Tensor], torch.Tensor]


# Without a device path: a plain copy back, no pinned buffer.
host_copy: HostCopy = partial(to_host, path=DevicePath(pinned_memory=False))
