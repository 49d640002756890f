"""Which blocks a compression may have changed, for prefix-caching tests."""


class BlockWatch:
    """Wraps a ``KVCompressScheduler``'s block pool and manager.

    ``dirty``: every block of a compressed request after its ``keep_cached``
    leading ones, until the pool hands the block out again (the worker may
    have changed it); ``keeps``: (request id, keep_cached) per compression;
    ``stale()``: blocks in the prefix cache that are dirty -- there must be
    none.  ``before(request_id, num_tokens)`` runs ahead of each compression.
    ``restore()`` unwraps."""

    def __init__(self, sched, before=None):
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

    def stale(self) -> list[int]:
        return [b.block_id for b in self.pool.blocks
                if b.block_hash is not None and b.block_id in self.dirty]

    def restore(self) -> None:
        self.pool.get_new_blocks, self.manager.apply_eviction = self._get_new, self._apply
