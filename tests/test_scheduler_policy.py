"""``KVCompressScheduler`` without an engine: a real vLLM scheduler over a
small fake KV pool (3 layers x 2 KV heads, block size 16), driven by a fake
model runner that samples one token whenever a request's tokens are all
computed (``tests/sched_harness.py``).  Covers when requests are compressed (chunk boundaries, resumed
requests, the interval, memory pressure, compression ahead of the interval so
that a waiting request fits), ``_next_step_demand`` and, in a randomized run
with preemptions, the block accounting after every step.
"""

import random

import pytest

from policy_oracle import evict_now
from sched_harness import (
    BS, LH, PROTECTED, SINKS, add, add_tokens, block_hasher, engine_config, make_scheduler,
    run_step,
)


@pytest.fixture(scope="module")
def vllm_config(model_path):
    return engine_config(model_path)


def test_chunk_ending_one_token_short_is_not_compressed(vllm_config):
    sched = make_scheduler(vllm_config, budget=64)
    add(sched, "a", 65)  # chunks 64 + 1: the first ends at prompt_len - 1
    out = run_step(sched)
    request = sched.requests["a"]
    assert request.num_computed_tokens == 64 == request.num_tokens - 1
    out = run_step(sched)  # looks like a decoding request, but is not
    assert out.kv_compress.evictions == [] and out.num_scheduled_tokens == {"a": 1}
    out = run_step(sched)  # prompt complete -> compressed now
    assert [(p.req_id, p.num_tokens) for p in out.kv_compress.evictions] == [("a", 65)]
    assert out.kv_compress.evictions[0].num_pages == evict_now(65, 0, LH, BS, 0.25, PROTECTED, SINKS)


def test_debug_checks_flag_a_scheduled_request_the_worker_does_not_hold(vllm_config):
    """``debug_checks``: the worker's page report must cover every request
    the step scheduled, with the page count the scheduler expects."""
    sched = make_scheduler(vllm_config, budget=64)
    add(sched, "a", 40)
    add(sched, "b", 20)
    out = run_step(sched)
    expected = {rid: sched.kvc_manager.pages_in_use(rid, sched.requests[rid].num_computed_tokens)
                for rid in ("a", "b")}
    sched._check_worker_pages(expected, out.num_scheduled_tokens)  # agreement passes
    with pytest.raises(RuntimeError, match=r"holds no pages for requests \['b'\] \(1 of 2"):
        sched._check_worker_pages({"a": expected["a"]}, out.num_scheduled_tokens)
    with pytest.raises(RuntimeError, match="request a: scheduler expects"):
        sched._check_worker_pages({**expected, "a": expected["a"] + 1}, out.num_scheduled_tokens)


def test_plan_names_requests_whose_metric_is_never_read(vllm_config):
    sched = make_scheduler(vllm_config, budget=64)
    add(sched, "metric", 20, kv_compress_scorer="kvcompress")
    add(sched, "off", 20, kv_compress_rate=1.0, kv_compress_scorer="kvcompress")
    add(sched, "default", 20)  # the default scorer, keydiff: no metric
    out = run_step(sched)
    assert set(out.kv_compress.prefill_ends) == {"metric", "off", "default"}
    assert out.kv_compress.no_metric == {"off", "default"}
    # Only the never-compressed request keeps vLLM's own cache layout
    # (max_cache_tokens makes a request compressible even at rate 1.0).
    assert out.kv_compress.stock_layout == {"off"}
    add(sched, "capped", 20, kv_compress_rate=1.0, max_cache_tokens=4000)
    out = run_step(sched)
    assert "capped" in out.kv_compress.prefill_ends and out.kv_compress.stock_layout == set()


def test_interval_and_pressure(vllm_config):
    """Compressions after the prompt and every `interval` tokens; under
    memory pressure one runs at once only where it frees a block for the
    step: here "a"'s would not (the rate-1 prompt that fills the pool is
    preempted instead), so "a" waits for its interval."""
    interval = 4 * BS
    sched = make_scheduler(vllm_config, num_blocks=40, budget=64, compress_to_admit=False,
                           compress_interval=interval)
    add(sched, "a", 60, max_tokens=300)
    for _ in range(3):
        run_step(sched)
    assert [p[0] for p in sched.plans_log] == ["a"]
    # Next compression once `interval` more tokens are in the cache, not before.
    n_first = sched.plans_log[0][1]
    while sched.requests["a"].num_computed_tokens < n_first + interval:
        assert len(sched.plans_log) == 1
        run_step(sched)
    run_step(sched)
    assert len(sched.plans_log) == 2 and sched.plans_log[1][1] == n_first + interval
    # Pressure: fill the pool with a prompt that is not compressed.
    free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    add(sched, "b", BS * free - 8, max_tokens=200, kv_compress_rate=1.0)
    manager = sched.kvc_manager
    for _ in range(interval):
        free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
        pressure = free < sched._next_step_demand()
        n, evicted = sched.requests["a"].num_computed_tokens, manager.evicted_pages["a"]
        pages = evict_now(n, evicted, LH, BS, 0.25, PROTECTED, SINKS)
        before = len(sched.plans_log)
        run_step(sched)
        if pressure:
            break
    else:
        pytest.fail("no memory pressure")
    assert pages > 0 and _blocks(n + 1, evicted) == _blocks(n + 1, evicted + pages)
    assert sched.plans_log[before:] == [] and sched.kvc_totals.pressure_steps == 1
    assert sched.kvc_totals.preemptions == 1 and sched.requests["b"].status.name == "PREEMPTED"
    # the per-request figures name it (kv_transfer_params["kv_compress"])
    assert sched.request_compression_summary(sched.requests["b"])["preemptions"] == 1
    assert sched.request_compression_summary(sched.requests["a"])["preemptions"] == 0
    while sched.requests["a"].num_computed_tokens < n_first + 2 * interval:
        run_step(sched)
    run_step(sched)
    assert [p[1] for p in sched.plans_log] == [n_first, n_first + interval, n_first + 2 * interval]


def _blocks(n, evicted):
    """Blocks a request of ``n`` tokens with ``evicted`` head-pages holds."""
    return -(-(LH * -(-n // BS) - evicted) // LH)


def _grown_request(vllm_config, num_blocks, hasher=None, **config):
    """A scheduler whose one running request "a" (rate 0.25, interval 96)
    has decoded past its prompt compression until compressing it now would
    free at least one block; returns (sched, gain in blocks, free - demand).
    ``hasher``: the block hasher (needed with prefix caching)."""
    sched = make_scheduler(vllm_config, num_blocks=num_blocks, budget=64,
                           compress_interval=96, **config)
    if hasher is None:
        add(sched, "a", 200, max_tokens=400)
    else:
        add_tokens(sched, "a", range(100, 300), hasher, max_tokens=400)
    while len(sched.plans_log) < 1:
        run_step(sched)
    last = sched.plans_log[-1][1]
    request = sched.requests["a"]
    while True:
        n = request.num_computed_tokens
        evicted = sched.kvc_manager.evicted_pages["a"]
        pages = evict_now(n, evicted, LH, BS, 0.25, PROTECTED, SINKS)
        gain = _blocks(n + 1, evicted) - _blocks(n + 1, evicted + pages)
        if gain >= 1:
            break
        run_step(sched)
        assert len(sched.plans_log) == 1 and n < last + 96, "no gain before the interval"
    free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    return sched, gain, free - sched._next_step_demand()


def test_under_pressure_a_compression_that_frees_a_block_runs_at_once(vllm_config):
    """"a" could free a block before its interval; a rate-1 prompt takes every
    spare block, and its first decode token needs one more: "a" is
    compressed at once (trigger "pressure") and nobody is preempted."""
    sched, gain, spare = _grown_request(vllm_config, 40, compress_to_admit=False)
    n0 = sched.requests["a"].num_computed_tokens
    add(sched, "b", BS * spare - 1, max_tokens=40, kv_compress_rate=1.0)
    pool = sched.kv_cache_manager.block_pool
    for _ in range(30):
        pressure = pool.get_num_free_blocks() < sched._next_step_demand()
        out = run_step(sched)
        if pressure:
            break
    else:
        pytest.fail("no memory pressure")
    assert [p.req_id for p in out.kv_compress.evictions] == ["a"]
    assert sched.requests["a"].num_computed_tokens < n0 + 96  # before its interval
    assert sched.kvc_metrics.compressions["pressure"] == 1
    assert sched.kvc_totals.preemptions == 0


def test_no_look_ahead_while_vllm_would_admit_no_one(vllm_config):
    """The request vLLM admits next (whose lack of blocks compressions may
    cover, and whose prefix-cache hit they keep): none while new requests
    are paused or paused streaming sessions hold the free slots, and no
    tokens at all while everything is paused."""
    from vllm.v1.core.sched.interface import PauseState

    sched = make_scheduler(vllm_config, budget=64)
    add(sched, "a", 20)
    run_step(sched)
    add(sched, "b", 20)
    assert sched._next_admitted().request_id == "b"
    sched.set_pause_state(PauseState.PAUSED_NEW)
    assert sched._next_admitted() is None and sched._step_tokens() == {"a": 1}
    sched.set_pause_state(PauseState.PAUSED_ALL)
    assert sched._next_admitted() is None and sched._step_tokens() == {}
    sched.set_pause_state(PauseState.UNPAUSED)
    sched.num_waiting_for_streaming_input = sched.max_num_active_reqs - 1
    assert sched._next_admitted() is None
    sched.num_waiting_for_streaming_input = sched.max_num_active_reqs - 2
    assert sched._next_admitted().request_id == "b"


def test_invalid_options_that_reach_the_scheduler_get_the_server_settings(vllm_config):
    """The frontend answers 400 to bad ``vllm_xargs``; a request that
    reaches the engine core with them anyway (a direct client) runs with the
    server's settings -- compressed at the server's rate, not left whole."""
    sched = make_scheduler(vllm_config, budget=64)
    add(sched, "bad", 60, kv_compress_rate=5)
    add(sched, "good", 60)
    for _ in range(3):
        run_step(sched)
    assert sched.kvc_requests["bad"].policy == sched.kvc_requests["good"].policy
    assert sched.kvc_requests["bad"].policy.rate == 0.25
    assert {p[0] for p in sched.plans_log} == {"bad", "good"}


@pytest.mark.parametrize("enabled", [True, False])
def test_compression_ahead_of_interval_admits_a_waiting_request(vllm_config, enabled):
    """A prompt that lacks exactly the blocks that compressing the running
    request now would free: with compress_to_admit that request is compressed
    ahead of its interval (trigger "admission") and the prompt is admitted in
    the same step; without it, neither."""
    sched, gain, spare = _grown_request(vllm_config, 40, compress_to_admit=enabled)
    n = sched.requests["a"].num_computed_tokens
    add(sched, "b", BS * (spare + gain), max_tokens=4, kv_compress_rate=1.0)
    out = run_step(sched)
    admitted = [r.req_id for r in out.scheduled_new_reqs]
    if enabled:
        assert [(p.req_id, p.num_tokens) for p in out.kv_compress.evictions] == [("a", n)]
        assert admitted == ["b"]
        assert sched.kvc_metrics.compressions["admission"] == 1
        assert sched.kvc_totals.admission_steps == 1
    else:
        assert out.kv_compress.evictions == [] and admitted == []
        assert sched.kvc_metrics.compressions["admission"] == 0


def test_no_compression_ahead_of_interval_that_would_not_admit(vllm_config):
    """One block more than the running request can free: it is not
    compressed early (that would admit no one), and the prompt waits."""
    sched, gain, spare = _grown_request(vllm_config, 40)
    add(sched, "b", BS * (spare + gain + 1), max_tokens=4, kv_compress_rate=1.0)
    out = run_step(sched)
    assert out.kv_compress.evictions == [] and out.scheduled_new_reqs == []
    assert sched.kvc_metrics.compressions["admission"] == 0


def test_no_compression_ahead_of_interval_when_the_budget_is_spent(vllm_config):
    """A running prefill takes the rest of this step's token budget: vLLM
    will admit no one, so the request that could free the blocks is not
    compressed early (it would be without the prefill: the first test)."""
    sched, _, _ = _grown_request(vllm_config, 80)
    add(sched, "p", 600, max_tokens=4, kv_compress_rate=1.0)
    run_step(sched)  # "p" admitted, its first chunk computed
    assert [r.request_id for r in sched.running] == ["a", "p"]
    n = sched.requests["a"].num_computed_tokens
    evicted = sched.kvc_manager.evicted_pages["a"]
    gain = _blocks(n + 1, evicted) - _blocks(
        n + 1, evicted + evict_now(n, evicted, LH, BS, 0.25, PROTECTED, SINKS))
    assert gain >= 1
    spare = sched.kv_cache_manager.block_pool.get_num_free_blocks() - sched._next_step_demand()
    add(sched, "b", BS * (spare + gain), max_tokens=4, kv_compress_rate=1.0)
    out = run_step(sched)
    assert out.num_scheduled_tokens["p"] == 64 - 1  # the budget less "a"'s token
    assert out.kv_compress.evictions == [] and out.scheduled_new_reqs == []


def test_admission_takes_the_largest_gain_first(vllm_config):
    """Two running requests, "c" (running second) able to free more blocks
    than "a": when the waiting prompt lacks what "c" alone frees, only "c" is
    compressed ahead of its interval."""
    sched = make_scheduler(vllm_config, num_blocks=60, budget=64, compress_interval=96)
    add(sched, "a", 200, max_tokens=400)
    add(sched, "c", 100, max_tokens=400, kv_compress_rate=0.1)
    manager = sched.kvc_manager

    def gain(rid, rate):
        n = sched.requests[rid].num_computed_tokens
        evicted = manager.evicted_pages.get(rid, 0)
        pages = evict_now(n, evicted, LH, BS, rate, PROTECTED, SINKS)
        return _blocks(n + 1, evicted) - _blocks(n + 1, evicted + pages)

    for _ in range(120):
        run_step(sched)
        done = {p[0] for p in sched.plans_log}
        if done == {"a", "c"} and gain("c", 0.1) >= 2 and gain("a", 0.25) >= 1:
            break
    else:
        pytest.fail(f"gains never reached: {sched.plans_log}")
    assert [r.request_id for r in sched.running] == ["a", "c"]
    assert gain("c", 0.1) > gain("a", 0.25)
    spare = sched.kv_cache_manager.block_pool.get_num_free_blocks() - sched._next_step_demand()
    add(sched, "b", BS * (spare + gain("c", 0.1)), max_tokens=4, kv_compress_rate=1.0)
    out = run_step(sched)
    assert [p.req_id for p in out.kv_compress.evictions] == ["c"]
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b"]


@pytest.mark.parametrize("threshold", [0, 16])
def test_next_step_demand_counts_blocks_for_the_next_tokens(vllm_config, monkeypatch, threshold):
    """The running requests share the step's token budget as vLLM hands it
    out (in running order; with a long-prefill threshold, prompts prefill
    side by side, each capped): the tokens ``_step_tokens`` expects are the
    ones vLLM schedules, and the demand counts their blocks, not a whole
    budget per prefilling request."""
    monkeypatch.setattr(vllm_config.scheduler_config, "long_prefill_token_threshold", threshold)
    sched = make_scheduler(vllm_config, num_blocks=80, budget=64)
    add(sched, "a", 40)
    for rid in "bcd":
        add(sched, rid, 150)
    manager = sched.kvc_manager
    side_by_side = 0
    for _ in range(8):
        tokens = sched._step_tokens()
        expected = 0
        for request in sched.running:
            new = tokens.get(request.request_id, 0)
            n = request.num_computed_tokens
            evicted = manager.evicted_pages.get(request.request_id, 0)
            if new:
                blocks = -(-(LH * -(-(n + new) // BS) - evicted) // LH)
                expected += max(0, blocks - len(manager.req_to_blocks[request.request_id]))
        assert sched._next_step_demand() == expected
        assert sum(tokens.values()) <= 64
        prefilling = [r for r in sched.running if r.num_tokens - r.num_computed_tokens > 1]
        side_by_side += len(prefilling) > 1
        out = run_step(sched)
        assert {r: out.num_scheduled_tokens[r] for r in tokens} == tokens
        assert set(tokens) | {r.req_id for r in out.scheduled_new_reqs} == set(
            out.num_scheduled_tokens)
    assert (side_by_side > 0) == (threshold > 0)


@pytest.mark.parametrize("seed", range(8))
def test_randomized_scheduling_keeps_every_invariant(vllm_config, monkeypatch, seed):
    """Random prompts, budgets, long-prefill thresholds, rates and aborts
    over a pool small enough to preempt; after every step: blocks owned +
    free = pool, every request holds exactly the blocks its compressed size
    needs, no compression before the (re)started prefill is complete,
    nothing is evicted below the target or from the protected window, the
    running requests got the tokens the planning expected (unless vLLM
    preempted), and under memory pressure exactly the requests whose
    compression frees a block for the step were compressed ahead of their
    interval."""
    from vllm.v1.request import RequestStatus

    from kvcompress_vllm.core import compression_due

    rng = random.Random(seed)
    budget = rng.choice([32, 48, 64, 100])  # 100: capped by max_num_batched_tokens=64
    num_blocks = rng.choice([30, 45, 80])
    threshold = random.Random(seed + 100).choice([0, 0, 16, 40])  # apart: same draws as before
    monkeypatch.setattr(vllm_config.scheduler_config, "long_prefill_token_threshold", threshold)
    sched = make_scheduler(vllm_config, num_blocks=num_blocks, budget=budget)
    manager = sched.kvc_manager
    pool = sched.kv_cache_manager.block_pool
    total_free = pool.get_num_free_blocks()
    next_id, preempted, admitted = 0, 0, 0
    pressure_skips = pressure_runs = 0
    for step in range(2000):
        if next_id < 30 and rng.random() < 0.3:
            extra = rng.choice([{}, {"kv_compress_rate": 0.5}, {"kv_compress_rate": 1.0},
                                {"max_cache_tokens": 40}])
            add(sched, f"r{next_id}", rng.randint(1, 300), max_tokens=rng.randint(1, 120), **extra)
            next_id += 1
        if sched.running and rng.random() < 0.03:
            victim = rng.choice(sched.running).request_id
            sched.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
        before = len(sched.plans_log)
        head = sched.waiting.peek_request().request_id if sched.waiting else None
        admissions = sched.kvc_totals.admission_steps
        tokens = sched._step_tokens()
        free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
        pressure = free < sched._next_step_demand()
        gains = {}  # requests compressed now only if pressure: their block gain
        for request in sched.running:
            rid = request.request_id
            state = sched.kvc_requests.get(rid)
            if state is None or not state.policy.compresses:
                continue
            n = request.num_computed_tokens
            due = [compression_due(num_computed=n, prefill_end=state.prefill_end,
                                   last_check=state.tokens_at_last_check,
                                   interval=state.policy.compress_interval, pressure=p)
                   for p in (False, True)]
            if due[True] and not due[False]:
                evicted = manager.evicted_pages.get(rid, 0)
                pages = evict_now(n, evicted, LH, BS, state.policy.rate, PROTECTED, SINKS,
                                  state.policy.max_cache_tokens)
                upto = n + tokens.get(rid, 0)
                gains[rid] = _blocks(upto, evicted) - _blocks(upto, evicted + pages)
        preemptions = sched.kvc_totals.preemptions
        out = run_step(sched)
        if sched.kvc_totals.preemptions == preemptions:
            assert {r: out.num_scheduled_tokens.get(r) for r in tokens} == tokens, step
        compressed = {p[0] for p in sched.plans_log[before:]}
        if pressure:
            for rid, gain in gains.items():
                assert (rid in compressed) == (gain > 0), (step, rid, gain)
                pressure_skips += gain == 0
                pressure_runs += gain > 0
        if sched.kvc_totals.admission_steps > admissions:
            # compressed ahead of the interval only when that admits the head
            admitted += 1
            started = {r.req_id for r in out.scheduled_new_reqs}
            started |= set(out.scheduled_cached_reqs.resumed_req_ids)  # preempted ones
            assert head in started, (step, head)
        preempted = sched.kvc_totals.preemptions
        owned = sum(len(b) for b in manager.req_to_blocks.values())
        assert owned + pool.get_num_free_blocks() == total_free
        for req_id, n, prefill_end, num_pages in sched.plans_log[before:]:
            assert prefill_end is not None and n >= prefill_end, (req_id, n, prefill_end)
        for request in sched.running:
            from policy_oracle import target_per_head

            rid = request.request_id
            n = request.num_computed_tokens
            evicted = manager.evicted_pages.get(rid, 0)
            need = -(-(LH * -(-n // BS) - evicted) // LH)
            held = len(manager.req_to_blocks.get(rid, ()))
            # vLLM allocates for the tokens scheduled this step, i.e. ahead.
            assert held >= need, (rid, n, evicted, held)
            policy = sched.kvc_requests[rid].policy
            assert evicted <= LH * (max(0, n - PROTECTED - SINKS) // BS)
            if evicted:
                target = target_per_head(n, policy.rate, PROTECTED, SINKS, policy.max_cache_tokens)
                # Targets only shrink per token (rate <= 1), so kept >= target
                # at the last compression implies it now.
                assert LH * n - evicted * BS >= LH * target - 1e-6, (rid, n, evicted)
        if next_id >= 30 and not sched.requests:
            break
    assert not sched.requests, f"{len(sched.requests)} requests left after 2000 steps"
    assert pool.get_num_free_blocks() == total_free
    assert not manager.evicted_pages and not sched.kvc_requests
    assert sched.plans_log, "nothing was compressed"
    assert admitted > 0, "no compression ahead of the interval for admission"
    print(f"seed {seed}: {len(sched.plans_log)} compressions, {preempted} preemptions, "
          f"{sched.kvc_totals.admission_steps} steps with compressions ahead for admission, "
          f"under pressure {pressure_runs} compressions and {pressure_skips} skipped (no gain)")


@pytest.fixture(scope="module")
def vllm_config_pc(model_path):
    """``vllm_config`` with prefix caching asked for (the plugin keeps it on CPU)."""
    cfg = engine_config(model_path, enable_prefix_caching=True)
    assert cfg.cache_config.enable_prefix_caching
    return cfg


_hasher = block_hasher


def test_prefix_caching_keeps_shared_blocks_intact(vllm_config_pc):
    """Two requests share a 3-block prefix (the second hits the first's
    blocks while both run): each compression keeps those blocks and protects
    their tokens (the plan's sinks), takes the request's other blocks out of
    the prefix cache, and caches nothing after; once both finish, the shared
    blocks are still cached and a third request hits them, and keeps its hits
    although it holds them alone.  A request sharing nothing takes all its
    blocks out of the cache when compressed."""
    from block_watch import BlockWatch

    sched = make_scheduler(vllm_config_pc, budget=64)
    manager, pool = sched.kvc_manager, sched.kv_cache_manager.block_pool

    def shared_kept(request_id, num_tokens):  # blocks others hold are all kept
        keep = sched._shared_prefix(request_id, sched.kvc_requests[request_id].policy)[1]
        assert all(b.ref_cnt == 1 for b in manager.req_to_blocks[request_id][keep:])

    watch = BlockWatch(sched, before=shared_kept)
    keeps = watch.keeps
    hasher = _hasher()
    prefix = list(range(1000, 1000 + 3 * BS))
    add_tokens(sched, "a", prefix + list(range(2000, 2040)), hasher, max_tokens=40)
    run_step(sched)  # a: 64 of 88 prompt tokens; its 4 full blocks cached
    add_tokens(sched, "b", prefix + list(range(3000, 3040)), hasher, max_tokens=40)
    out = run_step(sched)  # a's last chunk; b admitted with a hit on the prefix
    (new,) = out.scheduled_new_reqs
    assert new.req_id == "b" and new.num_computed_tokens == 3 * BS
    shared = manager.req_to_blocks["a"][:3]
    assert manager.req_to_blocks["b"][:3] == shared and all(b.ref_cnt == 2 for b in shared)
    seen = set()
    for _ in range(200):
        out = run_step(sched)
        for plan in out.kv_compress.evictions:
            seen.add(plan.req_id)
            assert plan.sink_tokens == 3 * BS, plan  # the shared prefix is protected
        for rid in ("a", "b"):
            blocks = manager.req_to_blocks.get(rid)
            if blocks and manager.evicted_pages.get(rid):
                assert blocks[:3] == shared  # kept, in place
                assert all(b.block_hash is None for b in blocks[3:]), rid
        assert not watch.stale()  # nothing cached was changed by a compression
        if not sched.requests:
            break
    assert seen == {"a", "b"} and {k for _, k in keeps} == {3}
    assert all(b.block_hash is not None and b.ref_cnt == 0 for b in shared)
    # c hits them alone: its hits stay kept (and cached) through its compressions.
    add_tokens(sched, "c", prefix + list(range(4000, 4040)), hasher, max_tokens=40)
    out = run_step(sched)
    assert out.scheduled_new_reqs[0].num_computed_tokens == 3 * BS
    assert manager.req_to_blocks["c"][:3] == shared and all(b.ref_cnt == 1 for b in shared)
    while sched.requests:
        run_step(sched)
        assert not watch.stale()
    assert ("c", 3) in keeps and {k for r, k in keeps if r == "c"} == {3}
    assert all(b.block_hash is not None for b in shared)
    # Alone, a request keeps nothing cached once compressed (sinks < a block),
    # and caches none of the blocks it fills while decoding on.
    add_tokens(sched, "d", list(range(5000, 5100)), hasher, max_tokens=400)
    while "d" not in manager.evicted_pages:
        run_step(sched)
    assert keeps[-1] == ("d", 0)
    while sched.requests:
        assert all(b.block_hash is None for b in manager.req_to_blocks["d"])
        run_step(sched)
        assert not watch.stale()
    add_tokens(sched, "e", list(range(5000, 5100)), hasher, max_tokens=2)
    assert run_step(sched).scheduled_new_reqs[0].num_computed_tokens == 0
    # Lightly compressed (a page or two per compression): it holds as many
    # blocks as vLLM would have cached for it, and must still cache none.
    add_tokens(sched, "f", list(range(6000, 6100)), hasher, max_tokens=300, kv_compress_rate=0.97)
    while sched.requests:
        run_step(sched)
        assert not watch.stale()
    assert keeps[-1][0] == "f"


def test_shared_blocks_after_an_unshared_one_are_kept_too(vllm_config_pc):
    """vLLM keeps duplicate blocks under one hash (a block recomputed because
    a hit stops a token short of the prompt), so a request's blocks that
    other requests hold need not be a prefix: a compression keeps everything
    up to the last of them, and at least the request's own hits."""
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    sched = make_scheduler(vllm_config_pc, budget=64)
    manager = sched.kvc_manager
    blocks = [KVCacheBlock(block_id=i) for i in range(6)]
    for b, ref in zip(blocks, [2, 2, 1, 2, 1, 1]):
        b.ref_cnt = ref
    manager.req_to_blocks["x"] = blocks
    assert manager.shared_prefix_blocks("x") == 4
    manager.hit_blocks["x"] = 5
    assert manager.shared_prefix_blocks("x") == 5
    for b in blocks:
        b.ref_cnt = 1
    manager.hit_blocks["x"] = 0
    assert manager.shared_prefix_blocks("x") == 0
    del manager.req_to_blocks["x"], manager.hit_blocks["x"]


@pytest.mark.parametrize("remember", [True, False], ids=["second-use-kept", "second-use-ignored"])
def test_a_prefix_in_its_second_use_stays_cached(vllm_config_pc, remember):
    """Requests that share a 3-block prefix arrive one after another, each
    after the previous one finished.  The first, alone, is compressed with
    its prefix, which leaves the cache; preempted after that, it recomputes
    the prefix and compresses it again (its own compression is no second
    use).  The second recomputes the prefix; its compressions keep those
    blocks (protected like sinks, still cached), because another request's
    compression took their hashes out of the cache before.  The third hits
    them.  Without the record (``remember`` False: the scheduler before this
    rule) every request recomputes the prefix and compresses it.  A reset of
    the prefix cache forgets the record."""
    import time

    from block_watch import BlockWatch

    sched = make_scheduler(vllm_config_pc, budget=64)
    manager = sched.kvc_manager
    if not remember:
        manager.record_uncached = manager.pending_uncached.clear
    watch = BlockWatch(sched)
    hasher = _hasher()
    prefix = list(range(1000, 1000 + 3 * BS))
    hits = {}
    for i, name in enumerate("abcd"):
        if name == "d":
            assert sched.reset_prefix_cache()
            assert not manager.uncached_by
        add_tokens(sched, name, prefix + list(range(2000 + 100 * i, 2040 + 100 * i)), hasher,
                   max_tokens=40)
        out = run_step(sched)
        hits[name] = out.scheduled_new_reqs[0].num_computed_tokens
        while sched.requests:
            run_step(sched)
            assert not watch.stale()
            if name == "a" and watch.keeps and not sched.kvc_totals.preemptions:
                request = sched.requests["a"]  # compressed: preempt it
                sched.running.remove(request)
                sched._preempt_request(request, time.monotonic())
    keeps = {r: {k for q, k in watch.keeps if q == r} for r, _ in watch.keeps}
    compressions = {r: sum(q == r for q, _ in watch.keeps) for r in keeps}
    assert set(keeps) == set("abcd") and min(compressions.values()) >= 2
    assert sched.kvc_totals.preemptions == 1
    if remember:  # every compression of b and c keeps the prefix
        assert hits == {"a": 0, "b": 0, "c": 3 * BS, "d": 0}
        assert keeps == {"a": {0}, "b": {3}, "c": {3}, "d": {0}}
    else:
        assert hits == {"a": 0, "b": 0, "c": 0, "d": 0}
        assert keeps == {"a": {0}, "b": {0}, "c": {0}, "d": {0}}
    watch.restore()


def test_a_second_use_is_not_kept_while_blocks_are_wanted_or_under_a_cap(vllm_config_pc):
    """The second use of a prefix is kept for requests that may come, by a
    request that holds it alone: not when the pool is short of blocks for
    the next step, not while the next waiting request does not fit, and not
    by a request capped by ``max_cache_tokens``."""
    from block_watch import BlockWatch

    hasher = _hasher()
    prefix = list(range(1000, 1000 + 3 * BS))
    for case in ("pressure", "waiting", "cap"):
        # pressure: 6 usable blocks (+ the null block), all taken by a prompt
        # of 3 prefix blocks + 48 tokens when its first compression is due
        sched = make_scheduler(vllm_config_pc, num_blocks=7 if case == "pressure" else 40,
                               budget=64)
        watch = BlockWatch(sched)
        try:
            add_tokens(sched, "a", prefix + list(range(2000, 2048)), hasher, max_tokens=40)
            while sched.requests:
                run_step(sched)
            assert watch.keeps[0] == ("a", 0) and manager_has_record(sched, prefix)
            extra = {"max_cache_tokens": PROTECTED + 64} if case == "cap" else {}
            add_tokens(sched, "b", prefix + list(range(3000, 3048)), hasher, max_tokens=40,
                       **extra)
            if case == "waiting":
                compressions = len(watch.keeps)
                run_step(sched)
                run_step(sched)  # b prefilled: its first compression is due next step
                assert len(watch.keeps) == compressions
                free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
                add_tokens(sched, "w", range(5000, 5000 + (free + 2) * BS), hasher,
                           max_tokens=2, kv_compress_rate=1.0)  # does not fit yet
                assert sched._admission_shortfall(free, sched._next_step_demand(), []) > 0
            while sched.requests:
                run_step(sched)
                assert not watch.stale()
            kept = [k for r, k in watch.keeps if r == "b"]
            assert kept and set(kept) == {0}, (case, watch.keeps)
            if case == "pressure":
                assert sched.kvc_totals.pressure_steps > 0
        finally:
            watch.restore()


def manager_has_record(sched, prefix):
    """The record names every block of ``prefix`` (hashes of its whole blocks)."""
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
    from vllm.v1.request import Request

    probe = Request("probe", list(prefix), SamplingParams(max_tokens=1), None,
                    block_hasher=_hasher())
    return all(make_block_hash_with_group_id(h, 0) in sched.kvc_manager.uncached_by
               for h in probe.block_hashes)


def test_the_record_of_uncached_prefixes(vllm_config_pc):
    """``KVCompressManager.record_uncached``: a block whose hash another
    request's compression took out of the cache is kept, one the same
    request's compression did (before its preemption) is not, nor any
    without ``second_use``; the record holds at most one hash per block of
    the pool, forgetting the least recently recorded or kept first."""
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    sched = make_scheduler(vllm_config_pc, num_blocks=8, budget=64)
    manager = sched.kvc_manager

    def hashed(i):
        block = KVCacheBlock(block_id=i)
        block._block_hash = bytes([i]) * 8
        return block

    def record(blocks, request_id):
        manager.pending_uncached.extend((b.block_hash, request_id) for b in blocks)
        manager.record_uncached()

    blocks = [hashed(i) for i in range(4)]
    record(blocks[:2], "x")
    manager.req_to_blocks["x"] = manager.req_to_blocks["y"] = blocks
    assert manager.shared_prefix_blocks("x") == 0  # its own compression: not a second use
    assert manager.shared_prefix_blocks("y") == 2
    assert manager.shared_prefix_blocks("y", second_use=False) == 0
    record(blocks[3:], "x")
    assert manager.shared_prefix_blocks("y") == 4  # up to the last (hashes chain)
    record([hashed(i) for i in range(10, 16)], "z")  # 9 hashes, 8 blocks in the pool
    assert len(manager.uncached_by) == 8 and blocks[0].block_hash not in manager.uncached_by
    record([blocks[1]], "x")  # recorded again: now the most recent
    record([hashed(20)], "z")
    assert blocks[1].block_hash in manager.uncached_by
    assert blocks[3].block_hash not in manager.uncached_by  # the least recent went
    assert manager.shared_prefix_blocks("y") == 2
    record([blocks[3]], "x")
    record([hashed(30)], "z")
    assert manager.shared_prefix_blocks("y") == 4  # a kept block is used: forgotten last
    record([hashed(i) for i in range(21, 28)], "z")
    assert list(manager.uncached_by) == [blocks[3].block_hash] + [
        hashed(i).block_hash for i in range(21, 28)]
    del manager.req_to_blocks["x"], manager.req_to_blocks["y"]


def test_streaming_input_sessions_are_never_compressed(vllm_config):
    """A resumable request (vLLM's streaming-input session) keeps its blocks
    between turns and comes back as a new request holding them, so it is kept
    uncompressed (vLLM's own layout), whatever rate it asked for."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    sched = make_scheduler(vllm_config, budget=64)
    params = SamplingParams(max_tokens=40, ignore_eos=True, extra_args={"kv_compress_rate": 0.25})
    sched.add_request(Request("s", list(range(100, 200)), params, None, resumable=True))
    add(sched, "plain", 100, max_tokens=40, kv_compress_rate=0.25)
    out = run_step(sched)
    assert out.kv_compress.stock_layout == {"s"}
    for _ in range(40):
        run_step(sched)
    assert [p[0] for p in sched.plans_log] and {p[0] for p in sched.plans_log} == {"plain"}


def _newcomer_behind_a_prefix(vllm_config_pc, holder_runs, look_ahead=True):
    """``_grown_request``'s "a"; then "p" (rate 1.0) computes a 3-block prefix
    and keeps running (``holder_runs``) or finishes, leaving the prefix cached
    and free; then "b" waits with that prefix, sized to lack exactly what
    compressing "a" now would free unless its 3 hit blocks count as held.
    ``look_ahead`` False: the scheduler before the look-ahead (no lookup).
    Returns (sched, "a"'s tokens, "b"'s size)."""
    hasher = _hasher()
    sched, _, _ = _grown_request(vllm_config_pc, 60, hasher)
    if not look_ahead:
        sched._awaited_hit = lambda: []
    prefix = list(range(1000, 1000 + 3 * BS))
    add_tokens(sched, "p", prefix + list(range(2000, 2008)), hasher,
               max_tokens=400 if holder_runs else 1, kv_compress_rate=1.0)
    run_step(sched)  # "p" prefilled (and, with max_tokens 1, finished)
    assert [r.request_id for r in sched.running] == (["a", "p"] if holder_runs else ["a"])
    n = sched.requests["a"].num_computed_tokens
    evicted = sched.kvc_manager.evicted_pages["a"]
    gain = _blocks(n + 1, evicted) - _blocks(
        n + 1, evicted + evict_now(n, evicted, LH, BS, 0.25, PROTECTED, SINKS))
    assert 1 <= gain <= 3
    spare = sched.kv_cache_manager.block_pool.get_num_free_blocks() - sched._next_step_demand()
    size = BS * (spare + gain)
    add_tokens(sched, "b", prefix + list(range(3000, 3000 + size - 3 * BS)), hasher,
               max_tokens=4, kv_compress_rate=1.0)
    return sched, n, size


@pytest.mark.parametrize("count_hits", [True, False], ids=["hits-counted", "hits-ignored"])
def test_admission_counts_hits_on_blocks_running_requests_hold(vllm_config_pc, count_hits):
    """Prefix caching: a waiting prompt whose first 3 blocks a running request
    holds needs that many fewer free blocks, as in vLLM's own admission.  Sized
    so that it fits only with its hits counted: then it is admitted with the
    hits and nobody is compressed ahead of its interval; with the hits ignored
    (the scheduler before this rule), "a" would be compressed to admit it."""
    sched, n, size = _newcomer_behind_a_prefix(vllm_config_pc, holder_runs=True,
                                               look_ahead=count_hits)
    if count_hits:
        # The shortfall vLLM's rule gives: whole prompt (or, for chunked
        # admission, the hit plus the chunk the budget leaves) less held hits.
        hit = sched._awaited_hit()
        assert hit == sched.kvc_manager.req_to_blocks["p"][:3]
        free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
        demand = sched._next_step_demand()
        fixed = sched.kv_cache_manager.watermark_blocks + demand - free
        left = 64 - 2  # "a" and "p" decode one token each
        assert sched._admission_shortfall(free, demand, hit) == max(0, -(-size // BS) - 3 + fixed)
        sched.scheduler_reserve_full_isl = False
        chunk = 3 * BS + min(size - 3 * BS, left)
        assert sched._admission_shortfall(free, demand, hit) == max(0, -(-chunk // BS) - 3 + fixed)
        sched.scheduler_reserve_full_isl = True
    out = run_step(sched)
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b"]
    assert out.scheduled_new_reqs[0].num_computed_tokens == 3 * BS  # the hits
    if count_hits:
        assert out.kv_compress.evictions == []
        assert sched.kvc_metrics.compressions["admission"] == 0
    else:
        assert [(p.req_id, p.num_tokens) for p in out.kv_compress.evictions] == [("a", n)]
        assert sched.kvc_metrics.compressions["admission"] == 1


@pytest.mark.parametrize("look_ahead", [True, False], ids=["awaited-kept", "awaited-ignored"])
def test_compression_keeps_the_blocks_the_next_waiting_request_hits(vllm_config_pc, look_ahead):
    """"p" alone holds a 3-block prefix and is compressed in the step after its
    prefill; "b", waiting with the same prefix, is admitted in that step.  The
    compression keeps (and leaves cached) the blocks "b" hits -- protected
    like sinks -- so "b" is admitted with the hit and shares them.  Without
    looking at the waiting request (the scheduler before this rule), the
    compression takes them out of the cache and "b" recomputes the prefix."""
    from block_watch import BlockWatch

    sched = make_scheduler(vllm_config_pc, budget=64)
    if not look_ahead:
        sched._awaited_hit = lambda: []
    watch = BlockWatch(sched)
    hasher = _hasher()
    prefix = list(range(1000, 1000 + 3 * BS))
    add_tokens(sched, "p", prefix + list(range(2000, 2048)), hasher, max_tokens=40)
    run_step(sched)
    run_step(sched)  # p prefilled (96 tokens in two chunks); its 3 prefix blocks cached
    assert sched.requests["p"].num_computed_tokens == 96 and not sched.kvc_manager.evicted_pages
    add_tokens(sched, "b", prefix + list(range(3000, 3008)), hasher, max_tokens=40)
    out = run_step(sched)
    (plan,) = out.kv_compress.evictions
    assert plan.req_id == "p"
    (new,) = out.scheduled_new_reqs
    assert new.req_id == "b"
    shared = sched.kvc_manager.req_to_blocks["p"][:3]
    if look_ahead:
        assert watch.keeps == [("p", 3)] and plan.sink_tokens == 3 * BS
        assert new.num_computed_tokens == 3 * BS
        assert sched.kvc_manager.req_to_blocks["b"][:3] == shared
        assert all(b.ref_cnt == 2 and b.block_hash is not None for b in shared)
    else:
        assert watch.keeps == [("p", 0)]
        assert new.num_computed_tokens == 0
    assert not watch.stale()
    while sched.requests:
        run_step(sched)
        assert not watch.stale()
    watch.restore()


def test_admission_counts_hits_on_free_cached_blocks_as_needed(vllm_config_pc):
    """A hit on blocks nobody holds any more (cached, free) takes free blocks,
    as in vLLM's admission: sized like the test above, the waiting prompt now
    lacks "a"'s gain, so "a" is compressed ahead of its interval and the
    prompt is admitted with its hit."""
    sched, n, _ = _newcomer_behind_a_prefix(vllm_config_pc, holder_runs=False)
    hit = sched._awaited_hit()
    assert len(hit) == 3 and all(b.ref_cnt == 0 for b in hit)
    out = run_step(sched)
    assert [(p.req_id, p.num_tokens) for p in out.kv_compress.evictions] == [("a", n)]
    assert sched.kvc_metrics.compressions["admission"] == 1
    assert [r.req_id for r in out.scheduled_new_reqs] == ["b"]
    assert out.scheduled_new_reqs[0].num_computed_tokens == 3 * BS


def test_under_pressure_the_waiting_requests_hit_is_not_kept(vllm_config_pc):
    """Under memory pressure vLLM admits nobody in the step (it preempts
    first), so a compression then keeps no block for the waiting request's
    hit: "p", alone on a full pool and needing a block for its next token,
    frees all it can although "b" waits with a hit on its prefix."""
    from block_watch import BlockWatch

    sched = make_scheduler(vllm_config_pc, num_blocks=7, budget=64)  # 6 usable (+ the null block)
    watch = BlockWatch(sched)
    hasher = _hasher()
    prefix = list(range(1000, 1000 + 3 * BS))
    add_tokens(sched, "p", prefix + list(range(2000, 2048)), hasher, max_tokens=40)
    run_step(sched)
    run_step(sched)  # p prefilled: 96 tokens in all 6 blocks
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 0
    assert sched._next_step_demand() == 1  # its next token needs a seventh block
    add_tokens(sched, "b", prefix + list(range(3000, 3008)), hasher, max_tokens=4)
    assert len(sched._awaited_hit()) == 3
    run_step(sched)
    assert watch.keeps == [("p", 0)] and sched.kvc_totals.pressure_steps == 1
    assert not watch.stale()
    watch.restore()
