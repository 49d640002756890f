"""The one configuration surface: ``additional_config["kv_compress"]``.

Every other way to configure the plugin (``--kv-compress-rate``,
``LLM(..., kv_compress_rate=...)``, per-request ``SamplingParams.extra_args``)
is folded into, or validated against, the dataclasses here.

``rate`` is the fraction of each sequence's *compressible* KVs that is KEPT:
``0 < rate <= 1``.  Compressible means everything but the protected window of
the newest ``protected_window`` tokens; ``rate = 1`` keeps everything (off).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CONFIG_KEY = "kv_compress"

#: Scorer names accepted by ``scorer`` / ``kv_compress_scorer``: one class per
#: name in ``kvcompress_vllm/scorers/`` (this module stays torch-free for the
#: API server; the scorer registry checks at import that both agree).
SCORERS = (
    "kvcompress", "random", "streamingllm", "knorm", "keydiff", "adaptive",
    "metric_keydiff", "metric_keydiff_rank", "metric_keydiff_union",
)
#: The scorers that read the attention metric (``Scorer.needs_metrics``; the
#: registry checks the two agree).  A request whose scorer is not one of them,
#: or that is never compressed, records no metric (``RequestPolicy.records_metric``).
METRIC_SCORERS = frozenset({"kvcompress", "adaptive", "metric_keydiff", "metric_keydiff_rank",
                            "metric_keydiff_union"})

#: How the evicted pages are spread over a request's (layer, KV head)s
#: (``allocation`` / ``kv_compress_allocation``): ``joint`` takes the
#: cheapest pages over all heads (variable per-head budgets, KV-Compress);
#: ``uniform`` makes every head give up the same number of pages over the
#: request's life (the control for variable per-head budgets).
ALLOCATIONS = ("joint", "uniform")


class KVCompressConfigError(ValueError):
    """A KV-Compress option has a bad value; the message names the option."""

    def __init__(self, option: str, message: str, value: Any = None) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.value = value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rate(value: Any, option: str = "kv_compress.rate") -> float:
    """Validate a keep-rate; the error names ``option`` and the allowed range."""
    if not _is_number(value) or not 0.0 < value <= 1.0:  # NaN fails the comparison
        raise KVCompressConfigError(
            option,
            f"must be a number in (0, 1] -- the fraction of each sequence's "
            f"compressible KVs that is kept (1 = no compression); got {value!r}",
            value,
        )
    return float(value)


def check_int(value: Any, option: str, minimum: int, *, odd: bool = False) -> int:
    """Validate an integer option ``>= minimum`` (optionally odd)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise KVCompressConfigError(
            option, f"must be an integer >= {minimum}; got {value!r}", value
        )
    if odd and value % 2 == 0:
        raise KVCompressConfigError(
            option, f"must be an odd integer >= {minimum}; got {value!r}", value
        )
    return value


def check_scorer(
    value: Any, option: str = "kv_compress.scorer", allocation_option: str = "kv_compress.allocation"
) -> str:
    """Validate a scorer name; ``allocation_option`` is named in the hint for
    the former ``uniform`` scorer."""
    if value == "uniform":
        raise KVCompressConfigError(
            option,
            f"'uniform' is no longer a scorer: it is an allocation mode that works with "
            f"any scorer; use {allocation_option} = \"uniform\" (and a scorer from "
            f"{', '.join(SCORERS)}, e.g. \"kvcompress\" for the former 'uniform')",
            value,
        )
    if value not in SCORERS:
        raise KVCompressConfigError(
            option, f"must be one of {', '.join(SCORERS)}; got {value!r}", value
        )
    return value


def check_cache_budget(
    max_cache_tokens: int | None, protected_window: int, sink_tokens: int, option: str
) -> None:
    """A per-head budget below the KVs that are never evicted cannot be met."""
    if max_cache_tokens is not None and max_cache_tokens < protected_window + sink_tokens:
        raise KVCompressConfigError(
            option,
            f"max_cache_tokens={max_cache_tokens} is below the KVs that are never evicted "
            f"(protected_window={protected_window} + sink_tokens={sink_tokens} = "
            f"{protected_window + sink_tokens}); allowed: max_cache_tokens >= "
            f"{protected_window + sink_tokens}, or a smaller protected_window",
            max_cache_tokens,
        )


def check_allocation(value: Any, option: str = "kv_compress.allocation") -> str:
    if value not in ALLOCATIONS:
        raise KVCompressConfigError(
            option,
            f"must be one of {', '.join(ALLOCATIONS)} (joint: variable pages per "
            f"(layer, KV head); uniform: the same number of pages per head); got {value!r}",
            value,
        )
    return value


@dataclass(frozen=True)
class KVCompressConfig:
    """Server-wide KV-Compress settings (validated on construction)."""

    #: Fraction of compressible KVs kept, in (0, 1].  1 = no eviction.
    rate: float = 1.0
    #: Run the machinery (per-head tables, metrics, eviction) even at rate 1,
    #: so that requests can opt in per request.  Default: on iff ``rate < 1``
    #: or ``max_cache_tokens`` is set.
    enabled: bool | None = None
    #: The newest ``protected_window`` tokens are never evicted.
    protected_window: int = 32
    #: The first ``sink_tokens`` tokens (attention sinks) are never evicted.
    sink_tokens: int = 4
    #: Number of last prompt queries whose attention scores the prompt KVs.
    observation_window: int = 32
    #: Max-pool kernel applied along keys to the prompt metric (1 = off).
    pooling_kernel: int = 7
    #: Decode queries add their squared attention to the metric.
    record_decode_metrics: bool = True
    #: Re-compress a decoding sequence every this many new tokens
    #: (default: one page per head, i.e. the block size).
    compress_interval: int | None = None
    #: When the next waiting request does not fit, compress running requests
    #: ahead of their interval if that frees the blocks it lacks (largest
    #: gain first; ``trigger="admission"``).  Off by default: not measurably
    #: faster here (docs/performance.md, "Admission: compressing ahead of the
    #: interval").
    compress_to_admit: bool = False
    #: Cap on a sequence's mean KVs per (layer, KV head), on top of the rate
    #: (``None`` = rate only; whole pages, never fewer than the cap; under
    #: ``joint`` single heads may hold more).
    max_cache_tokens: int | None = None
    #: Which KVs to evict first; see ``kvcompress_vllm.scorers``.  The
    #: default was chosen on held-in generated cases and confirmed on held-out
    #: ones (docs/quality.md, "Robust suite"); ``kvcompress`` is the paper's
    #: attention metric.
    scorer: str = "keydiff"
    #: How evicted pages are spread over (layer, KV head)s: ``joint``
    #: (variable per-head budgets) or ``uniform`` (same count per head).
    allocation: str = "joint"
    #: Assert, every step, that scheduler and worker agree on page counts.
    debug_checks: bool = False

    def __post_init__(self) -> None:
        check_rate(self.rate, "kv_compress.rate (--kv-compress-rate)")
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise KVCompressConfigError(
                "kv_compress.enabled", f"must be true or false; got {self.enabled!r}"
            )
        if self.enabled is False and (self.rate < 1.0 or self.max_cache_tokens is not None):
            # Not a silent switch-off of what the same config asks for.
            raise KVCompressConfigError(
                "kv_compress.enabled",
                f"false contradicts rate={self.rate!r} / max_cache_tokens="
                f"{self.max_cache_tokens!r}, which compress; leave out --kv-compress-rate "
                f"and kv_compress (or set rate 1) to run without KV-Compress",
                self.enabled,
            )
        check_int(self.protected_window, "kv_compress.protected_window", 0)
        check_int(self.sink_tokens, "kv_compress.sink_tokens", 0)
        check_int(self.observation_window, "kv_compress.observation_window", 1)
        check_int(self.pooling_kernel, "kv_compress.pooling_kernel", 1, odd=True)
        if not isinstance(self.record_decode_metrics, bool):
            raise KVCompressConfigError(
                "kv_compress.record_decode_metrics",
                f"must be true or false; got {self.record_decode_metrics!r}",
            )
        if self.compress_interval is not None:
            check_int(self.compress_interval, "kv_compress.compress_interval", 1)
        if not isinstance(self.compress_to_admit, bool):
            raise KVCompressConfigError(
                "kv_compress.compress_to_admit",
                f"must be true or false; got {self.compress_to_admit!r}",
            )
        if self.max_cache_tokens is not None:
            check_int(self.max_cache_tokens, "kv_compress.max_cache_tokens", 1)
        check_cache_budget(
            self.max_cache_tokens, self.protected_window, self.sink_tokens,
            "kv_compress.max_cache_tokens",
        )
        check_scorer(self.scorer)
        check_allocation(self.allocation)
        if not isinstance(self.debug_checks, bool):
            raise KVCompressConfigError(
                "kv_compress.debug_checks", f"must be true or false; got {self.debug_checks!r}"
            )
        # Frozen dataclass: normalise the rate to float.
        object.__setattr__(self, "rate", float(self.rate))

    @property
    def active(self) -> bool:
        """Whether the plugin replaces vLLM's scheduler/worker/attention."""
        if self.enabled is not None:
            return self.enabled
        return self.rate < 1.0 or self.max_cache_tokens is not None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "KVCompressConfig":
        if not isinstance(raw, dict):
            raise KVCompressConfigError(
                "additional_config.kv_compress", f"must be a JSON object; got {raw!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise KVCompressConfigError(
                "additional_config.kv_compress",
                f"unknown option(s) {unknown}; known: {sorted(known)}",
            )
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_additional(additional_config: dict[str, Any] | None) -> KVCompressConfig | None:
    """The validated config, or ``None`` when the plugin is not configured."""
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    return KVCompressConfig.from_dict(additional_config[CONFIG_KEY])


def active_config(vllm_config: Any) -> KVCompressConfig | None:
    """The config if KV-Compress is active for this ``VllmConfig``, else None."""
    cfg = config_from_additional(getattr(vllm_config, "additional_config", None))
    return cfg if cfg is not None and cfg.active else None


#: Per-request keys of ``SamplingParams.extra_args`` (OpenAI: ``vllm_xargs``).
REQUEST_KEYS = (
    "kv_compress_rate",
    "max_cache_tokens",
    "protected_window",
    "kv_compress_scorer",
    "kv_compress_allocation",
)


@dataclass(frozen=True)
class RequestPolicy:
    """Effective compression settings of one request (server defaults
    overridden by ``SamplingParams.extra_args``)."""

    rate: float
    max_cache_tokens: int | None
    protected_window: int
    sink_tokens: int
    scorer: str
    compress_interval: int
    #: ``joint`` or ``uniform`` (see ``ALLOCATIONS``).
    allocation: str = "joint"

    @property
    def compresses(self) -> bool:
        return self.rate < 1.0 or self.max_cache_tokens is not None

    @property
    def records_metric(self) -> bool:
        """Whether the attention metric of this request is ever read: it is
        compressed, by a scorer that reads the metric.  Otherwise the worker
        computes no metric for it (its prefill runs wholly on vLLM's kernel)."""
        return self.compresses and self.scorer in METRIC_SCORERS


def request_policy(
    cfg: KVCompressConfig, extra_args: dict[str, Any] | None, block_size: int
) -> RequestPolicy:
    """Resolve (and validate) the per-request overrides; a key that starts
    with ``kv_compress`` but is none of ``REQUEST_KEYS`` (a misspelling,
    or ``kv_compress_max_cache_tokens``) is an error, not ignored."""
    extra = extra_args or {}
    for key in extra:
        if _is_request_key(key) and key not in REQUEST_KEYS:
            raise KVCompressConfigError(
                f"extra_args.{key}",
                f"unknown KV-Compress option; known: {', '.join(REQUEST_KEYS)}",
                extra[key],
            )
    rate = cfg.rate
    if "kv_compress_rate" in extra:
        rate = check_rate(extra["kv_compress_rate"], "extra_args.kv_compress_rate")
    max_cache = cfg.max_cache_tokens
    if "max_cache_tokens" in extra:
        value = extra["max_cache_tokens"]
        max_cache = None if value is None else check_int(
            value, "extra_args.max_cache_tokens", 1
        )
    protected = cfg.protected_window
    if "protected_window" in extra:
        protected = check_int(extra["protected_window"], "extra_args.protected_window", 0)
    scorer = cfg.scorer
    if "kv_compress_scorer" in extra:
        scorer = check_scorer(
            extra["kv_compress_scorer"],
            "extra_args.kv_compress_scorer",
            allocation_option="extra_args.kv_compress_allocation",
        )
    allocation = cfg.allocation
    if "kv_compress_allocation" in extra:
        allocation = check_allocation(
            extra["kv_compress_allocation"], "extra_args.kv_compress_allocation"
        )
    check_cache_budget(
        max_cache, protected, cfg.sink_tokens,
        "extra_args.max_cache_tokens" if "max_cache_tokens" in extra
        else "extra_args.protected_window",
    )
    return RequestPolicy(
        rate=rate,
        max_cache_tokens=max_cache,
        protected_window=protected,
        sink_tokens=cfg.sink_tokens,
        scorer=scorer,
        compress_interval=cfg.compress_interval or block_size,
        allocation=allocation,
    )


def _is_request_key(key: Any) -> bool:
    """A key of ``REQUEST_KEYS``, or any other starting with ``kv_compress``
    (a misspelling: refused by ``request_policy``, not ignored)."""
    return key in REQUEST_KEYS or (isinstance(key, str) and key.startswith("kv_compress"))


def uses_request_keys(extra_args: dict[str, Any] | None) -> bool:
    """Whether ``extra_args`` holds KV-Compress options (``_is_request_key``)."""
    return bool(extra_args) and any(_is_request_key(k) for k in extra_args)


__all__ = [
    "ALLOCATIONS",
    "CONFIG_KEY",
    "REQUEST_KEYS",
    "SCORERS",
    "KVCompressConfig",
    "KVCompressConfigError",
    "RequestPolicy",
    "active_config",
    "check_allocation",
    "check_rate",
    "check_scorer",
    "config_from_additional",
    "request_policy",
    "uses_request_keys",
]
