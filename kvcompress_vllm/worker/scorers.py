"""Scorers: how the KVs of one request are ranked for eviction.

A scorer maps the gathered KVs of a request to ``scores [R, C]`` (one row per
(layer, KV head), lower = evicted first).  The caller then sets ``+inf`` on
the protected window, the sinks and padding, and ``selection`` turns scores
into page evictions.  Names (``kv_compress.scorer`` / per request
``extra_args.kv_compress_scorer``):

``kvcompress``   squared attention from the observation window and decode
                 queries, summed over the GQA group (KV-Compress); pages are
                 allocated jointly across heads (variable per-head rates).
``uniform``      the same metric, but every head gives up the same number of
                 pages (the control for variable per-head rates).
``random``       uniformly random (seeded by request and length).
``streamingllm`` oldest first: keeps the sinks plus the most recent tokens.
``knorm``        keeps low-norm keys (kvpress KnormPress): score = -||k||.
``keydiff``      keeps keys least similar to the head's mean key (KeyDiff):
                 score = -cos(k, mean k).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvcompress_vllm.config import SCORERS


@dataclass
class HeadKVs:
    """Gathered KVs of one request, one row per (layer, KV head)."""

    metrics: torch.Tensor  # [R, C] float32 attention metric
    positions: torch.Tensor  # [R, C] int64 token positions
    valid: torch.Tensor  # [R, C] bool (j < kv_count of the row)
    keys: Callable[[], torch.Tensor]  # -> [R, C, D] float32 (gathered lazily)
    req_id: str
    num_tokens: int


def _random(kvs: HeadKVs) -> torch.Tensor:
    seed = zlib.crc32(f"{kvs.req_id}:{kvs.num_tokens}".encode())
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(kvs.metrics.shape, generator=gen)


def _knorm(kvs: HeadKVs) -> torch.Tensor:
    return -kvs.keys().norm(dim=-1)


def _keydiff(kvs: HeadKVs) -> torch.Tensor:
    keys = kvs.keys()
    mask = kvs.valid.unsqueeze(-1).float()
    mean = (keys * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return -torch.nn.functional.cosine_similarity(keys, mean, dim=-1)


_SCORERS: dict[str, Callable[[HeadKVs], torch.Tensor]] = {
    "kvcompress": lambda kvs: kvs.metrics,
    "uniform": lambda kvs: kvs.metrics,
    "random": _random,
    "streamingllm": lambda kvs: kvs.positions.to(torch.float32),
    "knorm": _knorm,
    "keydiff": _keydiff,
}
assert set(_SCORERS) == set(SCORERS)


def score(name: str, kvs: HeadKVs, protected_window: int, sink_tokens: int) -> torch.Tensor:
    """Scores with ``+inf`` on KVs that must stay (protected, sinks, padding)."""
    scores = _SCORERS[name](kvs).to(torch.float32)
    keep = (
        ~kvs.valid
        | (kvs.positions >= kvs.num_tokens - protected_window)
        | (kvs.positions < sink_tokens)
    )
    return scores.masked_fill(keep, float("inf"))


def is_uniform(name: str) -> bool:
    return name == "uniform"
