"""KeyDiff on varied text, the attention metric on repetitive text."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvcompress_vllm.scorers.base import HeadKVs, Scorer
from kvcompress_vllm.scorers.keydiff_scorer import KeyDiffScorer
from kvcompress_vllm.scorers.kvcompress_scorer import KVCompressScorer


def later_copy_similarity(units: torch.Tensor, window: int) -> torch.Tensor:
    """``[C]``: for each row ``i`` of ``units`` ``[C, D]`` (unit vectors, zero
    rows for padding), the largest dot product with rows ``i+1 .. i+window``;
    ``-inf`` where there is none.  Banded, ``O(C * window * D)``: each tile
    of ``window`` rows is multiplied with itself and the next tile."""
    c, d = units.shape
    tiles = -(-c // window)
    padded = F.pad(units, (0, 0, 0, tiles * window + window - c))  # [(tiles + 1) * w, D]
    rows = padded[: tiles * window].view(tiles, window, d)
    cols = padded.as_strided((tiles, 2 * window, d), (window * d, d, 1))
    sims = rows @ cols.transpose(1, 2)  # [tiles, w, 2w]
    a = torch.arange(window, device=units.device)[:, None]
    b = torch.arange(2 * window, device=units.device)[None, :]
    sims.masked_fill_(~((b > a) & (b - a <= window)), float("-inf"))
    return sims.amax(-1).reshape(-1)[:c]


def repetition(kvs: HeadKVs, window: int = 64, threshold: float = 0.98) -> float:
    """Fraction of the valid KVs of ``kvs`` whose key recurs among the next
    ``window`` KVs of its head.

    Keys are compared by a position-free fingerprint: the norms of their
    rotary pairs (dims ``j`` and ``j + D/2``, the rotate-half layout of
    Llama-family models), which RoPE's rotations leave unchanged, centred on
    the head's mean and normalised; a later key with cosine above
    ``threshold`` is a recurrence.  On the quality suites' prompts (SmolLM2,
    1.5k-3.5k tokens, 4 sampled rows; docs/quality.md): repetitive filler
    0.87-0.96, generated prose 0.05-0.06.  With another rotary layout the
    fingerprint mixes unrelated dims, recurrences go unseen and the value
    falls toward the prose figure."""
    keys = kvs.keys().float()  # [r, C, D]
    half = keys.shape[-1] // 2
    prints = torch.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2)  # [r, C, D/2]
    hits = total = 0.0
    for i in range(prints.shape[0]):
        valid = kvs.valid[i]
        n = int(valid.sum())
        if n < 2:
            continue
        p = F.normalize(prints[i, :n], dim=-1)  # valid KVs are a prefix of the row
        centred = F.normalize(p - p.mean(0), dim=-1)
        hits += float((later_copy_similarity(centred, window) > threshold).sum())
        total += n
    return hits / total if total else 0.0


class AdaptiveScorer(Scorer):
    """Ranks a request by KeyDiff (https://arxiv.org/abs/2504.15364) unless
    its context is repetitive, then by the KV-Compress attention metric
    (https://arxiv.org/abs/2410.00161).

    Neither is robust alone on this project's suites (docs/quality.md):
    KeyDiff wins on varied text (copying, prose needles) where the metric's
    observation window misses what the answer needs, and on repetitive
    context it thins every copy of the repeated text alike, so a long
    generation that continues it drifts; the metric keeps what the queries
    read there.  The request's context is *repetitive* when ``repetition``
    of a few sampled (layer, KV head) rows is at least ``cutoff``; the
    choice is made at each compression from the KVs the request then holds,
    and applies to all its heads (of this rank under tensor parallelism:
    docs/scaling.md), so per-head budgets stay comparable.

    Records the metric (its requests run the metric-recording attention path)
    and reads keys (the sampled rows, and every row when KeyDiff ranks).
    """

    name = "adaptive"
    needs_metrics = True
    needs_keys = True
    #: ``repetition`` at or above which the metric ranks.
    cutoff = 0.5
    #: Rows (evenly spaced over the request's layer-major rows) sampled.
    sample_rows = 4

    _metric = KVCompressScorer()
    _keydiff = KeyDiffScorer()

    def choose(self, repetition_value: float) -> Scorer:
        """The scorer that ranks a request with this ``repetition``."""
        return self._metric if repetition_value >= self.cutoff else self._keydiff

    def for_request(self, gather: Callable[[int, int], HeadKVs], num_rows: int) -> Scorer:
        picks = sorted({(2 * k + 1) * num_rows // (2 * self.sample_rows) for k in range(self.sample_rows)})
        values = [repetition(gather(r, r + 1)) for r in picks]
        return self.choose(sum(values) / len(values))

    def score(self, kvs: HeadKVs) -> torch.Tensor:
        """Scores of the rows given, choosing from these rows alone (the
        worker decides once per request instead: ``for_request``)."""
        return self.choose(repetition(kvs)).score(kvs)
