"""Prompt-metric pooling at a chunk boundary, on the worker state (no engine).

A prompt of ``P`` tokens whose first chunk ends at ``P - 1`` completes in the
next step; only then is its metric max-pooled over all ``P`` keys.  If the
request had been compressed in between (the bug this guards against), its
heads hold fewer KVs than the prompt and trimmed page-table entries are -1:
pooling must refuse loudly and touch nobody's metrics, in particular not the
neighbour's whose page sits at the end of the pool.
"""

import pytest
import torch

from kvcompress_vllm.plan import EvictionPlan, MissingPlanError
from kvcompress_vllm.core import PageGeometry
from test_worker_state import B, H, L, N, fill, make_state, qsl_of, step

P = 21  # prompt of "b": chunk of 20, then 1


def _start(state):
    # "a" (the neighbour) owns the last block of the pool and is decoding.
    state.begin_step(step(new=[("a", [11, 10, 9], 20)], scheduled={"a": 20}, prefill_ends={"a": 20}))
    fill(state, ["a"], seed=1)
    state.end_step()
    state.begin_step(step(new=[("b", [0, 1, 2], P)], cached=[("a", [])],
                          scheduled={"b": P - 1, "a": 1}, prefill_ends={"b": P}))
    fill(state, ["b", "a"], seed=2)
    state.end_step()


def _rows(state, rid):
    req = state.table.requests[rid]
    counts = state.table.kv_count[req.slot]
    out = {}
    for layer in range(L):
        for h in range(H):
            pages = state.table.page_table[req.slot, layer, h]
            n = int(counts[layer, h])
            j = torch.arange(n)
            out[layer, h] = state.pool.metrics[pages[j // N].long(), j % N].clone()
    return out


def test_pooling_runs_once_the_whole_prompt_is_in():
    state, _ = make_state(rate=0.25, pooling_kernel=3, observation_window=4)
    _start(state)
    g = torch.Generator().manual_seed(3)
    state.pool.metrics.copy_(torch.rand(state.pool.metrics.shape, generator=g))
    before_b, before_a = _rows(state, "b"), _rows(state, "a")
    state.begin_step(step(cached=[("b", []), ("a", [])], scheduled={"b": 1, "a": 1}))
    batch = state.build_batch(["b", "a"], qsl_of(state, ["b", "a"]))
    assert [(r, n, rid) for r, n, rid in batch.pool_rows] == [(0, P, "b")]
    assert batch.metric_k_start is None  # no prefix-cache hits: every KV gets metric
    # Unpooled metric of the new (last) KV: zero, as write_kv leaves it.
    for layer in range(L):
        for h in range(H):
            before_b[layer, h] = torch.cat([before_b[layer, h], torch.zeros(1)])
    fill(state, ["b", "a"], seed=4)
    for layer in range(L):
        state.pool.metrics[batch.write_slots[layer, 0] // N, batch.write_slots[layer, 0] % N] = 0.0
        state.pool_prompt_metrics(batch, layer)
    state.end_step()
    after_b = _rows(state, "b")
    for key, values in before_b.items():
        expected = torch.nn.functional.max_pool1d(values.view(1, 1, -1), 3, 1, 1).view(-1)
        assert torch.equal(after_b[key], expected)
    after_a = _rows(state, "a")
    for key, values in before_a.items():
        assert torch.equal(after_a[key][: values.numel()], values)


def test_pooling_refuses_a_head_compressed_before_its_prompt_completed():
    state, _ = make_state(rate=0.25, pooling_kernel=3, observation_window=4)
    _start(state)
    geom = PageGeometry(N, L * H)
    # What the old scheduler did: compress "b" with P - 1 tokens in the cache.
    n = P - 1
    num_pages = L * H  # one page per head
    keep = geom.blocks_needed(n, num_pages)
    plan = EvictionPlan(req_id="b", num_pages=num_pages, num_tokens=n,
                        pages_after=geom.pages_in_use(n, num_pages),
                        released_block_ids=tuple([0, 1, 2][keep:]), protected_window=2,
                        sink_tokens=1, scorer="kvcompress")
    state.begin_step(step(plans=[plan], cached=[("b", []), ("a", [])], scheduled={"b": 1, "a": 1}))
    metrics_before = state.pool.metrics.clone()
    batch = state.build_batch(["b", "a"], qsl_of(state, ["b", "a"]))
    with pytest.raises(RuntimeError, match=r"request b: cannot pool .* prompt has 21 tokens"):
        state.pool_prompt_metrics(batch, 0)
    assert torch.equal(state.pool.metrics, metrics_before)


def test_missing_plan_is_an_error_not_evict_nothing():
    state, _ = make_state(rate=0.25)
    so = step(new=[("a", [0, 1], 9)], scheduled={"a": 9}, prefill_ends={"a": 9})
    del so.kv_compress
    with pytest.raises(MissingPlanError, match=r"\['a'\] carries no StepPlan"):
        state.begin_step(so)


def test_prefix_cache_hitter_pools_its_own_kvs_not_the_shared_prefix():
    """A request that starts on prefix-cache hits (vLLM hands it the writer's
    blocks with ``num_computed_tokens`` > 0) reads the shared KVs' metric as
    the neighbours of its own first KVs but leaves it as is: the writer pooled
    those shared pages at its own prefill end, and pooling them again would
    widen every max the writer reads when it compresses."""
    hit, prompt = 2 * N, 2 * N + 5
    state, _ = make_state(rate=0.25, pooling_kernel=3, observation_window=4)
    state.begin_step(step(new=[("a", [4, 5, 6], 2 * N + 3)], scheduled={"a": 2 * N + 3},
                          prefill_ends={"a": 2 * N + 3}))
    fill(state, ["a"], seed=1)
    state.end_step()
    so = step(new=[("b", [4, 5, 7], prompt)], cached=[("a", [])],
              scheduled={"b": prompt - hit, "a": 1}, prefill_ends={"b": prompt})
    so.scheduled_new_reqs[0].num_computed_tokens = hit
    state.begin_step(so)
    assert state.table.requests["b"].hit_tokens == hit
    batch = fill(state, ["b", "a"], seed=2)
    assert [(r, n, rid) for r, n, rid in batch.pool_rows] == [(0, prompt, "b")]
    # Its queries add metric to its own KVs only (the kernels' metric_k_start).
    assert batch.metric_k_start.tolist() == [hit, 0]
    g = torch.Generator().manual_seed(3)
    state.pool.metrics.copy_(torch.rand(state.pool.metrics.shape, generator=g))
    before = _rows(state, "b")
    for layer in range(L):
        state.pool_prompt_metrics(batch, layer)
    state.end_step()
    after = _rows(state, "b")
    for key, values in before.items():
        pooled = torch.nn.functional.max_pool1d(values.view(1, 1, -1), 3, 1, 1).view(-1)
        assert torch.equal(after[key][:hit], values[:hit]), "the shared prefix is left as is"
        assert torch.equal(after[key][hit:], pooled[hit:]), "its own KVs see the prefix"
        assert not torch.equal(pooled[hit:], values[hit:])


def test_blocks_of_never_compressed_requests_start_with_a_zero_metric():
    """vLLM's writer fills a never-compressed request's K/V without touching
    the per-slot metric, so the worker zeroes the metric of every block such
    a request is given -- at its start, on resumption and as it grows -- past
    its prefix-cache hits (whose metric is their writer's).  A compressible
    request that later hits those blocks then pools and scores against
    zeros, not against the previous tenant's attention."""
    state, _ = make_state(rate=0.25, pooling_kernel=3, observation_window=4)
    g = torch.Generator().manual_seed(5)
    state.pool.metrics.copy_(torch.rand(state.pool.metrics.shape, generator=g) + 1.0)
    stale = state.pool.metrics.clone()

    def metric_of(blocks):
        return state.pool.metrics[state.table.block_page_ids(blocks).view(-1)]

    # "w" (compressible) wrote blocks 0, 1; "s" (never compressed) hits them.
    state.begin_step(step(new=[("w", [0, 1, 2], 2 * N + 3)], scheduled={"w": 2 * N + 3},
                          prefill_ends={"w": 2 * N + 3}))
    fill(state, ["w"], seed=1)
    state.end_step()
    state.pool.metrics[state.table.block_page_ids([0, 1]).view(-1)] = 2.0  # w's attention
    written = metric_of([0, 1]).clone()
    so = step(new=[("s", [0, 1, 4, 5], 3 * N + 2)], scheduled={"s": N + 2},
              prefill_ends={"s": 3 * N + 2}, no_metric={"s"}, stock_layout={"s"})
    so.scheduled_new_reqs[0].num_computed_tokens = 2 * N
    state.begin_step(so)
    assert torch.equal(metric_of([0, 1]), written), "the hits keep their writer's metric"
    assert (metric_of([4, 5]) == 0).all()
    untouched = [b for b in range(B) if b not in (0, 1, 2, 4, 5)]
    assert torch.equal(metric_of(untouched), stale[state.table.block_page_ids(untouched).view(-1)])
    state.end_step()
    state.pool.metrics[state.table.block_page_ids([7]).view(-1)] = 3.0
    state.begin_step(step(cached=[("s", [7])], scheduled={"s": 1}))
    assert (metric_of([7]) == 0).all(), "a block it grows into"
    state.end_step()
    # A compressible request's blocks keep whatever is there (write_kv zeroes
    # the slots it writes), so nothing else was zeroed.
    state.pool.metrics[state.table.block_page_ids([8]).view(-1)] = 3.0
    state.begin_step(step(cached=[("w", [8])], scheduled={"w": 1}))
    assert (metric_of([8]) == 3.0).all()


def test_a_write_inside_the_prefix_cache_hits_is_refused():
    """The KVs of a request's hits are other requests' too: a step that would
    write one of them (a token count below the hit) stops, naming the request."""
    state, _ = make_state(rate=0.25)
    state.begin_step(step(new=[("a", [4, 5, 6], 2 * N + 3)], scheduled={"a": 2 * N + 3},
                          prefill_ends={"a": 2 * N + 3}))
    fill(state, ["a"], seed=1)
    state.end_step()
    so = step(new=[("b", [4, 5, 7], 2 * N + 5)], scheduled={"b": 5},
              prefill_ends={"b": 2 * N + 5})
    so.scheduled_new_reqs[0].num_computed_tokens = 2 * N
    state.begin_step(so)
    fill(state, ["b"])  # writes from token 2N on: fine
    state.end_step()
    state.table.requests["b"].hit_tokens = 2 * N + 6  # as if the token it writes were a hit
    state.begin_step(step(cached=[("b", [])], scheduled={"b": 1}))
    with pytest.raises(RuntimeError, match=r"request b: this step writes its KVs from token "
                                           r"\d+ on, inside its \d+ prefix-cache hit tokens"):
        state.build_batch(["b"], qsl_of(state, ["b"]))


@pytest.mark.parametrize("seed", range(3))
def test_a_hitter_and_its_writer_pooling_in_one_step_give_one_result_in_either_row_order(seed):
    """A request can hit the full blocks of a writer still in its prefill;
    both prompts may then end in the same step.  The hitter reads the shared
    KVs as neighbours and the writer pools them: every row reads the metric
    as it was before pooling, so vLLM's row order changes nothing."""
    hit = 2 * N

    def run(order):
        state, _ = make_state(rate=0.25, pooling_kernel=3, observation_window=4)
        state.begin_step(step(new=[("a", [4, 5, 6], 2 * N + 3)], scheduled={"a": 2 * N},
                              prefill_ends={"a": 2 * N + 3}))
        fill(state, ["a"], seed=1)
        state.end_step()
        so = step(new=[("b", [4, 5, 7], 2 * N + 5)], cached=[("a", [])],
                  scheduled={"a": 3, "b": 5}, prefill_ends={"b": 2 * N + 5})
        so.scheduled_new_reqs[0].num_computed_tokens = hit
        state.begin_step(so)
        batch = fill(state, order, seed=2)
        assert sorted(rid for _, _, rid in batch.pool_rows) == ["a", "b"]
        g = torch.Generator().manual_seed(10 + seed)
        state.pool.metrics.copy_(torch.rand(state.pool.metrics.shape, generator=g))
        for layer in range(L):
            state.pool_prompt_metrics(batch, layer)
        return state.pool.metrics.clone()

    assert torch.equal(run(["a", "b"]), run(["b", "a"]))
