"""A real ``KVCompressScheduler`` without an engine (shared by the tests).

vLLM's scheduler over a small fake KV pool (``LAYERS`` x ``HEADS`` KV heads,
block size ``BS``), driven by a fake model runner (``run_step``) that samples
token 7 whenever a request's tokens are all computed.  ``run_step(sched,
forward)`` hands each ``SchedulerOutput`` to ``forward`` first, e.g. a real
``KVCompressWorkerState`` (``tests/test_scheduler_worker_fuzz.py``), and
returns what it reports to the scheduler with the model runner's output.
"""

import dataclasses

import torch

BS, LAYERS, HEADS = 16, 3, 2
LH = LAYERS * HEADS
PROTECTED, SINKS = 8, 2
HEAD_SIZE = 8


def engine_config(model_path, **engine_args):
    """A ``VllmConfig`` for the harness: rate 0.25, ``compress_to_admit``,
    64 tokens a step, 16 sequences; ``engine_args`` override ``EngineArgs``."""
    import pytest
    from vllm.engine.arg_utils import EngineArgs

    args = dict(
        model=model_path, enforce_eager=True, max_model_len=2048, block_size=BS,
        max_num_batched_tokens=64, max_num_seqs=16,
        additional_config={"kv_compress": {
            "rate": 0.25, "protected_window": PROTECTED, "sink_tokens": SINKS,
            "compress_to_admit": True}},
    )
    args.update(engine_args)
    with pytest.MonkeyPatch.context() as mp:
        if args.get("enable_prefix_caching"):
            # No CPU worker here: every request in our layout, so prefix caching
            # is accepted on any CPU (the layout check is test_config's).
            mp.setenv("KVCOMPRESS_CPU_PREFILL", "own")
        return EngineArgs(**args).create_engine_config()


def make_scheduler(vllm_config, num_blocks=40, budget=64, **config):
    """A ``KVCompressScheduler`` over ``num_blocks`` blocks, ``budget`` tokens
    a step; ``config`` replaces fields of its ``KVCompressConfig``.  Logs
    every eviction it plans in ``sched.plans_log``: (request id, tokens,
    prefill end, head-pages)."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from kvcompress_vllm.scheduler.kv_cache_manager import KVCompressSpec, register_kv_cache_spec
    from kvcompress_vllm.scheduler.scheduler import KVCompressScheduler

    register_kv_cache_spec()
    spec = KVCompressSpec(block_size=BS, num_kv_heads=HEADS, head_size=HEAD_SIZE, dtype=torch.float32)
    kv_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec([f"layer.{i}" for i in range(LAYERS)], spec)],
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    sched = KVCompressScheduler(vllm_config, kv_config, StructuredOutputManager(vllm_config),
                                block_size=BS)
    sched.max_num_scheduled_tokens = budget
    sched.kvc_config = dataclasses.replace(sched.kvc_config, **config)
    sched.kvc_metrics.enabled = True  # count compressions by trigger (no stats logger here)
    sched.plans_log = []
    original = sched.kvc_manager.apply_eviction

    def apply_eviction(request_id, num_pages, num_tokens, **kwargs):
        state = sched.kvc_requests[request_id]
        sched.plans_log.append((request_id, num_tokens, state.prefill_end, num_pages))
        return original(request_id, num_pages, num_tokens, **kwargs)

    sched.kvc_manager.apply_eviction = apply_eviction
    return sched


def add(sched, rid, prompt_len, max_tokens=50, **extra):
    """A request of tokens 100 .. 100 + prompt_len; ``extra``: its extra_args."""
    add_tokens(sched, rid, range(100, 100 + prompt_len), None, max_tokens, **extra)


def add_tokens(sched, rid, tokens, hasher, max_tokens=50, priority=0, **extra):
    """A request of ``tokens`` (``hasher``: vLLM's block hasher, needed with
    prefix caching)."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra or None)
    sched.add_request(Request(rid, list(tokens), params, None, block_hasher=hasher,
                              priority=priority))


def block_hasher():
    """vLLM's block hasher for ``BS``-token blocks (sha256)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    fn = get_hash_fn_by_name("sha256")
    init_none_hash(fn)
    return get_request_block_hasher(BS, fn)


def run_step(sched, forward=None):
    """schedule() + a fake forward; returns the SchedulerOutput.  ``forward``
    (given the output) runs before the scheduler sees the step's result and
    returns the worker's ``WorkerStats`` to attach, or None."""
    from vllm.v1.outputs import ModelRunnerOutput

    from kvcompress_vllm.plan import attach_stats

    out = sched.schedule()
    stats = forward(out) if forward is not None else None
    rids = list(out.num_scheduled_tokens)
    sampled = [
        [7] if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens else []
        for r in rids
    ]
    result = ModelRunnerOutput(req_ids=rids, req_id_to_index={r: i for i, r in enumerate(rids)},
                               sampled_token_ids=sampled)
    if stats is not None:
        attach_stats(result, stats)
    sched.update_from_output(out, result)
    return out
