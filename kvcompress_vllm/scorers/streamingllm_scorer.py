"""StreamingLLM: attention sinks plus a recent window."""

from __future__ import annotations

import torch

from kvcompress_vllm.scorers.base import HeadKVs, Scorer


class StreamingLLMScorer(Scorer):
    """Evicts the oldest KVs first; with the ``sink_tokens`` (never evicted)
    this keeps the attention sinks plus the most recent tokens.
    Based on https://arxiv.org/abs/2309.17453.
    """

    name = "streamingllm"

    def score(self, kvs: HeadKVs) -> torch.Tensor:
        return kvs.positions.to(torch.float32)
