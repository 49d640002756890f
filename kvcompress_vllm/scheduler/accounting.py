"""Block accounting for block-aligned, per-head eviction (pure integer math).

A vLLM block holds ``block_size`` tokens of every layer and KV head, i.e.
``pages_per_block = L * H`` head-pages.  With ``n`` tokens in the cache and
``evicted`` head-pages evicted (each a whole page of one head), every head
keeps the same number of KVs in its last page, so:

* pages in use   = ``L*H*ceil(n/bs) - evicted``
* blocks needed  = ``ceil(pages in use / (L*H))``
* evictable now  = ``L*H*floor((n - protected - sinks)/bs) - evicted``
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvcompress_vllm.config import RequestPolicy


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PageGeometry:
    """Shape of the paged cache as the scheduler sees it."""

    block_size: int  # tokens per page (= vLLM block size)
    pages_per_block: int  # L * H head-pages per vLLM block

    def pages_in_use(self, num_tokens: int, evicted: int) -> int:
        return self.pages_per_block * cdiv(num_tokens, self.block_size) - evicted

    def blocks_needed(self, num_tokens: int, evicted: int) -> int:
        return cdiv(self.pages_in_use(num_tokens, evicted), self.pages_per_block)

    def max_evictable(self, num_tokens: int, evicted: int, protected: int, sinks: int) -> int:
        """Pages that can still go without touching protected or sink KVs."""
        compressible = max(0, num_tokens - protected - sinks)
        return max(0, self.pages_per_block * (compressible // self.block_size) - evicted)

    def kept_kvs(self, num_tokens: int, evicted: int) -> int:
        """KVs held over all heads."""
        return self.pages_per_block * num_tokens - evicted * self.block_size


def compression_due(
    *,
    num_computed: int,
    prefill_end: int | None,
    last_check: int | None,
    interval: int,
    pressure: bool,
) -> bool:
    """Whether a running request is compressed in this step.

    A request is scorable only once its whole (re)started prefill is in the
    cache: ``num_computed >= prefill_end``, where ``prefill_end`` is the
    request's ``num_tokens`` when its prefill started (the prompt, or the
    whole replayed prefix of a resumed request; ``None`` = not known yet).
    A chunk may end one token short of that, with ``num_computed ==
    num_tokens - 1`` like a decoding request: that is *not* done, since the
    last observation query has not run and its metric is not pooled yet.
    After that: right after the prefill, every ``interval`` new tokens, and at
    once under memory ``pressure``.
    """
    if prefill_end is None or num_computed < prefill_end:
        return False
    return pressure or last_check is None or num_computed - last_check >= interval


def target_kvs_per_head(policy: RequestPolicy, num_tokens: int) -> float:
    """Mean KVs per head the policy wants to keep for ``num_tokens`` tokens:
    ``rate * (n - protected) + protected``, capped by ``max_cache_tokens``
    (never below the protected window plus sinks)."""
    protected = min(num_tokens, policy.protected_window)
    target = policy.rate * (num_tokens - protected) + protected
    if policy.max_cache_tokens is not None:
        floor = min(num_tokens, policy.protected_window + policy.sink_tokens)
        target = min(target, max(policy.max_cache_tokens, floor))
    return target


def pages_to_evict(
    geometry: PageGeometry, policy: RequestPolicy, num_tokens: int, evicted: int
) -> int:
    """Head-pages to evict now to bring the request down to its target.

    Rounds down (never keeps fewer KVs than the target) and never exceeds what
    is evictable outside the protected window and the sinks.
    """
    if not policy.compresses:
        return 0
    excess = geometry.kept_kvs(num_tokens, evicted) - (
        geometry.pages_per_block * target_kvs_per_head(policy, num_tokens)
    )
    want = math.floor(excess / geometry.block_size) if excess > 0 else 0
    limit = geometry.max_evictable(
        num_tokens, evicted, policy.protected_window, policy.sink_tokens
    )
    return max(0, min(want, limit))
