"""The scorer interface: ``HeadKVs`` in, one score per KV out.

A scorer ranks the KVs of one request for eviction, one row per (layer, KV
head): ``score(kvs) -> [r, C]`` float32, lower = evicted first.  The caller
(``kvcompress_vllm.worker.selection.rank_heads``) sets ``+inf`` on KVs that
must stay (``keep_mask``: padding, the protected window, the sinks) and turns
scores into whole-page evictions.

Scorers see the request in *chunks of rows* (``HeadKVs.row_start`` tells
which), so that the keys gathered for a chunk stay bounded (``CHUNK_BYTES``);
a scorer's rows must not depend on each other, and chunked scoring gives
exactly the scores of scoring all rows at once (``tests/test_scorers.py``).

Memory bound of one compression (``KVCompressWorkerState.apply_eviction``),
for ``R = L*H`` heads of at most ``C`` KVs, block size ``N``, head dim ``D``,
cache element size ``e`` and ``B = CHUNK_BYTES``:

    4*R*C*(1 + 1/N)  +  max(B, 4*C*D) * (1 + e/4 + 12/D)   bytes

the first term lives for the whole call (int32 sort order ``[R, C]``, float32
unit costs ``[R, C/N]``), the second is one chunk of a key scorer (fp32 keys,
their cache-dtype gather, ``SCORE_BYTES_PER_KV`` of index/score temporaries);
scorers without keys, compaction and page moves use at most ``max(B, 48*C)``
per chunk.  About 134 MiB at 32k tokens on a Llama-3-8B shape (R = 256,
D = N = 128, bf16), where gathering all keys in fp32 at once took 4 GiB.

Adding a scorer = adding a file ``<name>_scorer.py`` next to this one with a
``Scorer`` subclass that sets ``name`` (subclasses register themselves), and
the name to ``kvcompress_vllm.config.SCORERS`` (the torch-free list the API
server validates against; the registry refuses to load if they disagree).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress_vllm.core.policy import protected_mask

#: Budget for the per-chunk temporaries of scoring, compaction and page moves:
#: a chunk holds at most this many bytes of fp32 keys (key scorers) or of
#: per-KV index/score temporaries (everything else).  See ``rows_per_chunk``.
CHUNK_BYTES = 64 << 20

#: Bytes of per-KV temporaries while scoring and sorting one chunk without
#: keys: validity (1), page (4), flat slot (8), metric (4), position (4),
#: keep mask (1), masked score (4+4), sorted score (4), sort order (8).
SCORE_BYTES_PER_KV = 48


class ScorerRegistryError(RuntimeError):
    """The scorer classes and ``config.SCORERS`` disagree, or a name is taken."""


@dataclass(frozen=True)
class PagedKeys:
    """Where a chunk's keys lie in the cache, for scorer kernels that read
    them in place (``ops.keydiff_scores``) instead of gathering ``keys()``."""

    kv_pages: torch.Tensor  # [P, 2, N, D] the pool's head-pages
    #: [r, np] int32 page ids of each row's logical pages (< 0: none).
    page_rows: torch.Tensor
    counts: torch.Tensor  # [r] int32 KVs of each row (= valid.sum(1))
    #: [2, N, D] int32 in-page offsets when the pages are in vLLM's layout.
    packing: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> "PagedKeys":
        return dataclasses.replace(
            self, page_rows=self.page_rows[start:stop], counts=self.counts[start:stop]
        )


@dataclass
class HeadKVs:
    """KVs of a chunk of (layer, KV head) rows of one request.

    Row ``i`` is the request's flat head ``row_start + i`` (``layer * H +
    head``); column ``j`` its ``j``-th KV in logical (compacted) order, up to
    the request's widest head; columns at or beyond a row's KV count are
    padding (``valid`` False, scored ``+inf`` by the caller whatever the
    scorer returns).
    """

    metrics: torch.Tensor  # [r, C] float32 attention metric
    positions: torch.Tensor  # [r, C] int32 (or int64) token positions
    valid: torch.Tensor  # [r, C] bool: j < kv_count of the row
    #: -> ``[r, C, D]`` keys in the cache dtype, gathered on each call (a fresh
    #: tensor the scorer may modify in place); padding keys are zero.
    keys: Callable[[], torch.Tensor]
    req_id: str
    #: Tokens in the request's cache (uncompressed count).
    num_tokens: int
    row_start: int = 0
    #: The same keys where they lie in the cache (the worker sets it where
    #: the C++ kernels run; None: only ``keys()``).  Describes the keys
    #: ``keys()`` returns: the page table is not changed while a chunk is
    #: scored, and ``counts`` is a copy taken at gather time.
    paged_keys: PagedKeys | None = None
    #: A number fixed for the request across runs, ranks and preemptions
    #: (``worker.state.request_seed``: a hash of its prompt tokens or
    #: embeddings), for
    #: scorers that draw random numbers.
    seed: int = 0

    @property
    def num_rows(self) -> int:
        return self.valid.shape[0]

    def rows(self, start: int, stop: int) -> "HeadKVs":
        """The sub-chunk of rows ``[start, stop)`` of this chunk."""
        keys = self.keys
        return HeadKVs(
            metrics=self.metrics[start:stop],
            positions=self.positions[start:stop],
            valid=self.valid[start:stop],
            keys=lambda: keys()[start:stop],
            req_id=self.req_id,
            num_tokens=self.num_tokens,
            row_start=self.row_start + start,
            paged_keys=None if self.paged_keys is None else self.paged_keys.rows(start, stop),
            seed=self.seed,
        )


_REGISTRY: dict[str, type["Scorer"]] = {}


class Scorer(ABC):
    """One eviction ranking.  Subclasses set ``name`` (registered under it),
    ``needs_keys`` if ``score`` calls ``kvs.keys()``, and document their paper."""

    name: ClassVar[str]
    #: ``score`` reads the keys: chunks are sized so that the fp32 keys of a
    #: chunk stay within ``CHUNK_BYTES``.
    needs_keys: ClassVar[bool] = False
    #: ``score`` reads ``kvs.metrics`` (the attention metric): requests with
    #: any other scorer record no metric (``config.METRIC_SCORERS``).
    needs_metrics: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return  # an intermediate base class
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ScorerRegistryError(
                f"scorer name {name!r} is used by both {_REGISTRY[name].__qualname__} "
                f"and {cls.__qualname__}"
            )
        _REGISTRY[name] = cls

    @abstractmethod
    def score(self, kvs: HeadKVs) -> torch.Tensor:
        """``[r, C]`` scores (any float dtype), lower = evicted first."""

    def for_request(self, gather: Callable[[int, int], "HeadKVs"], num_rows: int) -> "Scorer":
        """The scorer that ranks this request (``gather(start, stop)`` reads
        rows of it, ``num_rows`` in all): ``self``, unless a scorer chooses
        per request (``adaptive``); the worker calls it once per compression,
        before scoring the request chunk by chunk."""
        return self


def keep_mask(kvs: HeadKVs, protected_window: int, sink_tokens: int) -> torch.Tensor:
    """``[r, C]`` bool: KVs that are never evicted (padding, the newest
    ``protected_window`` tokens, the first ``sink_tokens`` tokens)."""
    return ~kvs.valid | protected_mask(kvs.positions, kvs.num_tokens, protected_window, sink_tokens)


def rows_per_chunk(width: int, head_dim: int, needs_keys: bool) -> int:
    """Rows scored together so that a chunk's fp32 keys (key scorers) or its
    per-KV score temporaries stay within ``CHUNK_BYTES`` (at least one row)."""
    per_kv = 4 * head_dim if needs_keys else SCORE_BYTES_PER_KV
    return max(1, CHUNK_BYTES // max(1, width * per_kv))
