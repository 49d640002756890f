"""Helpers shared by the Triton kernel modules (imports triton)."""

from __future__ import annotations

import functools

import torch
import triton.language as tl

# Same-width integer views: the copy kernels move raw bits, so they are
# bit-exact for every float format (NaN payloads included) and compile once
# per element width instead of once per dtype.
_BIT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def require(condition: bool, message: str = "invalid kernel arguments") -> None:
    """Argument check that stays on under ``python -O`` (unlike ``assert``)."""
    if not condition:
        raise ValueError(f"kvcompress triton kernels: {message}")


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as the signed integer type of the same width."""
    return t.view(_BIT_VIEW[t.element_size()])


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    try:
        return _TL_DTYPE[dtype]
    except KeyError:
        raise TypeError(f"kvcompress triton kernels: unsupported dtype {dtype}") from None


def interpreted(t: torch.Tensor) -> bool:
    """Tensors on the CPU can only be run by the Triton interpreter
    (``TRITON_INTERPRET=1``); it computes ``tl.dot`` and arithmetic on
    bfloat16 incorrectly (bf16 is stored as uint16 in numpy), so kernels
    upcast to float32 before any math when this is true."""
    return t.device.type == "cpu"


@functools.cache
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def device_index(device: torch.device) -> int:
    """The CUDA device's index (the current device for a bare ``cuda``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def is_hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.x (H100 / H200), the only GPU
    the tile choices of ``attention._launch`` were measured on."""
    return device.type == "cuda" and _capability_major(device_index(device)) == 9


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())
