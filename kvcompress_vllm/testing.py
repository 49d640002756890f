"""Drive ``KVCompressWorkerState`` without an engine (tests and benchmarks).

``scheduler_output`` builds a real vLLM ``SchedulerOutput`` carrying the
plugin's ``StepPlan``, as the scheduler side would send it to the worker.
"""

from __future__ import annotations

from collections.abc import Iterable

from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

from kvcompress_vllm.plan import EvictionPlan, StepPlan


def scheduler_output(
    new: Iterable[tuple[str, list[int], int]] = (),
    cached: Iterable[tuple[str, list[int] | None]] = (),
    plans: Iterable[EvictionPlan] = (),
    scheduled: dict[str, int] | None = None,
    finished: Iterable[str] = (),
    prefill_ends: dict[str, int] | None = None,
    no_metric: Iterable[str] = (),
    stock_layout: Iterable[str] = (),
) -> SchedulerOutput:
    """``new``: (request id, block ids, prompt length) of newly scheduled
    requests; ``cached``: (request id, newly allocated block ids or None) of
    running ones; ``scheduled``: tokens per request this step."""
    new_reqs = [
        NewRequestData(req_id=rid, prompt_token_ids=[0] * plen, mm_features=[],
                       sampling_params=None, pooling_params=None, block_ids=(list(blocks),),
                       num_computed_tokens=0, lora_request=None)
        for rid, blocks, plen in new
    ]
    cached = list(cached)
    cr = CachedRequestData(
        req_ids=[c[0] for c in cached], resumed_req_ids=set(), new_token_ids=[],
        all_token_ids={}, new_block_ids=[(list(c[1]),) if c[1] else None for c in cached],
        num_computed_tokens=[0 for _ in cached], num_output_tokens=[0 for _ in cached],
    )
    scheduled = dict(scheduled or {})
    so = SchedulerOutput(
        scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cr, num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()), scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={}, finished_req_ids=set(finished), free_encoder_mm_hashes=[],
    )
    so.kv_compress = StepPlan(evictions=list(plans), prefill_ends=dict(prefill_ends or {}),
                              no_metric=set(no_metric), stock_layout=set(stock_layout))
    return so
