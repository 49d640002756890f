"""Triton (GPU) kernels of kvcompress-vllm.

Installed as ``kvcompress_vllm.triton_kernels``.  The public functions have
the signatures and semantics of ``kvcompress_vllm.ops.reference`` (the single
source of truth) and operate in place on CUDA tensors:

* ``paged_head_attention`` - causal attention over per-(request, KV head)
  head-pages, GQA without repeating KVs, fused eviction-metric accumulation;
* ``compact_heads`` - close the holes left by evicted KVs (bit-exact);
* ``write_kv`` - scatter new keys/values into their head slots.

Importing this package does not import triton; the kernel modules
(``attention``, ``compact``, ``cache_write``) are loaded on first use, so the
plugin imports fine on machines without triton.  On CPU tensors the kernels
only run under the Triton interpreter (``TRITON_INTERPRET=1`` set before
triton is first imported), which the tests use.
``python -m kvcompress_vllm.triton_kernels._compile_check`` compiles every
kernel configuration to sm_80/sm_90 cubins without a GPU.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["paged_head_attention", "compact_heads", "write_kv", "is_available",
           "DECODE_SCORES_BYTES"]

#: Largest score scratch (bytes, fp32 ``[R, H, G, max_kv]``) that decode
#: attention with metrics allocates per call to store the scores of its
#: softmax pass, so that its metric pass need not read K again.  Larger
#: batches recompute the scores from K (the same result, slower).  The GPU
#: worker takes this out of the KV budget.
DECODE_SCORES_BYTES = 256 << 20


def is_available() -> bool:
    """True if triton is installed (it is needed to run any kernel here)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def paged_head_attention(
    query: torch.Tensor,  # [T, Hq, D]
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    page_table: torch.Tensor,  # [R, H, max_pages] int32
    kv_lens: torch.Tensor,  # [R, H] int32, includes this step's new KVs
    query_start_loc: torch.Tensor,  # [R + 1] int32
    scale: float,
    metrics: torch.Tensor | None,  # [P, N] float32, accumulated in place
    metric_q_start: torch.Tensor,  # [R] int32
    output: torch.Tensor,  # [T, Hq, D], written
    metric_k_start: torch.Tensor | None = None,  # [R] int32
) -> None:
    """See ``kvcompress_vllm.ops.reference.paged_head_attention``."""
    from .attention import paged_head_attention as impl

    impl(query, kv_pages, page_table, kv_lens, query_start_loc, scale, metrics,
         metric_q_start, output, metric_k_start)


def compact_heads(
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    metrics: torch.Tensor,  # [P, N] float32
    positions: torch.Tensor,  # [P, N] int32
    page_table: torch.Tensor,  # [S, max_pages] int32, one row per head
    kv_lens: torch.Tensor,  # [S] int32
    evict_idx: torch.Tensor,  # [S, max_evict] int32, ascending prefix per row
    evict_counts: torch.Tensor,  # [S] int32
) -> None:
    """See ``kvcompress_vllm.ops.reference.compact_heads``."""
    from .compact import compact_heads as impl

    impl(kv_pages, metrics, positions, page_table, kv_lens, evict_idx, evict_counts)


def write_kv(
    key: torch.Tensor,  # [T, H, D]
    value: torch.Tensor,  # [T, H, D]
    kv_pages: torch.Tensor,  # [P, 2, N, D], written
    slots: torch.Tensor,  # [T, H] int64: page * N + offset; < 0 skips
    metrics: torch.Tensor | None,  # [P, N] float32, reset to 0 at written slots
    positions: torch.Tensor | None,  # [P, N] int32, set at written slots
    token_positions: torch.Tensor,  # [T] int64/int32 position of each token
) -> None:
    """See ``kvcompress_vllm.ops.reference.write_kv``."""
    from .cache_write import write_kv as impl

    impl(key, value, kv_pages, slots, metrics, positions, token_positions)
