"""Prefill rows through vLLM's own CPU attention kernel (AMX where the CPU has it).

Only two kinds of query rows need our kernel: decode rows (every decode query
adds to the metric) and the observation-window rows of a prompt (queries
``i >= metric_q_start``).  The other rows of a prefill chunk -- usually almost
all of them -- are plain causal attention, which vLLM's CPU kernel computes
several times faster on CPUs with AMX tiles (measured in docs/performance.md).

Per step (``plan_stock_prefill``, once for all layers) the rows are split:

* *stock rows*: the first ``n_stock`` rows of every prefill chunk whose heads
  all hold the same number of KVs in every layer (an uncompressed request --
  vLLM's kernel has one block table per request, not per head) and that has at
  least ``min_rows`` rows before its first metric row;
* *own rows*: everything else, i.e. the newest ``q_len - n_stock`` rows of each
  request, which is again a valid input of ``ops.paged_head_attention`` (its
  queries are the request's newest tokens) with ``metric_q_start`` shifted by
  ``n_stock``.

Per layer (``run_split``) the KVs the stock rows attend to are gathered from
the head-pages into a scratch cache in vLLM's layout (with vLLM's
``cpu_attn_reshape_and_cache``, the way vLLM stages encoder attention), vLLM's
kernel attends the stock rows, ours the own rows.  Metrics are unchanged:
stock rows are exactly the rows that add nothing to them.

``KVCOMPRESS_CPU_PREFILL=own`` sends every row to our kernel (for comparison).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from vllm.utils.math_utils import cdiv

from kvcompress_vllm import ops

ENV = "KVCOMPRESS_CPU_PREFILL"
PATHS = ("vllm", "own")
#: Fewer stock rows than this: the gather of the request's KVs is not worth it.
MIN_STOCK_ROWS = 16
#: Block size of the scratch cache (vLLM's AMX kernel needs a multiple of 32).
SCRATCH_BLOCK = 128


def prefill_path() -> str:
    """``vllm`` (default) or ``own``, from ``KVCOMPRESS_CPU_PREFILL``."""
    path = os.environ.get(ENV, "vllm")
    if path not in PATHS:
        raise ValueError(f"{ENV}={path!r}: allowed values are {', '.join(PATHS)}")
    return path


@dataclass(frozen=True)
class StockKernel:
    """Static facts vLLM's CPU kernel needs (one attention layer group)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    isa: str
    split_kv: bool = True


@dataclass
class StockPrefill:
    """One step's split of the query rows (shared by all layers)."""

    rows_stock: torch.Tensor  # [Ts] int64 query rows vLLM's kernel computes
    rows_own: torch.Tensor  # [To] int64 query rows ours computes
    own_qsl: torch.Tensor  # [R + 1] int32 query_start_loc of the own rows
    own_mqs: torch.Tensor  # [R] int32 metric_q_start of the own rows
    kv_rows: torch.Tensor  # [L, Tk * H] int64 key row in kv_pages.view(-1, D); value = +N
    slot_mapping: torch.Tensor  # [Tk] int64 slot of each gathered KV in the scratch cache
    scratch: torch.Tensor  # [B, H, SCRATCH_BLOCK, 2 * D] vLLM's CPU cache layout
    qsl: torch.Tensor  # [Rs + 1] int32 stock rows per stock request
    seq_lens: torch.Tensor  # [Rs] int32 KVs the last stock row of a request sees
    block_table: torch.Tensor  # [Rs, max_blocks] int32 into the scratch cache
    scheduler_metadata: torch.Tensor
    kernel: StockKernel


def _vllm_ops():
    from vllm import _custom_ops

    return _custom_ops


def _offsets(count: torch.Tensor) -> torch.Tensor:
    """``[0, c0) ++ [0, c1) ++ ...``: each element's index within its segment."""
    return torch.arange(int(count.sum())) - torch.repeat_interleave(
        torch.cumsum(count, 0) - count, count
    )


def plan_stock_prefill(
    page_table: torch.Tensor,  # [L, R, H, max_pages] int32
    kv_lens: torch.Tensor,  # [L, R, H] int32 (including this step's tokens)
    query_start_loc: torch.Tensor,  # [R + 1] int32
    metric_q_start: torch.Tensor,  # [R] int32
    record_metrics: bool,
    block_size: int,
    kernel: StockKernel,
    min_rows: int = MIN_STOCK_ROWS,
) -> StockPrefill | None:
    """Split the step's rows; ``None`` when no row goes to vLLM's kernel."""
    qsl = query_start_loc.long()
    q_len = qsl[1:] - qsl[:-1]  # [R]
    if q_len.numel() == 0 or int(q_len.max()) < min_rows:
        return None
    lens = kv_lens.long()
    uniform = (lens == lens[:1, :, :1]).all(dim=2).all(dim=0)  # [R]
    if record_metrics:
        n_stock = torch.minimum(metric_q_start.long().clamp(min=0), q_len)
    else:
        n_stock = q_len.clone()
    fast = uniform & (n_stock >= min_rows)
    if not bool(fast.any()):
        return None
    n_stock = torch.where(fast, n_stock, 0)
    n_own = q_len - n_stock
    num_reqs = q_len.numel()
    req = torch.arange(num_reqs)

    def rows(start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(start, count) + _offsets(count)

    rows_stock = rows(qsl[:-1], n_stock)
    rows_own = rows(qsl[:-1] + n_stock, n_own)
    own_qsl = torch.zeros(num_reqs + 1, dtype=torch.int32)
    own_qsl[1:] = torch.cumsum(n_own, 0)
    own_mqs = (metric_q_start.long() - n_stock).clamp(min=0).to(torch.int32)

    fr = req[fast]
    seq = lens[0, fr, 0] - n_own[fr]  # [Rs] KVs the stock rows see
    stock_qsl = torch.zeros(fr.numel() + 1, dtype=torch.int32)
    stock_qsl[1:] = torch.cumsum(n_stock[fr], 0)
    nblocks = cdiv(seq, SCRATCH_BLOCK)
    base = torch.cumsum(nblocks, 0) - nblocks
    block_table = (base[:, None] + torch.arange(int(nblocks.max()))[None, :]).to(torch.int32)

    tok_req = torch.repeat_interleave(fr, seq)  # [Tk] request of each gathered KV
    j = _offsets(seq)  # [Tk] logical index of each gathered KV in its head
    slot_mapping = torch.repeat_interleave(base, seq) * SCRATCH_BLOCK + j
    heads = torch.arange(kernel.num_kv_heads)
    pages = page_table[:, tok_req[:, None], heads[None, :], (j // block_size)[:, None]]
    kv_rows = (pages.long() * 2 * block_size + (j % block_size)[:, None]).flatten(1)
    if bool((pages < 0).any()):
        raise RuntimeError(
            "stock prefill: a KV of a prefill chunk has no page "
            f"(requests {fr.tolist()}, KVs {seq.tolist()})"
        )

    # Zeroed: vLLM's kernel multiplies whole blocks, and garbage past a
    # request's last KV could be NaN/inf (NaN * 0 = NaN).
    scratch = torch.zeros(
        int(nblocks.sum()), kernel.num_kv_heads, SCRATCH_BLOCK, 2 * kernel.head_dim,
        dtype=kernel.dtype,
    )
    seq_lens = seq.to(torch.int32)
    sched = _vllm_ops().cpu_attn_get_scheduler_metadata(
        num_reqs=fr.numel(),
        num_heads=kernel.num_heads,
        num_kv_heads=kernel.num_kv_heads,
        head_dim=kernel.head_dim,
        seq_lens=seq_lens,
        dtype=kernel.dtype,
        query_start_loc=stock_qsl,
        causal=True,
        sliding_window_size=-1,
        isa=kernel.isa,
        enable_kv_split=kernel.split_kv,
    )
    return StockPrefill(
        rows_stock=rows_stock, rows_own=rows_own, own_qsl=own_qsl, own_mqs=own_mqs,
        kv_rows=kv_rows, slot_mapping=slot_mapping, scratch=scratch, qsl=stock_qsl,
        seq_lens=seq_lens, block_table=block_table, scheduler_metadata=sched, kernel=kernel,
    )


def run_split(
    plan: StockPrefill,
    layer: int,
    query: torch.Tensor,  # [T, Hq, D]
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    page_table: torch.Tensor,  # [R, H, max_pages] of this layer
    kv_lens: torch.Tensor,  # [R, H] of this layer
    scale: float,
    metrics: torch.Tensor | None,
    output: torch.Tensor,  # [T, Hq, D]
) -> None:
    """Attention of one layer's rows: stock rows by vLLM, own rows by ours."""
    vops = _vllm_ops()
    heads, dim = plan.kernel.num_kv_heads, kv_pages.shape[-1]
    block = kv_pages.shape[2]
    flat = kv_pages.view(-1, dim)
    idx = plan.kv_rows[layer]
    key = flat.index_select(0, idx).view(-1, heads, dim)
    value = flat.index_select(0, idx + block).view(-1, heads, dim)
    cache = plan.scratch.view(plan.scratch.shape[0], heads, 2 * SCRATCH_BLOCK, dim)
    key_cache, value_cache = cache.chunk(2, dim=2)
    vops.cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, plan.slot_mapping, plan.kernel.isa
    )
    q = query.index_select(0, plan.rows_stock)
    out = torch.empty_like(q)
    vops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=plan.qsl, seq_lens=plan.seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=plan.block_table, softcap=0.0,
        scheduler_metadata=plan.scheduler_metadata, s_aux=None,
    )
    output.index_copy_(0, plan.rows_stock, out)
    if plan.rows_own.numel():
        q = query.index_select(0, plan.rows_own)
        out = torch.empty_like(q)
        ops.paged_head_attention(
            q, kv_pages, page_table, kv_lens, plan.own_qsl, scale, metrics, plan.own_mqs, out
        )
        output.index_copy_(0, plan.rows_own, out)
