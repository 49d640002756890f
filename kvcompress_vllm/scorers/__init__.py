"""Scorer registry: which KVs of a request are evicted first.

One small class per scorer (``<name>_scorer.py``), each with one ``score``
method and its paper in the docstring:

``kvcompress``   lowest squared attention of the observation window and decode
                 queries (KV-Compress's metric)
``streamingllm`` oldest first (sinks + recent window)
``knorm``        largest key norm first (keeps low-norm keys)
``keydiff``      keys most similar to the normalised mean key first (the default)
``adaptive``     ``keydiff``, or ``kvcompress`` for requests whose context is
                 repetitive (records the metric)
``random``       random (control)
``metric_keydiff``        z-scored attention metric + z-scored key diversity
``metric_keydiff_rank``   mean of the two per-head ranks, the metric's per-head budgets
``metric_keydiff_union``  max of the two per-head ranks, the metric's per-head budgets
                 (candidates for a robust default; docs/quality.md, "Robust suite")

``_combine`` holds the per-head normalisation helpers the combined scorers share.

How the chosen pages are spread over (layer, KV head)s is a separate choice,
the allocation mode (``config.ALLOCATIONS``; ``worker.selection``).

API: ``get_scorer(name) -> Scorer``, ``scorer_names()``, ``score(name, kvs,
protected_window, sink_tokens)`` (scores with ``+inf`` on kept KVs), and from
``base``: ``HeadKVs``, ``Scorer``, ``keep_mask``, ``rows_per_chunk``.

Importing this package imports every module in it, which registers their
``Scorer`` subclasses, then checks the registry against the torch-free
``kvcompress_vllm.config.SCORERS``.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from kvcompress_vllm.config import METRIC_SCORERS, SCORERS
from kvcompress_vllm.scorers.base import (
    CHUNK_BYTES,
    HeadKVs,
    PagedKeys,
    Scorer,
    ScorerRegistryError,
    _REGISTRY,
    keep_mask,
    rows_per_chunk,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def _check_registry() -> None:
    registered, configured = set(_REGISTRY), set(SCORERS)
    if registered != configured:
        raise ScorerRegistryError(
            "scorer classes in kvcompress_vllm/scorers/ and "
            "kvcompress_vllm.config.SCORERS disagree: only registered "
            f"{sorted(registered - configured)}, only in config.SCORERS "
            f"{sorted(configured - registered)}. Add a new scorer's name to "
            "config.SCORERS (the API server validates against it without torch)."
        )
    reading = {name for name, cls in _REGISTRY.items() if cls.needs_metrics}
    if reading != set(METRIC_SCORERS):
        raise ScorerRegistryError(
            f"scorers with needs_metrics {sorted(reading)} disagree with "
            f"config.METRIC_SCORERS {sorted(METRIC_SCORERS)}"
        )


_check_registry()
_INSTANCES: dict[str, Scorer] = {name: cls() for name, cls in _REGISTRY.items()}


def scorer_names() -> tuple[str, ...]:
    return SCORERS


def get_scorer(name: str) -> Scorer:
    scorer = _INSTANCES.get(name)
    if scorer is None:
        raise KeyError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return scorer


def score(name: str | Scorer, kvs: HeadKVs, protected_window: int, sink_tokens: int) -> torch.Tensor:
    """float32 scores ``[r, C]`` with ``+inf`` on KVs that must stay, and
    only there: a score that is not finite (a NaN or an overflow from
    non-finite keys) becomes the largest finite float (``-inf`` the
    smallest), so every other KV stays evictable -- the scheduler planned
    with all of them (``PageGeometry.max_evictable``)."""
    scorer = get_scorer(name) if isinstance(name, str) else name
    scores = scorer.score(kvs).to(torch.float32)
    big = torch.finfo(torch.float32).max
    scores = torch.nan_to_num(scores, nan=big, posinf=big, neginf=-big)
    return scores.masked_fill_(keep_mask(kvs, protected_window, sink_tokens), float("inf"))


__all__ = [
    "CHUNK_BYTES",
    "HeadKVs",
    "PagedKeys",
    "Scorer",
    "ScorerRegistryError",
    "get_scorer",
    "keep_mask",
    "rows_per_chunk",
    "score",
    "scorer_names",
]
