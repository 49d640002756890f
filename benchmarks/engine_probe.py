"""Per-step instrumentation of an in-process vLLM engine (shared by the benchmarks).

``probe(llm)`` wraps the scheduler's ``schedule`` so that every step records
its start time, running/waiting counts, prefill vs decode tokens, preemptions
and KV-cache usage, and counts the preemptions of each request.  Works for vLLM's own scheduler and KVCompressScheduler
alike, so stock and plugin runs are measured the same way.  Requires
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (EngineCore in this process).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field


@dataclass
class StepRecord:
    start: float
    running: int
    waiting: int
    prefill_tokens: int
    decode_tokens: int
    preempted: int
    kv_usage: float
    schedule_s: float = 0.0  # time spent in schedule() itself


@dataclass
class EngineProbe:
    steps: list[StepRecord] = field(default_factory=list)
    end: float = 0.0
    #: engine-core request id -> times it was preempted
    preempted: collections.Counter = field(default_factory=collections.Counter)

    def summary(self) -> dict:
        """Aggregate figures; step durations are start-to-next-start."""
        if not self.steps:
            return {}
        starts = [s.start for s in self.steps] + [self.end or time.perf_counter()]
        prefill_s = decode_s = 0.0
        for rec, t0, t1 in zip(self.steps, starts, starts[1:]):
            if rec.prefill_tokens:
                prefill_s += t1 - t0
            else:
                decode_s += t1 - t0
        busy = [s for s in self.steps if s.prefill_tokens or s.decode_tokens]
        return {
            "steps": len(self.steps),
            "peak_running": max(s.running for s in self.steps),
            "mean_running_decode": (
                sum(s.running for s in busy if not s.prefill_tokens)
                / max(1, sum(1 for s in busy if not s.prefill_tokens))
            ),
            "preemptions": sum(s.preempted for s in self.steps),
            "scheduled_tokens": sum(s.prefill_tokens + s.decode_tokens for s in self.steps),
            "peak_kv_usage": max(s.kv_usage for s in self.steps),
            "mean_kv_usage": sum(s.kv_usage for s in busy) / max(1, len(busy)),
            "prefill_s": prefill_s,
            "decode_s": decode_s,
        }


def probe(llm) -> EngineProbe:
    core = llm.llm_engine.engine_core
    engine_core = getattr(core, "engine_core", None)
    if engine_core is None:
        raise RuntimeError("engine_probe needs VLLM_ENABLE_V1_MULTIPROCESSING=0")
    scheduler = engine_core.scheduler
    record = EngineProbe()
    original = scheduler.schedule

    def schedule(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        prefill = decode = 0
        for rid, n in out.num_scheduled_tokens.items():
            req = scheduler.requests[rid]
            # After scheduling, num_computed_tokens already includes this step.
            if req.num_computed_tokens - n < req.num_tokens - 1:
                prefill += n
            else:
                decode += n
        record.preempted.update(out.preempted_req_ids or ())
        record.steps.append(
            StepRecord(
                start=start,
                running=len(scheduler.running),
                waiting=len(scheduler.waiting),
                prefill_tokens=prefill,
                decode_tokens=decode,
                preempted=len(out.preempted_req_ids or ()),
                kv_usage=scheduler.kv_cache_manager.usage,
                schedule_s=time.perf_counter() - start,
            )
        )
        return out

    scheduler.schedule = schedule
    return record
