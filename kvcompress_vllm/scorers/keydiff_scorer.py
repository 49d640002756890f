"""KeyDiff: keep the keys least similar to the head's normalised mean key."""

from __future__ import annotations

import torch

from kvcompress_vllm import ops
from kvcompress_vllm.scorers.base import HeadKVs, Scorer


class KeyDiffScorer(Scorer):
    """Evicts the keys most similar to the head's anchor first (keeps diverse
    keys).  Based on https://arxiv.org/abs/2504.15364.

    Follows kvpress's ``KeyDiffPress`` definition exactly: the anchor is the
    mean of the L2-*normalised* keys of the head (``F.normalize(keys).mean``
    over the head's KVs; here over the KVs the head still holds), and
    ``score = -cos(k, anchor)``.  (Before this class the plugin used the mean
    of the raw keys, a different definition under the same name.)

    Computed per head as ``-(k . a) / (|k| |a|)`` with ``a`` the mean of
    ``k / |k|``: the same value as normalising the keys first, without writing
    normalised keys; each head's keys are upcast to fp32 one head at a time
    (``[C, D]``), so no ``[r, C, D]`` fp32 temporary is made.  When the
    worker says where the keys lie (``HeadKVs.paged_keys``), one kernel
    reads them in the pages instead (``ops.keydiff_scores``: C++ on CPU, no
    gather, no per-head loop).
    """

    name = "keydiff"
    needs_keys = True

    def score(self, kvs: HeadKVs) -> torch.Tensor:
        paged = kvs.paged_keys
        if paged is not None:  # read in place: ops.keydiff_scores (same definition)
            return ops.keydiff_scores(
                paged.kv_pages, paged.page_rows, paged.counts, kvs.valid.shape[1], paged.packing
            ).to(kvs.valid.device)
        keys = kvs.keys()  # [r, C, D], cache dtype; padding keys are zero
        valid = kvs.valid.to(torch.float32)  # [r, C]
        out = torch.empty(valid.shape, dtype=torch.float32, device=valid.device)
        for i in range(keys.shape[0]):
            k = keys[i].float()  # [C, D]
            inv_norm = torch.linalg.vector_norm(k, dim=-1).clamp_min_(1e-12).reciprocal_()  # [C]
            anchor = ((valid[i] * inv_norm) @ k) / valid[i].sum().clamp_min(1)  # [D]
            # cos(k, a) = (k . a) / |k| / |a|
            torch.mul(k @ anchor, inv_norm, out=out[i])
            out[i] /= torch.linalg.vector_norm(anchor).clamp_min(1e-8)
        return out.neg_()
