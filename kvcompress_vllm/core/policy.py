"""The compression policy: what may never be evicted, when a request is
compressed, and how many head-pages it gives up (pure functions).

The protection rule has two forms that must agree: a count for the
scheduler (``compressible_tokens``: the KVs outside the newest
``protected_window`` tokens and the first ``sink_tokens``) and a position mask
for the worker's scorers (``protected_mask``).  ``tests/test_scorers.py``
checks that evicting ``max_evictable`` pages never touches a protected KV.
"""

from __future__ import annotations

import math

from kvcompress_vllm.config import RequestPolicy
from kvcompress_vllm.core.geometry import PageGeometry


def compressible_tokens(num_tokens: int, protected_window: int, sink_tokens: int) -> int:
    """KVs per head that may be evicted: all but the newest
    ``protected_window`` tokens and the first ``sink_tokens``."""
    return max(0, num_tokens - protected_window - sink_tokens)


def protected_mask(positions, num_tokens: int, protected_window: int, sink_tokens: int):
    """Position mask (tensor in, bool tensor out) of the KVs that stay: the
    same rule as ``compressible_tokens``."""
    return (positions >= num_tokens - protected_window) | (positions < sink_tokens)


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


def target_kvs_per_head(policy: RequestPolicy, num_tokens: int, shared_prefix: int = 0) -> float:
    """Mean KVs per head the policy wants to keep for ``num_tokens`` tokens:
    ``rate * (n - protected - shared) + protected + shared``, capped by
    ``max_cache_tokens`` (never below the protected window plus the sinks or
    the shared prefix).  ``shared_prefix``: leading tokens whose blocks other
    requests hold too (prefix caching; ``shared_prefix_sinks``): kept, and
    not counted as compressible."""
    protected = min(num_tokens, policy.protected_window)
    shared = max(0, min(shared_prefix, num_tokens - protected))
    target = policy.rate * (num_tokens - protected - shared) + protected + shared
    if policy.max_cache_tokens is not None:
        floor = min(num_tokens, policy.protected_window + shared_prefix_sinks(policy, shared_prefix))
        target = min(target, max(policy.max_cache_tokens, floor))
    return target


def shared_prefix_sinks(policy: RequestPolicy, shared_prefix: int) -> int:
    """The leading tokens no compression of the request may touch: its sinks,
    or its shared prefix where that is longer."""
    return max(policy.sink_tokens, shared_prefix)


def pages_to_evict(
    geometry: PageGeometry, policy: RequestPolicy, num_tokens: int, evicted: int,
    shared_prefix: int = 0,
) -> int:
    """Head-pages to evict now to bring the request down to its target.

    Rounds down (never keeps fewer KVs than the target) and never exceeds what
    is evictable outside the protected window and the sinks (or the shared
    prefix, ``target_kvs_per_head``).
    """
    if not policy.compresses:
        return 0
    excess = geometry.kept_kvs(num_tokens, evicted) - (
        geometry.pages_per_block * target_kvs_per_head(policy, num_tokens, shared_prefix)
    )
    want = math.floor(excess / geometry.block_size) if excess > 0 else 0
    limit = geometry.max_evictable(
        num_tokens, evicted, policy.protected_window, shared_prefix_sinks(policy, shared_prefix)
    )
    return max(0, min(want, limit))
