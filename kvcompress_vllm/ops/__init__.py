"""Kernel entry points on CPU (C++ extension ``kvcompress_vllm._C``).

The contracts are defined, and tested against, by ``ops.reference``.  The
Triton versions for GPUs live in ``kvcompress_vllm.triton_kernels`` and follow
the same contracts.

Debugging: ``KVCOMPRESS_VLLM_KERNELS=reference`` runs the plain-PyTorch
reference instead of the C++ kernels (very slow; logged once).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from kvcompress_vllm.ops import reference

USE_REFERENCE = os.environ.get("KVCOMPRESS_VLLM_KERNELS", "cpp") == "reference"
if USE_REFERENCE:
    logging.getLogger("kvcompress_vllm").warning(
        "KVCOMPRESS_VLLM_KERNELS=reference: using the slow PyTorch reference kernels"
    )


@functools.cache
def load_library() -> None:
    """Load the C++ kernels once per process; fail loudly if they are missing."""
    pkg_dir = Path(__file__).resolve().parent.parent
    # Newest first: a source-tree build may sit next to an older one.
    candidates = sorted(pkg_dir.glob("_C*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not candidates:
        raise ImportError(
            f"kvcompress_vllm: C++ kernels not found in {pkg_dir} (expected "
            "_C*.so). Reinstall with `pip install --no-build-isolation .`."
        )
    torch.ops.load_library(str(candidates[0]))


def paged_head_attention(
    query: torch.Tensor,
    kv_pages: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    metrics: torch.Tensor | None,
    metric_q_start: torch.Tensor,
    output: torch.Tensor,
) -> None:
    """See ``reference.paged_head_attention``."""
    if USE_REFERENCE:
        return reference.paged_head_attention(**_args(locals()))
    load_library()
    torch.ops.kvcompress.paged_head_attention(
        query, kv_pages, page_table, kv_lens, query_start_loc, scale,
        metrics, metric_q_start, output,
    )


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_pages: torch.Tensor,
    slots: torch.Tensor,
    metrics: torch.Tensor | None,
    positions: torch.Tensor | None,
    token_positions: torch.Tensor,
) -> None:
    """See ``reference.write_kv``."""
    if USE_REFERENCE:
        return reference.write_kv(**_args(locals()))
    load_library()
    torch.ops.kvcompress.write_kv(
        key, value, kv_pages, slots, metrics, positions, token_positions
    )


def compact_heads(
    kv_pages: torch.Tensor,
    metrics: torch.Tensor,
    positions: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    evict_idx: torch.Tensor,
    evict_counts: torch.Tensor,
) -> None:
    """See ``reference.compact_heads``."""
    if USE_REFERENCE:
        return reference.compact_heads(**_args(locals()))
    load_library()
    torch.ops.kvcompress.compact_heads(
        kv_pages, metrics, positions, page_table, kv_lens, evict_idx, evict_counts
    )


def _args(local_vars: dict) -> dict:
    return {k: v for k, v in local_vars.items() if not k.startswith("_")}
