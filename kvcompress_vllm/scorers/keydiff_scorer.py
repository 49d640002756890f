"""KeyDiff: keep the keys least similar to the head's normalised mean key."""

from __future__ import annotations

import torch

from kvcompress_vllm.scorers.base import HeadKVs, Scorer


class KeyDiffScorer(Scorer):
    """Evicts the keys most similar to the head's anchor first (keeps diverse
    keys).  Based on https://arxiv.org/abs/2504.15364.

    Follows kvpress's ``KeyDiffPress`` definition exactly: the anchor is the
    mean of the L2-*normalised* keys of the head (``F.normalize(keys).mean``
    over the head's KVs; here over the KVs the head still holds), and
    ``score = -cos(k, anchor)``.  (Before this class the plugin used the mean
    of the raw keys, a different definition under the same name.)

    Memory: one chunk's keys are upcast to fp32 and normalised in place; the
    anchor and the similarities are matrix-vector products per head (per
    head, so that the result does not depend on how heads are chunked), so no
    further ``[r, C, D]`` temporary is made.
    """

    name = "keydiff"
    needs_keys = True

    def score(self, kvs: HeadKVs) -> torch.Tensor:
        keys = kvs.keys().float()  # [r, C, D], fresh: normalised in place
        norms = torch.linalg.vector_norm(keys, dim=-1, keepdim=True)
        keys.div_(norms.clamp_min_(1e-12))  # F.normalize
        valid = kvs.valid.to(torch.float32)  # [r, C]; padding keys are zero
        out = torch.empty(valid.shape, dtype=torch.float32, device=valid.device)
        for i in range(keys.shape[0]):
            anchor = (valid[i] @ keys[i]) / valid[i].sum().clamp_min(1)  # [D]
            # cos(k, a) = (k / |k|) . a / |a|
            out[i] = keys[i] @ anchor
            out[i] /= torch.linalg.vector_norm(anchor).clamp_min(1e-8)
        return out.neg_()
