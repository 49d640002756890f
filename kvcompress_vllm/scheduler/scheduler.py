"""``KVCompressScheduler``: decides how many head-pages each request evicts
and returns whole blocks to vLLM's pool before admitting work.

Per step (``schedule``):

1. For every running request whose prompt is fully in the cache, the policy
   (``core.pages_to_evict``) computes how many head-pages to evict: once
   right after the prompt, then every ``compress_interval`` new tokens, and,
   when the next step would not fit (compress before preempting), at once
   for each whose compression frees a block for that step.  With
   ``compress_to_admit``, when the next waiting request does not fit, the
   running requests whose compression now would free the most blocks are
   compressed ahead of their interval, if together they free what it lacks.
2. ``KVCompressManager.apply_eviction`` records the eviction and frees the
   request's surplus tail blocks into the pool, so vLLM's own ``schedule``
   can hand them to other requests in this very step.
3. The plans travel to the worker with the ``SchedulerOutput``
   (``plan.attach_plan``; the worker's ``plan.take_plan`` raises if one is
   missing); the
   worker evicts, compacts and vacates the released blocks before the forward.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from kvcompress_vllm.compat import SUPPORTED_VLLM
from kvcompress_vllm.config import (
    KVCompressConfigError,
    RequestPolicy,
    active_config,
    request_policy,
)
from kvcompress_vllm.log import get_logger
from kvcompress_vllm.metrics import CompressionMetricsBuffer, compression_trigger, publish
from kvcompress_vllm.plan import EvictionPlan, StepPlan, attach_plan, read_stats
from kvcompress_vllm.core import (
    PageGeometry,
    compression_due,
    pages_to_evict,
    shared_prefix_sinks,
)
from kvcompress_vllm.scheduler.kv_cache_manager import KVCompressManager, KVCompressSpec

logger = get_logger(__name__)

LOG_INTERVAL_S = 10.0


@dataclass
class RequestCompression:
    """Scheduler-side compression state of one request."""

    policy: RequestPolicy
    #: ``num_tokens`` when the request's prefill (re)started (None: not
    #: scheduled since it was created or preempted).
    prefill_end: int | None = None
    #: ``num_computed_tokens`` at the last compression decision (None: none
    #: since the request's prefill (re)started).
    tokens_at_last_check: int | None = None
    compressions: int = 0
    pages_evicted_total: int = 0


@dataclass
class CompressionTotals:
    """Engine-wide counters (for logs and tests)."""

    compressions: int = 0
    pages_evicted: int = 0
    blocks_released: int = 0
    kvs_evicted: int = 0
    compaction_ms: float = 0.0
    pages_migrated: int = 0
    pressure_steps: int = 0
    #: Steps in which requests were compressed ahead of their interval so
    #: that a waiting request fits (``compress_to_admit``).
    admission_steps: int = 0
    preemptions: int = 0
    #: Blocks taken out of the prefix cache because a request was preempted
    #: before the forward pass wrote them (``_preempt_request``).
    unwritten_uncached: int = 0
    max_running: int = 0


class KVCompressScheduler(Scheduler):
    """vLLM's scheduler plus KV-Compress eviction planning."""

    def __init__(self, vllm_config, kv_cache_config, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        cfg = active_config(vllm_config)
        if cfg is None:
            raise RuntimeError(
                "KVCompressScheduler needs additional_config['kv_compress'] with "
                "compression enabled"
            )
        self.kvc_config = cfg
        # vLLM scheduler state read by the eviction planning (checked here so
        # that a vLLM without it fails at start-up, not in the first step).
        missing = [a for a in ("running", "max_num_active_reqs", "max_model_len",
                               "max_num_scheduled_tokens", "scheduler_reserve_full_isl",
                               "kv_holding_waiting", "num_waiting_for_streaming_input",
                               "pause_state", "adaptive_long_prefill_threshold",
                               "get_request_counts")
                   if not hasattr(self, a)]
        for owner, attr in (("kv_cache_manager", "watermark_blocks"),
                            ("scheduler_config", "enable_chunked_prefill"),
                            ("scheduler_config", "long_prefill_token_threshold"),
                            ("scheduler_config", "max_num_batched_tokens")):
            if not hasattr(getattr(self, owner, None), attr):
                missing.append(f"{owner}.{attr}")
        if not callable(getattr(getattr(self, "waiting", None), "peek_request", None)):
            missing.append("waiting.peek_request")
        if missing:
            raise RuntimeError(
                f"KVCompressScheduler: vLLM's Scheduler lacks {missing}; "
                f"kvcompress-vllm supports vLLM {SUPPORTED_VLLM}x"
            )
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, KVCompressSpec):
            raise RuntimeError(
                "KV-Compress supports exactly one full-attention KV-cache group; "
                f"got {[type(g.kv_cache_spec).__name__ for g in groups]}"
            )
        spec = groups[0].kv_cache_spec
        if self.cache_config.enable_prefix_caching and self.hash_block_size != spec.block_size:
            # Hits inside a block would need vLLM's copy-on-write of a shared
            # block, which the plugin's block accounting does not do.
            raise RuntimeError(
                f"KV-Compress with prefix caching needs prefix-cache hashes per block "
                f"({spec.block_size} tokens); vLLM hashes every {self.hash_block_size}"
            )
        self.geometry = PageGeometry(
            block_size=spec.block_size,
            pages_per_block=len(groups[0].layer_names) * spec.num_kv_heads,
        )
        (manager,) = self.kv_cache_manager.coordinator.single_type_managers
        if not isinstance(manager, KVCompressManager):
            raise RuntimeError(f"expected KVCompressManager, got {type(manager).__name__}")
        manager.geometry = self.geometry
        self.kvc_manager = manager
        self.kvc_requests: dict[str, RequestCompression] = {}
        self.kvc_totals = CompressionTotals()
        #: Per-step deltas for the Prometheus metrics (``metrics.py``).
        self.kvc_metrics = CompressionMetricsBuffer(enabled=bool(self.log_stats))
        self._kvc_last_log = time.monotonic()

    # ------------------------------------------------------------------
    def _compression_state(self, request: Request) -> RequestCompression:
        state = self.kvc_requests.get(request.request_id)
        if state is None:
            params = request.sampling_params
            extra = params.extra_args if params is not None else None
            try:
                policy = request_policy(self.kvc_config, extra, self.geometry.block_size)
            except KVCompressConfigError as e:
                # The frontend validates these and answers 400; a request that
                # slipped through (e.g. a direct EngineCore client) gets the
                # server's settings, neither more cache nor less.
                logger.error(
                    "request %s: invalid KV-Compress extra_args %r (%s); it runs with "
                    "the server's KV-Compress settings",
                    request.request_id,
                    extra,
                    e,
                )
                policy = request_policy(self.kvc_config, None, self.geometry.block_size)
            if getattr(request, "resumable", False) and policy.compresses:
                # A streaming-input session keeps its blocks between turns and
                # comes back as a new request that holds them: its cache must
                # still be laid out as it was computed, i.e. never compressed.
                logger.warning(
                    "request %s is a streaming-input session: KV-Compress keeps its cache "
                    "uncompressed", request.request_id)
                policy = dataclasses.replace(policy, rate=1.0, max_cache_tokens=None)
            state = RequestCompression(policy=policy)
            self.kvc_requests[request.request_id] = state
        return state

    def _shared_prefix(self, request_id: str, policy: RequestPolicy,
                       awaited: frozenset[int] = frozenset(),
                       second_use: bool = True) -> tuple[int, int]:
        """(tokens, blocks) of the request's leading blocks a compression
        must leave intact: with prefix caching, its hits and blocks up to the
        last one other requests hold too, the next waiting request hits
        (``awaited``, block ids) or another request's compression took out of
        the cache before (their second use; ``KVCompressManager.shared_prefix_blocks``),
        and those wholly inside its sinks, all of which stay cached; (0, 0)
        without.  A second use is kept only with ``second_use`` (nothing
        waits for blocks: ``_plan_evictions``) and for a request without a
        ``max_cache_tokens`` cap: it holds those blocks alone, for requests
        that may come."""
        if not self.kvc_manager.enable_caching:
            return 0, 0
        second_use = second_use and policy.max_cache_tokens is None
        blocks = max(self.kvc_manager.shared_prefix_blocks(request_id, awaited, second_use),
                     policy.sink_tokens // self.geometry.block_size)
        return blocks * self.geometry.block_size, blocks

    def _next_admitted(self) -> Request | None:
        """The waiting request vLLM tries to admit next, where that is the
        head of ``waiting``: None when no request waits, no more may run
        (paused streaming sessions hold slots too), new requests are paused,
        requests that hold blocks (``kv_holding_waiting``) go first, or the
        head waits for something else (grammar, remote KVs, streamed input)."""
        if (not self.waiting or self.kv_holding_waiting
                or self.pause_state != PauseState.UNPAUSED
                or len(self.running) + self.num_waiting_for_streaming_input
                >= self.max_num_active_reqs):
            return None
        request = self.waiting.peek_request()
        return None if self._is_blocked_waiting_status(request.status) else request

    def _awaited_hit(self) -> list[KVCacheBlock]:
        """The prefix-cache hit (leading cached blocks) of the request vLLM
        admits next (``_next_admitted``), by vLLM's own lookup without its
        statistics; [] without prefix caching or such a request.  This
        step's compressions keep these blocks (``_shared_prefix``), so the hit
        is still there when vLLM admits the request."""
        request = self._next_admitted()
        manager = self.kv_cache_manager
        if request is None or not manager.prefix_cache_lookup_enabled(request):
            return []
        hit, _, _ = manager.coordinator.find_longest_cache_hit(
            request.block_hashes, request.num_tokens - 1)
        return hit[0]

    def _step_budget(self) -> int:
        """Tokens vLLM's ``schedule`` may hand out in a step: its token budget
        and its input budget (the same unless ``max_num_scheduled_tokens``
        is set; no draft slots: speculative decoding is refused)."""
        return min(self.max_num_scheduled_tokens, self.scheduler_config.max_num_batched_tokens)

    def _step_tokens(self) -> dict[str, int]:
        """Tokens each running request computes in the next step, as vLLM's
        ``schedule`` hands them out: in running order from the step's budget
        (``_step_budget``; none while paused), a prefill chunk capped by the
        long-prefill threshold (vLLM's rule: only with more than one request,
        adaptive if so configured), a decode one token.  Requests the budget does not
        reach are absent.  Not modelled (rare, and each only moves tokens
        between requests or drops one): the cap at ``max_model_len`` and the
        prefills data-parallel prefill balancing defers."""
        budget = 0 if self.pause_state == PauseState.PAUSED_ALL else self._step_budget()
        num_running, num_waiting = self.get_request_counts()
        eligible = num_running + num_waiting
        threshold = self.scheduler_config.long_prefill_token_threshold if eligible > 1 else 0
        if threshold > 0 and self.adaptive_long_prefill_threshold:
            threshold = max(threshold, self.scheduler_config.max_num_batched_tokens // eligible)
        tokens: dict[str, int] = {}
        for request in self.running:
            if budget <= 0:
                break
            new = max(request.num_tokens - request.num_computed_tokens, 1)
            if 0 < threshold < new:
                new = threshold
            new = min(new, budget)
            tokens[request.request_id] = new
            budget -= new
        return tokens

    def _next_step_demand(self, step_tokens: dict[str, int] | None = None) -> int:
        """Blocks the running requests need for their next tokens
        (``step_tokens``: ``_step_tokens``, computed when not given)."""
        if step_tokens is None:
            step_tokens = self._step_tokens()
        demand = 0
        for request in self.running:
            rid = request.request_id
            new = step_tokens.get(rid)
            if new is None:
                break  # past the step's budget, as every later one
            n = request.num_computed_tokens
            evicted = self.kvc_manager.evicted_pages.get(rid, 0)
            need = self.geometry.blocks_needed(n + new, evicted)
            demand += max(0, need - len(self.kvc_manager.req_to_blocks.get(rid, ())))
        return demand

    def _admission_shortfall(self, free: int, demand: int, hit: list[KVCacheBlock],
                             step_tokens: dict[str, int] | None = None) -> int:
        """Blocks the next waiting request lacks to be admitted in this step,
        after the running requests' next tokens (``step_tokens``, needing
        ``demand`` blocks); 0 when none waits, it fits, no more requests may
        run, or the running requests leave it no tokens of this step's
        budget.  Mirrors vLLM's admission: the whole uncompressed sequence
        must fit (``scheduler_reserve_full_isl``; otherwise the chunk the
        budget leaves after its prefix-cache ``hit``), less the hit blocks
        running requests hold (a hit on a free cached block still takes a
        free block), plus the watermark once anything runs."""
        request = self._next_admitted()
        if request is None:
            return 0
        if step_tokens is None:
            step_tokens = self._step_tokens()
        left = self._step_budget() - sum(step_tokens.values())
        computed = max(request.num_computed_tokens, len(hit) * self.geometry.block_size)
        if left <= 0 or (
            not self.scheduler_config.enable_chunked_prefill
            and request.num_tokens - computed > left
        ):
            return 0
        if self.scheduler_reserve_full_isl:
            tokens = min(request.num_tokens, self.max_model_len)
        else:
            tokens = computed + min(request.num_tokens - computed, left)
        held = sum(1 for block in hit if block.ref_cnt > 0)
        watermark = self.kv_cache_manager.watermark_blocks if self.running else 0
        return max(0, self.geometry.blocks_needed(tokens, 0) - held + watermark + demand - free)

    def _admission_compressions(self, shortfall: int, step_tokens: dict[str, int],
                                awaited: frozenset[int], second_use: bool) -> set[str]:
        """Running requests to compress ahead of their interval so that
        ``shortfall`` more blocks are free: what the compressions due in this
        step anyway free counts first, then the largest block gains (the
        exact gain: blocks held plus needed for the next step, before minus
        after), and none unless together they cover it (a compression that
        admits no one would only run early)."""
        if shortfall <= 0:
            return set()
        gains: list[tuple[int, str]] = []
        for request in self.running:
            state = self.kvc_requests.get(request.request_id)
            if state is None or not state.policy.compresses:
                continue
            n = request.num_computed_tokens
            due = self._due(state, n)
            if not due[True]:
                continue  # not scorable yet
            rid = request.request_id
            evicted = self.kvc_manager.evicted_pages.get(rid, 0)
            shared, _ = self._shared_prefix(rid, state.policy, awaited, second_use)
            pages = pages_to_evict(self.geometry, state.policy, n, evicted, shared)
            gain = self._block_gain(n + step_tokens.get(rid, 0), evicted, pages)
            if due[False]:
                shortfall -= gain  # compressed in this step anyway
            elif gain > 0:
                gains.append((gain, rid))
        if shortfall <= 0:
            return set()
        gains.sort(key=lambda g: -g[0])  # stable: ties in running order
        chosen: set[str] = set()
        for gain, rid in gains:
            if shortfall <= 0:
                break
            chosen.add(rid)
            shortfall -= gain
        return chosen if shortfall <= 0 else set()

    @staticmethod
    def _due(state: RequestCompression, num_computed: int) -> dict[bool, bool]:
        """``compression_due`` of a request without pressure (its interval,
        or right after its prompt: ``[False]``) and with it (scorable at
        all: ``[True]``)."""
        return {
            pressure: compression_due(
                num_computed=num_computed,
                prefill_end=state.prefill_end,
                last_check=state.tokens_at_last_check,
                interval=state.policy.compress_interval,
                pressure=pressure,
            )
            for pressure in (False, True)
        }

    def _block_gain(self, upto: int, evicted: int, pages: int) -> int:
        """Blocks a request with ``evicted`` pages, holding ``upto`` tokens
        after its next step, needs fewer when it evicts ``pages`` more."""
        return (self.geometry.blocks_needed(upto, evicted)
                - self.geometry.blocks_needed(upto, evicted + pages))

    def _plan_evictions(self) -> list[EvictionPlan]:
        free = self.kv_cache_manager.block_pool.get_num_free_blocks()
        step_tokens = self._step_tokens()
        demand = self._next_step_demand(step_tokens)
        pressure = free < demand

        @functools.cache
        def awaited() -> tuple[list[KVCacheBlock], frozenset[int]]:
            """The next admitted request's hit and its block ids, looked up
            when first needed.  Empty under pressure: vLLM admits nobody in a
            step it preempts in, so keeping the hit would only free fewer blocks."""
            hit = [] if pressure else self._awaited_hit()
            return hit, frozenset(block.block_id for block in hit)

        @functools.cache
        def shortfall() -> int:
            """Blocks the next admitted request lacks (0: none waits, or it fits)."""
            return self._admission_shortfall(free, demand, awaited()[0], step_tokens)

        def second_use() -> bool:
            """Whether compressions keep prefixes in their second use (held
            alone, for requests that may come): only while nothing waits for
            blocks -- no pressure, and the next admitted request, if any, fits."""
            return not pressure and shortfall() <= 0

        admit: set[str] = set()
        if pressure:
            self.kvc_totals.pressure_steps += 1
        elif self.kvc_config.compress_to_admit:
            admit = self._admission_compressions(shortfall(), step_tokens, awaited()[1],
                                                 second_use())
            self.kvc_totals.admission_steps += bool(admit)
        plans: list[EvictionPlan] = []
        for request in self.running:
            state = self.kvc_requests.get(request.request_id)
            if state is None or not state.policy.compresses:
                continue  # not scheduled yet (no prefill_end), or never compressed
            policy = state.policy
            n = request.num_computed_tokens
            rid = request.request_id
            ahead = rid in admit
            due = self._due(state, n)
            if not (due[False] or (due[True] and (pressure or ahead))):
                continue
            evicted = self.kvc_manager.evicted_pages.get(rid, 0)
            shared, shared_blocks = self._shared_prefix(rid, policy, awaited()[1], second_use())
            num_pages = pages_to_evict(self.geometry, policy, n, evicted, shared)
            if not (due[False] or ahead) and not self._block_gain(
                    n + step_tokens.get(rid, 0), evicted, num_pages):
                continue  # pressure, but compressing it now would free no block
            trigger = compression_trigger(
                last_check=state.tokens_at_last_check,
                due_without_pressure=due[False],
                ahead="admission" if ahead else "pressure",
            )
            state.tokens_at_last_check = n
            if num_pages == 0:
                continue
            released = self.kvc_manager.apply_eviction(rid, num_pages, n,
                                                       keep_cached=shared_blocks)
            self.kvc_metrics.record_compression(
                trigger, num_pages, len(released), first=state.compressions == 0
            )
            state.compressions += 1
            state.pages_evicted_total += num_pages
            self.kvc_totals.compressions += 1
            self.kvc_totals.pages_evicted += num_pages
            self.kvc_totals.blocks_released += len(released)
            plans.append(
                EvictionPlan(
                    req_id=rid,
                    num_pages=num_pages,
                    num_tokens=n,
                    pages_after=self.geometry.pages_in_use(n, evicted + num_pages),
                    released_block_ids=tuple(released),
                    protected_window=policy.protected_window,
                    sink_tokens=shared_prefix_sinks(policy, shared),
                    scorer=policy.scorer,
                    allocation=policy.allocation,
                )
            )
        self.kvc_manager.record_uncached()
        return plans

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        plans = self._plan_evictions()
        output = super().schedule(*args, **kwargs)
        # A request preempted by vLLM in this step lost all its blocks; the
        # worker drops its state, so its plan must not reach the worker.
        plans = [
            p
            for p in plans
            if (r := self.requests.get(p.req_id)) is not None
            and r.status == RequestStatus.RUNNING
        ]
        # Requests whose prefill (re)starts in this step: the prefill covers
        # every token they have now; they become scorable once it is computed.
        prefill_ends: dict[str, int] = {}
        no_metric: set[str] = set()
        stock_layout: set[str] = set()
        restarted = [r.req_id for r in output.scheduled_new_reqs]
        restarted += output.scheduled_cached_reqs.resumed_req_ids
        for rid in restarted:
            request = self.requests[rid]
            state = self._compression_state(request)
            state.prefill_end = prefill_ends[rid] = request.num_tokens
            state.tokens_at_last_check = None
            if not state.policy.records_metric:
                no_metric.add(rid)
            if not state.policy.compresses:
                stock_layout.add(rid)
        attach_plan(
            output,
            StepPlan(
                evictions=plans,
                prefill_ends=prefill_ends,
                no_metric=no_metric,
                stock_layout=stock_layout,
                report_pages=self.kvc_config.debug_checks,
            ),
        )
        self.kvc_totals.max_running = max(self.kvc_totals.max_running, len(self.running))
        return output

    # ------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output):
        stats = read_stats(model_runner_output)
        if stats is not None:
            self.kvc_totals.kvs_evicted += stats.kvs_evicted
            self.kvc_totals.compaction_ms += stats.compaction_ms
            self.kvc_totals.pages_migrated += stats.pages_migrated
            self.kvc_metrics.record_worker_step(stats)
            if stats.pages_in_use is not None:
                self._check_worker_pages(stats.pages_in_use, scheduler_output.num_scheduled_tokens)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._maybe_log()
        return outputs

    def make_stats(self, *args: Any, **kwargs: Any):
        stats = super().make_stats(*args, **kwargs)
        publish(stats, self.kvc_metrics)  # SchedulerStats.kv_connector_stats["kv_compress"]
        return stats

    def _check_worker_pages(self, worker_pages: dict[str, int], scheduled: dict[str, int]) -> None:
        """Scheduler and worker must agree on every request's page count, and
        the worker must hold every request this step scheduled."""
        missing = sorted(rid for rid in scheduled if rid not in worker_pages and rid in self.requests)
        if missing:
            raise RuntimeError(
                f"KV-Compress accounting mismatch: the worker holds no pages for requests "
                f"{missing[:8]} ({len(missing)} of {len(scheduled)} scheduled this step)"
            )
        for rid, pages in worker_pages.items():
            request = self.requests.get(rid)
            if request is None:
                continue
            expected = self.kvc_manager.pages_in_use(rid, request.num_computed_tokens)
            if expected != pages:
                raise RuntimeError(
                    f"KV-Compress accounting mismatch for request {rid}: scheduler "
                    f"expects {expected} pages, worker holds {pages}"
                )

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._kvc_last_log < LOG_INTERVAL_S or not self.kvc_totals.compressions:
            return
        self._kvc_last_log = now
        t = self.kvc_totals
        logger.info(
            "KV-Compress: %d compressions, %d head-pages evicted, %d blocks "
            "released, %d pages migrated, compaction %.1f ms total, KV usage %.1f%%",
            t.compressions,
            t.pages_evicted,
            t.blocks_released,
            t.pages_migrated,
            t.compaction_ms,
            100.0 * self.kv_cache_manager.usage,
        )

    def request_compression_summary(self, request: Request) -> dict[str, Any]:
        """Per-request figures reported in ``RequestOutput.kv_transfer_params``."""
        rid = request.request_id
        state = self.kvc_requests.get(rid)
        n = request.num_computed_tokens
        evicted = self.kvc_manager.evicted_pages.get(rid, 0)
        total = self.geometry.pages_per_block * n
        kept = self.geometry.kept_kvs(n, evicted)
        return {
            "tokens": n,
            "kvs_total": total,
            "kvs_kept": kept,
            "kept_fraction": (kept / total) if total else 1.0,
            "pages_evicted": state.pages_evicted_total if state else 0,
            "compressions": state.compressions if state else 0,
            # vLLM's own count (``Scheduler._preempt_request``)
            "preemptions": request.num_preemptions,
            "rate": state.policy.rate if state else self.kvc_config.rate,
            "scorer": state.policy.scorer if state else self.kvc_config.scorer,
            "allocation": state.policy.allocation if state else self.kvc_config.allocation,
        }

    def _connector_finished(self, request: Request):
        delay_free, params = super()._connector_finished(request)
        summary = {"kv_compress": self.request_compression_summary(request)}
        self.kvc_metrics.record_finished(summary["kv_compress"])
        params = {**(params or {}), **summary}
        return delay_free, params

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # With --scheduling-policy priority vLLM may preempt a request it has
        # already scheduled in this step, after allocate_slots put the blocks
        # for the step's tokens in the prefix cache; the forward pass then
        # never writes them, but their hashes stay, and a later request (or
        # this one, resumed) would hit blocks holding another tenant's KVs.
        # Take them out of the cache (vLLM 0.32 does not; see the upstream PR
        # vllm-project/vllm#43569).  num_computed_tokens still counts only
        # tokens computed before this step (vLLM adds the step's in
        # _update_after_schedule).
        # (Without prefix caching no block has a hash: the set is empty.)
        unwritten = self.kvc_manager.cached_past(request.request_id, request.num_computed_tokens)
        super()._preempt_request(request, *args, **kwargs)
        if unwritten:
            self.kv_cache_manager.block_pool.evict_blocks(unwritten)
            self.kvc_totals.unwritten_uncached += len(unwritten)
        self.kvc_totals.preemptions += 1
        # Preemption frees every block; the resumed request recomputes its
        # whole cache uncompressed and is compressed again after that prefill.
        state = self.kvc_requests.get(request.request_id)
        if state is not None:
            state.prefill_end = None
            state.tokens_at_last_check = None

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        """vLLM's reset; once it succeeded, the record of prefixes that
        compressions took out of the cache goes too (``KVCompressManager.record_uncached``)."""
        reset = super().reset_prefix_cache(*args, **kwargs)
        if reset:
            self.kvc_manager.forget_uncached()
        return reset

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        result = super()._free_request(request, delay_free_blocks)
        self.kvc_requests.pop(request.request_id, None)
        return result
