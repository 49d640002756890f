"""Compressible requests in vLLM's own in-page layout, attended per KV head by
vLLM's CPU kernel.

A request compressed by a scorer that does not read the attention metric
(``RequestPolicy.records_metric`` false: the default ``keydiff``, ``knorm``,
...) needs nothing from our attention kernel: no query of it adds to a
metric.  Its KVs still live in head-pages with a variable number of KVs per
(layer, KV head), so vLLM's kernel cannot read them with vLLM's block table --
but it can read them with *one sequence per (request, KV head)*: a head-page
of ``N`` tokens of one KV head is exactly one block of a cache with one KV
head, so

    key_cache   = kv_pages[:, 0:1]       # [P, 1, N, D]  (block = head-page)
    value_cache = kv_pages[:, 1:2]
    sequence (r, h): the G query heads of KV head h,
                     seq_len = kv_count[l, r, h], block table = page_table[l, r, h]

is a valid input of ``cpu_attention_with_kv_cache`` (causal: a chunk's
queries are the newest tokens of every head, compressed or not).  For that
the K/V must be in vLLM's in-page layout (``cpu_attn_reshape_and_cache``
packs K per ISA, e.g. transposed for AMX tiles), which is a fixed permutation
of a page's ``N * D`` elements.  ``PagePacking`` learns it from vLLM's own
writer at start-up; compaction (``ops.compact_heads(..., packing=)``) and the
scorers' key gather read pages through it.  The kernel itself is vLLM's:
AMX where the CPU has it, 0.7-1.0x its time on the same KVs read per request
(docs/performance.md section 2).

Per step, ``plan_packed`` (builder, once for all layers) makes the per-layer
block tables, sequence lengths and vLLM scheduler metadata; ``write_packed`` /
``attend_packed`` (``forward``, per layer) only call vLLM's ops.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.utils.math_utils import cdiv

from kvcompress_vllm import ops
from kvcompress_vllm.attention.vllm_cpu import (
    StockKernel,
    offsets,
    scheduler_metadata,
    segment_rows,
    vllm_attention,
    vllm_ops,
)

#: Values written to learn the layout: every coordinate c as (c % _BASE, c // _BASE),
#: both exact in bf16 (8 significant bits) for pages of up to _BASE**2 elements per row.
_BASE = 64


@dataclass(frozen=True)
class PagePacking:
    """Where vLLM's CPU cache writer puts element ``(slot, d)`` of a head-page."""

    isa: str
    dtype: torch.dtype
    block_size: int
    head_dim: int
    #: [2, N, D] int32: offset of (slot, d) within the K (0) / V (1) half-page.
    offsets: torch.Tensor

    @classmethod
    def learn(cls, dtype: torch.dtype, block_size: int, head_dim: int, isa: str) -> "PagePacking":
        """Write coordinates with vLLM's ``cpu_attn_reshape_and_cache`` into two
        scratch pages and read back where they landed.  Raises if the writer
        does not place every (slot, dim) at one offset, the same in every page."""
        vops = vllm_ops()
        n, d = block_size, head_dim
        if max(n, d) > _BASE * _BASE:
            raise ValueError(f"PagePacking: block_size {n} / head_dim {d} above {_BASE * _BASE}")
        pages = torch.zeros(2, 2, n, d, dtype=dtype)  # two head-pages
        key_cache, value_cache = pages[:, 0:1], pages[:, 1:2]
        slots = torch.arange(2 * n, dtype=torch.int64)  # both pages, every slot
        tok = torch.arange(n).repeat(2).view(-1, 1, 1).expand(2 * n, 1, d)
        dim = torch.arange(d).view(1, 1, d).expand(2 * n, 1, d)
        coords = []
        for value in (tok % _BASE, tok // _BASE, dim % _BASE, dim // _BASE):
            v = value.to(dtype).contiguous()
            vops.cpu_attn_reshape_and_cache(v, v, key_cache, value_cache, slots, isa)
            coords.append(pages.view(2, 2, n * d).to(torch.int64))  # [page, half, element]
        t = coords[0] + _BASE * coords[1]
        c = coords[2] + _BASE * coords[3]
        logical = t * d + c  # [page, half, element]: which (slot, dim) element e holds
        every = torch.arange(n * d)
        for h, name in enumerate(("K", "V")):
            if not torch.equal(logical[0, h], logical[1, h]) or not torch.equal(
                torch.sort(logical[0, h]).values, every
            ):
                raise RuntimeError(
                    f"vLLM's CPU cache writer (isa {isa}, {dtype}, block_size {n}, head_dim {d}) "
                    f"does not put each (slot, dim) of a {name} page at one fixed offset; "
                    "KV-Compress cannot keep compressible requests in vLLM's layout. "
                    "Set KVCOMPRESS_CPU_PREFILL=own to keep them in its own layout."
                )
        offsets = torch.empty(2, n * d, dtype=torch.int64)
        for h in range(2):
            offsets[h, logical[0, h]] = every
        return cls(isa=isa, dtype=dtype, block_size=n, head_dim=d,
                   offsets=offsets.view(2, n, d).to(torch.int32))

    def unpack_keys(self, kv_pages: torch.Tensor, page_rows: torch.Tensor) -> torch.Tensor:
        """Keys of whole head-pages in plain order: ``page_rows [r, np]`` int
        page ids (< 0: padding, zeros) -> ``[r, np * N, D]``."""
        keys = ops.unpack_pages(kv_pages, page_rows, self.offsets, 0)  # [r, np, N, D]
        return keys.view(page_rows.shape[0], -1, self.head_dim)


@dataclass
class PackedHeads:
    """One step's rows of requests in vLLM's layout (``RequestPages.packed``):
    every row of them goes to vLLM's kernel, one sequence per (request, KV head)."""

    mask: torch.Tensor  # [R] bool: the packed requests of the batch
    #: [Tp] int64 their token rows; None: every row of the step.
    rows: torch.Tensor | None
    #: [Sq] int64 rows of ``query.view(T * H, G, D)`` in (request, head, token)
    #: order; None: the identity (every row of the step is a packed decode row).
    q_index: torch.Tensor | None
    qsl: torch.Tensor  # [Rp * H + 1] int32
    #: ``kv_pages`` as vLLM's (key_cache, value_cache) of one KV head: ``[P, 1, N, D]``.
    caches: tuple[torch.Tensor, torch.Tensor]
    seq_heads: int  # KV heads per token row (sequences per request)
    #: Per layer: (seq_lens [Rp * H] int32 KVs of every head, this step's
    #: included; block_table [Rp * H, width] int32 head-page ids; vLLM's
    #: scheduler metadata) -- what ``attend_packed`` passes.
    layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def plan_packed(
    mask: torch.Tensor,  # [R] bool
    page_table: torch.Tensor,  # [L, R, H, width] int32
    kv_lens: torch.Tensor,  # [L, R, H] int32 (including this step's tokens)
    query_start_loc: torch.Tensor,  # [R + 1] int32
    kernel: StockKernel,  # of the layer group
    kv_pages: torch.Tensor,  # [P, 2, N, D] the pool's head-pages
    req_ids: list[str] | None = None,
) -> PackedHeads:
    """vLLM's kernel inputs for the packed requests' rows, every layer.

    Checks what vLLM's kernel cannot: every head holds this step's tokens
    (``kv_lens >= q_len``) and every page a head's KVs need is a real
    head-page.  Raises naming the request otherwise."""
    num_layers, num_reqs, heads, width = page_table.shape
    num_pages, _, block_size, _ = kv_pages.shape
    qsl = query_start_loc.long()
    q_len = qsl[1:] - qsl[:-1]
    pr = torch.nonzero(mask).view(-1)
    if pr.numel() == num_reqs:  # every request packed (the usual decode step)
        lens, pq, table = kv_lens, q_len, page_table
    else:
        lens = kv_lens.index_select(1, pr)  # [L, Rp, H]
        pq = q_len.index_select(0, pr)  # [Rp]
        table = page_table.index_select(1, pr)  # [L, Rp, H, width]
    need = cdiv(lens.long(), block_size)  # [L, Rp, H] pages each head reads
    bad = (lens.long() < pq.view(1, -1, 1)) | (need > width)
    bad |= ((torch.arange(width).view(1, 1, 1, -1) < need.unsqueeze(-1))
            & ((table < 0) | (table >= num_pages))).any(-1)
    if bool(bad.any()):
        layer, r, head = (int(i) for i in torch.nonzero(bad)[0])
        row = int(pr[r])
        name = req_ids[row] if req_ids is not None else f"batch row {row}"
        raise RuntimeError(
            f"request {name} (vLLM layout, per-head attention): layer {layer} head {head} "
            f"holds {int(lens[layer, r, head])} KVs for {int(pq[r])} new tokens in pages "
            f"{table[layer, r, head].tolist()[:8]} (of {num_pages} head-pages)"
        )
    rows = segment_rows(qsl[:-1].index_select(0, pr), pq)  # [Tp]
    num_tokens = int(qsl[-1])
    identity = rows.numel() == num_tokens
    decode_only = identity and bool((pq == 1).all())
    head = torch.arange(heads)
    if decode_only:
        q_index = None
    else:  # sequence (r, h) reads rows qsl[r] + [0, q_len[r]) of query head group h
        seq_q = pq.repeat_interleave(heads)  # [Rp * H]
        seq_start = (qsl[:-1].index_select(0, pr).view(-1, 1) * heads + head.view(1, -1)).view(-1)
        q_index = torch.repeat_interleave(seq_start, seq_q) + offsets(seq_q) * heads
    seq_q_len = pq.repeat_interleave(heads)
    seq_qsl = torch.zeros(seq_q_len.numel() + 1, dtype=torch.int32)
    seq_qsl[1:] = torch.cumsum(seq_q_len, 0)
    seq_lens = lens.reshape(num_layers, -1).contiguous()  # [L, Rp * H]
    block_table = table.reshape(num_layers, -1, width).contiguous()
    per_head = dataclasses.replace(
        kernel, num_heads=kernel.num_heads // kernel.num_kv_heads, num_kv_heads=1
    )
    # One schedule per distinct run of layers: a layer whose heads hold what
    # the previous layer's hold (every layer of an uncompressed request)
    # reuses its schedule.
    same_as_prev = [False] + (seq_lens[1:] == seq_lens[:-1]).all(1).tolist()
    sched = []
    for layer in range(num_layers):
        sched.append(sched[-1] if same_as_prev[layer] else
                     scheduler_metadata(per_head, seq_lens[layer], seq_qsl, kernel.isa))
    return PackedHeads(
        mask=mask,
        rows=None if identity else rows,
        q_index=q_index,
        qsl=seq_qsl,
        caches=(kv_pages[:, 0:1], kv_pages[:, 1:2]),
        seq_heads=heads,
        layers=list(zip(seq_lens.unbind(0), block_table.unbind(0), sched)),
    )


def write_packed(
    ph: PackedHeads,
    packing: PagePacking,
    key: torch.Tensor,  # [T, H, D]
    value: torch.Tensor,  # [T, H, D]
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    write_slots: torch.Tensor,  # [T, H] this layer's slots of every row
    metrics: torch.Tensor,  # [P, N] float32
    positions: torch.Tensor,  # [P, N] int32
    token_positions: torch.Tensor,  # [T]
) -> None:
    """The packed rows' K/V into their heads' slots in vLLM's in-page layout
    (``ops.write_kv`` with the packing learned from vLLM's writer)."""
    r = ph.rows
    if r is not None:
        key, value = key.index_select(0, r), value.index_select(0, r)
        write_slots, token_positions = write_slots.index_select(0, r), token_positions.index_select(0, r)
    ops.write_kv(key, value, kv_pages, write_slots, metrics, positions, token_positions,
                 packing=packing.offsets)


def attend_packed(
    ph: PackedHeads,
    layer: int,
    query: torch.Tensor,  # [T, Hq, D]
    output: torch.Tensor,  # [T, Hq, D]
    scale: float,
) -> None:
    """vLLM's kernel over the packed rows, one sequence per (request, KV head)."""
    seq_lens, block_table, sched = ph.layers[layer]
    t, hq, d = query.shape
    per_seq = (t * ph.seq_heads, hq // ph.seq_heads, d)  # [T * H, G, D]
    q = query.reshape(per_seq)
    if ph.q_index is None:
        vllm_attention(q, *ph.caches, output.view(per_seq), ph.qsl, seq_lens, block_table,
                        sched, scale)
        return
    q = q.index_select(0, ph.q_index)
    out = torch.empty_like(q)
    vllm_attention(q, *ph.caches, out, ph.qsl, seq_lens, block_table, sched, scale)
    output.view(per_seq).index_copy_(0, ph.q_index, out)
