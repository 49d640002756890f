"""Worker state on a synthetic vLLM-shaped KV pool (no engine).

Drives ``KVCompressWorkerState`` with real vLLM ``SchedulerOutput`` objects:
identity layout before compression, eviction + compaction + release of tail
blocks, growth afterwards, and attention over the compacted cache equal to
attention over exactly the kept KVs.
"""

import pytest
import torch

from kvcompress_vllm.config import KVCompressConfig
from kvcompress_vllm.ops import reference
from kvcompress_vllm.plan import EvictionPlan
from kvcompress_vllm.testing import scheduler_output
from kvcompress_vllm.core import PageGeometry
from kvcompress_vllm.worker.state import HeadPool, KVCompressWorkerState

L, B, H, N, D = 3, 12, 2, 8, 16  # layers, blocks, KV heads, block size, head dim


def make_state(**cfg):
    storage = torch.zeros(L * B * H * N * 2 * D, dtype=torch.float32)
    layers = [storage[l * B * H * N * 2 * D:(l + 1) * B * H * N * 2 * D].view(B, H, N, 2 * D) for l in range(L)]
    pool = HeadPool.from_layer_caches(layers)
    state = KVCompressWorkerState(KVCompressConfig(**cfg), pool, max_model_len=B * N, max_num_reqs=4)
    return state, layers


#: A vLLM SchedulerOutput carrying the plugin's StepPlan (see kvcompress_vllm.testing).
step = scheduler_output


def fill(state, req_ids, seed=0):
    """Write random K/V for this step's tokens through the batch slots."""
    batch = state.build_batch(req_ids, qsl_of(state, req_ids))
    g = torch.Generator().manual_seed(seed)
    t = batch.token_positions.numel()
    for layer in range(L):
        k = torch.randn(t, H, D, generator=g)
        v = torch.randn(t, H, D, generator=g)
        reference.write_kv(k, v, state.pool.kv_pages, batch.write_slots[layer],
                           state.pool.metrics, state.pool.positions, batch.token_positions)
    return batch


def qsl_of(state, req_ids):
    lens = [state.table.requests[r].step_tokens for r in req_ids]
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32)


def head_kvs(state, rid):
    """{(layer, head): {position: (k, v)}} of everything a request holds."""
    req = state.table.requests[rid]
    out = {}
    for layer in range(L):
        for h in range(H):
            n = int(state.table.kv_count[req.slot, layer, h])
            pages = state.table.page_table[req.slot, layer, h]
            kvs = {}
            for j in range(n):
                p, s = int(pages[j // N]), j % N
                kvs[int(state.pool.positions[p, s])] = (state.pool.kv_pages[p, 0, s].clone(),
                                                        state.pool.kv_pages[p, 1, s].clone())
            out[layer, h] = kvs
    return out


def test_identity_layout_matches_vllm_blocks():
    state, layers = make_state(rate=0.5)
    state.begin_step(step(new=[("a", [5, 2], 11)], scheduled={"a": 11}, prefill_ends={"a": 11}))
    fill(state, ["a"])
    state.end_step()
    # Token 9 of head (l, h) sits in block 2 (logical page 1), slot 1, as in vLLM.
    for layer in range(L):
        for h in range(H):
            assert int(state.table.page_table[0, layer, h, 1]) == (layer * B + 2) * H + h
            # vLLM's CPU backend reads a block as [H, 2N, D]: N keys, then N values.
            key = layers[layer].view(B, H, 2 * N, D)[2, h, 1]
            assert torch.equal(key, state.pool.kv_pages[(layer * B + 2) * H + h, 0, 1])
            assert int(state.pool.positions[(layer * B + 2) * H + h, 1]) == 9


@pytest.mark.parametrize(
    "scorer,allocation",
    [("kvcompress", "joint"), ("kvcompress", "uniform"), ("knorm", "joint"),
     ("streamingllm", "joint"), ("keydiff", "uniform"), ("random", "joint")],
)
def test_eviction_compaction_release_and_growth(scorer, allocation):
    state, _ = make_state(rate=0.25, protected_window=4, sink_tokens=1)
    geom = PageGeometry(N, L * H)
    blocks = [3, 7, 1, 9, 4]  # 5 blocks for 37 tokens
    n = 37
    state.begin_step(step(new=[("r", blocks, n)], scheduled={"r": n}, prefill_ends={"r": n}))
    fill(state, ["r"], seed=1)
    state.end_step()
    g = torch.Generator().manual_seed(2)
    state.pool.metrics.copy_(torch.rand(state.pool.metrics.shape, generator=g))
    before = head_kvs(state, "r")

    num_pages = 12
    keep = geom.blocks_needed(n, num_pages)
    plan = EvictionPlan(req_id="r", num_pages=num_pages, num_tokens=n,
                        pages_after=geom.pages_in_use(n, num_pages),
                        released_block_ids=tuple(blocks[keep:]), protected_window=4,
                        sink_tokens=1, scorer=scorer, allocation=allocation)
    evict = step(plans=[plan])
    evict.kv_compress.report_pages = True  # debug_checks: positions distinct after compaction
    state.begin_step(evict)
    stats = state.end_step()
    assert stats.pages_evicted == num_pages and stats.kvs_evicted == num_pages * N

    req = state.table.requests["r"]
    assert req.blocks == blocks[:keep]
    counts = state.table.kv_count[req.slot]
    assert ((n - counts) % N == 0).all() and int((n - counts).sum()) == num_pages * N
    assert state.table.pages_in_use(req) == plan.pages_after
    used = state.table.used_pages(req)
    assert not torch.isin(state.table.block_of_page(used), torch.tensor(blocks[keep:])).any()
    assert used.unique().numel() == used.numel()

    after = head_kvs(state, "r")
    for key, kvs in after.items():
        assert set(kvs) <= set(before[key])
        assert {0, *range(n - 4, n)} <= set(kvs)  # sink + protected window kept
        for pos, (k, v) in kvs.items():
            assert torch.equal(k, before[key][pos][0]) and torch.equal(v, before[key][pos][1])
    if scorer == "streamingllm":
        for kvs in after.values():
            assert set(kvs) == {0, *range(n - len(kvs) + 1, n)}

    # Attention over the compacted cache == attention over the kept KVs.
    q = torch.randn(1, H * 2, D, generator=g)
    for layer in range(L):
        out = torch.zeros_like(q)
        reference.paged_head_attention(
            q, state.pool.kv_pages, state.table.page_table[req.slot, layer].unsqueeze(0),
            counts[layer].unsqueeze(0), torch.tensor([0, 1], dtype=torch.int32), D**-0.5,
            None, torch.zeros(1, dtype=torch.int32), out)
        for h in range(H):
            kvs = after[layer, h]
            keys = torch.stack([kvs[p][0] for p in sorted(kvs)])
            vals = torch.stack([kvs[p][1] for p in sorted(kvs)])
            probs = torch.softmax(q[0, 2 * h:2 * h + 2] @ keys.T * D**-0.5, dim=-1)
            assert torch.allclose(out[0, 2 * h:2 * h + 2], probs @ vals, atol=1e-5)

    # Decode growth: a new block arrives, pages are assigned, nothing clashes.
    grow = geom.blocks_needed(n + N, num_pages) - keep
    new_blocks = [0, 2][:grow]
    state.begin_step(step(cached=[("r", new_blocks)], scheduled={"r": N}))
    fill(state, ["r"], seed=3)
    state.end_step()
    assert state.table.pages_in_use(req) == geom.pages_in_use(n + N, num_pages)
    grown = head_kvs(state, "r")
    for key in grown:
        assert set(grown[key]) == set(after[key]) | set(range(n, n + N))
    used = state.table.used_pages(req)
    assert used.unique().numel() == used.numel()
    assert torch.isin(state.table.block_of_page(used), torch.tensor(req.blocks)).all()


def test_prompt_metric_observation_window_and_pooling():
    state, _ = make_state(rate=0.5, observation_window=3, pooling_kernel=3)
    n = 20
    state.begin_step(step(new=[("a", [0, 1, 2], n)], scheduled={"a": n}, prefill_ends={"a": n}))
    batch = fill(state, ["a"])
    assert batch.metric_q_start.tolist() == [n - 3]
    assert batch.pool_rows == [(0, n, "a")]
    state.end_step()
    # A decode step records from its only query.
    state.begin_step(step(cached=[("a", [])], scheduled={"a": 1}))
    batch = fill(state, ["a"])
    assert batch.metric_q_start.tolist() == [0] and batch.record_metrics and not batch.pool_rows
    state.end_step()


def test_requests_without_a_metric_reader_record_none():
    """StepPlan.no_metric: no metric rows for those requests, in prefill and
    decode; the others in the same batch keep theirs."""
    state, _ = make_state(rate=0.5, observation_window=3)
    n = 20
    state.begin_step(step(new=[("a", [0, 1, 2], n), ("b", [3, 4, 5], n)],
                          scheduled={"a": n, "b": n}, prefill_ends={"a": n, "b": n},
                          no_metric={"b"}))
    batch = fill(state, ["a", "b"])
    assert batch.metric_q_start.tolist() == [n - 3, n] and batch.record_metrics
    assert batch.pool_rows == [(0, n, "a")]  # b has no metric to pool
    state.end_step()
    state.begin_step(step(cached=[("a", []), ("b", [])], scheduled={"a": 1, "b": 1}))
    batch = fill(state, ["a", "b"])
    assert batch.metric_q_start.tolist() == [0, 1]
    state.end_step()
    state.begin_step(step(cached=[("b", [])], scheduled={"b": 1}))
    assert not fill(state, ["b"]).record_metrics
    state.end_step()


@pytest.mark.parametrize("seed", range(6))
def test_metric_rows_follow_the_window_rule_over_random_chunks(seed):
    """``build_batch``'s first metric row of each request (``metric_q_start``),
    ``record_metrics`` and ``pool_rows`` against the rule written per query
    position here: a query records iff its request's metric is read and it is
    in the last ``observation_window`` prompt positions, or a decode query
    with ``record_decode_metrics`` on; a request pools when its prompt
    completes in the step."""
    import random

    rng = random.Random(seed)
    window, decode = rng.randint(1, 12), seed % 2 == 0
    state, _ = make_state(rate=0.5, observation_window=window, record_decode_metrics=decode,
                          pooling_kernel=rng.choice([1, 3]))
    prompts = {"a": rng.randint(5, 22), "b": rng.randint(5, 22), "c": rng.randint(5, 22)}
    no_metric = {rid for rid in prompts if rng.random() < 0.3}
    done = dict.fromkeys(prompts, 0)

    def records(rid, pos):
        if rid in no_metric:
            return False
        end = prompts[rid]
        return end - window <= pos < end or (pos >= end and decode)

    for i in range(12):
        sched = {rid: (min(rng.randint(1, 9), prompts[rid] - done[rid]) if done[rid] < prompts[rid]
                       else 1) for rid in prompts if rng.random() < 0.8 and done[rid] < 28}
        if not sched:
            continue
        new = [(rid, list(range(4 * k, 4 * k + 4)), prompts[rid])  # 4 blocks: 32 tokens
               for k, rid in enumerate(prompts) if done[rid] == 0 and rid in sched]
        cached = [(rid, None) for rid in sched if done[rid] > 0]
        state.begin_step(step(new=new, cached=cached, scheduled=sched,
                              prefill_ends={rid: prompts[rid] for rid, _, _ in new},
                              no_metric=no_metric & {rid for rid, _, _ in new}))
        rids = list(sched)
        rng.shuffle(rids)  # any batch order
        batch = state.build_batch(rids, qsl_of(state, rids))
        expected_start, expected_pool = [], []
        for row, rid in enumerate(rids):
            rec = [records(rid, done[rid] + o) for o in range(sched[rid])]
            first = rec.index(True) if True in rec else len(rec)
            assert all(rec[first:]), "a request's recording queries are its last ones"
            expected_start.append(first)
            if (state.cfg.pooling_kernel > 1 and rid not in no_metric
                    and done[rid] < prompts[rid] == done[rid] + sched[rid]):
                expected_pool.append((row, prompts[rid], rid))
        assert batch.metric_q_start.tolist() == expected_start, (i, rids, done, sched)
        assert batch.record_metrics == any(st < sched[r] for st, r in zip(expected_start, rids))
        assert batch.pool_rows == expected_pool
        state.end_step()
        for rid, n in sched.items():
            done[rid] += n


def test_batched_growth_equals_per_request_growth():
    """``HeadPageTable.append_tokens`` (one batched check per step) assigns
    exactly the pages the per-request ``ensure_capacity`` loop assigns, over
    random steps of prefill chunks and decode tokens, with a compressed
    request whose heads hold different KV counts."""
    import random

    rng = random.Random(0)
    tables = []
    for _ in range(2):
        state, _ = make_state()
        state.begin_step(step(new=[("a", [0, 1, 2], 17), ("b", [3, 4], 9)],
                              scheduled={"a": 17, "b": 9}, prefill_ends={"a": 17, "b": 9}))
        state.end_step()
        geometry = PageGeometry(block_size=N, pages_per_block=L * H)
        state.begin_step(step(cached=[("a", None)], scheduled={},
                              plans=[EvictionPlan(req_id="a", num_pages=L * H, num_tokens=17,
                                                  pages_after=geometry.pages_in_use(17, L * H),
                                                  released_block_ids=(), protected_window=2,
                                                  sink_tokens=0, scorer="random")]))
        state.end_step()
        tables.append(state.table)
    batched, looped = tables
    free = list(range(5, B))  # blocks the scheduler can still hand out
    evicted = {"a": L * H, "b": 0}
    for i in range(8):
        # both requests cross page boundaries in the same step now and then
        sched = {rid: N if i % 4 == 0 else rng.choice([1, 2, 3]) for rid in ("a", "b")}
        for rid, n in sched.items():  # the scheduler's allocation, same for both tables
            req = batched.requests[rid]
            extra = geometry.blocks_needed(req.num_tokens + n, evicted[rid]) - len(req.blocks)
            new_blocks = [free.pop(0) for _ in range(max(0, extra))]
            for t in (batched, looped):
                t.append_blocks(rid, new_blocks)
        batched.append_tokens([batched.requests[r] for r in sched], list(sched.values()))
        for rid, n in sched.items():
            req = looped.requests[rid]
            looped.ensure_capacity(req, n)
            looped.kv_count[req.slot] += n
            req.num_tokens += n
        assert torch.equal(batched.page_table, looped.page_table)
        assert torch.equal(batched.num_pages, looped.num_pages)
        assert torch.equal(batched.kv_count, looped.kv_count)
        assert all(batched.requests[r].num_tokens == looped.requests[r].num_tokens for r in sched)
        assert all(batched.requests[r].step_tokens == sched[r] for r in sched)
        for req in batched.requests.values():  # the per-request check append_tokens relies on
            assert req.slack == int((batched.num_pages[req.slot] * N - batched.kv_count[req.slot]).min())


def test_counts_recorded_by_append_tokens_reach_kv_count_when_read():
    """``append_tokens`` only records each step's counts; ``kv_count`` adds
    them on its next read -- after several unread steps, and where a finished
    request's slot went to a new request in between."""
    state, _ = make_state()
    table = state.table
    a = table.add("a", [0, 1, 2], 5, 5)
    b = table.add("b", [3, 4], 3, 3)
    for _ in range(6):
        table.append_tokens([a, b], [1, 2])
    table.remove("a")
    c = table.add("c", [5], 2, 2)
    assert c.slot == a.slot  # the slot is reused
    table.append_tokens([c, b], [1, 1])
    counts = table.kv_count
    assert (counts[c.slot] == 3).all() and (counts[b.slot] == 3 + 12 + 1).all()
    assert (c.num_tokens, b.num_tokens) == (3, 16)
    assert table.pages_in_use(b) == L * H * 2 and table.pages_in_use(c) == L * H
    for req in (b, c):
        assert req.slack == int((table.num_pages[req.slot] * N - counts[req.slot]).min())


def test_stock_layout_requests_are_marked_and_never_evicted():
    """``StepPlan.stock_layout`` reaches the batch (``AttentionBatch.stock_layout``,
    the CPU backend keeps those requests in vLLM's layout); an eviction plan
    for such a request is refused loudly."""
    state, _ = make_state(rate=0.5)
    state.begin_step(step(new=[("a", [0, 1, 2], 20), ("b", [3, 4, 5], 20)],
                          scheduled={"a": 20, "b": 20}, prefill_ends={"a": 20, "b": 20},
                          no_metric={"b"}, stock_layout={"b"}))
    batch = fill(state, ["a", "b"])
    assert batch.stock_layout.tolist() == [False, True]
    state.end_step()
    state.begin_step(step(cached=[("a", [])], scheduled={"a": 1}))
    assert fill(state, ["a"]).stock_layout is None  # none in vLLM's layout: no mask
    state.end_step()
    geom = PageGeometry(N, L * H)
    plan = EvictionPlan(req_id="b", num_pages=L * H, num_tokens=20,
                        pages_after=geom.pages_in_use(20, L * H), released_block_ids=(),
                        protected_window=2, sink_tokens=0, scorer="random")
    with pytest.raises(RuntimeError, match="request b, which is never compressed"):
        state.begin_step(step(cached=[("b", None)], scheduled={}, plans=[plan]))


def test_check_stock_only_when_every_request_is_never_compressed():
    """The CPU builder's shortcut (``check_stock_only``): True for a step whose
    requests all stay in vLLM's layout, once vLLM's query lengths, sequence
    lengths and block-table rows (blocks, then padding) agree with the
    worker's; False with any request in our layout; a disagreement names the
    request and both sides' numbers."""
    state, _ = make_state(rate=0.5)
    state.begin_step(step(new=[("a", [0, 1, 2], 20), ("b", [3, 4, 5], 12), ("c", [6, 7], 9)],
                          scheduled={"a": 20, "b": 12, "c": 9},
                          prefill_ends={"a": 20, "b": 12, "c": 9},
                          no_metric={"b", "c"}, stock_layout={"b", "c"}))

    def vllm_metadata(ids):
        reqs = [state.table.requests[r] for r in ids]
        seq = torch.tensor([r.num_tokens for r in reqs], dtype=torch.int32)
        table = torch.full((len(ids), 8), 0, dtype=torch.int32)
        for i, r in enumerate(reqs):
            table[i, : len(r.blocks)] = torch.tensor(r.blocks)
        return qsl_of(state, ids), seq, table

    assert not state.check_stock_only(["a", "b", "c"], *vllm_metadata(["a", "b", "c"]))
    assert state.check_stock_only(["c", "b"], *vllm_metadata(["c", "b"]))
    qsl, seq, table = vllm_metadata(["c", "b"])
    with pytest.raises(RuntimeError, match="request c .* 1 query tokens .* scheduled 9"):
        state.check_stock_only(["c", "b"], torch.tensor([0, 1, 2], dtype=torch.int32), seq, table)
    longer = seq.clone()
    longer[1] += 1
    with pytest.raises(RuntimeError, match="request b .* sequence length 13, .* holds 12"):
        state.check_stock_only(["c", "b"], qsl, longer, table)
    moved = table.clone()
    moved[0, 1] = 9
    with pytest.raises(RuntimeError, match=r"request c .* 2 blocks at entry 1: \[9\] vs \[7\]"):
        state.check_stock_only(["c", "b"], qsl, seq, moved)
    # Decode steps: the checks follow the worker's counts and new blocks.
    state.end_step()
    state.begin_step(step(cached=[("b", [8]), ("c", None)], scheduled={"b": 1, "c": 1}))
    qsl, seq, table = vllm_metadata(["b", "c"])
    assert seq.tolist() == [13, 10] and table[0, :4].tolist() == [3, 4, 5, 8]
    assert state.check_stock_only(["b", "c"], qsl, seq, table)


def test_packed_requests_evict_what_plain_ones_evict():
    """A request in vLLM's in-page layout (the pool has a packing, its metric
    is never read) goes through eviction -- key gather for the scorer,
    compaction, page moves out of released blocks -- exactly like the same
    request in plain pages: same page tables and counts, and every kept KV,
    unpacked, equal to the plain state's.  A random permutation stands in for
    vLLM's packing (the worker only uses the offsets)."""
    from kvcompress_vllm.attention.cpu_packed import PagePacking

    g = torch.Generator().manual_seed(7)
    offsets = torch.stack([torch.randperm(N * D, generator=g) for _ in range(2)]).view(2, N, D)
    packing = PagePacking(isa="test", dtype=torch.float32, block_size=N, head_dim=D,
                          offsets=offsets.to(torch.int32))
    n, blocks, num_pages = 37, [3, 7, 1, 9, 4], 12
    geom = PageGeometry(N, L * H)
    keep = geom.blocks_needed(n, num_pages)
    states = []
    for packed in (False, True):
        state, _ = make_state(rate=0.25, protected_window=4, sink_tokens=1)
        if packed:
            state.pool.packing = packing
        state.begin_step(step(new=[("r", blocks, n)], scheduled={"r": n}, prefill_ends={"r": n},
                              no_metric=["r"]))
        assert state.table.requests["r"].packed == packed
        batch = state.build_batch(["r"], qsl_of(state, ["r"]))
        assert (batch.packed is not None) == packed
        kv = torch.Generator().manual_seed(1)
        for layer in range(L):
            k, v = torch.randn(n, H, D, generator=kv), torch.randn(n, H, D, generator=kv)
            reference.write_kv(k, v, state.pool.kv_pages, batch.write_slots[layer],
                               state.pool.metrics, state.pool.positions, batch.token_positions,
                               packing=offsets.int() if packed else None)
        state.end_step()
        plan = EvictionPlan(req_id="r", num_pages=num_pages, num_tokens=n,
                            pages_after=geom.pages_in_use(n, num_pages),
                            released_block_ids=tuple(blocks[keep:]), protected_window=4,
                            sink_tokens=1, scorer="keydiff", allocation="joint")
        state.begin_step(step(plans=[plan]))
        stats = state.end_step()
        assert stats.pages_evicted == num_pages and stats.pages_migrated > 0
        if packed:  # read the pages back in plain order for head_kvs
            pages = state.pool.kv_pages
            halves = pages.reshape(pages.shape[0], 2, N * D)
            plain = torch.stack([halves[:, h, offsets[h].view(-1)] for h in range(2)], 1)
            pages.copy_(plain.view(pages.shape))
        states.append(state)
    plain, packed = states
    slot_a, slot_b = plain.table.requests["r"].slot, packed.table.requests["r"].slot
    assert torch.equal(plain.table.kv_count[slot_a], packed.table.kv_count[slot_b])
    assert torch.equal(plain.table.page_table[slot_a], packed.table.page_table[slot_b])
    want, got = head_kvs(plain, "r"), head_kvs(packed, "r")
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].keys() == got[key].keys()
        for pos, (k, v) in want[key].items():
            assert torch.equal(k, got[key][pos][0]) and torch.equal(v, got[key][pos][1])


def test_compression_leaves_a_shared_prefix_untouched():
    """Prefix caching: b starts with a prefix-cache hit on a's first two
    blocks (vLLM hands it the same block ids and ``num_computed_tokens``).
    Compressing either with its plan's sinks covering those blocks (what the
    scheduler sends) leaves their bytes, positions and every head's page
    mapping as they were, so the other request still reads its prefix; a
    page table that lost one of them is refused loudly."""
    state, _ = make_state(rate=0.25, protected_window=4, sink_tokens=1)
    geom = PageGeometry(N, L * H)
    shared, n = [3, 7], 37
    blocks = {"a": shared + [1, 9, 4], "b": shared + [5, 6, 8]}
    state.begin_step(step(new=[("a", blocks["a"], n)], scheduled={"a": n}, prefill_ends={"a": n}))
    fill(state, ["a"], seed=1)
    state.end_step()
    hit = step(new=[("b", blocks["b"], n)], scheduled={"b": n - 2 * N}, prefill_ends={"b": n})
    hit.scheduled_new_reqs[0].num_computed_tokens = 2 * N  # the hit
    state.begin_step(hit)
    fill(state, ["b"], seed=2)
    state.end_step()
    pages = state.table.block_page_ids(shared).view(-1)
    kv, pos = state.pool.kv_pages[pages].clone(), state.pool.positions[pages].clone()
    prefix = {key: {p: kv_ for p, kv_ in kvs.items() if p < 2 * N}
              for key, kvs in head_kvs(state, "a").items()}
    g = torch.Generator().manual_seed(3)
    state.pool.metrics.copy_(torch.rand(state.pool.metrics.shape, generator=g))
    for rid in ("a", "b"):
        num_pages = L * H * ((n - 4 - 2 * N) // N)  # all that is evictable
        keep = geom.blocks_needed(n, num_pages)
        plan = EvictionPlan(req_id=rid, num_pages=num_pages, num_tokens=n,
                            pages_after=geom.pages_in_use(n, num_pages),
                            released_block_ids=tuple(blocks[rid][keep:]), protected_window=4,
                            sink_tokens=2 * N, scorer="random")
        state.begin_step(step(plans=[plan]))
        state.end_step()
        req = state.table.requests[rid]
        assert req.blocks[:2] == shared
        assert torch.equal(state.pool.kv_pages[pages], kv) and torch.equal(state.pool.positions[pages], pos)
        for other in ("a", "b"):  # both still read the same prefix KVs
            got = head_kvs(state, other)
            for key, kvs in prefix.items():
                for p, (k, v) in kvs.items():
                    assert torch.equal(got[key][p][0], k) and torch.equal(got[key][p][1], v)
    req = state.table.requests["b"]
    state.table.page_table[req.slot, 1, 0, 1] = int(state.table.page_table[req.slot, 1, 0, 2])
    with pytest.raises(RuntimeError, match="request b: after compression, layer 1 head 0 .* "
                                           "logical page 1 of its 2 protected leading blocks"):
        state._check_prefix_intact(plan, req)


def test_a_hit_gets_positions_and_eviction_never_enters_the_protected_prefix():
    """Blocks written by vLLM's own writer (a never-compressed request) carry
    no positions: a request that hits them gets them written (the shared
    prefix is protected by position).  Were a protected KV ever chosen --
    here positions are scrambled after the hit -- the worker refuses to
    compact, naming the request, before anything is moved."""
    state, _ = make_state(rate=0.25, protected_window=4, sink_tokens=1)
    geom = PageGeometry(N, L * H)
    shared, n = [3, 7], 37
    state.begin_step(step(new=[("a", shared + [1, 9, 4], n)], scheduled={"a": n},
                          prefill_ends={"a": n}))
    fill(state, ["a"], seed=1)
    state.end_step()
    pages = state.table.block_page_ids(shared).view(-1)
    state.pool.positions[pages] = 20  # what vLLM's writer leaves: not these KVs' positions
    hit = step(new=[("b", shared + [5, 6, 8], n)], scheduled={"b": n - 2 * N},
               prefill_ends={"b": n})
    hit.scheduled_new_reqs[0].num_computed_tokens = 2 * N
    state.begin_step(hit)
    fill(state, ["b"], seed=2)
    state.end_step()
    want = (torch.arange(2).view(-1, 1, 1) * N + torch.arange(N)).expand(2, L * H, N)
    assert torch.equal(state.pool.positions[pages].view(2, L * H, N), want.int())
    state.pool.positions[pages] = 20  # now protection by position cannot see the prefix
    kv = state.pool.kv_pages[pages].clone()
    num_pages = L * H * ((n - 4 - 2 * N) // N)
    plan = EvictionPlan(req_id="b", num_pages=num_pages, num_tokens=n,
                        pages_after=geom.pages_in_use(n, num_pages),
                        released_block_ids=(), protected_window=4, sink_tokens=2 * N,
                        scorer="streamingllm")  # evicts the oldest unprotected KVs first
    with pytest.raises(RuntimeError, match=r"request b: head row \d+ would evict its KV at "
                                           r"logical index \d+, inside the 16 protected"):
        state.begin_step(step(plans=[plan]))
    assert torch.equal(state.pool.kv_pages[pages], kv)


def test_a_hit_on_a_block_released_in_the_same_step_waits_for_the_eviction():
    """vLLM may hand a block that a compression releases in this step to a new
    request in the same step -- even as a prefix-cache hit, when another
    request writes that block in this step (found by the soak: a parallel
    sample hit its sibling's freshly allocated blocks).  The compressed
    request's live pages still sit in the block until its eviction moves them
    out, so the new request's hit positions must be written after that, or
    they overwrite the compressed request's positions (its newest KVs would
    then look unprotected, or unevictable)."""
    state, _ = make_state(rate=0.25, protected_window=4, sink_tokens=1)
    geom = PageGeometry(N, L * H)
    blocks, n = [3, 7, 1, 9, 4], 37
    state.begin_step(step(new=[("a", blocks, n)], scheduled={"a": n}, prefill_ends={"a": n}))
    fill(state, ["a"], seed=1)
    state.end_step()
    before = head_kvs(state, "a")
    num_pages = 12
    keep = geom.blocks_needed(n, num_pages)
    released = blocks[keep:]
    assert released == [9, 4]
    plan = EvictionPlan(req_id="a", num_pages=num_pages, num_tokens=n,
                        pages_after=geom.pages_in_use(n, num_pages),
                        released_block_ids=tuple(released), protected_window=4,
                        sink_tokens=1, scorer="random")
    # b hits 2 blocks: 5, then 9 (released by a in this step) at b's index 1.
    hit = step(new=[("b", [5, 9, 6], 20)], scheduled={"b": 4}, prefill_ends={"b": 20}, plans=[plan])
    hit.scheduled_new_reqs[0].num_computed_tokens = 2 * N
    state.begin_step(hit)
    state.end_step()
    after = head_kvs(state, "a")
    counts = state.table.kv_count[state.table.requests["a"].slot].view(L, H)
    for key, kvs in after.items():
        assert len(kvs) == int(counts[key]), key  # distinct positions: none overwritten
        assert set(range(n - 4, n)) <= set(kvs) and 0 in kvs, (key, sorted(kvs))  # protected kept
        for pos, (k, v) in kvs.items():  # every KV a holds is one it held, at its position
            assert torch.equal(k, before[key][pos][0]) and torch.equal(v, before[key][pos][1]), (key, pos)
    pages = state.table.block_page_ids([9]).view(-1)  # b's hit positions, written last
    assert (state.pool.positions[pages] == torch.arange(N, 2 * N, dtype=torch.int32)).all()


@pytest.mark.parametrize("bad_position", [2, 21, 4000])
def test_debug_checks_refuse_positions_that_repeat_or_lie_outside(bad_position):
    """With ``debug_checks`` (the plan's ``report_pages``) every step ends by
    checking that each head holds its KVs at distinct positions below the
    request's token count -- what the seed-48 soak bug broke silently until
    a later compression tripped over it.  (Compaction moves tail KVs into
    holes, so positions need not rise; test_eviction_compaction_release_and_growth
    runs that with the check on.)"""
    state, _ = make_state(rate=0.25, protected_window=4, sink_tokens=1)
    blocks, n = [3, 7, 1], 20
    first = step(new=[("a", blocks, n)], scheduled={"a": n}, prefill_ends={"a": n})
    first.kv_compress.report_pages = True
    state.begin_step(first)
    fill(state, ["a"], seed=1)
    assert state.end_step().pages_in_use == {"a": L * H * 3}
    req = state.table.requests["a"]
    page = int(state.table.page_table[req.slot, 2, 1, 1])  # layer 2, head 1, logical 8..15
    state.pool.positions[page, 3] = bad_position  # as if another request had written it
    again = step(cached=[("a", None)], scheduled={"a": 1})
    again.kv_compress.report_pages = True
    state.begin_step(again)
    fill(state, ["a"], seed=2)
    with pytest.raises(RuntimeError, match=r"request a: head row 5 holds 21 KVs whose positions "
                                           r"are not distinct positions below its 21 tokens"):
        state.end_step()
