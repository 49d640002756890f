"""Knorm: keep low-norm keys."""

from __future__ import annotations

import torch

from kvcompress_vllm.scorers.base import HeadKVs, Scorer


class KnormScorer(Scorer):
    """Evicts the keys with the largest L2 norm first (keeps low-norm keys):
    ``score = -||k||``, as kvpress's ``KnormPress``.
    Based on https://arxiv.org/abs/2406.11430.
    """

    name = "knorm"
    needs_keys = True

    def score(self, kvs: HeadKVs) -> torch.Tensor:
        return -torch.linalg.vector_norm(kvs.keys().float(), dim=-1)
