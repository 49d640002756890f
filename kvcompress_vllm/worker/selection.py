"""Which head-pages to evict: one joint decision over all (layer, KV head)s.

Input: one row of scores per head of a request (``[R, C]``, lower = evict
first, ``+inf`` = never: protected window, sinks, padding) and the number of
pages to free.  Within a head, KVs are taken in ascending score order, so
evicting ``j`` pages from that head removes its ``j * N`` lowest-scored KVs and
costs the largest score among them (``sorted[j*N - 1]``).  Costs grow with
``j``, so taking the globally cheapest page-units yields a prefix per head: a
variable number of pages per head, the KV-Compress allocation.

``uniform=True`` spreads the pages as evenly as possible over the heads (the
same scores inside each head): the control that measures what variable
per-head rates buy.  Ties are broken deterministically (lower head index, then
lower unit index; within a head by logical index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    per-head ascending order of its KVs."""
    sorted_scores, order = torch.sort(scores, dim=1, stable=True)
    num_units = scores.shape[1] // block_size
    costs = sorted_scores[:, block_size - 1 : num_units * block_size : block_size]
    return costs, order


def choose_pages(costs: torch.Tensor, num_pages: int, uniform: bool = False) -> torch.Tensor:
    """Pages per head (``[R]`` int64) for the ``num_pages`` cheapest units."""
    rows, units = costs.shape
    if num_pages == 0:
        return torch.zeros(rows, dtype=torch.int64)
    flat = costs.reshape(-1)
    if uniform:
        # Round-robin: all first units (cheapest first), then all second ones...
        unit_idx = torch.arange(units).repeat(rows)
        key = torch.argsort(flat, stable=True)
        key = key[torch.argsort(unit_idx[key], stable=True)]
    else:
        key = torch.argsort(flat, stable=True)
    chosen = key[:num_pages]
    if chosen.numel() < num_pages or not bool(torch.isfinite(flat[chosen]).all()):
        raise RuntimeError(
            f"asked to evict {num_pages} pages but only "
            f"{int(torch.isfinite(flat).sum())} are evictable"
        )
    return torch.bincount(chosen // units, minlength=rows)


def select_evictions(
    scores: torch.Tensor, num_pages: int, block_size: int, uniform: bool = False
) -> HeadEvictions:
    """Joint (or uniform) selection of ``num_pages`` head-pages to evict."""
    costs, order = unit_costs(scores, block_size)
    pages = choose_pages(costs, num_pages, uniform)
    counts = pages * block_size
    max_evict = max(1, int(counts.max()))
    take = torch.arange(max_evict).view(1, -1) < counts.view(-1, 1)
    idx = order[:, :max_evict]
    idx = torch.where(take, idx, torch.full_like(idx, torch.iinfo(torch.int64).max))
    idx = torch.sort(idx, dim=1).values
    idx = torch.where(idx == torch.iinfo(torch.int64).max, torch.full_like(idx, -1), idx)
    return HeadEvictions(pages_per_head=pages, evict_idx=idx.to(torch.int32))
