"""The KV-Compress attention metric."""

from __future__ import annotations

import torch

from kvcompress_vllm.scorers.base import HeadKVs, Scorer


class KVCompressScorer(Scorer):
    """Evicts the KVs with the lowest squared attention (KV-Compress).

    The metric is accumulated by the attention kernel next to each KV: the
    squared softmax probabilities from the last ``observation_window`` prompt
    queries, max-pooled along keys (``pooling_kernel``), plus those of every
    decode query (``record_decode_metrics``), summed over the KV head's query
    group.  Based on https://arxiv.org/abs/2410.00161.
    """

    name = "kvcompress"
    needs_metrics = True

    def score(self, kvs: HeadKVs) -> torch.Tensor:
        return kvs.metrics
