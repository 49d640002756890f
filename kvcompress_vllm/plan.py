"""Typed messages between the scheduler (EngineCore) and the worker.

``StepPlan`` rides on ``SchedulerOutput.kv_compress`` (scheduler -> worker),
``WorkerStats`` on ``ModelRunnerOutput.kv_compress_stats`` (worker ->
scheduler).  Both are plain picklable dataclasses.

Invariant the plan relies on (block-aligned eviction): every (layer, KV head)
evicts whole pages, so with ``n`` tokens in a request and ``E`` head-pages
evicted so far, head ``(l, h)`` holds ``n - k[l, h] * block_size`` KVs and the
request holds ``L*H*ceil(n / block_size) - E`` pages.  The scheduler therefore
knows every request's memory exactly, and the worker alone decides *which*
heads give up pages (it owns the attention metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvictionPlan:
    """Evict ``num_pages`` head-pages of one request, chosen jointly across all
    of its (layer, KV head) pairs, then release ``released_block_ids``."""

    req_id: str
    #: Head-pages to evict now (summed over all layers and KV heads).
    num_pages: int
    #: Tokens in the request's cache when planned (``num_computed_tokens``).
    num_tokens: int
    #: Pages the request holds after this eviction (scheduler's accounting).
    pages_after: int
    #: Tail blocks of the request returned to vLLM's pool in this step.  The
    #: worker moves live pages out of them before the step's forward pass.
    released_block_ids: tuple[int, ...]
    #: The newest ``protected_window`` and first ``sink_tokens`` tokens stay.
    protected_window: int
    sink_tokens: int
    #: Name of the scorer (``kvcompress_vllm.worker.scorers``).
    scorer: str


@dataclass
class StepPlan:
    """Everything KV-Compress adds to one ``SchedulerOutput``."""

    evictions: list[EvictionPlan] = field(default_factory=list)
    #: For requests that (re)start a prefill in this step: the number of
    #: tokens the prefill covers.  The last ``observation_window`` of them
    #: score the prompt KVs.
    prefill_ends: dict[str, int] = field(default_factory=dict)
    #: Ask the worker to report every request's page count (debug checks).
    report_pages: bool = False


@dataclass
class WorkerStats:
    """What the worker did for KV-Compress in one step."""

    pages_evicted: int = 0
    kvs_evicted: int = 0
    compactions: int = 0
    compaction_ms: float = 0.0
    pages_migrated: int = 0
    #: req_id -> pages in use, only when ``StepPlan.report_pages``.
    pages_in_use: dict[str, int] | None = None
