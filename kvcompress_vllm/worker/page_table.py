"""``HeadPageTable``: per-(layer, KV head) page tables of every live request.

A *head-page* holds ``block_size`` tokens of one KV head of one layer.  vLLM's
KV pool (layout LBHNC, one storage for all layers) is viewed as
``[P = L*B*H, 2, N, D]`` head-pages with

    page_id(layer, block, head) = (layer * B + block) * H + head

so one vLLM block owns ``L*H`` head-pages, one per (layer, head).  A request
owns the pages of the blocks the scheduler gave it.  While it is not
compressed, head (l, h) uses page ``page_id(l, blocks[i], h)`` for its i-th
logical page: exactly where stock vLLM keeps those bytes.  After an eviction
heads hold different numbers of pages, taken from any page of any block the
request owns.

Per request (a "slot" row of the persistent tensors):
    page_table  [S, L, H, max_pages] int32   logical page -> page id (-1: none)
    num_pages   [S, L, H]            int32   pages assigned to each head
    kv_count    [S, L, H]            int32   KVs held by each head
Invariant: ``num_pages >= ceil(kv_count / N)`` and every assigned page lies in
a block the request owns; no page is assigned twice.  ``RequestPages.slack``
= min over the request's heads of ``num_pages * N - kv_count``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.utils.math_utils import cdiv


@dataclass
class RequestPages:
    """Host-side bookkeeping of one request (mirrors the scheduler)."""

    slot: int
    blocks: list[int]
    #: Tokens in the cache (the uncompressed count, same for every head).
    num_tokens: int
    #: Tokens covered by the request's (re)started prefill.
    prefill_end: int
    #: Tokens already in its blocks when it was (re)started: prefix-cache
    #: hits, whose KVs (and metric) another request wrote and pooled.
    hit_tokens: int = 0
    #: Its queries add to the attention metric (``StepPlan.no_metric``).
    records_metric: bool = True
    #: Never compressed: its K/V are in vLLM's own layout, read by vLLM's
    #: kernel (``StepPlan.stock_layout``; CPU worker).
    stock_layout: bool = False
    #: Compressible, but its metric is never read: its K/V are in vLLM's
    #: in-page layout (``HeadPool.packing``), read by vLLM's kernel one
    #: sequence per KV head (``attention.cpu_packed``; CPU worker).
    packed: bool = False
    #: Head-pages evicted so far (sum over heads).
    evicted_pages: int = 0
    compressions: int = 0
    #: Tokens scheduled in the current step (set by ``begin_step``).
    step_tokens: int = 0
    #: KVs every head can still append without another page: the minimum over
    #: heads of ``num_pages * N - kv_count`` (``HeadPageTable`` keeps it after
    #: every change of either; ``append_tokens`` assigns pages only past it).
    slack: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def compressed(self) -> bool:
        return self.evicted_pages > 0


class HeadPageTable:
    """Page tables and page allocation at (layer, KV head) granularity."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        num_blocks: int,
        block_size: int,
        max_pages_per_head: int,
        max_requests: int,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_pages = max_pages_per_head
        shape = (max_requests, num_layers, num_kv_heads)
        self.page_table = torch.full((*shape, max_pages_per_head), -1, dtype=torch.int32)
        self.num_pages = torch.zeros(shape, dtype=torch.int32)
        self._kv_count = torch.zeros(shape, dtype=torch.int32)
        #: slot -> tokens of ``append_tokens`` not yet added to ``_kv_count``.
        self._pending: dict[int, int] = {}
        self.requests: dict[str, RequestPages] = {}
        self._free_slots = list(range(max_requests - 1, -1, -1))
        # page_id(l, 0, h) for every (l, h): add block * H for other blocks.
        layer = torch.arange(num_layers).view(-1, 1)
        head = torch.arange(num_kv_heads).view(1, -1)
        self._page_base = (layer * num_blocks * num_kv_heads + head).to(torch.int64)

    @property
    def kv_count(self) -> torch.Tensor:
        """``[S, L, H]`` int32: KVs held by each head.  ``append_tokens``
        only records its counts; they are added here, on the first read after
        it (one ``index_add_``), so a step whose requests' counts nobody reads
        -- never-compressed requests on vLLM's own metadata -- costs no tensor op.
        Only ``HeadPageTable`` changes the counts (``RequestPages.slack``
        follows them)."""
        if self._pending:
            r = len(self._pending)
            both = torch.tensor([*self._pending, *self._pending.values()], dtype=torch.int64)
            new = both[r:].to(torch.int32).view(-1, 1, 1).expand(r, *self._kv_count.shape[1:])
            self._kv_count.index_add_(0, both[:r], new)
            self._pending.clear()
        return self._kv_count

    # -- geometry ----------------------------------------------------------
    @property
    def heads_per_block(self) -> int:
        return self.num_layers * self.num_kv_heads

    def block_page_ids(self, blocks: list[int] | torch.Tensor) -> torch.Tensor:
        """Page ids of ``blocks``: ``[len(blocks), L, H]`` int64."""
        b = torch.as_tensor(blocks, dtype=torch.int64).view(-1, 1, 1)
        return self._page_base.unsqueeze(0) + b * self.num_kv_heads

    def block_of_page(self, pages: torch.Tensor) -> torch.Tensor:
        return (pages.to(torch.int64) // self.num_kv_heads) % self.num_blocks

    # -- lifecycle ---------------------------------------------------------
    def add(self, req_id: str, blocks: list[int], num_tokens: int, prefill_end: int,
            records_metric: bool = True, stock_layout: bool = False,
            packed: bool = False) -> RequestPages:
        if req_id in self.requests:
            raise RuntimeError(f"request {req_id} is already registered")
        if not self._free_slots:
            raise RuntimeError("HeadPageTable: no free request slot")
        slot = self._free_slots.pop()
        self.page_table[slot] = -1
        self.num_pages[slot] = 0
        self.kv_count[slot] = num_tokens
        req = RequestPages(slot=slot, blocks=list(blocks), num_tokens=num_tokens,
                           prefill_end=prefill_end, hit_tokens=num_tokens,
                           records_metric=records_metric,
                           stock_layout=stock_layout, packed=packed)
        self.requests[req_id] = req
        self.ensure_capacity(req, 0)
        return req

    def remove(self, req_id: str) -> None:
        req = self.requests.pop(req_id, None)
        if req is not None:
            self._free_slots.append(req.slot)

    def append_blocks(self, req_id: str, blocks: list[int]) -> None:
        self.requests[req_id].blocks.extend(blocks)

    # -- page assignment ---------------------------------------------------
    def pages_in_use(self, req: RequestPages) -> int:
        return int(self.num_pages[req.slot].sum())

    def needed_pages(self, req: RequestPages, new_tokens: int) -> torch.Tensor:
        """Pages each head needs to also hold ``new_tokens`` more KVs."""
        return cdiv(self.kv_count[req.slot] + new_tokens, self.block_size)

    def ensure_capacity(self, req: RequestPages, new_tokens: int) -> None:
        """Assign pages so every head can append ``new_tokens`` KVs.

        Uncompressed requests get the identity pages (head (l, h), logical
        page i -> ``page_id(l, blocks[i], h)``); compressed requests take any
        free page of their blocks, preferring the head's own page of block i.
        """
        try:
            self._assign_pages(req, new_tokens)
        finally:
            self._refresh_slack(req)

    def _refresh_slack(self, req: RequestPages) -> None:
        slot = req.slot
        req.slack = int((self.num_pages[slot] * self.block_size - self.kv_count[slot]).min())

    def _assign_pages(self, req: RequestPages, new_tokens: int) -> None:
        slot = req.slot
        need = self.needed_pages(req, new_tokens)
        have = self.num_pages[slot]
        if bool((need <= have).all()):
            return
        target = int(need.max())
        if target > self.max_pages:
            raise RuntimeError(f"request needs {target} pages per head; max is {self.max_pages}")
        if not req.compressed:
            if target > len(req.blocks):
                raise RuntimeError(
                    f"request owns {len(req.blocks)} blocks but needs {target}: "
                    "scheduler and worker disagree"
                )
            start = int(have.min())
            ids = self.block_page_ids(req.blocks[start:target])  # [k, L, H]
            self.page_table[slot, :, :, start:target] = ids.permute(1, 2, 0).to(torch.int32)
            self.num_pages[slot] = torch.maximum(have, need.clamp(min=start))
            return
        # Compressed: every missing (head, logical page) slot at once.  A
        # slot takes its head's own page of block i when that page is free
        # (keeps the identity layout where possible), the others take the
        # remaining free pages of the request's blocks in block-major order.
        rows = self.num_layers * self.num_kv_heads
        have_f, need_f = have.reshape(rows), need.reshape(rows)
        missing = (need_f - have_f).clamp(min=0).to(torch.int64)  # [L*H]
        row = torch.repeat_interleave(torch.arange(rows), missing)
        first = torch.repeat_interleave(have_f.to(torch.int64), missing)
        offset = torch.arange(row.numel()) - torch.repeat_interleave(
            torch.cumsum(missing, 0) - missing, missing)
        logical = first + offset  # logical page index of every missing slot
        free = self.free_pages(req)
        blocks = torch.as_tensor(req.blocks, dtype=torch.int64)
        in_range = logical < blocks.numel()
        own = self._page_base.view(-1)[row] + blocks[logical.clamp(max=max(0, blocks.numel() - 1))] * self.num_kv_heads
        own_ok = in_range & torch.isin(own, free)
        pages = torch.where(own_ok, own, torch.full_like(own, -1))
        rest = free[~torch.isin(free, pages[own_ok])]
        need_rest = int((~own_ok).sum())
        if need_rest > rest.numel():
            raise RuntimeError(
                f"request needs {need_rest} more pages than the {rest.numel()} free ones in "
                f"its {len(req.blocks)} blocks: scheduler and worker disagree on its page count"
            )
        pages[~own_ok] = rest[:need_rest]
        table = self.page_table[slot].view(rows, self.max_pages)
        table[row, logical] = pages.to(torch.int32)
        self.num_pages[slot] = torch.maximum(have, need)

    def append_tokens(self, reqs: list[RequestPages], new_tokens: list[int]) -> None:
        """Make room for and count ``new_tokens[i]`` more KVs in every head of
        ``reqs[i]`` (one step's scheduled tokens; requests distinct).

        Every head of a request appends the same number of KVs, so a request
        needs pages only where its tokens exceed its ``slack`` (once in
        ``block_size`` decode steps: ``ensure_capacity``); the check is integer
        arithmetic per request, and the counts reach ``kv_count`` when it is
        next read: no tensor op per step where nothing needs pages."""
        pending = self._pending
        for req, n in zip(reqs, new_tokens):
            if n > req.slack:
                self.ensure_capacity(req, n)  # reads kv_count: adds (and clears) ``pending`` first
            req.slack -= n
            req.num_tokens += n
            req.step_tokens = n
            pending[req.slot] = pending.get(req.slot, 0) + n

    def used_pages(self, req: RequestPages) -> torch.Tensor:
        """Page ids assigned to any head of ``req`` (1-D int64)."""
        slot = req.slot
        valid = torch.arange(self.max_pages).view(1, 1, -1) < self.num_pages[slot].unsqueeze(-1)
        return self.page_table[slot][valid].to(torch.int64)

    def free_pages(self, req: RequestPages, blocks: list[int] | None = None) -> torch.Tensor:
        """Unassigned pages of ``blocks`` (default: all owned), block-major."""
        owned = self.block_page_ids(req.blocks if blocks is None else blocks).view(-1)
        return owned[~torch.isin(owned, self.used_pages(req))]

    def trim(self, req: RequestPages) -> None:
        """Unassign pages beyond what each head's KVs occupy."""
        slot = req.slot
        keep = cdiv(self.kv_count[slot], self.block_size)
        drop = torch.arange(self.max_pages).view(1, 1, -1) >= keep.unsqueeze(-1)
        self.page_table[slot][drop] = -1
        self.num_pages[slot] = keep
        self._refresh_slack(req)

    def release_blocks(self, req: RequestPages, released: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stop owning the tail blocks ``released``; return (src, dst) page
        moves that vacate them (the caller copies the page contents)."""
        if not released:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        if req.blocks[-len(released):] != list(released):
            raise RuntimeError(
                f"released blocks {released} are not the tail of {req.blocks}"
            )
        kept_blocks = req.blocks[: -len(released)]
        slot = req.slot
        table = self.page_table[slot]  # [L, H, max_pages] (view)
        valid = torch.arange(self.max_pages).view(1, 1, -1) < self.num_pages[slot].unsqueeze(-1)
        in_released = valid & torch.isin(
            self.block_of_page(table), torch.as_tensor(released, dtype=torch.int64)
        )
        src = table[in_released].to(torch.int64)
        dst = self.free_pages(req, kept_blocks)[: src.numel()]
        if dst.numel() < src.numel():
            raise RuntimeError(
                f"cannot vacate released blocks: {src.numel()} live pages, "
                f"{dst.numel()} free pages left in kept blocks"
            )
        table[in_released] = dst.to(torch.int32)
        req.blocks = kept_blocks
        return src, dst

    # -- batch views -------------------------------------------------------
    def head_rows(self, req: RequestPages) -> tuple[torch.Tensor, torch.Tensor]:
        """(page_table [L*H, max_pages], kv_count [L*H]) of one request."""
        slot = req.slot
        return (
            self.page_table[slot].view(self.heads_per_block, self.max_pages),
            self.kv_count[slot].view(self.heads_per_block),
        )
