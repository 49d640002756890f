"""Attention metric + key diversity: mean per-head rank, metric allocation."""

from __future__ import annotations

import torch

from kvcompress_vllm.scorers._combine import head_ranks, rank_key, remap_to_metric
from kvcompress_vllm.scorers.base import HeadKVs, Scorer
from kvcompress_vllm.scorers.keydiff_scorer import KeyDiffScorer


class MetricKeyDiffRankScorer(Scorer):
    """Within each (layer, KV head), KVs go in the order of the mean of their
    two per-head ranks: by the KV-Compress attention
    metric (https://arxiv.org/abs/2410.00161) and by KeyDiff's key diversity
    (https://arxiv.org/abs/2504.15364); ties by the metric rank.

    Across heads nothing changes from ``kvcompress``: the scores returned are
    the head's own sorted metric values reassigned in the combined order
    (``_combine.remap_to_metric``), so each head gives up the pages the
    attention metric's joint allocation would take from it.
    """

    name = "metric_keydiff_rank"
    needs_metrics = True
    needs_keys = True

    def score(self, kvs: HeadKVs) -> torch.Tensor:
        rm = head_ranks(kvs.metrics, kvs.valid)
        rk = head_ranks(KeyDiffScorer().score(kvs), kvs.valid)
        key = rank_key(rm + rk, rm)  # ties: by the metric rank
        return remap_to_metric(key, kvs.metrics, kvs.valid)
