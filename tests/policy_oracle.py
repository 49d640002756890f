"""Independent statement of the compression policy, for tests.

Written from the README's definitions, not from
``kvcompress_vllm.core.policy``: a request of ``n`` tokens over
``lh`` (layer, KV head) pairs keeps on average ``rate * (n - protected) +
protected`` KVs per head (capped by ``max_cache_tokens``); eviction removes
whole pages of ``bs`` KVs, never so many that fewer than that target remain,
and never a KV of the protected window or the sinks.  With prefix caching, a
leading ``shared`` tokens other requests hold too are kept like sinks and
are not compressible: the rate applies to the rest.
"""


def target_per_head(n, rate, protected, sinks, max_cache=None, shared=0):
    window = min(n, protected)
    kept_prefix = max(0, min(shared, n - window))
    target = rate * (n - window - kept_prefix) + window + kept_prefix
    if max_cache is not None:
        target = min(target, max(max_cache, min(n, protected + max(sinks, shared))))
    return target


def evict_now(n, evicted, lh, bs, rate, protected, sinks, max_cache=None, shared=0):
    """Largest number of further pages to evict, found by counting up."""
    if rate >= 1.0 and max_cache is None:
        return 0
    per_head_evictable = max(0, n - protected - max(sinks, shared)) // bs  # whole pages only
    floor = lh * target_per_head(n, rate, protected, sinks, max_cache, shared)
    x = 0
    while (
        evicted + x + 1 <= lh * per_head_evictable
        and lh * n - (evicted + x + 1) * bs >= floor
    ):
        x += 1
    return x
