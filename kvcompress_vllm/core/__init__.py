"""The contract the scheduler side and the worker side both import.

* ``geometry``: how many head-pages and blocks a request holds, per head and
  in total; page-table widths and their memory.  "How many pages does a
  request hold?" is answered here and nowhere else.
* ``policy``: which KVs may never be evicted (the protection rule, as a count
  for the scheduler and as a position mask for the worker), when a request is
  compressed, and how many pages it gives up.
* ``kvcompress_vllm.plan``: the messages between the two sides and their
  transport (a missing plan raises).

Block-aligned eviction is what makes one contract possible: every (layer, KV
head) evicts whole pages, so after ``E`` head-pages evicted over all heads of
a request with ``n`` tokens, head ``(l, h)`` holds ``n - k[l, h] * N`` KVs and
the request holds ``L*H*ceil(n/N) - E`` pages.  The scheduler needs only
``E``; the worker alone decides which heads give the pages up.  Under tensor
parallelism ``H`` is the rank's KV heads and every rank evicts the same ``E``.
"""

from kvcompress_vllm.core.geometry import PageGeometry, head_table_bytes, max_pages_per_head
from kvcompress_vllm.core.policy import (
    compressible_tokens,
    compression_due,
    pages_to_evict,
    protected_mask,
    shared_prefix_sinks,
    target_kvs_per_head,
)

__all__ = [
    "PageGeometry",
    "compressible_tokens",
    "compression_due",
    "head_table_bytes",
    "max_pages_per_head",
    "pages_to_evict",
    "protected_mask",
    "shared_prefix_sinks",
    "target_kvs_per_head",
]
