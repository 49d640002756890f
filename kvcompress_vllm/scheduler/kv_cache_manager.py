"""KV-cache spec and manager that account for evicted head-pages.

``KVCompressSpec`` is what the plugin's attention backend reports for every
layer (same bytes per block as ``FullAttentionSpec``, so vLLM sizes the pool
exactly as before).  The registry maps it to ``KVCompressManager``, which the
scheduler's coordinator then uses for all block accounting: allocation,
admission and preemption all see each request's *compressed* size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from kvcompress_vllm.core.geometry import BLOCK_TABLE_SLACK, PageGeometry


@dataclass(frozen=True, kw_only=True)
class KVCompressSpec(FullAttentionSpec):
    """Full attention whose blocks can be released before the request ends."""

    @property
    def prefix_cacheable(self) -> bool:
        # With prefix caching on, a request's blocks are cached while they
        # hold the tokens their hash names: ``KVCompressManager`` takes every
        # block a compression may change out of the cache first.
        return True

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:  # type: ignore[override]
        # Append-only worker block-table rows: see core.geometry.BLOCK_TABLE_SLACK.
        return super().max_num_blocks_per_req(vllm_config, max_len) + BLOCK_TABLE_SLACK


class KVCompressManager(FullAttentionManager):
    """Full-attention manager with per-request evicted head-page counts.

    Prefix caching (``enable_caching``): a request's full blocks are cached
    as vLLM caches them until its first compression, after which it caches no
    more (its blocks no longer hold the tokens of their position).  A
    compression keeps the request's leading ``keep_cached`` blocks intact
    (``shared_prefix_blocks``: its prefix-cache hits, blocks other requests
    hold too, blocks whose hash another request's compression took out of
    the cache before -- a prefix in its second use -- and blocks wholly
    inside the sinks; the scheduler protects their tokens) and takes every
    later block out of the prefix cache before the worker compacts or
    releases it.
    """

    #: Set by ``KVCompressScheduler`` once the layer count is known.
    geometry: PageGeometry | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.evicted_pages: dict[str, int] = {}
        #: Prefix-cache hits (blocks) of each request's current allocation.
        self.hit_blocks: dict[str, int] = {}
        #: Hashes of blocks compressions took out of the prefix cache -> the
        #: request whose compression did; least recently used first, at most
        #: one per block of the pool (``record_uncached``, ``forget_uncached``).
        self.uncached_by: OrderedDict[bytes, str] = OrderedDict()
        #: This step's additions to ``uncached_by`` (``apply_eviction``), so
        #: that no compression of a step depends on another's of the same step.
        self.pending_uncached: list[tuple[bytes, str]] = []

    # -- accounting ------------------------------------------------------
    def _required_blocks(self, request_id: str, num_tokens: int) -> int | None:
        evicted = self.evicted_pages.get(request_id, 0)
        if evicted == 0:
            return None  # stock accounting
        return self._geometry().blocks_needed(num_tokens, evicted)

    def _geometry(self) -> PageGeometry:
        if self.geometry is None:
            raise RuntimeError(
                "KVCompressManager used before KVCompressScheduler set its PageGeometry"
            )
        return self.geometry

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        required = self._required_blocks(request_id, num_tokens)
        if required is None:
            return super().get_num_blocks_to_allocate(
                request_id,
                num_tokens,
                new_computed_blocks,
                total_computed_tokens,
                num_local_computed_tokens,
                num_tokens_main_model,
                apply_admission_cap,
                prefill_end,
            )
        if new_computed_blocks:
            raise RuntimeError(
                f"request {request_id}: {len(new_computed_blocks)} prefix-cache hits on a "
                "compressed request (only a request's first allocation looks for hits)"
            )
        return max(required - len(self.req_to_blocks[request_id]), 0)

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        required = self._required_blocks(request_id, num_tokens)
        if required is None:
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        req_blocks = self.req_to_blocks[request_id]
        num_new = required - len(req_blocks)
        if num_new <= 0:
            return []
        new_blocks = self.block_pool.get_new_blocks(num_new)
        req_blocks.extend(new_blocks)
        if self.records_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in new_blocks)
        return new_blocks

    def cache_blocks(self, request, num_tokens, *args, **kwargs) -> None:
        if self.evicted_pages.get(request.request_id, 0):
            return  # compressed: its blocks hold other tokens than their position's
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def cached_past(self, request_id: str, num_computed_tokens: int) -> set[int]:
        """Ids of the request's blocks in the prefix cache from the one that
        holds its first uncomputed token on.  vLLM caches a block when it
        allocates it for a step's tokens (``allocate_slots`` ->
        ``cache_blocks``), before the forward pass writes them: while the
        step is being scheduled these blocks are not written yet."""
        first = num_computed_tokens // self.block_size
        return {b.block_id for b in self.req_to_blocks.get(request_id, ())[first:]
                if b.block_hash is not None}

    def add_local_computed_blocks(self, request_id, new_computed_blocks, *args, **kwargs) -> None:
        super().add_local_computed_blocks(request_id, new_computed_blocks, *args, **kwargs)
        self.hit_blocks[request_id] = len(new_computed_blocks)

    def shared_prefix_blocks(self, request_id: str, awaited: frozenset[int] = frozenset(),
                             second_use: bool = True) -> int:
        """Leading blocks of the request a compression must leave intact: up
        to its last block another request holds too (a hit on this request's
        blocks), is about to hit (``awaited``: block ids of the next waiting
        request's hit) or, with ``second_use``, another request's
        compression took out of the cache before (``record_uncached``: the
        prefix's second use), and at least its own prefix-cache hits (0
        without prefix caching: no hits, no block held twice, no hashes).
        Hits count even once no other request holds them, so a prefix that
        was reused stays cached for the next request.
        Shared blocks are usually a prefix (hashes chain), but not always:
        vLLM keeps duplicate blocks under one hash (a block recomputed because
        a hit stops a token short of the prompt), and a later request can hit
        one copy's predecessors and another copy's successor."""
        blocks = self.req_to_blocks.get(request_id, ())
        shared = min(self.hit_blocks.get(request_id, 0), len(blocks))
        for i in range(len(blocks) - 1, shared - 1, -1):
            block = blocks[i]
            if block.ref_cnt > 1 or block.block_id in awaited:
                return i + 1
            if second_use and self.uncached_by.get(block.block_hash, request_id) != request_id:
                self.uncached_by.move_to_end(block.block_hash)  # in use: forgotten last
                return i + 1
        return shared

    def record_uncached(self) -> None:
        """Remember the hashes of the blocks this step's compressions took out
        of the prefix cache, with the request compressed.  A request that
        computes one of them again keeps it (``shared_prefix_blocks``): such a
        prefix is in its second use, and the next request with it will hit
        it.  The record forgets the least recently used hashes beyond one per
        block of the pool."""
        for block_hash, request_id in self.pending_uncached:
            self.uncached_by[block_hash] = request_id
            self.uncached_by.move_to_end(block_hash)
        self.pending_uncached.clear()
        while len(self.uncached_by) > self.block_pool.num_gpu_blocks:
            self.uncached_by.popitem(last=False)

    def forget_uncached(self) -> None:
        """Drop the record of uncached hashes (the prefix cache was reset)."""
        self.uncached_by.clear()
        self.pending_uncached.clear()

    # -- eviction --------------------------------------------------------
    def apply_eviction(self, request_id: str, num_pages: int, num_tokens: int,
                       keep_cached: int = 0) -> list[int]:
        """Record ``num_pages`` evicted head-pages and release the tail blocks
        the request no longer needs; they are free for this very step.  With
        prefix caching, every block after the first ``keep_cached`` (whose
        tokens the compression may not touch) leaves the prefix cache first;
        none of those may be shared."""
        geometry = self._geometry()
        if num_pages <= 0:
            raise ValueError(f"request {request_id}: cannot evict {num_pages} pages")
        evicted = self.evicted_pages.get(request_id, 0) + num_pages
        in_use = geometry.pages_in_use(num_tokens, evicted)
        if in_use < 0:
            raise RuntimeError(
                f"request {request_id}: evicting {num_pages} pages leaves {in_use} of "
                f"{num_tokens} tokens' pages (already evicted {evicted - num_pages})"
            )
        req_blocks = self.req_to_blocks[request_id]
        if self.enable_caching:
            later = req_blocks[keep_cached:]
            shared = [b.block_id for b in later if b.ref_cnt > 1]
            if shared:
                raise RuntimeError(
                    f"request {request_id}: compressing would change blocks {shared[:8]} "
                    f"that other requests hold (only its first {keep_cached} blocks are "
                    "kept intact)"
                )
            cached = [b for b in later if b.block_hash is not None]
            if cached:
                self.pending_uncached.extend((b.block_hash, request_id) for b in cached)
                self.block_pool.evict_blocks({b.block_id for b in cached})
        self.evicted_pages[request_id] = evicted
        keep = geometry.blocks_needed(num_tokens, evicted)
        if keep > len(req_blocks):
            raise RuntimeError(
                f"request {request_id}: needs {keep} blocks after eviction but owns "
                f"{len(req_blocks)}"
            )
        released = req_blocks[keep:]
        del req_blocks[keep:]
        if released:
            self.block_pool.free_blocks(reversed(released))
        return [b.block_id for b in released]

    def pages_in_use(self, request_id: str, num_tokens: int) -> int:
        return self._geometry().pages_in_use(num_tokens, self.evicted_pages.get(request_id, 0))

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        self.evicted_pages.pop(request_id, None)
        self.hit_blocks.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def register_kv_cache_spec() -> None:
    """Map ``KVCompressSpec`` to ``KVCompressManager`` (idempotent).

    The built-ins must be registered first: the registry only installs them
    when it is empty.
    """
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        KVCompressSpec, KVCompressManager, uniform_type_base_spec=FullAttentionSpec
    )
