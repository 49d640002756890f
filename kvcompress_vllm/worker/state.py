"""Worker-side KV-Compress state: the head-page pool, metrics, page tables,
and the per-step work (register requests, apply eviction plans, compact,
vacate released blocks, build the attention batch tensors).

One instance per worker process (``get_state()``), created after vLLM has
allocated the KV cache.  The attention backend reads it while building
metadata and in ``forward``.
"""

from __future__ import annotations

import array
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from vllm.utils.math_utils import cdiv

from kvcompress_vllm import ops, scorers
from kvcompress_vllm.config import KVCompressConfig
from kvcompress_vllm.plan import EvictionPlan, StepPlan, WorkerStats, take_plan
from kvcompress_vllm.core.geometry import max_pages_per_head
from kvcompress_vllm.worker.page_table import HeadPageTable, RequestPages
from kvcompress_vllm.worker.selection import choose_pages, evict_indices, rank_heads

if TYPE_CHECKING:
    from kvcompress_vllm.attention.cpu_packed import PagePacking

_STATE: "KVCompressWorkerState | None" = None


def get_state() -> "KVCompressWorkerState | None":
    return _STATE


def set_state(state: "KVCompressWorkerState | None") -> None:
    global _STATE
    _STATE = state


#: Bytes of per-slot metadata next to each K/V pair: float32 metric + int32 position.
METADATA_BYTES_PER_SLOT = 8


@dataclass
class HeadPool:
    """vLLM's KV cache viewed as head-pages, plus per-slot metadata.

    Lives on the cache's device (CPU or CUDA); index tensors may come from
    the host (``copy_pages`` moves them)."""

    kv_pages: torch.Tensor  # [P, 2, N, D] view of vLLM's KV storage
    metrics: torch.Tensor  # [P, N] float32
    positions: torch.Tensor  # [P, N] int32
    num_layers: int
    num_blocks: int
    num_kv_heads: int
    layer_numel: int  # elements of one layer region (B * H * 2 * N * D)
    #: vLLM's in-page layout, for requests kept in it (``RequestPages.packed``);
    #: None: every compressible request is in plain ``[N, D]`` pages.
    packing: "PagePacking | None" = None
    #: Requests that record the metric are kept in ``packing`` too (our kernel
    #: reads it: ``cpu_packed.metric_pages_packed``); else only metric-free ones.
    metric_packed: bool = False
    #: Decode rows of metric-free packed requests run on our kernel
    #: (``cpu_packed.packed_decode_ours``); else on vLLM's, per KV head.
    decode_ours: bool = False

    @classmethod
    def from_layer_caches(cls, layer_caches: list[torch.Tensor], layout=None) -> "HeadPool":
        """Build from the per-layer cache views vLLM allocated.

        ``layout`` (``worker.layouts``; default ``LBHNC``, the layout of both
        the CPU and the CUDA backend) checks the views and makes the
        head-page view; metrics and positions are allocated on its device.
        """
        from kvcompress_vllm.worker.layouts import LBHNC

        view = (layout or LBHNC).head_pages(layer_caches)
        num_pages, _, block_size, _ = view.kv_pages.shape
        device = view.kv_pages.device
        return cls(
            kv_pages=view.kv_pages,
            metrics=torch.zeros(num_pages, block_size, dtype=torch.float32, device=device),
            positions=torch.zeros(num_pages, block_size, dtype=torch.int32, device=device),
            num_layers=view.num_layers,
            num_blocks=view.num_blocks,
            num_kv_heads=view.num_kv_heads,
            layer_numel=view.layer_numel,
        )

    def region_of(self, layer_cache: torch.Tensor) -> int:
        """Region (our layer index) of one layer's cache view."""
        offset = layer_cache.data_ptr() - self.kv_pages.data_ptr()
        return offset // (self.layer_numel * layer_cache.element_size())

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        device = self.kv_pages.device
        src, dst = src.to(device), dst.to(device)
        self.kv_pages[dst] = self.kv_pages[src]
        self.metrics[dst] = self.metrics[src]
        self.positions[dst] = self.positions[src]


@dataclass
class AttentionBatch:
    """Per-step tensors the attention impl reads (one set for all layers)."""

    page_table: torch.Tensor  # [L, R, H, max_pages] int32
    kv_lens: torch.Tensor  # [L, R, H] int32 (including this step's tokens)
    write_slots: torch.Tensor  # [L, T, H] int64 page * N + offset
    token_positions: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [R + 1] int32
    metric_q_start: torch.Tensor  # [R] int32
    record_metrics: bool
    #: Rows whose prompt completes in this step (their prompt metric is
    #: max-pooled along keys): list of (row, prompt length, request id).
    pool_rows: list[tuple[int, int, str]]
    #: [R] int32: the first KV each request's metric rows add to, its
    #: ``hit_tokens`` (a prefix-cache hitter leaves the metric of the KVs it
    #: shares to their writer); None: no request of the step has hits.
    metric_k_start: torch.Tensor | None = None
    #: [R] bool: requests kept in vLLM's own cache layout (never compressed;
    #: ``RequestPages.stock_layout``); None: none.
    stock_layout: torch.Tensor | None = None
    #: [R] bool: requests in vLLM's in-page layout, attended per KV head
    #: (``RequestPages.packed``); None: none.
    packed: torch.Tensor | None = None


#: Bytes of a prompt's embeddings hashed for its seed, at most: half from the
#: start, half from the end (with the shape), so a long prompt costs no more.
SEED_EMBEDS_BYTES = 1 << 20


def request_seed(req_id: str, prompt_token_ids, prompt_embeds: torch.Tensor | None = None) -> int:
    """A number fixed for a request across runs, ranks and preemptions: the
    CRC-32 of its prompt tokens (vLLM makes request ids unique with random
    characters), continued over its prompt embeddings where it has some
    (their shape, dtype and bytes; of a long prompt the first and last
    ``SEED_EMBEDS_BYTES / 2``; a prompt mixing token ids and embeddings has
    placeholder ids where the embeddings go); of the id only where the
    request has neither."""
    if prompt_token_ids is None and prompt_embeds is None:
        return zlib.crc32(req_id.encode())
    crc = 0
    if prompt_token_ids is not None:
        crc = zlib.crc32(array.array("q", prompt_token_ids).tobytes())
    if prompt_embeds is not None:
        flat = prompt_embeds.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        half = SEED_EMBEDS_BYTES // 2
        parts = [flat] if flat.numel() <= 2 * half else [flat[:half], flat[-half:]]
        crc = zlib.crc32(f"{tuple(prompt_embeds.shape)} {prompt_embeds.dtype}".encode(), crc)
        for part in parts:
            crc = zlib.crc32(part.numpy().tobytes(), crc)
    return crc


class KVCompressWorkerState:
    def __init__(
        self,
        cfg: KVCompressConfig,
        pool: HeadPool,
        *,
        max_model_len: int,
        max_num_reqs: int,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.block_size = pool.kv_pages.shape[2]
        max_pages = max_pages_per_head(max_model_len, self.block_size)
        self.table = HeadPageTable(
            num_layers=pool.num_layers,
            num_kv_heads=pool.num_kv_heads,
            num_blocks=pool.num_blocks,
            block_size=self.block_size,
            max_pages_per_head=max_pages,
            max_requests=max_num_reqs,
        )
        self.in_step = False
        self.pending_stats = WorkerStats()
        self._report_pages = False
        self._batch: AttentionBatch | None = None
        self._batch_key: tuple | None = None
        #: request id -> ``HeadKVs.seed`` (from its prompt; kept across
        #: preemption, dropped when the request finishes).
        self._seeds: dict[str, int] = {}

    # ------------------------------------------------------------------
    def begin_step(self, scheduler_output) -> None:
        """Bring the page tables in line with this step's scheduler output."""
        step: StepPlan = take_plan(scheduler_output)
        table = self.table
        self._batch = None
        self._batch_key = None
        for rid in scheduler_output.finished_req_ids:
            table.remove(rid)
            self._seeds.pop(rid, None)
        for rid in scheduler_output.preempted_req_ids or ():
            table.remove(rid)
        # (Re)started requests get their blocks' metadata (``_adopt_blocks``)
        # only after this step's evictions: a block a compression releases in
        # this step may already be one of theirs -- even a prefix-cache hit,
        # on a block another request writes in this step -- while the
        # compressed request's live pages still sit in it until its eviction
        # moves them out.
        started: list[RequestPages] = []
        for new_req in scheduler_output.scheduled_new_reqs:
            table.remove(new_req.req_id)  # abort + resubmit with the same id
            self._seeds[new_req.req_id] = request_seed(
                new_req.req_id, new_req.prompt_token_ids, new_req.prompt_embeds)
            req = table.add(
                new_req.req_id,
                list(new_req.block_ids[0]),
                new_req.num_computed_tokens,
                self._prefill_end(step, new_req.req_id),
                new_req.req_id not in step.no_metric,
                new_req.req_id in step.stock_layout,
                self._packed(step, new_req.req_id),
            )
            started.append(req)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if rid in cached.resumed_req_ids:
                table.remove(rid)
                blocks = cached.new_block_ids[i]
                req = table.add(
                    rid,
                    list(blocks[0]) if blocks is not None else [],
                    cached.num_computed_tokens[i],
                    self._prefill_end(step, rid),
                    rid not in step.no_metric,
                    rid in step.stock_layout,
                    self._packed(step, rid),
                )
                started.append(req)
        # Plans refer to the block lists as they were before this step's
        # allocations, so they run before new blocks are appended.
        for plan in step.evictions:
            self.apply_eviction(plan)
        for req in started:
            self._adopt_blocks(req)
        for i, rid in enumerate(cached.req_ids):
            blocks = cached.new_block_ids[i]
            if rid not in cached.resumed_req_ids and blocks is not None:
                req = table.requests[rid]
                table.append_blocks(rid, list(blocks[0]))
                self._reset_stock_metric(req, len(req.blocks) - len(blocks[0]))
        scheduled = scheduler_output.num_scheduled_tokens
        table.append_tokens([table.requests[rid] for rid in scheduled], list(scheduled.values()))
        self._report_pages = step.report_pages
        self.in_step = True

    def _adopt_blocks(self, req: RequestPages) -> None:
        """The blocks of a request just (re)started: its hit blocks get their
        positions, and a never-compressed request's other blocks a zero metric."""
        hits = min(cdiv(req.hit_tokens, self.block_size), len(req.blocks))
        self._write_hit_positions(req, hits)
        self._reset_stock_metric(req, hits)

    def _write_hit_positions(self, req: RequestPages, num_blocks: int) -> None:
        """A request that starts with KVs in its blocks (prefix-cache hits)
        holds them at the identity pages of its first ``num_blocks`` blocks:
        give those slots their positions.  The request that wrote the blocks
        may have been one vLLM's writer served (never compressed), which
        writes no position, and eviction protects the shared prefix by
        position."""
        if num_blocks == 0:
            return
        pages = self.table.block_page_ids(req.blocks[:num_blocks]).view(num_blocks, -1)
        positions = self.pool.positions
        first = torch.arange(num_blocks, device=positions.device) * self.block_size
        slot = torch.arange(self.block_size, device=positions.device)
        positions[pages.to(positions.device)] = (first.view(-1, 1, 1) + slot.view(1, 1, -1)).to(
            positions.dtype).expand(num_blocks, pages.shape[1], self.block_size)

    def _reset_stock_metric(self, req: RequestPages, first: int) -> None:
        """Zero the metric of a never-compressed request's blocks from
        ``req.blocks[first]`` on (blocks it was just given, past its
        prefix-cache hits).  vLLM's writer fills their K/V without touching
        our metadata, so the slots would keep the previous tenant's metric; a
        compressible request that later hits these blocks reads them as
        neighbours when it pools its prompt.
        (``write_kv`` zeroes the slots it writes for every other request.)"""
        if not req.stock_layout or first >= len(req.blocks):
            return
        pages = self.table.block_page_ids(req.blocks[first:]).view(-1)
        self.pool.metrics[pages.to(self.pool.metrics.device)] = 0.0

    def _packed(self, step: StepPlan, req_id: str) -> bool:
        """Kept in vLLM's in-page layout: compressible, the pool has vLLM's
        packing (CPU worker with vLLM's prefill path), and no metric read or
        our kernel reads that packing (``HeadPool.metric_packed``)."""
        return (
            self.pool.packing is not None
            and (req_id in step.no_metric or self.pool.metric_packed)
            and req_id not in step.stock_layout
        )

    @staticmethod
    def _prefill_end(step: StepPlan, req_id: str) -> int:
        end = step.prefill_ends.get(req_id)
        if end is None:
            raise RuntimeError(
                f"request {req_id} (re)starts its prefill but the StepPlan names no "
                f"prefill end for it (prefill_ends has {sorted(step.prefill_ends)[:8]})"
            )
        return end

    def end_step(self) -> WorkerStats:
        self.in_step = False
        self._batch = None
        stats = self.pending_stats
        if self._report_pages:
            stats.pages_in_use = {
                rid: self.table.pages_in_use(req) for rid, req in self.table.requests.items()
            }
            self._check_positions()
        self.pending_stats = WorkerStats()
        for req in self.table.requests.values():
            req.step_tokens = 0
        return stats

    def _check_positions(self) -> None:
        """``debug_checks``: every head of every request in the plugin's
        layout holds its KVs at distinct positions below the request's token
        count (compaction moves tail KVs into holes, so their order is not
        kept); a slot whose position another request overwrote breaks it.
        Raises naming the request, the head and the positions."""
        big = torch.iinfo(torch.int32).max
        for rid, req in self.table.requests.items():
            if req.stock_layout:  # vLLM's writer writes no positions
                continue
            _, counts = self.table.head_rows(req)  # [L*H]
            width = int(counts.max()) if counts.numel() else 0
            if width == 0:
                continue
            kvs = self._gather_request(req, 0, counts.numel(), width, rid)
            pos, valid = kvs.positions.cpu(), kvs.valid.cpu()  # [L*H, width]
            ranked = torch.where(valid, pos, big).sort(dim=1).values
            repeated = ((ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] != big)).any(dim=1)
            outside = (((pos < 0) | (pos >= req.num_tokens)) & valid).any(dim=1)
            bad = repeated | outside
            if bool(bad.any()):
                row = int(torch.nonzero(bad)[0])
                got = ranked[row, : int(counts[row])].tolist()
                raise RuntimeError(
                    f"request {rid}: head row {row} holds {len(got)} KVs whose positions are "
                    f"not distinct positions below its {req.num_tokens} tokens (sorted: "
                    f"{got[:6]} ... {got[-6:]})"
                )

    # ------------------------------------------------------------------
    def _gather_request(
        self, req: RequestPages, start: int, stop: int, width: int, req_id: str
    ) -> scorers.HeadKVs:
        """The KVs of flat heads ``[start, stop)`` (``layer * H + head``) of
        ``req``, ``width`` columns in logical order: metrics (float32),
        positions (int32) and validity now (``[r, width]`` each), keys on
        demand in the cache dtype (``[r, width, D]``, padding zeroed), and,
        where the C++ kernels run, where those keys lie (``paged_keys``)."""
        pool = self.pool
        n = self.block_size
        page_rows, counts = self.table.head_rows(req)
        # Gather where the cache lives (host tables are copied to the pool's
        # device; a no-op for the CPU pool), so scoring runs there too.
        device = pool.kv_pages.device
        rows = page_rows[start:stop].to(device, non_blocking=True)
        j = torch.arange(width, device=device)
        valid = j.view(1, -1) < counts[start:stop].to(device, non_blocking=True).view(-1, 1)
        logical_page = (j // n).clamp(max=rows.shape[1] - 1)
        # int32 [r, width]; -1 (no page: padding) -> page 0, masked by `valid`.
        pages = rows.index_select(1, logical_page).clamp_(min=0)
        slot = j % n
        flat = pages.to(torch.int64).mul_(n).add_(slot)  # page * N + slot
        head_dim = pool.kv_pages.shape[3]

        def keys() -> torch.Tensor:
            if req.packed:  # vLLM's in-page layout: the head's pages, unpacked
                used = rows[:, : cdiv(width, n)]
                out = pool.packing.unpack_keys(pool.kv_pages, used)[:, :width].contiguous()
            else:
                # kv_pages [P, 2, N, D] as rows of D: key (page, slot) is row page*2N + slot.
                key_rows = pages.to(torch.int64).mul_(2 * n).add_(slot).view(-1)
                out = pool.kv_pages.view(-1, head_dim).index_select(0, key_rows)
            out = out.view(stop - start, width, head_dim)
            return out.masked_fill_(~valid.unsqueeze(-1), 0)

        return scorers.HeadKVs(
            metrics=pool.metrics.view(-1)[flat],
            positions=pool.positions.view(-1)[flat],
            valid=valid,
            keys=keys,
            req_id=req_id,
            num_tokens=req.num_tokens,
            row_start=start,
            seed=self._seeds.get(req_id, 0),
            # Where the C++ kernels run: key scorers with a kernel read the
            # pages in place (``ops.keydiff_scores``).
            paged_keys=scorers.PagedKeys(
                kv_pages=pool.kv_pages,
                page_rows=rows,
                counts=counts[start:stop].clone(),  # not a view of the live table
                packing=pool.packing.offsets if req.packed else None,
            ) if ops.backend_for(pool.kv_pages) == "cpp" else None,
        )

    def apply_eviction(self, plan: EvictionPlan) -> None:
        """Evict ``plan.num_pages`` head-pages of one request, compact its
        heads and move its live pages out of the released blocks.

        Pages are spread over heads per ``plan.allocation``; for ``uniform``
        each head's lifetime evicted pages ``k = (num_tokens - kv_count) / N``
        come from the page table (eviction is block-aligned).

        Memory: with ``R = L*H`` heads, ``C`` the request's widest head (KVs),
        ``N`` the block size, ``D`` the head dim and ``e`` the cache element
        size, the temporaries that live for the whole call are the int32 sort
        order ``[R, C]`` and the float32 unit costs ``[R, C/N]``; scoring,
        compaction and page moves run in chunks of heads (pages) whose
        temporaries stay within ``B = scorers.CHUNK_BYTES`` (64 MiB) or one
        head: the fp32 keys of a chunk (at most ``max(B, 4*C*D)``) plus their
        cache-dtype gather (``e/4`` of that) plus per-KV index/score
        temporaries (``12/D`` of that).  Peak growth:

            4*R*C*(1 + 1/N) + max(B, 4*C*D) * (1 + e/4 + 12/D)

        About 32 + 102 MiB for a 32k-token request on a Llama-3-8B shape
        (R = 256, D = N = 128, bf16); ``tests/test_memory_budget.py``
        measures it (99-134 MiB).  A request in vLLM's in-page layout
        (``req.packed``) gathers its keys as whole pages and then unpacks
        them: ``2*e/4`` instead of ``e/4`` (about +16 MiB in that example).
        The default ``keydiff`` on a CPU pool gathers no keys: its kernel
        (``ops.keydiff_scores``) holds the fp32 keys of one head per thread
        (``4*C*D`` each), within the bound above.
        """
        start = time.perf_counter()
        table = self.table
        req = table.requests.get(plan.req_id)
        if req is None:
            raise RuntimeError(f"eviction plan for unknown request {plan.req_id}")
        if req.stock_layout:
            raise RuntimeError(
                f"eviction plan for request {plan.req_id}, which is never compressed "
                f"(its KVs are in vLLM's layout): {plan.num_pages} pages at {plan.num_tokens} tokens"
            )
        if req.num_tokens != plan.num_tokens:
            raise RuntimeError(
                f"request {plan.req_id}: worker holds {req.num_tokens} tokens, "
                f"plan was made for {plan.num_tokens}"
            )
        pool = self.pool
        n = self.block_size
        page_rows, counts = table.head_rows(req)  # views: [R, max_pages], [R]
        lifetime = req.num_tokens - counts.to(torch.int64)  # KVs evicted per head so far
        if bool((lifetime < 0).any()) or bool((lifetime % n).any()):
            raise RuntimeError(
                f"request {plan.req_id}: heads hold {sorted(set(counts.tolist()))[:8]} KVs, "
                f"not {req.num_tokens} minus whole pages of {n}"
            )
        num_rows = counts.numel()
        width = int(counts.max())
        costs, order = rank_heads(
            scorers.get_scorer(plan.scorer),
            lambda a, b: self._gather_request(req, a, b, width, plan.req_id),
            num_rows,
            width,
            pool.kv_pages.shape[3],
            n,
            plan.protected_window,
            plan.sink_tokens,
        )
        pages = choose_pages(costs, plan.num_pages, plan.allocation, evicted=lifetime // n)
        evict_counts = (pages * n).to(torch.int32)
        # Compact chunk by chunk (heads are independent): the ascending
        # eviction lists cost about 16 bytes per evicted KV while built.
        step = max(1, scorers.CHUNK_BYTES // (16 * max(1, int(evict_counts.max()))))
        for a in range(0, num_rows, step):
            b = min(a + step, num_rows)
            if not bool(evict_counts[a:b].any()):
                continue
            idx = evict_indices(order[a:b], pages[a:b], n)  # [rows, E] ascending, -1 padded
            first = idx[:, 0]
            bad = (first >= 0) & (first < plan.sink_tokens)
            if bool(bad.any()):
                row = a + int(torch.nonzero(bad)[0])
                raise RuntimeError(
                    f"request {plan.req_id}: head row {row} would evict its KV at logical index "
                    f"{int(first[row - a])}, inside the {plan.sink_tokens} protected leading "
                    "tokens (sinks or a prefix shared with other requests)"
                )
            ops.compact_heads(
                pool.kv_pages, pool.metrics, pool.positions, page_rows[a:b], counts[a:b],
                idx, evict_counts[a:b],
                packing=pool.packing.offsets if req.packed else None,
            )
        del order, costs
        counts -= evict_counts  # view of table.kv_count
        table.trim(req)
        src, dst = table.release_blocks(req, list(plan.released_block_ids))
        # Move live pages out of the released blocks, a bounded batch at a time
        # (sources and destinations are disjoint, so the order is free).
        page_bytes = pool.kv_pages[0].numel() * pool.kv_pages.element_size()
        step = max(1, scorers.CHUNK_BYTES // page_bytes)
        for a in range(0, src.numel(), step):
            pool.copy_pages(src[a : a + step], dst[a : a + step])
        req.evicted_pages += plan.num_pages
        req.compressions += 1
        self._check_prefix_intact(plan, req)
        in_use = table.pages_in_use(req)
        if in_use != plan.pages_after:
            raise RuntimeError(
                f"request {plan.req_id}: {in_use} pages after eviction, scheduler "
                f"expects {plan.pages_after}"
            )
        stats = self.pending_stats
        stats.pages_evicted += plan.num_pages
        stats.kvs_evicted += int(evict_counts.sum())
        stats.compactions += 1
        stats.pages_migrated += int(src.numel())
        stats.compaction_ms += 1000.0 * (time.perf_counter() - start)

    def _check_prefix_intact(self, plan: EvictionPlan, req: RequestPages) -> None:
        """The request's blocks wholly inside its protected leading tokens
        (``plan.sink_tokens``: sinks, or a prefix shared with other requests
        under prefix caching) still hold every head's KVs of those tokens at
        their own pages: no compression writes into a block another request
        may read."""
        k = min(plan.sink_tokens // self.block_size, len(req.blocks))
        if k == 0:
            return
        table = self.table
        want = table.block_page_ids(req.blocks[:k]).permute(1, 2, 0)  # [L, H, k]
        got = table.page_table[req.slot, :, :, :k]
        if not torch.equal(got.to(torch.int64), want):
            bad = torch.nonzero(got.to(torch.int64) != want)[0].tolist()
            raise RuntimeError(
                f"request {plan.req_id}: after compression, layer {bad[0]} head {bad[1]} "
                f"holds page {int(got[tuple(bad)])} at logical page {bad[2]} of its "
                f"{k} protected leading blocks, not its block's own page "
                f"{int(want[tuple(bad)])}"
            )

    # ------------------------------------------------------------------
    @staticmethod
    def _check_step_tokens(req_ids: list[str], reqs: list[RequestPages], qsl: list[int]) -> None:
        """vLLM's query lengths (``qsl``: its query start locations) are the
        tokens the worker scheduled for each request in this step."""
        for i, (rid, r) in enumerate(zip(req_ids, reqs)):
            q_len = qsl[i + 1] - qsl[i]
            if q_len != r.step_tokens:
                raise RuntimeError(
                    f"request {rid} of the step: vLLM's metadata has {q_len} query tokens where "
                    f"the worker scheduled {r.step_tokens}"
                )

    def check_stock_only(
        self,
        req_ids: list[str],
        query_start_loc: torch.Tensor,  # [R + 1] int32
        seq_lens: torch.Tensor,  # [R] int32, vLLM's
        block_table: torch.Tensor,  # [R, >= blocks] int32, vLLM's
    ) -> bool:
        """Whether every request of the step stays in vLLM's layout (never
        compressed), after checking that vLLM's metadata then describes the
        step as the worker does: each request's scheduled tokens, its token
        count (``seq_lens``) and its blocks (the head of its block-table row).
        Such requests are never evicted (``apply_eviction`` refuses them), so
        every head holds all their tokens at vLLM's slots and vLLM's own
        metadata builder and kernel serve the whole step.  ``False`` when some
        request is in our layout (the builder then calls ``build_batch``)."""
        reqs = [self.table.requests[rid] for rid in req_ids]
        if not reqs or not all(r.stock_layout for r in reqs):
            return False
        self._check_step_tokens(req_ids, reqs, query_start_loc.tolist())
        seq = seq_lens.tolist()
        width = max(len(r.blocks) for r in reqs)
        rows = block_table[: len(reqs), :width].tolist()
        for i, (rid, r) in enumerate(zip(req_ids, reqs)):
            if seq[i] != r.num_tokens:
                raise RuntimeError(
                    f"request {rid} (never compressed): vLLM's sequence length {seq[i]}, "
                    f"the worker holds {r.num_tokens}"
                )
            if rows[i][: len(r.blocks)] != r.blocks:
                at = next(j for j, (a, b) in enumerate(zip(rows[i], r.blocks)) if a != b)
                raise RuntimeError(
                    f"request {rid} (never compressed): vLLM's block table differs from the "
                    f"worker's {len(r.blocks)} blocks at entry {at}: "
                    f"{rows[i][at:len(r.blocks)][:4]} vs {r.blocks[at:at + 4]}"
                )
        return True

    def build_batch(self, req_ids: list[str], query_start_loc: torch.Tensor) -> AttentionBatch:
        """Per-step attention tensors in the runner's batch order."""
        qsl = query_start_loc.tolist()
        key = (tuple(req_ids), tuple(qsl))
        if self._batch is not None and self._batch_key == key:
            return self._batch
        table = self.table
        reqs = [table.requests[rid] for rid in req_ids]
        self._check_step_tokens(req_ids, reqs, qsl)
        before = [r.num_tokens - r.step_tokens for r in reqs]
        for rid, r, b in zip(req_ids, reqs, before):
            if b < r.hit_tokens:  # writes go to tokens [b, num_tokens)
                raise RuntimeError(
                    f"request {rid}: this step writes its KVs from token {b} on, inside its "
                    f"{r.hit_tokens} prefix-cache hit tokens (blocks other requests wrote "
                    f"and may be reading)"
                )
        # Page rows, KV counts, write slots and token positions: one kernel
        # over the tables (``ops.gather_batch``); the rest is per request.
        try:
            page_table, kv_lens, write_slots, token_positions = ops.gather_batch(
                table.page_table, table.num_pages, table.kv_count,
                torch.tensor([r.slot for r in reqs], dtype=torch.int64),
                query_start_loc, torch.tensor(before, dtype=torch.int64), self.block_size,
            )
        except RuntimeError as err:
            raise RuntimeError(f"{err} (rows: the step's requests {req_ids[:16]})") from err
        # Observation window: prompt queries at positions >= prefill_end - w
        # score the KVs; decode queries (positions >= prefill_end) always do
        # unless record_decode_metrics is off.  Requests whose metric is
        # never read (not compressed, or a scorer without it) record none.
        window, decode = self.cfg.observation_window, self.cfg.record_decode_metrics
        start, pool_rows, record_metrics = [], [], False
        for i, (r, b) in enumerate(zip(reqs, before)):
            q_len = qsl[i + 1] - qsl[i]
            if not r.records_metric or (not decode and b >= r.prefill_end):
                start.append(q_len)
                continue
            start.append(min(max(r.prefill_end - window - b, 0), q_len))
            record_metrics |= start[-1] < q_len
            # Only requests that record a metric have one to pool.
            if self.cfg.pooling_kernel > 1 and q_len > 0 and b + q_len == r.prefill_end:
                pool_rows.append((i, r.prefill_end, req_ids[i]))
        batch = AttentionBatch(
            page_table=page_table,
            kv_lens=kv_lens,
            write_slots=write_slots,
            token_positions=token_positions,
            query_start_loc=query_start_loc.to(torch.int32),
            metric_q_start=torch.tensor(start, dtype=torch.int32),
            metric_k_start=(torch.tensor([r.hit_tokens for r in reqs], dtype=torch.int32)
                            if record_metrics and any(r.hit_tokens for r in reqs) else None),
            record_metrics=record_metrics,
            pool_rows=pool_rows,
            stock_layout=(torch.tensor([r.stock_layout for r in reqs], dtype=torch.bool)
                          if any(r.stock_layout for r in reqs) else None),
            packed=(torch.tensor([r.packed for r in reqs], dtype=torch.bool)
                    if any(r.packed for r in reqs) else None),
        )
        self._batch, self._batch_key = batch, key
        return batch

    def pool_prompt_metrics(self, batch: AttentionBatch, region: int) -> None:
        """Max-pool the prompt metric along keys for rows finishing prefill.

        Only an uncompressed head holds the prompt's KVs in position order, so
        every head of a pooled row must hold exactly ``prompt length`` KVs;
        anything else means the request was compressed before its prompt was
        complete, and pooling would read (and write) pages it does not own.
        Prefix-cache hits (``RequestPages.hit_tokens``) are read as the
        neighbours of the request's first own KVs but not written: the request
        that wrote those shared pages pooled them already.  Every row reads
        the metric as it was before this call, so a hitter whose writer pools
        in the same step reads the same neighbours whatever the rows' order.
        """
        kernel = self.cfg.pooling_kernel
        metrics = self.pool.metrics
        writes = []
        for row, length, req_id in batch.pool_rows:
            counts = batch.kv_lens[region, row]  # [H]
            if bool((counts != length).any()):
                raise RuntimeError(
                    f"request {req_id}: cannot pool the prompt metric of layer {region}: "
                    f"heads hold {counts.tolist()} KVs, the prompt has {length} tokens "
                    "(compressed before its prompt was complete?)"
                )
            pages = batch.page_table[region, row].to(torch.int64)  # [H, width]
            j = torch.arange(length)
            page = pages[:, j // self.block_size]
            slot = (j % self.block_size).expand_as(page)
            values = metrics[page, slot]  # [H, length] in position order
            pooled = torch.nn.functional.max_pool1d(
                values.unsqueeze(1), kernel, stride=1, padding=kernel // 2
            ).squeeze(1)
            own = self.table.requests[req_id].hit_tokens
            writes.append((page[:, own:], slot[:, own:], pooled[:, own:]))
        for page, slot, pooled in writes:
            metrics[page, slot] = pooled
