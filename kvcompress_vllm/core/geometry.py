"""Page arithmetic of block-aligned, per-head eviction (one home).

A vLLM block holds ``block_size`` (``N``) tokens of every layer and KV head
of one worker, i.e. ``pages_per_block = L * H`` head-pages (``H``: the KV
heads of this rank).  With ``n`` tokens in the cache and ``E`` head-pages
evicted over all heads, every head keeps ``n - k * N`` KVs and

* pages in use  = ``L*H*ceil(n/N) - E``
* blocks needed = ``ceil(pages in use / (L*H))``
* evictable now = ``L*H*floor(compressible(n)/N) - E``

Everything is plain integer math on vLLM's ``cdiv`` and also works
element-wise on integer tensors (per-head counts on the worker).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv


@dataclass(frozen=True)
class PageGeometry:
    """Shape of the paged cache, identical on the scheduler and every rank."""

    block_size: int  # tokens per page (= vLLM block size)
    pages_per_block: int  # L * H head-pages per vLLM block (H: this rank's KV heads)

    def head_pages(self, kv_count):
        """Pages one head needs for ``kv_count`` KVs (int or int tensor)."""
        return cdiv(kv_count, self.block_size)

    def pages_in_use(self, num_tokens: int, evicted: int) -> int:
        return self.pages_per_block * self.head_pages(num_tokens) - evicted

    def blocks_needed(self, num_tokens: int, evicted: int) -> int:
        return cdiv(self.pages_in_use(num_tokens, evicted), self.pages_per_block)

    def max_evictable(self, num_tokens: int, evicted: int, protected: int, sinks: int) -> int:
        """Pages that can still go without touching protected or sink KVs."""
        from kvcompress_vllm.core.policy import compressible_tokens

        whole = compressible_tokens(num_tokens, protected, sinks) // self.block_size
        return max(0, self.pages_per_block * whole - evicted)

    def kept_kvs(self, num_tokens: int, evicted: int) -> int:
        """KVs held over all heads."""
        return self.pages_per_block * num_tokens - evicted * self.block_size

    def lifetime_evicted_pages(self, num_tokens: int, kv_count):
        """Pages a head with ``kv_count`` KVs has given up (exact division:
        eviction is block-aligned; callers check the remainder)."""
        return (num_tokens - kv_count) // self.block_size


def max_pages_per_head(max_model_len: int, block_size: int) -> int:
    """Worker page-table row width: a head never holds more than
    ``max_model_len`` KVs; one spare page lets a compacted head append before
    its surplus page is trimmed."""
    return cdiv(max_model_len, block_size) + 1


#: Extra entries in vLLM's per-request block-table row (``KVCompressSpec``).
#: The worker's stock row is append-only: a request that released tail blocks
#: and grows again appends new ids.  A request needs one more block per
#: ``L*H`` pages, i.e. at most one per ``N`` new tokens, so its appends stay
#: within ``ceil(prompt/N) + ceil(decoded/N) <= ceil(max_len/N) + 1``; the
#: second entry is margin (an overflow would fail inside vLLM's runner).
BLOCK_TABLE_SLACK = 2


def head_table_bytes(max_requests: int, num_heads: int, max_pages: int) -> int:
    """Host memory of the worker's page tables, taken out of the KV budget.

    ``HeadPageTable``: ``page_table [S, L*H, max_pages]`` plus ``num_pages``
    and ``kv_count [S, L*H]`` int32; per step ``build_batch`` makes at most
    two more ``[R <= S, L*H, <= max_pages]`` int32 copies (row gather and the
    layer-major permute)."""
    persistent = 4 * max_requests * num_heads * (max_pages + 2)
    per_step = 2 * 4 * max_requests * num_heads * max_pages
    return persistent + per_step
