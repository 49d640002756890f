"""Kernel entry points, dispatched by the device of the KV pages.

* CPU tensors  -> the C++ extension ``kvcompress_vllm._C`` (``csrc/``);
* CUDA tensors -> the Triton kernels ``kvcompress_vllm.triton_kernels``
  (index tensors that live on the host, e.g. the worker's page-table rows,
  are moved to the device first).

The contracts are defined, and tested against, by ``ops.reference``.

``KVCOMPRESS_VLLM_KERNELS`` (read at import; ``ops.KERNELS`` at call time):

* ``auto`` (default; ``cpp`` is accepted as an alias): by device, as above;
* ``reference``: the plain-PyTorch reference everywhere (very slow;
  debugging; logged once);
* ``triton``: the Triton kernels for every device -- on CPU tensors only
  under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the
  tests run the CUDA path on a machine without a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from kvcompress_vllm.ops import reference

MODES = ("auto", "cpp", "reference", "triton")
KERNELS = os.environ.get("KVCOMPRESS_VLLM_KERNELS", "auto")
USE_REFERENCE = KERNELS == "reference"  # kept for callers that read it
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


#: The ISA paths of the C++ kernels with AVX-512 micro-kernels (``avx512``:
#: the AVX512-BF16 instructions they use emulated, for CPUs without them).
AVX512_PATHS = ("avx512", "avx512_bf16", "avx512_amx")


def cpu_isa() -> str:
    """The ISA path the C++ kernels run now (``csrc/cpu_isa.h``): ``avx512_amx``,
    ``avx512_bf16``, ``avx512``, ``avx2`` or ``generic``."""
    load_library()
    return torch.ops.kvcompress.cpu_isa()


def backend_for(kv_pages: torch.Tensor) -> str:
    """``"cpp"``, ``"triton"`` or ``"reference"``: what runs on ``kv_pages``.
    (Called once per layer and step: the common case takes two attribute reads.)"""
    mode = KERNELS
    if mode == "auto" or mode == "cpp":
        if kv_pages.is_cpu:
            return "cpp"
        if kv_pages.is_cuda:
            return "triton"
        raise RuntimeError(f"kvcompress_vllm: no kernels for {kv_pages.device.type} tensors")
    if mode not in MODES:
        raise ValueError(
            f"KVCOMPRESS_VLLM_KERNELS={mode!r}: expected one of {', '.join(MODES)}"
        )
    return mode


def _triton():
    from kvcompress_vllm import triton_kernels

    return triton_kernels


def _on(device: torch.device, *tensors):
    return [None if t is None else t.to(device, non_blocking=True) for t in tensors]


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
    packing: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
    metric_k_start: torch.Tensor | None = None,
) -> None:
    """See ``reference.paged_head_attention``.  The C++ kernel reads two
    in-page layouts, ``reference.amx_packing`` and ``reference.vec_packing``:
    ``packing`` must be one of them."""
    backend = backend_for(kv_pages)
    if backend == "reference":
        return reference.paged_head_attention(**_args(locals()))
    if backend == "triton":
        _no_packing("paged_head_attention", packing)
        page_table, kv_lens, query_start_loc, metric_q_start, metric_k_start = _on(
            kv_pages.device, page_table, kv_lens, query_start_loc, metric_q_start,
            metric_k_start,
        )
        return _triton().paged_head_attention(
            query, kv_pages, page_table, kv_lens, query_start_loc, scale,
            metrics, metric_q_start, output, metric_k_start,
        )
    load_library()
    if (packing is None) != (packed is None):
        raise ValueError("paged_head_attention: packing and packed go together")
    if packing is not None and tuple(packing.shape[1:]) != tuple(kv_pages.shape[2:]):
        raise ValueError(
            f"paged_head_attention: packing is for pages of {tuple(packing.shape[1:])} "
            f"(block_size, head_dim), kv_pages hold {tuple(kv_pages.shape[2:])}"
        )
    layout = 0 if packing is None else _kernel_layout(packing)
    torch.ops.kvcompress.paged_head_attention(
        query, kv_pages, page_table, kv_lens, query_start_loc, scale,
        metrics, metric_q_start, output, packed, layout, metric_k_start,
    )


#: The in-page layouts the C++ kernel reads, by its ``packed_layout`` code
#: (``csrc/cpu_isa.h``, ``PackedLayout``).
KERNEL_LAYOUTS = {"amx": (0, reference.amx_packing), "vec": (1, reference.vec_packing)}
#: Packings already identified: (the tensor, kept alive so its id stays
#: unique, and its layout code).
_LAYOUT_SEEN: list[tuple[torch.Tensor, int]] = []


def packing_layout(packing: torch.Tensor) -> str | None:
    """Which of ``KERNEL_LAYOUTS`` the ``[2, N, D]`` in-page offsets
    ``packing`` are (``None``: neither; the C++ kernel needs ``N % 16 == 0``
    and ``D % 32 == 0`` for both)."""
    _, block_size, head_dim = packing.shape
    if block_size % 16 or head_dim % 32:
        return None
    for name, (_, offsets) in KERNEL_LAYOUTS.items():
        if torch.equal(packing.to(torch.int64), offsets(block_size, head_dim).to(torch.int64)):
            return name
    return None


def kernel_reads_packing(packing: torch.Tensor) -> bool:
    """Whether the C++ kernel reads head-pages packed by ``packing`` (``[2, N,
    D]`` in-page offsets): vLLM's AMX or vec layout (``packing_layout``)."""
    return packing_layout(packing) is not None


def _kernel_layout(packing: torch.Tensor) -> int:
    for seen, code in _LAYOUT_SEEN:
        if seen is packing:
            return code
    name = packing_layout(packing)
    if name is None:
        _, block_size, head_dim = packing.shape
        raise ValueError(
            f"paged_head_attention: the C++ kernel reads head-pages in vLLM's AMX or vec "
            f"in-page layout only (reference.amx_packing, reference.vec_packing); this "
            f"packing (block_size {block_size}, head_dim {head_dim}) is neither"
        )
    code = KERNEL_LAYOUTS[name][0]
    del _LAYOUT_SEEN[:-15]  # the engine has one packing; tests make many
    _LAYOUT_SEEN.append((packing, code))
    return code


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_pages: torch.Tensor,
    slots: torch.Tensor,
    metrics: torch.Tensor | None,
    positions: torch.Tensor | None,
    token_positions: torch.Tensor,
    packing: torch.Tensor | None = None,
) -> None:
    """See ``reference.write_kv``."""
    backend = backend_for(kv_pages)
    if backend == "reference":
        return reference.write_kv(**_args(locals()))
    if backend == "triton":
        _no_packing("write_kv", packing)
        slots, token_positions = _on(kv_pages.device, slots, token_positions)
        return _triton().write_kv(
            key, value, kv_pages, slots, metrics, positions, token_positions
        )
    load_library()
    torch.ops.kvcompress.write_kv(
        key, value, kv_pages, slots, metrics, positions, token_positions, packing
    )


def unpack_pages(
    kv_pages: torch.Tensor,
    page_rows: torch.Tensor,
    packing: torch.Tensor,
    half: int,
) -> torch.Tensor:
    """See ``reference.unpack_pages``."""
    backend = backend_for(kv_pages)
    if backend == "reference":
        return reference.unpack_pages(**_args(locals()))
    if backend == "triton":
        _no_packing("unpack_pages", packing)
    load_library()
    return torch.ops.kvcompress.unpack_pages(kv_pages, page_rows, packing, half)


def keydiff_scores(
    kv_pages: torch.Tensor,
    page_rows: torch.Tensor,
    counts: torch.Tensor,
    width: int,
    packing: torch.Tensor | None = None,
) -> torch.Tensor:
    """See ``reference.keydiff_scores`` (C++ on CPU).  There is no Triton
    kernel: CUDA tensors run the reference's torch ops, and the CUDA worker
    does not call it (its ``keydiff`` scores the gathered keys)."""
    backend = backend_for(kv_pages)
    if backend != "cpp":
        if backend == "triton":
            _no_packing("keydiff_scores", packing)
        return reference.keydiff_scores(**_args(locals()))
    load_library()
    return torch.ops.kvcompress.keydiff_scores(kv_pages, page_rows, counts, width, packing)


def gather_batch(
    page_table: torch.Tensor,
    num_pages: torch.Tensor,
    kv_count: torch.Tensor,
    slots: torch.Tensor,
    query_start_loc: torch.Tensor,
    tokens_before: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See ``reference.gather_batch``.  The worker's page tables live on the
    host for every pool (the CUDA worker copies the result to the device), so
    this runs the C++ kernel whatever the pool's device; ``reference`` mode
    runs the reference."""
    if KERNELS == "reference":
        return reference.gather_batch(**_args(locals()))
    load_library()
    return torch.ops.kvcompress.gather_batch(
        page_table, num_pages, kv_count, slots, query_start_loc, tokens_before, block_size
    )


def _no_packing(op: str, packing: torch.Tensor | None) -> None:
    if packing is not None:
        raise ValueError(
            f"{op}: packing (vLLM's CPU in-page layout) is a CPU-only layout; "
            "the CUDA pool keeps plain [N, D] pages"
        )


def compact_heads(
    kv_pages: torch.Tensor,
    metrics: torch.Tensor,
    positions: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    evict_idx: torch.Tensor,
    evict_counts: torch.Tensor,
    packing: torch.Tensor | None = None,
) -> None:
    """See ``reference.compact_heads``."""
    backend = backend_for(kv_pages)
    if backend == "reference":
        return reference.compact_heads(**_args(locals()))
    if backend == "triton":
        _no_packing("compact_heads", packing)
        page_table, kv_lens, evict_idx, evict_counts = _on(
            kv_pages.device, page_table, kv_lens, evict_idx, evict_counts
        )
        return _triton().compact_heads(
            kv_pages, metrics, positions, page_table, kv_lens, evict_idx, evict_counts
        )
    load_library()
    torch.ops.kvcompress.compact_heads(
        kv_pages, metrics, positions, page_table, kv_lens, evict_idx, evict_counts, packing
    )


def _args(local_vars: dict) -> dict:
    return {k: v for k, v in local_vars.items() if not k.startswith("_") and k != "backend"}
