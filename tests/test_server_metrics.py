"""KV-Compress Prometheus metrics: the route EngineCore -> frontend and the
numbers they carry (a real server's /metrics is checked in test_server.py)."""

import math
from types import SimpleNamespace

import pytest

from kvcompress_vllm import metrics
from kvcompress_vllm.plan import WorkerStats


def _sample(name, **labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


def test_trigger_attribution():
    assert metrics.compression_trigger(last_check=None, due_without_pressure=True) == "prompt"
    assert metrics.compression_trigger(last_check=None, due_without_pressure=False) == "prompt"
    assert metrics.compression_trigger(last_check=640, due_without_pressure=True) == "interval"
    assert metrics.compression_trigger(last_check=640, due_without_pressure=False) == "pressure"
    # ahead of the interval so that a waiting request fits
    assert metrics.compression_trigger(last_check=640, due_without_pressure=False,
                                       ahead="admission") == "admission"
    assert metrics.compression_trigger(last_check=640, due_without_pressure=True,
                                       ahead="admission") == "interval"
    assert metrics.compression_trigger(last_check=None, due_without_pressure=False,
                                       ahead="admission") == "prompt"
    with pytest.raises(ValueError, match="ahead must be"):
        metrics.compression_trigger(last_check=640, due_without_pressure=False, ahead="later")


def test_buffer_drains_deltas_and_is_inert_when_disabled():
    buf = metrics.CompressionMetricsBuffer()
    assert buf.drain() is None
    buf.record_compression("prompt", 90, 1, first=True)
    buf.record_compression("pressure", 180, 2, first=False)
    buf.record_worker_step(WorkerStats(pages_evicted=270, kvs_evicted=270 * 128, compactions=2,
                                       compaction_ms=12.5, pages_migrated=7))
    buf.record_worker_step(WorkerStats())  # a step without eviction: no observation
    buf.record_finished({"kvs_total": 900, "kept_fraction": 0.25})
    buf.record_finished({"kvs_total": 0, "kept_fraction": 1.0})  # never held KVs: skipped
    payload = buf.drain()
    assert payload == {
        "kvs_evicted": 270 * 128, "head_pages_evicted": 270, "blocks_released": 3,
        "head_pages_migrated": 7, "requests_compressed": 1,
        "compressions": {"prompt": 1, "interval": 0, "pressure": 1, "admission": 0},
        "eviction_seconds": [0.0125], "kept_fractions": [0.25],
    }
    assert buf.drain() is None  # deltas, not totals
    with pytest.raises(ValueError, match="unknown compression trigger 'later'"):
        buf.record_compression("later", 1, 0, first=False)

    off = metrics.CompressionMetricsBuffer(enabled=False)
    off.record_compression("prompt", 90, 1, first=True)
    off.record_finished({"kvs_total": 900, "kept_fraction": 0.25})
    assert off.drain() is None


def _stats_with_payload():
    from vllm.v1.metrics.stats import SchedulerStats

    buf = metrics.CompressionMetricsBuffer()
    buf.record_compression("interval", 30, 0, first=False)
    buf.record_worker_step(WorkerStats(kvs_evicted=30 * 128, compactions=1, compaction_ms=3.0))
    buf.record_finished({"kvs_total": 1000, "kept_fraction": 0.4})
    stats = SchedulerStats(kv_cache_usage=0.5)
    metrics.publish(stats, buf)
    return stats


def test_payload_survives_the_engine_core_msgspec_hop():
    """EngineCore -> frontend serialisation: the payload arrives intact in a
    declared field, while an undeclared attribute would be dropped."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    stats = _stats_with_payload()
    stats.undeclared = {"lost": 1}
    sent = stats.kv_connector_stats[metrics.PAYLOAD_KEY]
    bufs = MsgpackEncoder().encode(EngineCoreOutputs(engine_index=0, scheduler_stats=stats))
    got = MsgpackDecoder(EngineCoreOutputs).decode(bufs).scheduler_stats
    assert not hasattr(got, "undeclared")
    assert got.kv_cache_usage == 0.5
    assert metrics.take_payload(got) == sent
    assert got.kv_connector_stats is None  # vLLM's own loggers see no connector stats


def test_publish_refuses_to_overwrite_connector_stats():
    from vllm.v1.metrics.stats import SchedulerStats

    buf = metrics.CompressionMetricsBuffer()
    buf.record_compression("prompt", 1, 0, first=True)
    stats = SchedulerStats(kv_connector_stats={"nixl": {"xfers": 1}})
    with pytest.raises(RuntimeError, match="kv_connector_stats is already set.*nixl"):
        metrics.publish(stats, buf)


def test_parse_payload_rejects_bad_shapes():
    good = _stats_with_payload().kv_connector_stats[metrics.PAYLOAD_KEY]
    assert metrics.parse_payload(good)["compressions"]["interval"] == 1
    for bad, msg in [
        ({**good, "kvs_evicted": -1}, "kvs_evicted must be an integer >= 0"),
        ({**good, "kept_fractions": [1.5]}, r"kept_fractions holds 1.5, outside \[0.0, 1.0\]"),
        ({**good, "eviction_seconds": [math.nan]}, "eviction_seconds holds nan"),
        ({**good, "compressions": {"later": 1}}, "compressions must map"),
        ([1, 2], "must be a dict"),
    ]:
        with pytest.raises(metrics.MetricsPayloadError, match=msg):
            metrics.parse_payload(bad)


def test_stat_logger_publishes_with_vllm_labels():
    cls = metrics.stat_logger_class()
    cfg = SimpleNamespace(model_config=SimpleNamespace(served_model_name="unit-model"))
    logger = cls(cfg, [0])
    labels = {"model_name": "unit-model", "engine": "0"}
    # Series exist (at 0) before anything happened, like vLLM's own.
    assert _sample("vllm:kv_compress_compressions_total", **labels, trigger="pressure") == 0
    assert _sample("vllm:kv_compress_evicted_kvs_total", **labels) == 0
    for _ in range(2):
        logger.record(_stats_with_payload(), None, engine_idx=0)
    logger.record(None, None, engine_idx=0)
    assert _sample("vllm:kv_compress_compressions_total", **labels, trigger="interval") == 2
    assert _sample("vllm:kv_compress_compressions_total", **labels, trigger="prompt") == 0
    assert _sample("vllm:kv_compress_evicted_head_pages_total", **labels) == 60
    assert _sample("vllm:kv_compress_evicted_kvs_total", **labels) == 60 * 128
    assert _sample("vllm:kv_compress_eviction_time_seconds_count", **labels) == 2
    assert _sample("vllm:kv_compress_eviction_time_seconds_sum", **labels) == pytest.approx(0.006)
    assert _sample("vllm:kv_compress_request_kept_fraction_bucket", **labels, le="0.4") == 2
    assert _sample("vllm:kv_compress_request_kept_fraction_bucket", **labels, le="0.35") == 0
    # A malformed payload is dropped (logged), never raised into vLLM's output handler.
    bad = _stats_with_payload()
    bad.kv_connector_stats[metrics.PAYLOAD_KEY]["kvs_evicted"] = "many"
    logger.record(bad, None, engine_idx=0)
    assert _sample("vllm:kv_compress_evicted_head_pages_total", **labels) == 60
    # A second engine in the same process re-creates the collectors.
    cls(cfg, [0])
    assert _sample("vllm:kv_compress_evicted_head_pages_total", **labels) == 0


@pytest.mark.engine
def test_engine_metrics_match_scheduler_totals(model_path):
    """In-process LLM engine with stats on: the Prometheus counters equal the
    scheduler's own totals, triggers add up, and every finished request is
    observed once with its reported kept fraction."""
    from prometheus_client import REGISTRY
    from vllm import SamplingParams

    from conftest import Engine
    from kvcompress_vllm import tasks

    eng = Engine(model_path, kv_compress_rate=0.25, disable_log_stats=False,
                 kv_cache_memory_bytes=64 << 20, max_model_len=2048, served_model_name="m-eng")
    try:
        from vllm.v1.metrics.loggers import StatLoggerManager

        manager = eng.engine.logger_manager
        assert isinstance(manager, StatLoggerManager)
        assert type(manager.stat_loggers[0]).__name__ == "KVCompressStatLogger"
        prompts = [tasks.passkey(eng.tokenizer, n, depth=0.5, seed=n).prompt
                   for n in (300, 700, 1100, 1500, 1500, 1200)]
        outs = eng.generate(prompts, SamplingParams(max_tokens=200, temperature=0.0,
                                                    ignore_eos=True))
        totals = eng.scheduler.kvc_totals
        labels = {"model_name": "m-eng", "engine": "0"}

        def value(name, **extra):
            return REGISTRY.get_sample_value(name, {**labels, **extra}) or 0.0

        assert totals.compressions > len(prompts)  # prompt + interval (+ pressure)
        by_trigger = {t: value("vllm:kv_compress_compressions_total", trigger=t)
                      for t in metrics.TRIGGERS}
        assert sum(by_trigger.values()) == totals.compressions
        assert by_trigger["prompt"] >= len(prompts) and by_trigger["interval"] >= 1
        assert value("vllm:kv_compress_evicted_head_pages_total") == totals.pages_evicted
        assert value("vllm:kv_compress_released_blocks_total") == totals.blocks_released
        assert value("vllm:kv_compress_evicted_kvs_total") == totals.kvs_evicted
        assert value("vllm:kv_compress_migrated_head_pages_total") == totals.pages_migrated
        assert value("vllm:kv_compress_requests_compressed_total") == len(prompts)
        assert 0 < value("vllm:kv_compress_eviction_time_seconds_count") <= totals.compressions
        assert value("vllm:kv_compress_eviction_time_seconds_sum") == pytest.approx(
            totals.compaction_ms / 1000.0, rel=1e-6)
        kept = sorted(o.kv_transfer_params["kv_compress"]["kept_fraction"] for o in outs)
        assert value("vllm:kv_compress_request_kept_fraction_count") == len(prompts)
        assert value("vllm:kv_compress_request_kept_fraction_sum") == pytest.approx(sum(kept))
        assert all(k < 0.5 for k in kept)
        # vLLM's own metrics still work next to ours.
        assert value("vllm:generation_tokens_total") == 200 * len(prompts)
        assert totals.preemptions == value("vllm:num_preemptions_total")
    finally:
        eng.shutdown()
