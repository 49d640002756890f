"""Prefill rows through vLLM's CPU kernel (``attention/cpu_prefill.py``).

The split path (stock rows by vLLM's kernel, own rows and every metric by
ours) against ``ops.reference.paged_head_attention`` on random batches that mix
decode rows, first prefill chunks, later chunks (KVs of earlier chunks already
in the pages), observation windows that start before, inside or after a
chunk, and requests whose heads hold different KV counts (compressed: never
routed to vLLM's kernel).
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
        metrics, out,
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
    plan = cpu_prefill.plan_stock_prefill(
        case.page_table[None], case.kv_lens[None], case.query_start_loc, case.metric_q_start,
        record, case.kv_pages.shape[2], _kernel(case, stock_isa), min_rows=1,
    )
    want = torch.zeros_like(case.query)
    want_m = torch.zeros_like(case.metrics) if record else None
    reference.paged_head_attention(
        case.query, case.kv_pages, case.page_table, case.kv_lens, case.query_start_loc,
        case.scale, want_m, case.metric_q_start, want,
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
