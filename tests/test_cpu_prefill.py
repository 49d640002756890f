"""Prefill rows through vLLM's CPU kernel (``attention/cpu_prefill.py``).

The split path (stock rows by vLLM's kernel, own rows and every metric by
ours) against ``ops.reference.paged_head_attention`` on random batches that mix
decode rows, first prefill chunks, later chunks (KVs of earlier chunks already
in the pages), observation windows that start before, inside or after a
chunk, and requests whose heads hold different KV counts (compressed: never
routed to vLLM's kernel); and stock-layout requests (never compressed: K/V
written in vLLM's layout at vLLM's slots, every row on vLLM's kernel over the
real cache) mixed with all of those.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_attention_case

from kvcompress_vllm.attention import cpu_prefill
from kvcompress_vllm.ops import reference


@pytest.fixture(scope="module")
def stock_isa():
    import vllm  # noqa: F401  (before vllm._custom_ops)
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    current_platform.import_kernels()
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()  # what vLLM's CPU worker does at start-up
    return lambda dtype, head_dim: _get_attn_isa(dtype, cpu_prefill.SCRATCH_BLOCK, head_dim)


def _kernel(case, isa):
    heads = case.page_table.shape[1]
    return cpu_prefill.StockKernel(
        num_heads=case.query.shape[1], num_kv_heads=heads, head_dim=case.query.shape[2],
        dtype=case.query.dtype, isa=isa(case.query.dtype, case.query.shape[2]),
    )


def _run(case, plan, metrics):
    out = torch.zeros_like(case.query)
    cpu_prefill.run_split(
        plan, 0, case.query, case.kv_pages, case.page_table, case.kv_lens, case.scale,
        metrics, out, metric_k_start=case.metric_k_start,
    )
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("record", [True, False])
def test_split_matches_reference(seed, record, stock_isa):
    g = torch.Generator().manual_seed(1000 + seed)
    case = make_attention_case(
        num_reqs=int(torch.randint(2, 8, (1,), generator=g)), num_kv_heads=int([1, 2, 3][seed % 3]),
        group=int([1, 3, 4][seed % 3]), head_dim=64 if seed % 2 else 128, block_size=[16, 128][seed % 2],
        dtype=torch.bfloat16, max_kv=900, max_q=400, seed=seed, uniform_heads=True,
    )
    if seed % 2:  # request 1 compressed: head 0 holds fewer KVs (stays on our kernel)
        q1 = int(case.query_start_loc[2] - case.query_start_loc[1])
        case.kv_lens[1, 0] = max(q1, int(case.kv_lens[1, 0]) - 40)
    # Prefix-cache hitters: their metric skips their first 0-2 pages' KVs.
    case.metric_k_start = (torch.randint(0, 3, (case.kv_lens.shape[0],), generator=g)
                           * case.kv_pages.shape[2]).to(torch.int32)
    plan = cpu_prefill.plan_stock_prefill(
        case.page_table[None], case.kv_lens[None], case.query_start_loc, case.metric_q_start,
        record, case.kv_pages.shape[2], _kernel(case, stock_isa), min_rows=1,
    )
    want = torch.zeros_like(case.query)
    want_m = torch.zeros_like(case.metrics) if record else None
    reference.paged_head_attention(
        case.query, case.kv_pages, case.page_table, case.kv_lens, case.query_start_loc,
        case.scale, want_m, case.metric_q_start, want, metric_k_start=case.metric_k_start,
    )
    if plan is None:
        pytest.skip("no prefill row qualifies in this case")
    q_len = (case.query_start_loc[1:] - case.query_start_loc[:-1]).long()
    # Exactly the rows before each request's first metric row go to vLLM.
    fast = set(plan.rows_stock.tolist())
    for r in range(q_len.numel()):
        q0 = int(case.query_start_loc[r])
        for i in range(int(q_len[r])):
            if (q0 + i) in fast:
                assert not record or i < int(case.metric_q_start[r])
                assert bool((case.kv_lens[r] == case.kv_lens[r, 0]).all())
    assert sorted(fast | set(plan.rows_own.tolist())) == list(range(case.query.shape[0]))
    got_m = torch.zeros_like(case.metrics) if record else None
    got = _run(case, plan, got_m)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=0)
    if record:
        torch.testing.assert_close(got_m, want_m, rtol=2e-2, atol=1e-6)


def test_rows_without_metric_reach_vllm(stock_isa):
    """One long first chunk with a 32-row observation window: all other rows
    go to vLLM's kernel, so a broken split (wrong rows, wrong causal offset,
    stale scratch) shows up as an output mismatch on almost every row."""
    case = make_attention_case(num_reqs=1, num_kv_heads=3, group=3, head_dim=64,
                               block_size=128, dtype=torch.bfloat16, max_kv=1, max_q=1, seed=5)
    n = 700
    g = torch.Generator().manual_seed(0)
    case.query = torch.randn(n, 9, 64, generator=g).bfloat16()
    case.kv_lens = torch.full((1, 3), n, dtype=torch.int32)
    pages = -(-n // 128)
    case.page_table = torch.randperm(3 * pages + 2, generator=g)[: 3 * pages].view(1, 3, pages).int()
    case.kv_pages = torch.randn(3 * pages + 2, 2, 128, 64, generator=g).bfloat16()
    case.query_start_loc = torch.tensor([0, n], dtype=torch.int32)
    case.metric_q_start = torch.tensor([n - 32], dtype=torch.int32)
    case.metrics = torch.zeros(3 * pages + 2, 128)
    plan = cpu_prefill.plan_stock_prefill(
        case.page_table[None], case.kv_lens[None], case.query_start_loc, case.metric_q_start,
        True, 128, _kernel(case, stock_isa),
    )
    assert plan.rows_stock.tolist() == list(range(n - 32))
    assert plan.rows_own.tolist() == list(range(n - 32, n))
    want, want_m = torch.zeros_like(case.query), torch.zeros_like(case.metrics)
    reference.paged_head_attention(case.query, case.kv_pages, case.page_table, case.kv_lens,
                                   case.query_start_loc, case.scale, want_m,
                                   case.metric_q_start, want)
    got_m = torch.zeros_like(case.metrics)
    got = _run(case, plan, got_m)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(got_m, want_m, rtol=2e-2, atol=1e-6)


def test_short_chunks_and_decode_stay_on_our_kernel(stock_isa):
    case = make_attention_case(num_reqs=6, num_kv_heads=2, group=2, head_dim=64, block_size=128,
                               dtype=torch.bfloat16, max_kv=300, max_q=12, seed=3,
                               uniform_heads=True)
    plan = cpu_prefill.plan_stock_prefill(
        case.page_table[None], case.kv_lens[None], case.query_start_loc, case.metric_q_start,
        False, 128, _kernel(case, stock_isa),
    )
    assert plan is None  # no chunk has MIN_STOCK_ROWS rows


def test_prefill_path_env(monkeypatch):
    monkeypatch.setenv(cpu_prefill.ENV, "own")
    assert cpu_prefill.prefill_path() == "own"
    monkeypatch.setenv(cpu_prefill.ENV, "amx")
    with pytest.raises(ValueError, match="KVCOMPRESS_CPU_PREFILL='amx'.*vllm, own"):
        cpu_prefill.prefill_path()


@pytest.mark.parametrize("seed", range(6))
def test_stock_layout_requests_run_on_vllm_kernel_over_the_real_cache(seed, stock_isa):
    """Requests that are never compressed keep vLLM's own cache layout: their
    K/V are written at vLLM's slots with vLLM's writer and all their rows --
    decode and prefill -- are attended by vLLM's kernel with vLLM's block
    table, in a batch mixed with requests in our layout (gathered prefill rows
    and our kernel).  Outputs and metrics against the reference over the same
    KVs in plain head-pages; the stock-layout requests' metrics stay zero."""
    g = torch.Generator().manual_seed(2000 + seed)
    heads, group, dim = [(1, 1, 64), (2, 3, 128), (3, 3, 64)][seed % 3]
    n, dtype = 128, torch.bfloat16
    num_reqs = int(torch.randint(2, 7, (1,), generator=g))
    direct = torch.rand(num_reqs, generator=g) < 0.5
    direct[seed % num_reqs] = True  # at least one of each kind, but one case all stock-layout
    direct[(seed + 1) % num_reqs] = False
    if seed == 5:
        direct[:] = True
    past = torch.randint(0, 700, (num_reqs,), generator=g)
    q_len = torch.where(torch.rand(num_reqs, generator=g) < 0.4, 1,
                        torch.randint(1, 300, (num_reqs,), generator=g))
    total = past + q_len
    nblocks = (total + n - 1) // n
    num_blocks = int(nblocks.sum()) + 3
    perm = torch.randperm(num_blocks, generator=g)
    blocks, start = [], 0
    for r in range(num_reqs):
        blocks.append(perm[start:start + int(nblocks[r])])
        start += int(nblocks[r])
    width = int(nblocks.max())
    block_table = torch.zeros(num_reqs, width + 2, dtype=torch.int32)  # stale tail columns
    page_table = torch.full((num_reqs, heads, width), -1, dtype=torch.int32)
    for r in range(num_reqs):
        block_table[r, :len(blocks[r])] = blocks[r].int()
        block_table[r, len(blocks[r]):] = 7
        page_table[r, :, :len(blocks[r])] = (blocks[r].view(1, -1) * heads
                                             + torch.arange(heads).view(-1, 1)).int()
    cache = torch.zeros(num_blocks, heads, n, 2 * dim, dtype=dtype)
    kv_pages = cache.view(num_blocks * heads, 2, n, dim)  # the worker's view of the same bytes
    ref_pages = torch.zeros_like(kv_pages)
    metrics = torch.zeros(num_blocks * heads, n)
    positions = torch.zeros(num_blocks * heads, n, dtype=torch.int32)
    keys = [torch.randn(int(total[r]), heads, dim, generator=g).to(dtype) for r in range(num_reqs)]
    vals = [torch.randn(int(total[r]), heads, dim, generator=g).to(dtype) for r in range(num_reqs)]

    def slots(r, pos):  # (our write slots [t, H], vLLM's slot mapping [t]) of positions pos
        pages = page_table[r, :, pos // n].T.long()
        return pages * n + (pos % n).view(-1, 1), blocks[r][pos // n].long() * n + pos % n

    import vllm._custom_ops as vops

    key_cache, value_cache = cache.view(num_blocks, heads, 2 * n, dim).chunk(2, dim=2)
    isa = stock_isa(dtype, dim)
    for r in range(num_reqs):  # the KVs of earlier steps
        pos = torch.arange(int(past[r]))
        ours, theirs = slots(r, pos)
        k, v = keys[r][: int(past[r])], vals[r][: int(past[r])]
        if direct[r]:
            vops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, theirs, isa)
        else:
            reference.write_kv(k, v, kv_pages, ours, metrics, positions, pos)
        all_pos = torch.arange(int(total[r]))
        reference.write_kv(keys[r], vals[r], ref_pages, slots(r, all_pos)[0], None, None, all_pos)
    # This step's tokens.
    qsl = torch.zeros(num_reqs + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_len, 0)
    step_pos = torch.cat([torch.arange(int(past[r]), int(total[r])) for r in range(num_reqs)])
    write_slots = torch.cat([slots(r, torch.arange(int(past[r]), int(total[r])))[0]
                             for r in range(num_reqs)])
    slot_mapping = torch.cat([slots(r, torch.arange(int(past[r]), int(total[r])))[1]
                              for r in range(num_reqs)])
    key = torch.cat([keys[r][int(past[r]):] for r in range(num_reqs)])
    value = torch.cat([vals[r][int(past[r]):] for r in range(num_reqs)])
    query = torch.randn(key.shape[0], heads * group, dim, generator=g).to(dtype)
    window = torch.randint(0, 40, (num_reqs,), generator=g)
    mqs = torch.where(direct, q_len, (q_len - window).clamp(min=0)).to(torch.int32)
    kv_lens = total.view(-1, 1).expand(num_reqs, heads).to(torch.int32).contiguous()
    kernel = cpu_prefill.StockKernel(num_heads=heads * group, num_kv_heads=heads, head_dim=dim,
                                     dtype=dtype, isa=isa)
    plan = cpu_prefill.plan_stock_prefill(
        page_table[None], kv_lens[None], qsl, mqs, True, n, kernel, min_rows=8,
        vllm_inputs=cpu_prefill.VllmInputs(stock_layout=direct, seq_lens=total.int(), block_table=block_table,
                                           slot_mapping=slot_mapping, isa=isa),
    )
    rows_direct = set(plan.stock_layout.rows.tolist())
    assert plan.stock_layout.all_rows == bool(direct.all())
    for r in range(num_reqs):
        rows_r = set(range(int(qsl[r]), int(qsl[r + 1])))
        assert (rows_r <= rows_direct) if direct[r] else not (rows_r & rows_direct)
    assert sorted(rows_direct | set(plan.rows_stock.tolist()) | set(plan.rows_own.tolist())) \
        == list(range(key.shape[0]))
    cpu_prefill.write_kv_split(plan, key, value, cache, kv_pages, write_slots, metrics, positions,
                               step_pos)
    out = torch.zeros_like(query)
    cpu_prefill.run_split(plan, 0, query, kv_pages, page_table, kv_lens, dim**-0.5, metrics, out,
                          kv_cache=cache)
    want, want_m = torch.zeros_like(query), torch.zeros_like(metrics)
    reference.paged_head_attention(query, ref_pages, page_table, kv_lens, qsl, dim**-0.5, want_m,
                                   mqs, want)
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(metrics, want_m, rtol=2e-2, atol=1e-6)
    for r in range(num_reqs):
        pages = page_table[r][page_table[r] >= 0].long()
        if direct[r]:
            assert not bool(metrics[pages].any())
        else:  # our layout: every KV where the reference put it
            pos = torch.arange(int(total[r]))
            page = page_table[r, :, pos // n].long()  # [H, t]
            assert torch.equal(kv_pages[page, :, pos % n], ref_pages[page, :, pos % n])
    # A stock-layout request whose heads hold fewer KVs than vLLM's sequence is refused.
    uneven = kv_lens.clone()
    r = int(torch.nonzero(direct)[0])
    uneven[r, 0] -= n
    with pytest.raises(RuntimeError, match="vLLM's sequence lengths are"):
        cpu_prefill.plan_stock_prefill(
            page_table[None], uneven[None], qsl, mqs, True, n, kernel,
            vllm_inputs=cpu_prefill.VllmInputs(stock_layout=direct, seq_lens=total.int(), block_table=block_table,
                                               slot_mapping=slot_mapping, isa=isa),
        )
    # A stock-layout request whose block table disagrees with its pages is refused.
    bad = block_table.clone()
    r = int(torch.nonzero(direct)[0])
    bad[r, 0] = int(blocks[r][0]) + num_blocks
    with pytest.raises(RuntimeError, match="vLLM's block table"):
        cpu_prefill.plan_stock_prefill(
            page_table[None], kv_lens[None], qsl, mqs, True, n, kernel,
            vllm_inputs=cpu_prefill.VllmInputs(stock_layout=direct, seq_lens=total.int(), block_table=bad,
                                               slot_mapping=slot_mapping, isa=isa),
        )


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(sliding_window=128), "sliding window"),
        (dict(logits_soft_cap=30.0), "logits soft-cap"),
        (dict(kv_sharing_target_layer_name="model.layers.0.self_attn.attn"), "KV sharing"),
    ],
)
def test_cpu_impl_rejects_unsupported(kwargs, needle, monkeypatch):
    """What the CPU backend cannot run is refused when the layer is built,
    naming the feature (a layer that shares another's KV cache would have
    vLLM's cache write run twice on one cache)."""
    from kvcompress_vllm.attention.cpu_backend import KVCompressCPUImpl

    args = dict(num_heads=9, head_size=64, scale=0.125, num_kv_heads=3, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    args.update(kwargs)
    from types import SimpleNamespace

    from vllm.v1.attention.backends import cpu_attn

    # vLLM's impl reads the model dtype from the current config (no engine here).
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config",
                        lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match=f"KV-Compress does not support: {needle}"):
        KVCompressCPUImpl(**args)
