"""Which cached blocks a compression may have changed, and which were never
computed, for prefix-caching tests."""


class BlockWatch:
    """Wraps a ``KVCompressScheduler``'s block pool and manager.

    ``dirty``: every block of a compressed request after its ``keep_cached``
    leading ones, until the pool hands the block out again (the worker may
    have changed it); ``keeps``: (request id, keep_cached) per compression;
    ``stale()``: blocks in the prefix cache that are dirty -- there must be
    none.  ``unwritten()``: blocks in the prefix cache that no request has
    computed under their hash -- there must be none either.
    ``before(request_id, num_tokens)`` runs ahead of each compression.
    ``restore()`` unwraps."""

    def __init__(self, sched, before=None):
        self.sched = sched
        #: block id -> the hash it had when a request's computed tokens covered it
        self.written: dict[int, object] = {}
        self.manager = sched.kvc_manager
        self.pool = sched.kv_cache_manager.block_pool
        self.dirty: set[int] = set()
        self.keeps: list[tuple[str, int]] = []
        self._get_new, self._apply = self.pool.get_new_blocks, self.manager.apply_eviction

        def get_new_blocks(num_blocks):
            blocks = self._get_new(num_blocks)
            self.dirty.difference_update(b.block_id for b in blocks)
            return blocks

        def apply_eviction(request_id, num_pages, num_tokens, keep_cached=0):
            if before is not None:
                before(request_id, num_tokens)
            blocks = list(self.manager.req_to_blocks[request_id])
            released = self._apply(request_id, num_pages, num_tokens, keep_cached=keep_cached)
            self.dirty.update(b.block_id for b in blocks[keep_cached:])
            self.keeps.append((request_id, keep_cached))
            return released

        self.pool.get_new_blocks = get_new_blocks
        self.manager.apply_eviction = apply_eviction
        # A request's blocks are freed when it ends or is preempted: record
        # what it computed first (for a preempted request, without the
        # tokens of the step it was preempted in).
        self._kv_cache_manager = sched.kv_cache_manager
        self._free = self._kv_cache_manager.free

        def free(request):
            self._record(request.request_id, request.num_computed_tokens)
            return self._free(request)

        self._kv_cache_manager.free = free

    def stale(self) -> list[int]:
        return [b.block_id for b in self.pool.blocks
                if b.block_hash is not None and b.block_id in self.dirty]

    def _record(self, request_id: str, num_computed_tokens: int) -> None:
        """The leading blocks a never-compressed request has computed, under
        their hash (a compressed request's cached blocks are its leading
        ones, recorded before its first compression)."""
        if self.manager.evicted_pages.get(request_id, 0):
            return
        blocks = self.manager.req_to_blocks.get(request_id, ())
        for block in blocks[: num_computed_tokens // self.sched.block_size]:
            if block.block_hash is not None:
                self.written[block.block_id] = block.block_hash

    def unwritten(self) -> list[int]:
        """Call between steps: records the running requests' computed blocks
        (``_record``; ending or preempted requests are recorded as vLLM frees
        their blocks), then returns the cached blocks not recorded under the
        hash they have now -- blocks vLLM cached for tokens no forward pass
        computed (vLLM 0.32's preempt-after-cache case,
        ``KVCompressScheduler._preempt_request``)."""
        for request_id in list(self.manager.req_to_blocks):
            request = self.sched.requests.get(request_id)
            if request is not None:
                self._record(request_id, request.num_computed_tokens)
        return [b.block_id for b in self.pool.blocks
                if b.block_hash is not None and self.written.get(b.block_id) != b.block_hash]

    def restore(self) -> None:
        self.pool.get_new_blocks, self.manager.apply_eviction = self._get_new, self._apply
        self._kv_cache_manager.free = self._free
