"""vLLM's own CPU attention ops, as the CPU backend calls them.

One home for how we call ``vllm._custom_ops``' CPU attention
(``cpu_attention_with_kv_cache``, its scheduler metadata) and for the row
arithmetic shared by ``cpu_prefill`` (stock-layout requests, gathered prefill
rows) and ``cpu_packed`` (requests in vLLM's layout, one sequence per KV head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StockKernel:
    """Static facts vLLM's CPU kernel needs (one attention layer group)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    isa: str
    split_kv: bool = True


_OPS = None

#: vLLM's builds of its x86 CPU kernel library (``CpuPlatform.import_kernels``
#: loads one per process): without AVX-512, AVX-512 without BF16, and
#: AVX-512-BF16 (``_C``, also the only build on other architectures).
VLLM_CPU_BUILDS = ("_C_AVX2", "_C_AVX512", "_C")

_BUILD: str | None = None


def vllm_kernel_build() -> str | None:
    """Which of ``VLLM_CPU_BUILDS`` this process loaded, read from the
    process's own mappings (what vLLM actually loaded, not a re-derivation of
    its choice); None before vLLM loaded one."""
    global _BUILD
    if _BUILD is None:
        try:
            with open("/proc/self/maps") as maps:
                names = {line.rsplit("/", 1)[-1].split(".", 1)[0]
                         for line in maps if "/vllm/_C" in line}
        except OSError:
            return None
        found = [b for b in VLLM_CPU_BUILDS if b in names]
        if len(found) > 1:
            raise RuntimeError(f"vLLM's CPU kernel library is loaded twice: {found}")
        _BUILD = found[0] if found else None
    return _BUILD


def vllm_ops():
    """``vllm._custom_ops``, imported on first use (after ``vllm`` itself)."""
    global _OPS
    if _OPS is None:
        from vllm import _custom_ops

        _OPS = _custom_ops
    return _OPS


def scheduler_metadata(kernel: StockKernel, seq_lens: torch.Tensor, qsl: torch.Tensor,
                       isa: str) -> torch.Tensor:
    """vLLM's CPU attention schedule for ``len(seq_lens)`` causal requests."""
    return vllm_ops().cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.numel(),
        num_heads=kernel.num_heads,
        num_kv_heads=kernel.num_kv_heads,
        head_dim=kernel.head_dim,
        seq_lens=seq_lens,
        dtype=kernel.dtype,
        query_start_loc=qsl,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=kernel.split_kv,
    )


def vllm_attention(query, key_cache, value_cache, out, qsl, seq_lens, block_table,
                   scheduler_metadata, scale) -> None:
    """vLLM's CPU attention kernel (causal, no window/ALiBi/soft-cap/sinks)."""
    vllm_ops().cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=qsl, seq_lens=seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
        scheduler_metadata=scheduler_metadata, s_aux=None,
    )


def segment_rows(start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Rows ``start[i] + [0, count[i])`` of every segment, concatenated."""
    return torch.repeat_interleave(start, count) + offsets(count)


def offsets(count: torch.Tensor) -> torch.Tensor:
    """``[0, c0) ++ [0, c1) ++ ...``: each element's index within its segment."""
    return torch.arange(int(count.sum())) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count
    )
