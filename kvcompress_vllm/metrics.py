"""Prometheus metrics for KV-Compress on vLLM's own ``/metrics`` endpoint.

Route (EngineCore -> API server), using only channels vLLM already has (no
extra port, socket or process):

1. **EngineCore** (``KVCompressScheduler``): a ``CompressionMetricsBuffer``
   collects what happened since the last stats message -- compressions by
   trigger, head-pages evicted, blocks released (scheduler side), KVs
   evicted, pages migrated and eviction time (the worker's ``WorkerStats``)
   and the kept fraction of every finished request.  ``make_stats`` drains it
   into ``SchedulerStats.kv_connector_stats["kv_compress"]``: that field is a
   ``dict[str, Any]`` which vLLM already serialises with msgspec from
   EngineCore to the frontend (undeclared attributes on ``SchedulerStats`` would
   be dropped by the hop).  KV connectors are rejected when KV-Compress is on,
   so vLLM never uses the field otherwise; the payload only holds plain ints,
   floats, lists and dicts.
2. **Frontend** (API server, or the ``LLM`` process): ``KVCompressStatLogger``
   is put *first* in vLLM's ``StatLoggerManager`` of every engine that has
   KV-Compress enabled (``patch_stat_logger_manager``, installed by the
   general plugin).  It pops the payload before vLLM's own loggers run, so
   they see exactly the stats they would see without the plugin, and updates
   its ``vllm:kv_compress_*`` metrics in vLLM's Prometheus registry, with
   vLLM's labels ``model_name`` and ``engine``.

Why not the ``vllm.stat_logger_plugins`` entry point: vLLM loads it only in
``AsyncLLM`` (not in the ``LLMEngine`` of ``LLM`` / ``vllm bench
throughput``, where vLLM's ``LoggingStatLogger`` would hand the payload to its
KV-connector logger, which fails without a connector), and any entry-point
logger turns stats
collection on in *every* server of the environment, even stock ones started
with ``--disable-log-stats``.  Wrapping ``StatLoggerManager.__init__`` covers
both frontends and is inert unless KV-Compress is on; with
``--disable-log-stats`` vLLM builds no manager and the scheduler publishes
nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from kvcompress_vllm.config import active_config

#: Key of the payload in ``SchedulerStats.kv_connector_stats``.
PAYLOAD_KEY = "kv_compress"

#: Why a request was compressed: first time after its (re)started prefill,
#: every ``compress_interval`` tokens, only because the next step would not
#: fit in the KV cache (memory pressure), or ahead of its interval so that the
#: next waiting request fits (``compress_to_admit``).
TRIGGERS = ("prompt", "interval", "pressure", "admission")

#: Bound on the per-observation lists between two stats messages (vLLM sends
#: one per engine step, so this is never reached in practice).
MAX_PENDING_OBSERVATIONS = 100_000

EVICTION_TIME_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
KEPT_FRACTION_BUCKETS = (
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0,
)

#: Metric names as exposed on ``/metrics`` (counters get ``_total``).
METRIC_NAMES = {
    "kvs_evicted": "vllm:kv_compress_evicted_kvs",
    "head_pages_evicted": "vllm:kv_compress_evicted_head_pages",
    "blocks_released": "vllm:kv_compress_released_blocks",
    "head_pages_migrated": "vllm:kv_compress_migrated_head_pages",
    "compressions": "vllm:kv_compress_compressions",
    "requests_compressed": "vllm:kv_compress_requests_compressed",
    "eviction_time": "vllm:kv_compress_eviction_time_seconds",
    "kept_fraction": "vllm:kv_compress_request_kept_fraction",
}

_COUNTER_KEYS = ("kvs_evicted", "head_pages_evicted", "blocks_released",
                 "head_pages_migrated", "requests_compressed")

_PATCHED_ATTR = "_kvcompress_patched"


class MetricsPayloadError(ValueError):
    """A ``kv_compress`` stats payload does not have the expected shape."""


def compression_trigger(
    *, last_check: int | None, due_without_pressure: bool, ahead: str = "pressure"
) -> str:
    """Trigger of a compression the policy decided to run.

    ``last_check`` is the request's ``tokens_at_last_check`` *before* this
    decision (``None``: first decision since its prefill (re)started);
    ``due_without_pressure`` whether ``compression_due`` holds with
    ``pressure=False``; ``ahead`` why it runs otherwise (``pressure`` or
    ``admission``).  A compression that would have run anyway is attributed
    to its regular trigger.
    """
    if ahead not in ("pressure", "admission"):
        raise ValueError(f"ahead must be 'pressure' or 'admission'; got {ahead!r}")
    if last_check is None:
        return "prompt"
    return "interval" if due_without_pressure else ahead


# ----------------------------------------------------------------------
# EngineCore side
# ----------------------------------------------------------------------
@dataclass
class CompressionMetricsBuffer:
    """What KV-Compress did since the last ``SchedulerStats`` (EngineCore).

    Disabled (records nothing) when the engine does not collect stats.
    """

    enabled: bool = True
    kvs_evicted: int = 0
    head_pages_evicted: int = 0
    blocks_released: int = 0
    head_pages_migrated: int = 0
    requests_compressed: int = 0
    compressions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRIGGERS, 0))
    #: Worker time spent evicting, one entry per engine step that evicted.
    eviction_seconds: list[float] = field(default_factory=list)
    #: ``kvs_kept / kvs_total`` of each finished request that held KVs.
    kept_fractions: list[float] = field(default_factory=list)

    def record_compression(self, trigger: str, num_pages: int, num_blocks: int,
                           first: bool) -> None:
        if not self.enabled:
            return
        if trigger not in self.compressions:
            raise ValueError(f"unknown compression trigger {trigger!r}; known: {TRIGGERS}")
        self.compressions[trigger] += 1
        self.head_pages_evicted += num_pages
        self.blocks_released += num_blocks
        if first:
            self.requests_compressed += 1

    def record_worker_step(self, stats: Any) -> None:
        """``stats``: the step's ``plan.WorkerStats``."""
        if not self.enabled:
            return
        self.kvs_evicted += stats.kvs_evicted
        self.head_pages_migrated += stats.pages_migrated
        if stats.compactions and len(self.eviction_seconds) < MAX_PENDING_OBSERVATIONS:
            self.eviction_seconds.append(stats.compaction_ms / 1000.0)

    def record_finished(self, summary: dict[str, Any]) -> None:
        """``summary``: ``KVCompressScheduler.request_compression_summary``."""
        if not self.enabled or not summary.get("kvs_total"):
            return
        if len(self.kept_fractions) < MAX_PENDING_OBSERVATIONS:
            self.kept_fractions.append(float(summary["kept_fraction"]))

    def drain(self) -> dict[str, Any] | None:
        """The payload since the last call (``None`` if nothing happened)."""
        if not (self.kvs_evicted or self.head_pages_evicted or self.head_pages_migrated
                or self.eviction_seconds or self.kept_fractions
                or any(self.compressions.values())):
            return None
        payload = {
            "kvs_evicted": self.kvs_evicted,
            "head_pages_evicted": self.head_pages_evicted,
            "blocks_released": self.blocks_released,
            "head_pages_migrated": self.head_pages_migrated,
            "requests_compressed": self.requests_compressed,
            "compressions": dict(self.compressions),
            "eviction_seconds": self.eviction_seconds,
            "kept_fractions": self.kept_fractions,
        }
        self.kvs_evicted = self.head_pages_evicted = self.blocks_released = 0
        self.head_pages_migrated = self.requests_compressed = 0
        self.compressions = dict.fromkeys(TRIGGERS, 0)
        self.eviction_seconds = []
        self.kept_fractions = []
        return payload


def publish(scheduler_stats: Any, buffer: CompressionMetricsBuffer) -> None:
    """EngineCore: move the buffer's contents into ``scheduler_stats``."""
    if scheduler_stats is None:
        return
    payload = buffer.drain()
    if payload is None:
        return
    if scheduler_stats.kv_connector_stats is not None:
        raise RuntimeError(
            "KV-Compress: SchedulerStats.kv_connector_stats is already set "
            f"(keys {sorted(scheduler_stats.kv_connector_stats)[:8]}); KV connectors "
            "must be off when KV-Compress is enabled"
        )
    scheduler_stats.kv_connector_stats = {PAYLOAD_KEY: payload}


# ----------------------------------------------------------------------
# Frontend side
# ----------------------------------------------------------------------
def take_payload(scheduler_stats: Any) -> dict[str, Any] | None:
    """Frontend: remove and return the ``kv_compress`` payload, leaving the
    stats as vLLM would have produced them without the plugin."""
    if scheduler_stats is None:
        return None
    extra = scheduler_stats.kv_connector_stats
    if not isinstance(extra, dict) or PAYLOAD_KEY not in extra:
        return None
    payload = extra.pop(PAYLOAD_KEY)
    if not extra:
        scheduler_stats.kv_connector_stats = None
    return payload


def _nonneg_int(payload: dict[str, Any], key: str) -> int:
    value = payload.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MetricsPayloadError(f"kv_compress stats: {key} must be an integer >= 0, got {value!r}")
    return value


def _float_list(payload: dict[str, Any], key: str, lo: float, hi: float) -> list[float]:
    values = payload.get(key, [])
    if not isinstance(values, list):
        raise MetricsPayloadError(f"kv_compress stats: {key} must be a list, got {values!r}")
    for v in values:
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v)
                or not lo <= v <= hi):
            raise MetricsPayloadError(
                f"kv_compress stats: {key} holds {v!r}, outside [{lo}, {hi}]"
            )
    return [float(v) for v in values]


def parse_payload(payload: Any) -> dict[str, Any]:
    """Validate a payload produced by ``CompressionMetricsBuffer.drain``."""
    if not isinstance(payload, dict):
        raise MetricsPayloadError(f"kv_compress stats must be a dict, got {type(payload).__name__}")
    out: dict[str, Any] = {k: _nonneg_int(payload, k) for k in _COUNTER_KEYS}
    compressions = payload.get("compressions", {})
    if not isinstance(compressions, dict) or set(compressions) - set(TRIGGERS):
        raise MetricsPayloadError(
            f"kv_compress stats: compressions must map {TRIGGERS} to counts, got {compressions!r}"
        )
    out["compressions"] = {t: _nonneg_int(compressions, t) for t in TRIGGERS}
    out["eviction_seconds"] = _float_list(payload, "eviction_seconds", 0.0, math.inf)
    out["kept_fractions"] = _float_list(payload, "kept_fractions", 0.0, 1.0)
    return out


def _make_logger_class():
    from prometheus_client import Counter, Histogram
    from vllm.logger import init_logger
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase
    from vllm.v1.metrics.utils import create_metric_per_engine

    logger = init_logger("vllm.kvcompress.metrics")

    class KVCompressStatLogger(AggregateStatLoggerBase):
        """Publishes the ``kv_compress`` payload as ``vllm:kv_compress_*``
        Prometheus metrics, labelled like vLLM's own (``model_name``,
        ``engine``).  Must run before vLLM's loggers (it removes the payload)."""

        def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
            self.engine_indexes = list(engine_indexes) if engine_indexes else [0]
            model_name = vllm_config.model_config.served_model_name
            labelnames = ["model_name", "engine"]
            per_engine = {idx: [model_name, str(idx)] for idx in self.engine_indexes}
            _unregister_own_metrics()
            doc = {
                "kvs_evicted": "KVs evicted by KV-Compress (one KV = one token of one layer "
                               "and KV head).",
                "head_pages_evicted": "Head-pages evicted by KV-Compress (one head-page = "
                                      "block_size KVs of one layer and KV head).",
                "blocks_released": "vLLM KV-cache blocks released to the free pool by "
                                   "KV-Compress eviction.",
                "head_pages_migrated": "Head-pages moved out of released blocks into kept "
                                       "blocks by KV-Compress.",
                "requests_compressed": "Requests compressed at least once by KV-Compress.",
            }
            self.counters = {
                key: create_metric_per_engine(
                    Counter(name=METRIC_NAMES[key], documentation=doc[key],
                            labelnames=labelnames),
                    per_engine,
                )
                for key in _COUNTER_KEYS
            }
            compressions = Counter(
                name=METRIC_NAMES["compressions"],
                documentation="KV-Compress compressions by trigger: prompt (first after a "
                              "(re)started prefill), interval (every compress_interval "
                              "tokens), pressure (the next step would not fit), admission (ahead "
                              "of its interval, so that a waiting request fits).",
                labelnames=labelnames + ["trigger"],
            )
            self.compressions = {
                trigger: create_metric_per_engine(
                    compressions, {i: v + [trigger] for i, v in per_engine.items()}
                )
                for trigger in TRIGGERS
            }
            self.eviction_time = create_metric_per_engine(
                Histogram(
                    name=METRIC_NAMES["eviction_time"],
                    documentation="Worker time per engine step spent on KV-Compress "
                                  "eviction (scoring, selection, compaction, page moves), "
                                  "in seconds; steps without eviction are not observed.",
                    buckets=EVICTION_TIME_BUCKETS,
                    labelnames=labelnames,
                ),
                per_engine,
            )
            self.kept_fraction = create_metric_per_engine(
                Histogram(
                    name=METRIC_NAMES["kept_fraction"],
                    documentation="Fraction of its KVs a finished request still held "
                                  "(kvs_kept / kvs_total over all layers and KV heads; 1 = "
                                  "uncompressed).",
                    buckets=KEPT_FRACTION_BUCKETS,
                    labelnames=labelnames,
                ),
                per_engine,
            )

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0):
            raw = take_payload(scheduler_stats)
            if raw is None:
                return
            if engine_idx not in self.eviction_time:
                logger.warning("KV-Compress metrics: unexpected engine index %s", engine_idx)
                return
            try:
                payload = parse_payload(raw)
            except MetricsPayloadError as e:
                # Never take the output handler (and every stream) down over
                # a metrics message; the payload comes from our own scheduler.
                logger.error("KV-Compress metrics: dropping a malformed payload: %s", e)
                return
            for key in _COUNTER_KEYS:
                if payload[key]:
                    self.counters[key][engine_idx].inc(payload[key])
            for trigger, count in payload["compressions"].items():
                if count:
                    self.compressions[trigger][engine_idx].inc(count)
            hist = self.eviction_time[engine_idx]
            for seconds in payload["eviction_seconds"]:
                hist.observe(seconds)
            hist = self.kept_fraction[engine_idx]
            for fraction in payload["kept_fractions"]:
                hist.observe(fraction)

        def log_engine_initialized(self):
            pass

    return KVCompressStatLogger


def _unregister_own_metrics() -> None:
    """Drop our collectors from the default registry (a second engine in the
    same process re-creates them, like vLLM's own ``unregister_vllm_metrics``)."""
    from prometheus_client import REGISTRY

    names = set(METRIC_NAMES.values())
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", None) in names:
            REGISTRY.unregister(collector)


@functools.cache
def stat_logger_class():
    """``KVCompressStatLogger`` (built on first use: it subclasses vLLM's
    ``AggregateStatLoggerBase``)."""
    return _make_logger_class()


def patch_stat_logger_manager() -> None:
    """Put ``KVCompressStatLogger`` first in the ``StatLoggerManager`` of
    every engine with KV-Compress enabled (inert otherwise)."""
    from vllm.v1.metrics.loggers import StatLoggerManager

    original = StatLoggerManager.__init__
    if getattr(original, _PATCHED_ATTR, False):
        return

    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        if active_config(vllm_config) is None:
            return
        loggers = getattr(self, "stat_loggers", None)
        engines = getattr(self, "engine_indexes", None)
        if not isinstance(loggers, list) or not engines:
            from kvcompress_vllm.compat import IncompatibleVLLMError

            raise IncompatibleVLLMError(
                "kvcompress-vllm: vLLM's StatLoggerManager has no stat_loggers list / "
                f"engine_indexes (got {type(loggers).__name__}, {engines!r})"
            )
        # Created after vLLM's PrometheusStatLogger (whose constructor drops
        # every registered vllm:* collector), inserted first so it removes
        # its payload before vLLM's loggers see the stats.
        loggers.insert(0, stat_logger_class()(vllm_config, list(engines)))

    setattr(__init__, _PATCHED_ATTR, True)
    StatLoggerManager.__init__ = __init__
