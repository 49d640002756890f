"""Random paged inputs shared by the C++ and Triton kernel tests.

Every case uses disjoint random pages per (request, KV head), per-head KV
counts that differ by several pages, and a mix of decode rows (1 query) and
chunked-prefill rows (several queries whose KVs are the newest of each head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class AttentionCase:
    query: torch.Tensor  # [T, Hq, D]
    kv_pages: torch.Tensor  # [P, 2, N, D]
    page_table: torch.Tensor  # [R, H, max_pages] int32
    kv_lens: torch.Tensor  # [R, H] int32
    query_start_loc: torch.Tensor  # [R + 1] int32
    metric_q_start: torch.Tensor  # [R] int32
    metrics: torch.Tensor  # [P, N] float32 (random start values)
    scale: float
    metric_k_start: torch.Tensor | None = None  # [R] int32, None: every KV

    def clone_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.zeros_like(self.query)
        return out, self.metrics.clone()


def make_attention_case(
    *,
    num_reqs: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    max_kv: int = 300,
    min_kv: int = 1,
    max_q: int = 1,
    seed: int = 0,
    uniform_heads: bool = False,
) -> AttentionCase:
    """Random case; ``max_q > 1`` adds prefill-chunk rows of up to max_q queries.
    ``uniform_heads``: all heads of a request hold the same number of KVs (an
    uncompressed request)."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:  # inclusive bounds
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    q_lens = [1 if max_q == 1 or r % 2 == 0 else randint(2, max_q) for r in range(num_reqs)]
    kv_lens = torch.zeros(num_reqs, num_kv_heads, dtype=torch.int32)
    for r in range(num_reqs):
        if uniform_heads:
            kv_lens[r, :] = max(q_lens[r], randint(min_kv, max_kv))
            continue
        for h in range(num_kv_heads):
            # Heads differ by several pages; never fewer KVs than queries.
            kv_lens[r, h] = max(q_lens[r], randint(min_kv, max_kv))
    pages_per_head = (kv_lens + block_size - 1) // block_size
    max_pages = int(pages_per_head.max()) + 1
    total_pages = int(pages_per_head.sum()) + 7  # a few unused pages
    perm = torch.randperm(total_pages, generator=g).to(torch.int32)
    page_table = torch.full((num_reqs, num_kv_heads, max_pages), -1, dtype=torch.int32)
    cursor = 0
    for r in range(num_reqs):
        for h in range(num_kv_heads):
            n = int(pages_per_head[r, h])
            page_table[r, h, :n] = perm[cursor : cursor + n]
            cursor += n
    kv_pages = torch.randn(total_pages, 2, block_size, head_dim, generator=g).to(dtype)
    qsl = torch.zeros(num_reqs + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    num_tokens = int(qsl[-1])
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=g).to(dtype)
    # Decode rows always record; prefill rows record from a random query on.
    metric_q_start = torch.tensor(
        [0 if q == 1 else randint(0, q) for q in q_lens], dtype=torch.int32
    )
    metrics = torch.rand(total_pages, block_size, generator=g)
    return AttentionCase(
        query=query,
        kv_pages=kv_pages,
        page_table=page_table,
        kv_lens=kv_lens,
        query_start_loc=qsl,
        metric_q_start=metric_q_start,
        metrics=metrics,
        scale=head_dim**-0.5,
    )


@dataclass
class CompactionCase:
    kv_pages: torch.Tensor  # [P, 2, N, D]
    metrics: torch.Tensor  # [P, N]
    positions: torch.Tensor  # [P, N] int32
    page_table: torch.Tensor  # [S, max_pages] int32
    kv_lens: torch.Tensor  # [S] int32
    evict_idx: torch.Tensor  # [S, max_evict] int32 (ascending prefix, -1 padded)
    evict_counts: torch.Tensor  # [S] int32


def make_compaction_case(
    *, num_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    max_kv: int = 300, seed: int = 0,
) -> CompactionCase:
    g = torch.Generator().manual_seed(seed)
    kv_lens = torch.randint(1, max_kv + 1, (num_heads,), generator=g, dtype=torch.int32)
    pages = (kv_lens + block_size - 1) // block_size
    max_pages = int(pages.max())
    total = int(pages.sum()) + 3
    perm = torch.randperm(total, generator=g).to(torch.int32)
    page_table = torch.full((num_heads, max_pages), -1, dtype=torch.int32)
    cursor = 0
    evict_lists = []
    for s in range(num_heads):
        n = int(pages[s])
        page_table[s, :n] = perm[cursor : cursor + n]
        cursor += n
        length = int(kv_lens[s])
        count = int(torch.randint(0, length + 1, (1,), generator=g))
        chosen = torch.randperm(length, generator=g)[:count].sort().values
        evict_lists.append(chosen.to(torch.int32))
    max_evict = max(1, max(len(e) for e in evict_lists))
    evict_idx = torch.full((num_heads, max_evict), -1, dtype=torch.int32)
    for s, e in enumerate(evict_lists):
        evict_idx[s, : len(e)] = e
    return CompactionCase(
        kv_pages=torch.randn(total, 2, block_size, head_dim, generator=g).to(dtype),
        metrics=torch.rand(total, block_size, generator=g),
        positions=torch.randint(0, 1 << 20, (total, block_size), generator=g, dtype=torch.int32),
        page_table=page_table,
        kv_lens=kv_lens,
        evict_idx=evict_idx,
        evict_counts=torch.tensor([len(e) for e in evict_lists], dtype=torch.int32),
    )


def share_prefix_pages(case: AttentionCase, shared_pages: int, hits: bool = False) -> AttentionCase:
    """The same case with the first ``shared_pages`` page slots of every head of
    every request pointing at request 0's pages (prefix-cache hitters and the
    n > 1 children of one prompt share their prefix blocks, page for page).
    ``hits``: requests 1.. are prefix-cache hitters whose metric skips the
    shared KVs (``metric_k_start``), as the worker sets it.

    Every head must already hold more than ``shared_pages`` pages, so that the
    shared pages are full and each request also attends its own pages."""
    n_pages = case.page_table.shape[2]
    block_size = case.kv_pages.shape[2]
    need = shared_pages * block_size
    if int(case.kv_lens.min()) <= need or shared_pages >= n_pages:
        raise ValueError(
            f"share_prefix_pages: every head needs > {need} KVs, min is {int(case.kv_lens.min())}"
        )
    pt = case.page_table.clone()
    pt[1:, :, :shared_pages] = pt[0:1, :, :shared_pages]
    mks = torch.tensor([0] + [need] * (pt.shape[0] - 1), dtype=torch.int32) if hits else None
    return dataclasses.replace(case, page_table=pt, metric_k_start=mks)


def two_heads_on_pages(pages0, pages1, ev0, ev1, n=40, block_size=16):
    """Two heads of ``n`` KVs on the given page lists (in a pool of 8 pages),
    evicting ``ev0`` / ``ev1``."""
    g = torch.Generator().manual_seed(7)
    width = max(len(ev0), len(ev1))
    return CompactionCase(
        kv_pages=torch.randn(8, 2, block_size, 8, generator=g),
        metrics=torch.rand(8, block_size, generator=g),
        positions=torch.randint(0, 1 << 20, (8, block_size), generator=g, dtype=torch.int32),
        page_table=torch.tensor([pages0, pages1], dtype=torch.int32),
        kv_lens=torch.tensor([n, n], dtype=torch.int32),
        evict_idx=torch.tensor([e + [-1] * (width - len(e)) for e in (ev0, ev1)],
                               dtype=torch.int32),
        evict_counts=torch.tensor([len(ev0), len(ev1)], dtype=torch.int32),
    )


#: Calls that compact_heads (C++ and Triton) must refuse, as
#: ``pytest.mark.parametrize("pages0,pages1,ev0,ev1", **SHARED_MOVED_PAGES)``
#: arguments for ``two_heads_on_pages``: a page one head moves KVs within is
#: listed by another head or twice.
SHARED_MOVED_PAGES = dict(argvalues=[
    ([0, 1, 2], [3, 1, 4], [20], [2]),       # page 1: both heads move within it
    ([0, 1, 2], [3, 4, 2], [5], [36]),       # page 2: head 1 moves only within its last page
    ([0, 1, 1], [3, 4, 5], [3], [1]),        # page 1 listed twice by head 0
    ([0, 1, 2], [1, 3, 4], [20], [33]),      # page 1: head 0 moves within it, head 1 keeps KVs
    ([0, 1, 2], [3, 1, 4], [20], []),        # the same with a head that evicts nothing
], ids=["both-move", "one-moves-in-its-last-page", "twice-in-one-head", "one-moves-one-keeps",
        "one-moves-one-evicts-nothing"])
