"""Random eviction: the control that any real score must beat."""

from __future__ import annotations

import zlib

import torch

from kvcompress_vllm.scorers.base import HeadKVs, Scorer


class RandomScorer(Scorer):
    """Uniformly random scores: the control, the baseline every other scorer
    must beat (kvpress's ``RandomPress`` plays the same role).

    Deterministic per (request, token count, head): each row draws from its
    own generator seeded by ``crc32("seed:num_tokens:row")`` with the
    request's ``HeadKVs.seed`` (a hash of its prompt tokens or embeddings), so the scores do
    not depend on how rows are chunked, repeat for the same prompt and length
    -- in another run too, where vLLM gives the request another id -- and
    differ across prompts and compressions.
    """

    name = "random"

    def score(self, kvs: HeadKVs) -> torch.Tensor:
        out = torch.empty(kvs.valid.shape, dtype=torch.float32)
        for i in range(out.shape[0]):
            seed = zlib.crc32(f"{kvs.seed}:{kvs.num_tokens}:{kvs.row_start + i}".encode())
            out[i] = torch.rand(out.shape[1], generator=torch.Generator().manual_seed(seed))
        # Drawn on the host (same numbers on every platform), used where the KVs are.
        return out.to(kvs.valid.device)
