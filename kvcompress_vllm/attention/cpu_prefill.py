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

*Stock-layout requests* (never compressed: ``StepPlan.stock_layout``) go to
vLLM's kernel whole, prefill and decode rows alike, and without a gather:
nothing ever scores, moves or evicts their KVs, so ``forward`` writes them into
the real cache in vLLM's own layout (``cpu_attn_reshape_and_cache`` with
vLLM's slot mapping) and vLLM's kernel reads them there with vLLM's block
table -- exactly what stock vLLM does for them.  Their head-pages in our
layout are never written; only the page bookkeeping (counts, blocks) is kept.

*Packed requests* (compressed, head-pages in vLLM's in-page layout:
``cpu_packed``) go to vLLM's kernel, one sequence per (request, KV head) over
those head-pages, for every row before their ``metric_q_start`` (all rows when
the metric is never read); their metric rows are own rows, attended by our
kernel reading the same pages (``packed`` flags, the pool's packing).

``KVCOMPRESS_CPU_PREFILL=own`` sends every row to our kernel (for comparison);
it also keeps every request in our layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from kvcompress_vllm import ops
from kvcompress_vllm.attention.cpu_packed import (
    METRIC_PAGES,
    METRIC_PAGES_ENV,
    PackedHeads,
    PagePacking,
    attend_packed,
    metric_pages_packed,
    packed_decode_ours,
    write_packed,
)
from kvcompress_vllm.attention.vllm_cpu import (
    StockKernel,
    offsets,
    scheduler_metadata,
    segment_rows,
    vllm_attention,
    vllm_ops,
)

ENV = "KVCOMPRESS_CPU_PREFILL"
PATHS = ("vllm", "own")
#: Fewer stock rows than this: the gather of the request's KVs is not worth it.
MIN_STOCK_ROWS = 16
#: What puts every request in one layout (``PageLayouts.single``).
ONE_LAYOUT_SETTINGS = ("set KVCOMPRESS_METRIC_PAGES=packed (all in vLLM's layout) or "
                       "KVCOMPRESS_CPU_PREFILL=own (all in ours)")
#: Block size of the scratch cache (vLLM's AMX kernel needs a multiple of 32).
SCRATCH_BLOCK = 128


def prefill_path() -> str:
    """``vllm`` (default) or ``own``, from ``KVCOMPRESS_CPU_PREFILL``."""
    path = os.environ.get(ENV, "vllm")
    if path not in PATHS:
        raise ValueError(f"{ENV}={path!r}: allowed values are {', '.join(PATHS)}")
    return path


@dataclass(frozen=True)
class PageLayouts:
    """Which in-page layouts an engine's requests use on CPU: one home for
    the worker (which installs them) and for ``create_engine_config``'s
    prefix-caching check (which must know before the worker exists)."""

    packing: PagePacking | None  # vLLM's layout, learned (None: every request in our plain rows)
    metric_packed: bool  # requests that record the metric stay in vLLM's layout too
    decode_ours: bool  # decode rows of metric-free packed requests on our kernel

    @classmethod
    def decide(cls, dtype: torch.dtype, block_size: int, head_dim: int,
               cache_dtype: str) -> "PageLayouts":
        """From the prefill path, the cache's dtype and shape and the CPU
        (``metric_pages_packed``, ``packed_decode_ours``)."""
        if prefill_path() != "vllm":
            return cls(None, False, False)
        isa = _get_attn_isa(dtype, block_size, head_dim, cache_dtype)
        packing = PagePacking.learn(dtype, block_size, head_dim, isa)
        return cls(packing, metric_pages_packed(packing), packed_decode_ours(packing))

    @property
    def single(self) -> bool:
        """Every request's pages are in one layout -- what prefix caching needs,
        since a cached block is read by requests other than its writer."""
        return self.packing is None or self.metric_packed

    def two_layouts(self) -> str | None:
        """Why requests would use two layouts here (None: they use one)."""
        if self.single:
            return None
        return (f"requests that record the metric would use our plain layout next to "
                f"vLLM's {self.packing.isa} layout for the others (our kernel's path "
                f"{ops.cpu_isa()}, {METRIC_PAGES_ENV}="
                f"{os.environ.get(METRIC_PAGES_ENV, METRIC_PAGES[0])}); {ONE_LAYOUT_SETTINGS}")

    def check_prefix_caching(self, enabled: bool) -> None:
        """Raises, naming the flag and the ways out, if prefix caching is
        ``enabled`` where requests would use two layouts."""
        why = self.two_layouts() if enabled else None
        if why:
            raise RuntimeError(
                "KV-Compress with --enable-prefix-caching needs every request's pages in "
                f"one layout (a cached block is read by other requests), but {why}, or "
                "drop --enable-prefix-caching"
            )


@dataclass
class StockLayoutRows:
    """The rows of stock-layout requests: vLLM's kernel on the real cache."""

    rows: torch.Tensor  # [Td] int64 token rows (all rows of those requests)
    write_rows_own: torch.Tensor | None  # [T - Td] int64 the other token rows (None: none)
    slot_mapping: torch.Tensor  # [Td] int64 vLLM's slot of each row's K/V
    qsl: torch.Tensor  # [Rd + 1] int32
    seq_lens: torch.Tensor  # [Rd] int32
    block_table: torch.Tensor  # [Rd, max_blocks] int32 vLLM's block table rows
    scheduler_metadata: torch.Tensor
    isa: str  # vLLM's ISA for the real cache's block size

    @property
    def all_rows(self) -> bool:
        """Every row of the step is a stock-layout row: no row gathering."""
        return self.write_rows_own is None


@dataclass
class VllmInputs:
    """What vLLM's own metadata says about the step (stock-layout requests)."""

    stock_layout: torch.Tensor  # [R] bool
    seq_lens: torch.Tensor  # [R] int32 vLLM's tokens per request (this step's included)
    block_table: torch.Tensor  # [R, max_blocks] int32 vLLM's block table
    slot_mapping: torch.Tensor  # [T] int64 vLLM's slot of every token
    isa: str  # vLLM's ISA for the real cache's block size


@dataclass
class StockPrefill:
    """One step's split of the query rows (shared by all layers)."""

    rows_stock: torch.Tensor  # [Ts] int64 query rows vLLM's kernel computes (scratch)
    rows_own: torch.Tensor | None  # [To] int64 query rows ours computes (None: every row)
    own_qsl: torch.Tensor  # [R + 1] int32 query_start_loc of the own rows
    own_mqs: torch.Tensor  # [R] int32 metric_q_start of the own rows
    kv_rows: torch.Tensor  # [L, Tk * H] int64 key row in kv_pages.view(-1, D); value = +N
    slot_mapping: torch.Tensor  # [Tk] int64 slot of each gathered KV in the scratch cache
    scratch: torch.Tensor  # [B, H, SCRATCH_BLOCK, 2 * D] vLLM's CPU cache layout
    qsl: torch.Tensor  # [Rs + 1] int32 stock rows per stock request
    seq_lens: torch.Tensor  # [Rs] int32 KVs the last stock row of a request sees
    block_table: torch.Tensor  # [Rs, max_blocks] int32 into the scratch cache
    scheduler_metadata: torch.Tensor | None  # None: no gathered rows
    kernel: StockKernel
    stock_layout: StockLayoutRows | None = None
    #: Rows of requests in vLLM's layout attended per KV head (``cpu_packed``).
    packed: PackedHeads | None = None
    #: Rows ``ops.write_kv`` writes into our layout (None: every row).
    write_rows_own: torch.Tensor | None = None
    #: [R] bool: requests whose own rows read packed head-pages (None: none).
    own_packed: torch.Tensor | None = None


def plan_stock_prefill(
    page_table: torch.Tensor,  # [L, R, H, max_pages] int32
    kv_lens: torch.Tensor,  # [L, R, H] int32 (including this step's tokens)
    query_start_loc: torch.Tensor,  # [R + 1] int32
    metric_q_start: torch.Tensor,  # [R] int32
    record_metrics: bool,
    block_size: int,
    kernel: StockKernel,
    min_rows: int = MIN_STOCK_ROWS,
    vllm_inputs: VllmInputs | None = None,
    packed: PackedHeads | None = None,
) -> StockPrefill | None:
    """Split the step's rows; ``None`` when no row goes to vLLM's kernel.

    ``vllm_inputs`` marks the stock-layout requests (all their rows go to
    vLLM's kernel on the real cache), ``packed`` the requests in vLLM's
    layout attended per KV head (their rows before ``metric_q_start``; the
    rest are own rows, on packed pages: ``own_packed``); without them every
    request is in our layout."""
    num_reqs = query_start_loc.shape[0] - 1
    direct = None if vllm_inputs is None else vllm_inputs.stock_layout.to(torch.bool)
    any_direct = direct is not None and bool(direct.any())
    if packed is not None and packed.rows is None and not any_direct:
        return _packed_only(packed, num_reqs, page_table.shape[0], kernel)
    if (packed is not None and not any_direct and not packed.layers
            and bool(packed.mask.all())):  # e.g. decode steps: every row to our kernel
        return _packed_only(packed, num_reqs, page_table.shape[0], kernel,
                            own_all=(query_start_loc, metric_q_start))
    qsl = query_start_loc.long()
    q_len = qsl[1:] - qsl[:-1]  # [R]
    if direct is None:
        direct = torch.zeros(num_reqs, dtype=torch.bool)
    # Requests not in our plain layout: every row to vLLM's kernel, but the
    # rows of packed requests that plan_packed leaves to ours (metric rows;
    # with decode_ours, decode rows): own rows on packed pages.
    in_vllm = direct if packed is None else direct | packed.mask
    if num_reqs == 0 or (packed is None and not any_direct and int(q_len.max()) < min_rows):
        return None
    lens = kv_lens.long()
    uniform = (lens == lens[:1, :, :1]).all(dim=2).all(dim=0)  # [R]
    if record_metrics:
        n_stock = torch.minimum(metric_q_start.long().clamp(min=0), q_len)
    else:
        n_stock = q_len.clone()
    fast = uniform & (n_stock >= min_rows) & ~in_vllm
    if not bool(fast.any()) and not any_direct and packed is None:
        return None
    n_stock = torch.where(fast, n_stock, 0)
    # Own rows start after the gathered rows (plain requests) or after the
    # rows vLLM's kernel attends per head (packed requests).
    own_start = n_stock if packed is None else torch.where(packed.mask, packed.vllm_rows, n_stock)
    n_own = torch.where(direct, 0, q_len - own_start)
    ours = ~in_vllm
    write_rows_own = None if bool(ours.all()) else segment_rows(qsl[:-1], torch.where(ours, q_len, 0))
    req = torch.arange(num_reqs)

    rows_stock = segment_rows(qsl[:-1], n_stock)
    rows_own = segment_rows(qsl[:-1] + own_start, n_own)
    own_qsl = torch.zeros(num_reqs + 1, dtype=torch.int32)
    own_qsl[1:] = torch.cumsum(n_own, 0)
    own_mqs = (metric_q_start.long() - own_start).clamp(min=0).to(torch.int32)
    own_packed = None
    if packed is not None and bool((packed.mask & (n_own > 0)).any()):
        own_packed = packed.mask
    stock_layout = (
        _plan_stock_layout(vllm_inputs, direct, qsl, q_len, lens, page_table, kernel)
        if any_direct
        else None
    )

    fr = req[fast]
    seq = lens[0, fr, 0] - n_own[fr]  # [Rs] KVs the stock rows see
    stock_qsl = torch.zeros(fr.numel() + 1, dtype=torch.int32)
    stock_qsl[1:] = torch.cumsum(n_stock[fr], 0)
    seq_lens = seq.to(torch.int32)
    if fr.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return StockPrefill(
            rows_stock=empty, rows_own=rows_own, own_qsl=own_qsl, own_mqs=own_mqs,
            kv_rows=torch.zeros(page_table.shape[0], 0, dtype=torch.int64),
            slot_mapping=empty, scratch=torch.zeros(0), qsl=stock_qsl, seq_lens=seq_lens,
            block_table=torch.zeros(0, 1, dtype=torch.int32), scheduler_metadata=None,
            kernel=kernel, stock_layout=stock_layout, packed=packed, write_rows_own=write_rows_own,
            own_packed=own_packed,
        )
    nblocks = cdiv(seq, SCRATCH_BLOCK)
    base = torch.cumsum(nblocks, 0) - nblocks
    block_table = (base[:, None] + torch.arange(int(nblocks.max()))[None, :]).to(torch.int32)

    tok_req = torch.repeat_interleave(fr, seq)  # [Tk] request of each gathered KV
    j = offsets(seq)  # [Tk] logical index of each gathered KV in its head
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
    sched = scheduler_metadata(kernel, seq_lens, stock_qsl, kernel.isa)
    return StockPrefill(
        rows_stock=rows_stock, rows_own=rows_own, own_qsl=own_qsl, own_mqs=own_mqs,
        kv_rows=kv_rows, slot_mapping=slot_mapping, scratch=scratch, qsl=stock_qsl,
        seq_lens=seq_lens, block_table=block_table, scheduler_metadata=sched, kernel=kernel,
        stock_layout=stock_layout, packed=packed, write_rows_own=write_rows_own,
        own_packed=own_packed,
    )


def _packed_only(packed: PackedHeads, num_reqs: int, num_layers: int, kernel: StockKernel,
                 own_all: tuple[torch.Tensor, torch.Tensor] | None = None) -> StockPrefill:
    """Every request is packed and nothing needs splitting: every row goes to
    vLLM's kernel per head, or with ``own_all = (query_start_loc,
    metric_q_start)`` (``plan_packed`` left vLLM no rows: every row records
    the metric or is a decode row for our kernel) every row goes to our
    kernel on the packed pages, without row copies."""
    empty = torch.zeros(0, dtype=torch.int64)
    zeros = torch.zeros(num_reqs + 1, dtype=torch.int32)
    rows_own, own_qsl, own_mqs, own_packed = empty, zeros, zeros[:-1], None
    if own_all is not None:
        rows_own, own_packed = None, packed.mask
        own_qsl, own_mqs = (t.to(torch.int32) for t in own_all)
    return StockPrefill(
        rows_stock=empty, rows_own=rows_own, own_qsl=own_qsl, own_mqs=own_mqs,
        kv_rows=torch.zeros(num_layers, 0, dtype=torch.int64), slot_mapping=empty,
        scratch=torch.zeros(0), qsl=zeros[:1], seq_lens=torch.zeros(0, dtype=torch.int32),
        block_table=torch.zeros(0, 1, dtype=torch.int32), scheduler_metadata=None,
        kernel=kernel, packed=packed, write_rows_own=empty, own_packed=own_packed,
    )


def _plan_stock_layout(
    inputs: VllmInputs,
    direct: torch.Tensor,  # [R] bool
    qsl: torch.Tensor,  # [R + 1] int64
    q_len: torch.Tensor,  # [R] int64
    lens: torch.Tensor,  # [L, R, H] int64
    page_table: torch.Tensor,  # [L, R, H, max_pages] int32
    kernel: StockKernel,
) -> StockLayoutRows:
    """vLLM's kernel inputs for the stock-layout requests' rows (a step that
    also has requests in our layout), after checking the invariant that makes
    the real cache readable with vLLM's block table -- such a request is
    uncompressed, so every head of every layer holds all of vLLM's
    ``seq_lens`` tokens, and its head-pages are ``page_id(l, block, h)`` of
    exactly the blocks in vLLM's block table, in order (checked on layer 0,
    head 0; the other heads' pages follow from the same identity layout)."""
    dr = torch.nonzero(direct).view(-1)  # [Rd] batch rows of the stock-layout requests
    rows = segment_rows(qsl[:-1], torch.where(direct, q_len, 0))  # [Td] their token rows
    others = segment_rows(qsl[:-1], torch.where(direct, 0, q_len))
    kv_counts = lens[:, dr, :].permute(1, 0, 2).reshape(dr.numel(), -1)  # [Rd, L*H]
    seq = inputs.seq_lens.index_select(0, dr).long()  # [Rd]
    if not bool((kv_counts == seq.view(-1, 1)).all()):
        raise RuntimeError(
            f"stock-layout requests (batch rows {dr.tolist()[:8]}): heads hold "
            f"{sorted(set(kv_counts.flatten().tolist()))[:8]} KVs, vLLM's sequence "
            f"lengths are {seq.tolist()[:8]}: they must never be compressed"
        )
    heads = kernel.num_kv_heads
    first_pages = page_table[0, dr, 0]  # [Rd, max_pages] layer 0, head 0
    block_table = inputs.block_table.index_select(0, dr)
    used = min(first_pages.shape[1], block_table.shape[1])
    pages = first_pages[:, :used].long()  # layer 0, head 0: page = block * H
    valid = pages >= 0
    if not bool((block_table[:, :used].long()[valid] == pages[valid] // heads).all()):
        raise RuntimeError(
            f"stock-layout requests (batch rows {dr.tolist()[:8]}): vLLM's block table "
            f"{block_table[:, :used].tolist()[:4]} differs from the worker's pages "
            f"{(pages // heads).tolist()[:4]}"
        )
    d_qsl = torch.zeros(dr.numel() + 1, dtype=torch.int32)
    d_qsl[1:] = torch.cumsum(q_len.index_select(0, dr), 0)
    seq_lens = seq.to(torch.int32)
    sched = scheduler_metadata(kernel, seq_lens, d_qsl, inputs.isa)
    return StockLayoutRows(
        rows=rows,
        write_rows_own=others if others.numel() else None,
        slot_mapping=inputs.slot_mapping.index_select(0, rows).long(),
        qsl=d_qsl,
        seq_lens=seq_lens,
        block_table=block_table.contiguous(),
        scheduler_metadata=sched,
        isa=inputs.isa,
    )


def _vllm_cache(cache: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, block, 2D]`` -> vLLM's (key_cache, value_cache) views."""
    view = cache.view(cache.shape[0], cache.shape[1], 2 * block, -1)
    key_cache, value_cache = view.chunk(2, dim=2)
    return key_cache, value_cache


def _write_stock_layout(sl: StockLayoutRows, key: torch.Tensor, value: torch.Tensor,
                        kv_cache: torch.Tensor) -> None:
    """``key``/``value`` ``[Td, H, D]`` of ``sl.rows`` at vLLM's slots, in vLLM's layout."""
    key_cache, value_cache = _vllm_cache(kv_cache, kv_cache.shape[2])
    vllm_ops().cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, sl.slot_mapping, sl.isa)


def _attend_stock_layout(sl: StockLayoutRows, query: torch.Tensor, kv_cache: torch.Tensor,
                         out: torch.Tensor, scale: float) -> None:
    """vLLM's kernel on the real cache for ``query``/``out`` ``[Td, Hq, D]`` of ``sl.rows``."""
    key_cache, value_cache = _vllm_cache(kv_cache, kv_cache.shape[2])
    vllm_attention(query, key_cache, value_cache, out, sl.qsl, sl.seq_lens, sl.block_table,
                    sl.scheduler_metadata, scale)


def write_kv_split(
    plan: StockPrefill | None,
    key: torch.Tensor,  # [T, H, D]
    value: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [B, H, N, 2D] this layer's real cache
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    write_slots: torch.Tensor,  # [T, H] of this layer
    metrics: torch.Tensor,
    positions: torch.Tensor,
    token_positions: torch.Tensor,  # [T]
    packing=None,  # cpu_packed.PagePacking of the pool (packed rows only)
) -> None:
    """Write the step's K/V: stock-layout requests' in vLLM's layout at vLLM's
    slots, packed requests' in vLLM's layout at their heads' slots, everyone
    else's into their head-pages (``ops.write_kv``)."""
    if plan is None:
        ops.write_kv(key, value, kv_pages, write_slots, metrics, positions, token_positions)
        return
    sl = plan.stock_layout
    if sl is not None:
        k, v = (key, value) if sl.all_rows else (key.index_select(0, sl.rows), value.index_select(0, sl.rows))
        _write_stock_layout(sl, k, v, kv_cache)
    if plan.packed is not None:
        write_packed(plan.packed, packing, key, value, kv_pages, write_slots, metrics, positions,
                     token_positions)
    r = plan.write_rows_own
    if r is None:
        ops.write_kv(key, value, kv_pages, write_slots, metrics, positions, token_positions)
    elif r.numel():
        ops.write_kv(
            key.index_select(0, r), value.index_select(0, r), kv_pages,
            write_slots.index_select(0, r), metrics, positions, token_positions.index_select(0, r),
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
    kv_cache: torch.Tensor | None = None,  # [B, H, N, 2D] this layer's real cache
    packing: torch.Tensor | None = None,  # [2, N, D] the pool's packing (packed own rows)
    metric_k_start: torch.Tensor | None = None,  # [R] int32 (AttentionBatch.metric_k_start)
) -> None:
    """Attention of one layer's rows: stock-layout requests by vLLM on the real
    cache, packed requests by vLLM per KV head on the head-pages, gathered
    prefill rows by vLLM on the scratch cache, own rows by ours (on plain or,
    for packed requests' metric rows, packed head-pages)."""
    sl = plan.stock_layout
    if sl is not None:
        if kv_cache is None:
            raise ValueError("run_split: stock-layout rows need the layer's real cache")
        q = query if sl.all_rows else query.index_select(0, sl.rows)
        out = output if sl.all_rows else torch.empty_like(q)
        _attend_stock_layout(sl, q, kv_cache, out, scale)
        if not sl.all_rows:
            output.index_copy_(0, sl.rows, out)
    if plan.packed is not None:
        attend_packed(plan.packed, layer, query, output, scale)
    if plan.rows_stock.numel():
        _run_gathered(plan, layer, query, kv_pages, scale, output)
    every = plan.rows_own is None
    if every or plan.rows_own.numel():
        q = query if every else query.index_select(0, plan.rows_own)
        out = output if every else torch.empty_like(q)
        own_packing = None
        if plan.own_packed is not None:
            if packing is None:
                raise ValueError("run_split: own rows on packed head-pages need the pool's packing")
            own_packing = packing
        ops.paged_head_attention(
            q, kv_pages, page_table, kv_lens, plan.own_qsl, scale, metrics, plan.own_mqs, out,
            own_packing, plan.own_packed, metric_k_start=metric_k_start,
        )
        if not every:
            output.index_copy_(0, plan.rows_own, out)


def _run_gathered(
    plan: StockPrefill,
    layer: int,
    query: torch.Tensor,  # [T, Hq, D]
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    scale: float,
    output: torch.Tensor,  # [T, Hq, D]
) -> None:
    """Gathered prefill rows: their KVs copied from the head-pages into the
    scratch cache in vLLM's layout, then vLLM's kernel."""
    vops = vllm_ops()
    heads, dim = plan.kernel.num_kv_heads, kv_pages.shape[-1]
    block = kv_pages.shape[2]
    flat = kv_pages.view(-1, dim)
    idx = plan.kv_rows[layer]
    key = flat.index_select(0, idx).view(-1, heads, dim)
    value = flat.index_select(0, idx + block).view(-1, heads, dim)
    key_cache, value_cache = _vllm_cache(plan.scratch, SCRATCH_BLOCK)
    vops.cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, plan.slot_mapping, plan.kernel.isa
    )
    q = query.index_select(0, plan.rows_stock)
    out = torch.empty_like(q)
    vllm_attention(q, key_cache, value_cache, out, plan.qsl, plan.seq_lens, plan.block_table,
                    plan.scheduler_metadata, scale)
    output.index_copy_(0, plan.rows_stock, out)
