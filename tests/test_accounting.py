"""Scheduler-side page accounting and the compression policy."""

import dataclasses

import pytest

from kvcompress_vllm.config import KVCompressConfig, request_policy
from kvcompress_vllm.core import PageGeometry, pages_to_evict, target_kvs_per_head

GEOM = PageGeometry(block_size=16, pages_per_block=6)  # e.g. 3 layers x 2 KV heads


def policy(**kw):
    return request_policy(KVCompressConfig(**kw), None, GEOM.block_size)


def test_page_and_block_counts():
    assert GEOM.pages_in_use(33, 0) == 18 and GEOM.blocks_needed(33, 0) == 3
    assert GEOM.pages_in_use(33, 7) == 11 and GEOM.blocks_needed(33, 7) == 2
    assert GEOM.kept_kvs(33, 7) == 6 * 33 - 7 * 16


@pytest.mark.parametrize("rate", [0.125, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("n", [40, 100, 333, 2000])
def test_eviction_reaches_target_within_one_page_per_head(rate, n):
    p = policy(rate=rate, protected_window=8, sink_tokens=2)
    evicted = pages_to_evict(GEOM, p, n, 0)
    kept_per_head = GEOM.kept_kvs(n, evicted) / GEOM.pages_per_block
    target = target_kvs_per_head(p, n)
    limit = GEOM.max_evictable(n, 0, 8, 2)
    assert evicted <= limit
    if evicted < limit:  # not capped by the protected window
        assert target <= kept_per_head < target + GEOM.block_size
    # Idempotent: a second call right away evicts nothing more.
    assert pages_to_evict(GEOM, p, n, evicted) == 0


def test_decode_growth_is_recompressed_to_rate():
    p = policy(rate=0.25, protected_window=8, sink_tokens=0)
    n, evicted = 500, 0
    evicted += pages_to_evict(GEOM, p, n, evicted)
    for _ in range(10):
        n += GEOM.block_size
        evicted += pages_to_evict(GEOM, p, n, evicted)
    kept = GEOM.kept_kvs(n, evicted) / GEOM.pages_per_block
    assert target_kvs_per_head(p, n) <= kept < target_kvs_per_head(p, n) + GEOM.block_size


def test_protected_window_and_sinks_bound_evictions():
    p = policy(rate=0.01, protected_window=40, sink_tokens=4)
    # 60 tokens: only 16 compressible -> at most one page per head.
    assert pages_to_evict(GEOM, p, 60, 0) == GEOM.pages_per_block
    assert pages_to_evict(GEOM, p, 50, 0) == 0


def test_max_cache_tokens_budget():
    p = dataclasses.replace(policy(rate=1.0), max_cache_tokens=64)
    assert p.compresses
    evicted = pages_to_evict(GEOM, p, 400, 0)
    kept = GEOM.kept_kvs(400, evicted) / GEOM.pages_per_block
    assert 64 <= kept < 64 + GEOM.block_size


def test_rate_one_never_evicts():
    assert pages_to_evict(GEOM, policy(rate=1.0), 5000, 0) == 0


@pytest.mark.parametrize("seed", range(20))
def test_pages_to_evict_matches_the_definition_over_a_request_life(seed):
    """Random geometry and policy; a request grows by random steps and is
    compressed after each: the pages evicted equal the independent oracle
    (``policy_oracle``, written from the definitions), and the kept KVs never
    fall below the target nor exceed it by a page per head when not capped."""
    import random

    from policy_oracle import evict_now, target_per_head

    rng = random.Random(seed)
    bs = rng.choice([4, 16, 128])
    lh = rng.choice([1, 6, 90])
    geom = PageGeometry(block_size=bs, pages_per_block=lh)
    rate = rng.choice([0.05, 0.25, 0.5, 0.9, 1.0])
    protected = rng.choice([0, 3, 32])
    sinks = rng.choice([0, 1, 4])
    max_cache = rng.choice([None, None, protected + sinks + rng.randint(0, 3 * bs)])
    # Prefix caching: leading whole blocks other requests hold too (every
    # third seed none, as without prefix caching).
    shared = 0 if seed % 3 == 0 else bs * rng.randint(1, 4)
    p = dataclasses.replace(
        policy(rate=rate, protected_window=protected, sink_tokens=sinks), max_cache_tokens=max_cache
    )
    n, evicted = rng.randint(1, 5 * bs), 0
    for _ in range(30):
        got = pages_to_evict(geom, p, n, evicted, shared)
        assert got == evict_now(n, evicted, lh, bs, rate, protected, sinks, max_cache, shared), \
            (n, evicted)
        evicted += got
        kept = lh * n - evicted * bs
        target = lh * target_per_head(n, rate, protected, sinks, max_cache, shared)
        assert kept >= target - 1e-6
        capped = evicted == lh * (max(0, n - protected - max(sinks, shared)) // bs)
        if p.compresses and not capped:
            assert kept < target + lh * bs
        n += rng.choice([1, bs - 1, bs, 3 * bs + 1])
