"""Attention metric + key diversity, z-scored per (layer, head)."""

from __future__ import annotations

import torch

from kvcompress_vllm.scorers._combine import head_zscores, log_metric
from kvcompress_vllm.scorers.base import HeadKVs, Scorer
from kvcompress_vllm.scorers.keydiff_scorer import KeyDiffScorer


class MetricKeyDiffScorer(Scorer):
    """``z(log metric) + z(keydiff)``: the KV-Compress attention metric
    (https://arxiv.org/abs/2410.00161) and KeyDiff's key diversity
    (https://arxiv.org/abs/2504.15364), each z-scored over the valid KVs of
    its (layer, KV head), then added with equal weight.

    The normalisation makes the two comparable but also makes heads
    comparable to each other, so the joint allocation over heads becomes
    close to uniform (each head's scores have mean 0, std about 1).
    """

    name = "metric_keydiff"
    needs_metrics = True
    needs_keys = True

    def score(self, kvs: HeadKVs) -> torch.Tensor:
        zm = head_zscores(log_metric(kvs.metrics), kvs.valid)
        zk = head_zscores(KeyDiffScorer().score(kvs), kvs.valid)
        return (zm + zk).nan_to_num(nan=0.0)
