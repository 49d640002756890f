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

Decode rows of metric-free requests go to our kernel as well where it reads
the layout fast (``packed_decode_ours``): it reads each KV head's pages once
for its G query heads and needs no per-layer scheduler metadata, which is
what vLLM's kernel costs most on a decode step of one sequence per head.

Requests that record the metric (the ``kvcompress`` and ``adaptive``
scorers) are kept in the same layout where our kernel reads it
(``metric_pages_packed``: vLLM's AMX layout, ``ops.reference.amx_packing``,
or its vec layout, ``ops.reference.vec_packing`` -- K transposed, what vLLM
writes on CPUs without AMX -- on the AVX-512 paths of our kernel, with AMX
tiles for the AMX layout where the CPU has them).
Their prompt rows before the observation window go to vLLM's kernel like any
packed row, without the gather into a scratch cache that plain pages need;
their window and decode rows go to our kernel, which records the metric.

Per step, ``plan_packed`` (builder, once for all layers) makes the per-layer
block tables, sequence lengths and vLLM scheduler metadata; ``write_packed`` /
``attend_packed`` (``forward``, per layer) only call vLLM's ops.
"""

from __future__ import annotations

import dataclasses
import os
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
    vllm_kernel_build,
    vllm_ops,
)

#: Where requests that record the metric keep their head-pages: ``auto``
#: (vLLM's layout where our kernel reads it fast, else plain rows), ``packed``
#: (vLLM's layout; an error where our kernel cannot read it) or ``plain``.
METRIC_PAGES_ENV = "KVCOMPRESS_METRIC_PAGES"
METRIC_PAGES = ("auto", "packed", "plain")

#: Where decode rows of metric-free packed requests run: ``auto`` (our kernel
#: where it reads vLLM's layout fast, else vLLM's), ``ours`` (our kernel; an
#: error where it cannot read the layout) or ``vllm`` (vLLM's, per KV head).
PACKED_DECODE_ENV = "KVCOMPRESS_PACKED_DECODE"
PACKED_DECODE = ("auto", "ours", "vllm")

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


def metric_pages_packed(packing: "PagePacking | None") -> bool:
    """Whether requests that record the metric keep vLLM's in-page layout too
    (``KVCOMPRESS_METRIC_PAGES``).  ``auto``: where the layout is the one our
    kernel reads fast (``_our_kernel_reads``: vLLM's AMX or vec layout, bf16
    pages, an AVX-512 path of our kernel)."""
    mode = _env_choice(METRIC_PAGES_ENV, METRIC_PAGES)
    if mode == "plain":
        return False
    return _our_kernel_reads(packing, f"{METRIC_PAGES_ENV}={mode}", forced=mode == "packed")


def packed_decode_ours(packing: "PagePacking | None") -> bool:
    """Whether decode rows (one query) of metric-free packed requests run on
    our kernel, which reads the packed pages as they lie, instead of vLLM's
    kernel per KV head (``KVCOMPRESS_PACKED_DECODE``).  ``auto``: under the
    same condition as ``metric_pages_packed``, and on a CPU without AVX-512
    (vLLM's ``_C_AVX2`` build, our avx2 path) for bf16 pages in its vec
    layout, where our AVX2 code takes 0.5-0.7x the time of vLLM's AVX2 code
    on every row.  Our kernel needs no per-layer scheduler metadata and reads
    a KV head's pages once for its G query heads (docs/performance.md
    section 2: the ``packed off`` column against ``per-head``)."""
    mode = _env_choice(PACKED_DECODE_ENV, PACKED_DECODE)
    if mode == "vllm":
        return False
    return _our_kernel_reads(packing, f"{PACKED_DECODE_ENV}={mode}", forced=mode == "ours",
                             avx2_vec=True)


def _env_choice(env: str, choices: tuple[str, ...]) -> str:
    """``env``'s value, ``choices[0]`` when unset; refuses any other value
    than ``choices``, naming the variable."""
    mode = os.environ.get(env, choices[0])
    if mode not in choices:
        raise ValueError(f"{env}={mode!r}: expected one of {', '.join(choices)}")
    return mode


def _our_kernel_reads(packing: "PagePacking | None", setting: str, forced: bool,
                      avx2_vec: bool = False) -> bool:
    """``forced``: our kernel must read ``packing`` (raises, naming ``setting``,
    where it cannot); else: it reads it *fast* -- vLLM's AMX or vec layout
    (``ops.packing_layout``), bf16 pages and an AVX-512 path of our kernel
    (``ops.AVX512_PATHS``; AMX tiles for the AMX layout where the CPU has
    them).  Its AVX2 path reads the vec layout in place too, and the AMX one
    by unpacking every block; against vLLM's AVX-512 builds both were slower
    than vLLM's kernel per KV head on the small calls (docs/performance.md
    section 2), so not ``auto``.  ``avx2_vec``: also fast is our avx2 path
    on the vec layout where vLLM runs its own AVX2 build (``_C_AVX2``), which
    takes longer than ours on every row when no metric is recorded."""
    readable = packing is not None and ops.kernel_reads_packing(packing.offsets)
    if forced:
        if not readable:
            raise ValueError(
                f"{setting}: vLLM's in-page layout here "
                f"({'none' if packing is None else packing.isa}) is not one our kernel "
                "reads (vLLM's AMX or vec layout); use auto"
            )
        return True
    if not readable or packing.dtype != torch.bfloat16:
        return False
    isa = ops.cpu_isa()
    return isa in ops.AVX512_PATHS or (
        avx2_vec and isa == "avx2" and packing.isa == "vec"
        and vllm_kernel_build() == "_C_AVX2")


@dataclass
class PackedHeads:
    """One step's rows of requests in vLLM's layout (``RequestPages.packed``).

    A packed request's rows before its ``metric_q_start`` (all rows of a
    request whose metric is never read) go to vLLM's kernel, one sequence per
    (request, KV head); the rest (observation-window and decode rows of
    requests that record the metric; with ``plan_packed(decode_ours=True)``
    every decode row) to our kernel, which reads the same pages
    (``ops.paged_head_attention(..., packing, packed)``)."""

    mask: torch.Tensor  # [R] bool: the packed requests of the batch
    #: [R] int64 leading rows of each request that vLLM's kernel attends (0
    #: for requests that are not packed).
    vllm_rows: torch.Tensor
    #: [Tw] int64 every token row of the packed requests (their K/V are
    #: written in vLLM's layout); None: every row of the step.
    write_rows: torch.Tensor | None
    #: [Tp] int64 the rows vLLM's kernel attends; None: every row of the step.
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
    metric_q_start: torch.Tensor | None = None,  # [R] int32; None: no metric rows
    decode_ours: bool = False,
) -> PackedHeads:
    """vLLM's kernel inputs for the packed requests' rows before their
    ``metric_q_start``, every layer; with ``decode_ours``
    (``packed_decode_ours``) not for decode rows (requests with one query
    this step): those go to our kernel like metric rows.

    Checks what vLLM's kernel cannot, for the sequences it gets: every head
    holds this step's tokens (``kv_lens >= q_len``) and every page a head's
    KVs need is a real head-page.  Raises naming the request otherwise (our
    kernel checks its own rows)."""
    num_layers, num_reqs, heads, width = page_table.shape
    num_pages, _, block_size, _ = kv_pages.shape
    # The leading rows each request leaves to vLLM's kernel, worked out on the
    # host: on a decode step of the default scorer there are none, and the
    # plan is done with three small tensors made and no tensor arithmetic
    # (each op costs 20-50 us between forward passes).
    starts = query_start_loc.tolist()
    flags = mask.tolist()
    first = None if metric_q_start is None else metric_q_start.tolist()
    lead, packed_tokens = [0] * num_reqs, 0
    for i in range(num_reqs):
        n = starts[i + 1] - starts[i]
        if not flags[i]:
            continue
        packed_tokens += n
        if not (decode_ours and n == 1):
            lead[i] = n if first is None else min(max(first[i], 0), n)
    mask = mask.to(torch.bool)
    num_tokens = starts[-1]
    every_row = packed_tokens == num_tokens  # the packed requests' rows are the step's
    any_lead = any(lead)
    if not every_row or any_lead:
        qsl = query_start_loc.long()
        q_len = qsl[1:] - qsl[:-1]
    write_rows = None
    if not every_row:  # [Tw] the packed requests' rows
        pr = torch.nonzero(mask).view(-1)
        write_rows = segment_rows(qsl[:-1].index_select(0, pr), q_len.index_select(0, pr))
    vllm_rows = torch.tensor(lead, dtype=torch.int64)  # [R]
    if not any_lead:  # every packed row is for our kernel: none for vLLM
        return PackedHeads(
            mask=mask, vllm_rows=vllm_rows, write_rows=write_rows,
            rows=torch.zeros(0, dtype=torch.int64), q_index=None,
            qsl=torch.zeros(1, dtype=torch.int32),
            caches=(kv_pages[:, 0:1], kv_pages[:, 1:2]), seq_heads=heads, layers=[],
        )
    pr = torch.nonzero(vllm_rows).view(-1)  # requests with rows for vLLM's kernel
    pq = vllm_rows.index_select(0, pr)  # [Rp] their leading rows
    if pr.numel() == num_reqs:  # every request (the usual decode step)
        lens, table = kv_lens, page_table
    else:
        lens = kv_lens.index_select(1, pr)  # [L, Rp, H]
        table = page_table.index_select(1, pr)  # [L, Rp, H, width]
    rest = q_len.index_select(0, pr) - pq  # [Rp] metric rows after them
    if bool(rest.any()):  # the last vLLM row of a request sees all but its metric rows
        lens = lens - rest.view(1, -1, 1).to(lens.dtype)
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
    identity = rows.numel() == num_tokens
    decode_only = identity and bool((pq == 1).all())
    head = torch.arange(heads)
    if decode_only:
        q_index = None
    else:  # sequence (r, h) reads rows qsl[r] + [0, pq[r]) of query head group h
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
        vllm_rows=vllm_rows,
        write_rows=write_rows,
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
    """The packed requests' K/V into their heads' slots in vLLM's in-page
    layout (``ops.write_kv`` with the packing learned from vLLM's writer)."""
    r = ph.write_rows
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
    if ph.rows is not None and ph.rows.numel() == 0:  # every packed row records the metric
        return
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
