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
    #: Name of the scorer (``kvcompress_vllm.scorers``).
    scorer: str
    #: ``"joint"`` (variable pages per head) or ``"uniform"`` (same number of
    #: pages per head over the request's life).
    allocation: str = "joint"


@dataclass
class StepPlan:
    """Everything KV-Compress adds to one ``SchedulerOutput``."""

    evictions: list[EvictionPlan] = field(default_factory=list)
    #: For requests that (re)start a prefill in this step: the number of
    #: tokens the prefill covers.  The last ``observation_window`` of them
    #: score the prompt KVs.
    prefill_ends: dict[str, int] = field(default_factory=dict)
    #: Those of them whose attention metric is never read
    #: (``RequestPolicy.records_metric`` false): the worker records none.
    no_metric: set[str] = field(default_factory=set)
    #: Those of them that are never compressed (``RequestPolicy.compresses``
    #: false): nothing ever scores, moves or evicts their KVs, so the CPU
    #: worker keeps them in vLLM's own cache layout and attends them with
    #: vLLM's kernel (``attention.cpu_prefill``), as stock vLLM would.
    stock_layout: set[str] = field(default_factory=set)
    #: Ask the worker to report every request's page count (debug checks).
    report_pages: bool = False


#: Attribute names on vLLM's ``SchedulerOutput`` / ``ModelRunnerOutput``.
PLAN_ATTR = "kv_compress"
STATS_ATTR = "kv_compress_stats"


class MissingPlanError(RuntimeError):
    """A ``SchedulerOutput`` reached the worker without its ``StepPlan``."""


def attach_plan(scheduler_output, plan: "StepPlan") -> None:
    """Scheduler side: send ``plan`` with this step's output."""
    setattr(scheduler_output, PLAN_ATTR, plan)


def take_plan(scheduler_output) -> "StepPlan":
    """Worker side: the step's plan.  A missing plan is an error, never
    "evict nothing": the scheduler may already have handed the released
    blocks to other requests (e.g. an object rebuilt by
    ``dataclasses.replace`` drops the attribute)."""
    plan = getattr(scheduler_output, PLAN_ATTR, None)
    if not isinstance(plan, StepPlan):
        reqs = sorted(scheduler_output.num_scheduled_tokens)[:8]
        raise MissingPlanError(
            f"KV-Compress: SchedulerOutput for requests {reqs} carries no StepPlan "
            f"(got {type(plan).__name__}); the worker cannot know which blocks the "
            "scheduler released. Is KVCompressScheduler the engine's scheduler?"
        )
    return plan


def attach_stats(model_runner_output, stats: "WorkerStats") -> None:
    setattr(model_runner_output, STATS_ATTR, stats)


def read_stats(model_runner_output) -> "WorkerStats | None":
    """Scheduler side: the worker's stats (``None`` for outputs that did not
    come from a KV-Compress step, e.g. vLLM's shared empty output)."""
    return getattr(model_runner_output, STATS_ATTR, None)


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
