"""Which head-pages to evict: scores -> per-head page counts -> KV indices.

Input: one row of scores per (layer, KV head) of a request (``[R, C]``, lower
= evict first, ``+inf`` = never: protected window, sinks, padding) and the
number of pages to free.  Within a head, KVs are taken in ascending score
order, so evicting ``j`` pages from that head removes its ``j * N`` lowest-
scored KVs and costs the largest score among them (``sorted[j*N - 1]``): the
head's ``j``-th *unit*.  Costs grow with ``j`` and an ``+inf`` unit is never
taken, so every allocation below takes a prefix of units per head.

Allocation modes (``config.ALLOCATIONS``, ``EvictionPlan.allocation``):

``joint``    the globally cheapest units: a variable number of pages per
             (layer, KV head), the KV-Compress allocation.
``uniform``  water-filling over the request's whole life: with ``k[h]``
             pages already evicted from head ``h`` (lifetime, derived from the
             page table), units are taken in order of ``(k[h] + j, cost, h)``.
             Every head ends up with the same lifetime count up to one page,
             unless a head ran out of evictable units; among the most even
             outcomes it is the cheapest.  The control that measures what
             variable per-head budgets buy.

Both modes can take any number of pages up to the number of finite-cost units
(the scheduler's ``max_evictable``).  Ties are broken deterministically
(lower head index, then lower unit index; within a head by logical index).

``rank_heads`` scores a request in chunks of rows so that temporaries stay
bounded (see ``scorers.CHUNK_BYTES``); only the int32 sort order ``[R, C]``
and the unit costs ``[R, C/N]`` are kept for the whole request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvcompress_vllm import scorers
from kvcompress_vllm.config import ALLOCATIONS
from kvcompress_vllm.scorers import HeadKVs, Scorer


@dataclass
class HeadEvictions:
    """Result for one request."""

    pages_per_head: torch.Tensor  # [R] int64
    #: Ascending logical indices to evict per head, padded with -1:
    #: ``[R, max_evict]`` int32; row r has ``pages_per_head[r] * N`` entries.
    evict_idx: torch.Tensor

    @property
    def evict_counts(self) -> torch.Tensor:  # [R] int32 (KVs)
        return (self.evict_idx >= 0).sum(dim=1).to(torch.int32)


def unit_costs(scores: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(costs [R, U], order [R, C]): cost of a head's j-th page-unit and the
    per-head ascending (stable) order of its KVs."""
    sorted_scores, order = torch.sort(scores, dim=1, stable=True)
    num_units = scores.shape[1] // block_size
    costs = sorted_scores[:, block_size - 1 : num_units * block_size : block_size]
    return costs, order


def choose_pages(
    costs: torch.Tensor,
    num_pages: int,
    allocation: str = "joint",
    evicted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pages to evict per head (``[R]`` int64).

    ``costs``: ``[R, U]`` unit costs (ascending per row, ``+inf`` = not
    evictable).  ``evicted``: ``[R]`` pages each head gave up earlier in the
    request's life (only ``uniform`` uses it; default none).
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {allocation!r}")
    rows, units = costs.shape
    flat = costs.reshape(-1)
    finite = torch.isfinite(flat)
    num_finite = int(finite.sum())
    if num_pages < 0 or num_pages > num_finite:
        raise RuntimeError(
            f"asked to evict {num_pages} pages but only {num_finite} are evictable "
            f"({rows} heads x {units} units)"
        )
    if num_pages == 0:
        return torch.zeros(rows, dtype=torch.int64)
    key = torch.argsort(flat, stable=True)  # by cost, then head, then unit
    if allocation == "uniform":
        base = torch.zeros(rows, dtype=torch.int64) if evicted is None else evicted.to(torch.int64)
        if base.shape != (rows,):
            raise ValueError(f"evicted must have shape ({rows},); got {tuple(base.shape)}")
        level = (base.view(-1, 1) + torch.arange(units).view(1, -1)).view(-1)
        level = level.masked_fill(~finite, torch.iinfo(torch.int64).max)
        key = key[torch.argsort(level[key], stable=True)]  # by level, then cost, head
    chosen = key[:num_pages]
    return torch.bincount(chosen // units, minlength=rows)


def evict_indices(order: torch.Tensor, pages: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[r, max(1, max_evict)]`` int32: per row the ``pages[r] * N`` first
    entries of ``order`` (a head's KVs, cheapest first) in ascending order,
    padded with -1 (the ``compact_heads`` input)."""
    counts = pages.to(torch.int64) * block_size
    max_evict = int(counts.max()) if counts.numel() else 0
    if max_evict == 0:
        return torch.full((order.shape[0], 1), -1, dtype=torch.int32)
    idx = order[:, :max_evict].to(torch.int32)
    big = torch.iinfo(torch.int32).max
    take = torch.arange(max_evict).view(1, -1) < counts.view(-1, 1)
    idx = torch.where(take, idx, big)
    idx = torch.sort(idx, dim=1).values
    return idx.masked_fill_(idx == big, -1)


def select_evictions(
    scores: torch.Tensor,
    num_pages: int,
    block_size: int,
    allocation: str = "joint",
    evicted: torch.Tensor | None = None,
) -> HeadEvictions:
    """Selection of ``num_pages`` head-pages from a whole ``[R, C]`` score
    tensor (the worker does the same in chunks: ``rank_heads``)."""
    costs, order = unit_costs(scores, block_size)
    pages = choose_pages(costs, num_pages, allocation, evicted)
    return HeadEvictions(pages_per_head=pages, evict_idx=evict_indices(order, pages, block_size))


def rank_heads(
    scorer: Scorer,
    gather: Callable[[int, int], HeadKVs],
    num_rows: int,
    width: int,
    head_dim: int,
    block_size: int,
    protected_window: int,
    sink_tokens: int,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score a request chunk by chunk: ``(costs [R, U] float32, order [R, C]
    int32)`` as ``unit_costs`` of the protected scores of all rows, by the
    scorer ``scorer.for_request`` picks for the request.

    ``gather(start, stop)`` returns the ``HeadKVs`` of rows ``[start, stop)``
    with ``width`` columns.  Chunks hold ``chunk_rows`` rows (default
    ``scorers.rows_per_chunk``: the fp32 keys, or the per-KV score/sort
    temporaries, of a chunk stay within ``scorers.CHUNK_BYTES``).
    """
    scorer = scorer.for_request(gather, num_rows)
    units = width // block_size
    costs = torch.empty(num_rows, units, dtype=torch.float32)
    order = torch.empty(num_rows, width, dtype=torch.int32)
    step = chunk_rows or scorers.rows_per_chunk(width, head_dim, scorer.needs_keys)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        kvs = gather(start, stop)
        chunk_costs, chunk_order = unit_costs(
            scorers.score(scorer, kvs, protected_window, sink_tokens), block_size
        )
        costs[start:stop] = chunk_costs
        order[start:stop] = chunk_order
    return costs, order
