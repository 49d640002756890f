"""Per-(layer, head) normalisation helpers for the combined scorers.

Each row of a ``HeadKVs`` chunk is one (layer, KV head); only its valid KVs
(``kvs.valid``) take part in a row's statistics, padding gets ``nan`` (the
caller sets ``+inf`` on padding whatever a scorer returns).
"""

from __future__ import annotations

import torch


def head_ranks(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[r, C]`` int64: each valid KV's rank among its head's valid KVs (0 =
    lowest score, ties in column order); padding ranks after every valid KV."""
    s = scores.to(torch.float32).masked_fill(~valid, float("inf"))
    order = torch.sort(s, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return ranks


def rank_key(primary: torch.Tensor, tie_break: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering by ``primary`` then ``tie_break`` (both int64,
    ``tie_break`` in ``[0, C)``), exactly (no float rounding at any length)."""
    return primary * tie_break.shape[1] + tie_break


def head_zscores(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[r, C]`` float32: ``(x - mean) / std`` over each head's valid KVs
    (std clamped to 1e-6).  Padding: nan."""
    x = scores.to(torch.float32)
    w = valid.to(torch.float32)
    n = w.sum(dim=1, keepdim=True).clamp_min(1)
    xv = torch.where(valid, x, torch.zeros_like(x))
    mean = xv.sum(dim=1, keepdim=True) / n
    var = (((xv - mean) * w) ** 2).sum(dim=1, keepdim=True) / n
    z = (x - mean) / var.sqrt().clamp_min(1e-6)
    return z.masked_fill(~valid, float("nan"))


def log_metric(metrics: torch.Tensor) -> torch.Tensor:
    """``log`` of the attention metric (squared probabilities span many
    decades; the log makes a z-score meaningful)."""
    return torch.log(metrics.to(torch.float32).clamp_min(0) + 1e-12)


def remap_to_metric(order_key: torch.Tensor, metrics: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Order each head's KVs by ``order_key`` (ascending = evicted first) but
    give them the head's own sorted metric values: the KV ranked ``j``-th by
    ``order_key`` gets the head's ``j``-th smallest metric.  The multiset of a
    head's scores is its metric's, so the joint allocation over heads (how
    many pages each head gives up, ``worker.selection.choose_pages``) is the
    attention metric's, and only *which* KVs of a head go is decided by
    ``order_key``.  Padding gets ``+inf``."""
    m = metrics.to(torch.float32).masked_fill(~valid, float("inf"))
    sorted_m = torch.sort(m, dim=1).values
    if order_key.is_floating_point():
        key = order_key.masked_fill(~valid, float("inf"))
    else:
        key = order_key.masked_fill(~valid, torch.iinfo(order_key.dtype).max)
    order = torch.sort(key, dim=1, stable=True).indices
    out = torch.empty_like(m)
    out.scatter_(1, order, sorted_m)
    return out
