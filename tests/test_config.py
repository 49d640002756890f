"""Configuration surface: validation, kwarg/flag folding, compatibility rules."""

import math

import pytest
import torch

from kvcompress_vllm.config import (
    KVCompressConfig,
    KVCompressConfigError,
    config_from_additional,
    request_policy,
)
from kvcompress_vllm.engine_args import SCHEDULER_CLS, fold_rate


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.0001, 2, math.nan, math.inf, "0.3", None, True,
                                 10 ** 400, -(10 ** 400)])
def test_bad_rates_name_option_and_range(bad):
    with pytest.raises(KVCompressConfigError) as err:
        KVCompressConfig(rate=bad)
    msg = str(err.value)
    assert "kv_compress.rate" in msg and "(0, 1]" in msg


@pytest.mark.parametrize(
    "field,value,expect",
    [
        ("protected_window", -1, ">= 0"),
        ("sink_tokens", -3, ">= 0"),
        ("observation_window", 0, ">= 1"),
        ("pooling_kernel", 4, "odd"),
        ("compress_interval", 0, ">= 1"),
        ("max_cache_tokens", -5, ">= 1"),
        ("scorer", "h2o", "one of"),
        ("allocation", "even", "joint, uniform"),
        ("enabled", "yes", "true or false"),
        ("compress_to_admit", 1, "true or false"),
    ],
)
def test_bad_fields(field, value, expect):
    with pytest.raises(KVCompressConfigError) as err:
        KVCompressConfig(**{field: value})
    assert f"kv_compress.{field}" in str(err.value) and expect in str(err.value)


def test_unknown_key_is_rejected():
    with pytest.raises(KVCompressConfigError, match="unknown option"):
        config_from_additional({"kv_compress": {"rate": 0.5, "ratio": 0.5}})


def test_active_only_when_compressing_or_enabled():
    assert config_from_additional(None) is None
    assert not KVCompressConfig(rate=1.0).active
    assert KVCompressConfig(rate=0.3).active
    assert KVCompressConfig(rate=1.0, enabled=True).active
    assert not KVCompressConfig(rate=1.0, enabled=False).active


@pytest.mark.parametrize("compressing", [{"rate": 0.3}, {"max_cache_tokens": 500}])
def test_enabled_false_with_compressing_settings_is_refused(compressing):
    """Not a silent switch-off of what the same config asks for."""
    with pytest.raises(KVCompressConfigError, match=r"^kv_compress\.enabled: false contradicts"):
        KVCompressConfig(enabled=False, **compressing)


@pytest.mark.parametrize("key", ["kv_compress_max_cache_tokens", "kv_compress_allocaton",
                                 "kv_compress_protected_window", "kv_compress"])
def test_misspelled_request_options_are_refused_not_ignored(key):
    from kvcompress_vllm.config import REQUEST_KEYS, uses_request_keys

    assert uses_request_keys({key: 1, "other_plugin_key": 2})
    assert not uses_request_keys({"other_plugin_key": 2})
    with pytest.raises(KVCompressConfigError) as err:
        request_policy(KVCompressConfig(rate=0.5), {key: 1}, 128)
    assert err.value.option == f"extra_args.{key}"
    assert all(k in str(err.value) for k in REQUEST_KEYS)


def test_request_overrides():
    cfg = KVCompressConfig(rate=0.5, protected_window=16)
    p = request_policy(cfg, {"kv_compress_rate": 0.25, "kv_compress_scorer": "knorm"}, 128)
    assert (p.rate, p.scorer, p.protected_window, p.compress_interval) == (0.25, "knorm", 16, 128)
    # a JSON body may carry an integer too large for a float
    for bad in (0, 10 ** 400, -(10 ** 400)):
        with pytest.raises(KVCompressConfigError, match="extra_args.kv_compress_rate"):
            request_policy(cfg, {"kv_compress_rate": bad}, 128)
    with pytest.raises(KVCompressConfigError, match="extra_args.protected_window"):
        request_policy(cfg, {"protected_window": -2}, 128)


def test_records_metric_only_when_a_metric_scorer_compresses():
    from kvcompress_vllm import scorers
    from kvcompress_vllm.config import METRIC_SCORERS, SCORERS

    cfg = KVCompressConfig(rate=0.5)
    for name in SCORERS:
        p = request_policy(cfg, {"kv_compress_scorer": name}, 128)
        assert p.records_metric == (name in METRIC_SCORERS)
        # The registry's classes say the same (it refuses to load otherwise).
        assert scorers.get_scorer(name).needs_metrics == (name in METRIC_SCORERS)
    assert not request_policy(cfg, {"kv_compress_rate": 1.0}, 128).records_metric
    metric_cfg = KVCompressConfig(rate=0.5, scorer="kvcompress")
    assert request_policy(metric_cfg, {}, 128).records_metric
    assert not request_policy(metric_cfg, {"kv_compress_rate": 1.0}, 128).records_metric
    assert request_policy(metric_cfg, {"kv_compress_rate": 1.0, "max_cache_tokens": 500},
                          128).records_metric
    # The default scorer (keydiff) reads keys, not the metric.
    assert not request_policy(cfg, {}, 128).records_metric


def test_allocation_is_an_option_and_uniform_is_no_longer_a_scorer():
    assert KVCompressConfig().allocation == "joint"
    assert KVCompressConfig(allocation="uniform").allocation == "uniform"
    with pytest.raises(KVCompressConfigError) as err:
        KVCompressConfig(scorer="uniform")
    msg = str(err.value)
    assert msg.startswith("kv_compress.scorer:") and 'kv_compress.allocation = "uniform"' in msg
    with pytest.raises(KVCompressConfigError) as err:
        request_policy(KVCompressConfig(rate=0.5), {"kv_compress_scorer": "uniform"}, 128)
    msg = str(err.value)
    assert msg.startswith("extra_args.kv_compress_scorer:")
    assert 'extra_args.kv_compress_allocation = "uniform"' in msg


def test_request_allocation_override():
    cfg = KVCompressConfig(rate=0.5)
    assert request_policy(cfg, None, 128).allocation == "joint"
    assert request_policy(KVCompressConfig(rate=0.5, allocation="uniform"), {}, 128).allocation == "uniform"
    p = request_policy(cfg, {"kv_compress_allocation": "uniform", "kv_compress_scorer": "keydiff"}, 128)
    assert (p.allocation, p.scorer) == ("uniform", "keydiff")
    for bad in ("even", None, 1, "Uniform"):
        with pytest.raises(KVCompressConfigError) as err:
            request_policy(cfg, {"kv_compress_allocation": bad}, 128)
        assert err.value.option == "extra_args.kv_compress_allocation"
        assert "joint, uniform" in str(err.value)


def test_request_validation_rejects_bad_allocation():
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from kvcompress_vllm.request_validation import validate_request

    vllm_config = SimpleNamespace(
        additional_config={"kv_compress": {"rate": 0.5}},
        cache_config=SimpleNamespace(block_size=128),
    )
    validate_request(vllm_config, SamplingParams(extra_args={"kv_compress_allocation": "uniform"}))
    with pytest.raises(VLLMValidationError, match="kv_compress_allocation.*joint, uniform"):
        validate_request(vllm_config, SamplingParams(extra_args={"kv_compress_allocation": "even"}))
    with pytest.raises(VLLMValidationError, match="kv_compress_allocation"):
        validate_request(vllm_config, SamplingParams(extra_args={"kv_compress_scorer": "uniform"}))


def test_fold_rate_conflict():
    assert fold_rate(None, 0.3, "kv_compress_rate") == {"kv_compress": {"rate": 0.3}}
    with pytest.raises(KVCompressConfigError, match="conflicts"):
        fold_rate({"kv_compress": {"rate": 0.5}}, 0.3, "kv_compress_rate")


# --- vLLM engine arguments (no engine is started) -----------------------------

@pytest.fixture(scope="module")
def engine_args_mod():
    from vllm.engine import arg_utils

    import kvcompress_vllm  # noqa: F401 - installs the EngineArgs hook

    return arg_utils


def test_kwarg_reaches_additional_config(engine_args_mod):
    args = engine_args_mod.EngineArgs(model="m", kv_compress_rate=0.3)
    assert args.additional_config == {"kv_compress": {"rate": 0.3}}
    async_args = engine_args_mod.AsyncEngineArgs(model="m", kv_compress_rate=0.5)
    assert async_args.additional_config["kv_compress"]["rate"] == 0.5


@pytest.mark.parametrize("bad", [0, 1.5, math.nan, "abc"])
def test_bad_kwarg_fails_early(engine_args_mod, bad):
    with pytest.raises(ValueError, match=r"kv_compress_rate.*\(0, 1\]"):
        engine_args_mod.EngineArgs(model="m", kv_compress_rate=bad)


def _parser(engine_args_mod):
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return engine_args_mod.AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())


def test_cli_flag_is_parsed_and_kept(engine_args_mod):
    parser = _parser(engine_args_mod)
    ns = parser.parse_args(["--model", "m", "--kv-compress-rate", "0.3"])
    args = engine_args_mod.AsyncEngineArgs.from_cli_args(ns)
    assert args.additional_config["kv_compress"]["rate"] == 0.3


@pytest.mark.parametrize("bad", ["0", "1.2", "nan", "abc", "-1"])
def test_cli_flag_rejects_bad_values(engine_args_mod, bad, capsys):
    parser = _parser(engine_args_mod)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--kv-compress-rate", bad])
    err = capsys.readouterr().err
    assert "--kv-compress-rate" in err and "(0, 1]" in err


@pytest.mark.parametrize("scheduler_cls", [None, "vllm.v1.core.sched.scheduler.Scheduler"],
                         ids=["default", "vllm-scheduler-named"])
def test_create_engine_config_enables_plugin(engine_args_mod, model_path, scheduler_cls):
    """Naming vLLM's synchronous scheduler, the class ours extends, is the
    default spelled out; any other class is refused
    (``test_incompatible_options_are_rejected``)."""
    args = engine_args_mod.EngineArgs(model=model_path, kv_compress_rate=0.3, max_model_len=2048,
                                      scheduler_cls=scheduler_cls)
    cfg = args.create_engine_config()
    assert cfg.scheduler_config.scheduler_cls == SCHEDULER_CLS
    assert cfg.parallel_config.worker_cls.endswith("KVCompressCPUWorker")
    # vLLM's default would turn prefix caching on: off unless asked for (it
    # would keep blocks that requests share uncompressed).
    assert cfg.cache_config.enable_prefix_caching is False


@pytest.mark.parametrize("single", [True, False], ids=["one-layout", "two-layouts"])
def test_prefix_caching_asked_for_needs_one_layout(engine_args_mod, model_path, monkeypatch,
                                                   single):
    """``enable_prefix_caching=True`` is kept where every request's pages share
    one layout -- the worker's own decision, made at configuration from the
    cache's dtype, block size and head dim -- and refused, naming the option
    and the settings that give one layout, where they would not; vLLM's
    default and ``False`` leave it off without asking for the layouts."""
    from types import SimpleNamespace

    from kvcompress_vllm.attention.cpu_prefill import PageLayouts
    from kvcompress_vllm.config import KVCompressConfigError

    layouts = PageLayouts(SimpleNamespace(isa="vec"), metric_packed=single, decode_ours=True)
    seen = []
    monkeypatch.setattr(PageLayouts, "decide",
                        classmethod(lambda cls, *a: seen.append(a) or layouts))

    def config(**kw):
        return engine_args_mod.EngineArgs(model=model_path, kv_compress_rate=0.3,
                                          max_model_len=2048, **kw).create_engine_config()

    for kw in ({}, {"enable_prefix_caching": False}):
        assert config(**kw).cache_config.enable_prefix_caching is False
    assert not seen
    if single:
        assert config(enable_prefix_caching=True).cache_config.enable_prefix_caching is True
    else:
        with pytest.raises(KVCompressConfigError,
                           match="enable_prefix_caching: .*one layout.*METRIC_PAGES=packed"):
            config(enable_prefix_caching=True)
    assert seen[0] == (torch.bfloat16, 128, 64, "auto")  # the cache's dtype, shape, cache dtype


def test_create_engine_config_passthrough_without_config(engine_args_mod, model_path):
    for extra in ({}, {"additional_config": {"kv_compress": {"rate": 1.0}}}):
        cfg = engine_args_mod.EngineArgs(model=model_path, max_model_len=2048, **extra).create_engine_config()
        assert "kvcompress" not in str(cfg.scheduler_config.scheduler_cls)
        assert cfg.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative"),
        ({"kv_offloading_size": 1.0}, "offloading"),
        ({"kv_cache_dtype": "fp8"}, "kv-cache-dtype"),
        ({"async_scheduling": True}, "async-scheduling"),
        ({"enable_dbo": True}, "micro-batching"),
        ({"ubatch_size": 2}, "micro-batching"),
        ({"scheduler_cls": "vllm.v1.core.sched.async_scheduler.AsyncScheduler"},
         r"scheduler-cls \(vllm\.v1\.core\.sched\.async_scheduler\.AsyncScheduler; leave it "
         r"unset or name vllm\.v1\.core\.sched\.scheduler\.Scheduler\)"),
        ({"scheduler_cls": "my_pkg.MyScheduler"}, r"scheduler-cls \(my_pkg\.MyScheduler;"),
        ({"worker_cls": "my_pkg.MyWorker"}, "worker-cls"),
    ],
)
def test_incompatible_options_are_rejected(engine_args_mod, model_path, extra, needle):
    args = engine_args_mod.EngineArgs(model=model_path, kv_compress_rate=0.5, **extra)
    with pytest.raises(KVCompressConfigError, match=needle):
        args.create_engine_config()


def test_bad_additional_config_fails_in_create_engine_config(engine_args_mod, model_path):
    args = engine_args_mod.EngineArgs(
        model=model_path, additional_config={"kv_compress": {"rate": 0.5, "protected_window": -1}}
    )
    with pytest.raises(KVCompressConfigError, match="protected_window"):
        args.create_engine_config()


@pytest.mark.parametrize("section", ["on", [0.5], 3])
def test_a_kv_compress_section_that_is_no_object_is_named(engine_args_mod, section):
    with pytest.raises(KVCompressConfigError) as err:
        engine_args_mod.EngineArgs(model="m", kv_compress_rate=0.3,
                                   additional_config={"kv_compress": section})
    assert err.value.option == "additional_config.kv_compress"
    assert "must be a JSON object" in str(err.value)


@pytest.mark.parametrize("plugins", ["", "someother", "someother,kvcompress"])
def test_compression_with_the_plugin_filtered_out_is_refused(engine_args_mod, model_path,
                                                             monkeypatch, plugins):
    """``VLLM_PLUGINS`` without ``kvcompress`` would leave the engine core
    and the frontend without what the plugin installs: refused, named."""
    monkeypatch.setenv("VLLM_PLUGINS", plugins)
    args = engine_args_mod.EngineArgs(model=model_path, kv_compress_rate=0.3, max_model_len=2048)
    if "kvcompress" in plugins.split(","):
        assert args.create_engine_config().scheduler_config.scheduler_cls == SCHEDULER_CLS
        return
    with pytest.raises(KVCompressConfigError) as err:
        args.create_engine_config()
    assert err.value.option == "VLLM_PLUGINS" and "leaves out the 'kvcompress' plugin" in str(
        err.value)


def test_an_incompatible_vllm_says_how_to_run_without_the_plugin(monkeypatch):
    from kvcompress_vllm import compat, plugin

    def mismatch():
        raise compat.IncompatibleVLLMError("kvcompress-vllm supports vLLM 0.32.x; found 9.9")

    monkeypatch.setattr(compat, "check_engine_hooks", mismatch)
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.raises(compat.IncompatibleVLLMError, match=r"found 9\.9\. To run vLLM without "
                       r"kvcompress-vllm, set VLLM_PLUGINS"):
        plugin.register()


def test_cache_budget_below_the_never_evicted_kvs_is_rejected():
    with pytest.raises(KVCompressConfigError, match=r"max_cache_tokens=30 .*\(protected_window=32 \+ sink_tokens=4 = 36\)"):
        KVCompressConfig(max_cache_tokens=30)
    assert KVCompressConfig(max_cache_tokens=36).max_cache_tokens == 36
    cfg = KVCompressConfig(rate=0.5)
    with pytest.raises(KVCompressConfigError) as err:
        request_policy(cfg, {"max_cache_tokens": 20}, 128)
    assert err.value.option == "extra_args.max_cache_tokens"
    server_cap = KVCompressConfig(max_cache_tokens=100)
    with pytest.raises(KVCompressConfigError) as err:
        request_policy(server_cap, {"protected_window": 99}, 128)
    assert err.value.option == "extra_args.protected_window"
    assert request_policy(server_cap, {"protected_window": 96}, 128).protected_window == 96
