"""How ``--kv-compress-rate`` and ``LLM(..., kv_compress_rate=...)`` reach vLLM.

vLLM 0.32 has no hook for plugin engine arguments, so we wrap four
``EngineArgs`` entry points (idempotently, see ``patch_engine_args``):

* ``__init__`` (of ``EngineArgs`` and ``AsyncEngineArgs``): pops the
  ``kv_compress_rate`` kwarg into ``additional_config["kv_compress"]``.
* ``add_cli_args``: adds ``--kv-compress-rate`` (``vllm serve``, ``vllm bench
  throughput|latency``, ...).
* ``from_cli_args``: folds the parsed flag into ``additional_config``
  (vLLM would silently drop it: it keeps dataclass fields only).
* ``create_engine_config``: the one place that turns KV-Compress on -- it
  validates the config, rejects incompatible options, switches off prefix
  caching unless it was asked for (on CPU, where it then checks that every
  request's pages share one layout) and plugs in the scheduler and worker
  classes.  Without a
  ``kv_compress`` config, or with one that is not ``KVCompressConfig.active``
  (``enabled`` unset with rate 1 and no ``max_cache_tokens``), it does
  nothing, so vLLM runs exactly as without the plugin.
"""

from __future__ import annotations

import argparse
from typing import Any

from kvcompress_vllm.config import (
    CONFIG_KEY,
    KVCompressConfigError,
    check_rate,
    config_from_additional,
)

KWARG = "kv_compress_rate"
FLAG = "--kv-compress-rate"
SCHEDULER_CLS = "kvcompress_vllm.scheduler.scheduler.KVCompressScheduler"
#: The class ``SCHEDULER_CLS`` extends, the only other ``--scheduler-cls`` accepted.
VLLM_SCHEDULER_CLS = "vllm.v1.core.sched.scheduler.Scheduler"
CPU_WORKER_CLS = "kvcompress_vllm.worker.worker.KVCompressCPUWorker"
GPU_WORKER_CLS = "kvcompress_vllm.worker.gpu_worker.KVCompressGPUWorker"
#: What has run of the CUDA path (logged when it is selected; README says the same).
CUDA_VERIFIED = (
    "the Triton kernels were tested against the reference on an H200 (sm_90); "
    "the CUDA backend's metadata builder and impl and the worker's eviction on "
    "the GPU cache layout were tested only under the Triton interpreter on CPU "
    "tensors; the engine path has not yet run on a real GPU"
)

_PATCHED_ATTR = "_kvcompress_patched"


def _rate_arg(text: str) -> float:
    """argparse type for ``--kv-compress-rate``."""
    try:
        value = float(text)
    except ValueError:
        value = text
    try:
        return check_rate(value, FLAG)
    except KVCompressConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fold_rate(additional_config: dict[str, Any] | None, rate: Any, option: str) -> dict[str, Any]:
    """``additional_config`` with ``kv_compress.rate`` set (validated)."""
    rate = check_rate(rate, option)
    merged = dict(additional_config or {})
    section = merged.get(CONFIG_KEY) or {}
    if not isinstance(section, dict):
        raise KVCompressConfigError(
            f"additional_config.{CONFIG_KEY}", f"must be a JSON object; got {section!r}", section
        )
    section = dict(section)
    if "rate" in section and section["rate"] != rate:
        raise KVCompressConfigError(
            option,
            f"conflicts with additional_config.kv_compress.rate={section['rate']!r}",
        )
    section["rate"] = rate
    merged[CONFIG_KEY] = section
    return merged


def _wrap_init(cls: type) -> None:
    original = cls.__init__
    if getattr(original, _PATCHED_ATTR, False):
        return

    def __init__(self, *args, **kwargs):
        if KWARG in kwargs:
            rate = kwargs.pop(KWARG)
            if rate is not None:
                kwargs["additional_config"] = fold_rate(
                    kwargs.get("additional_config"), rate, KWARG
                )
        original(self, *args, **kwargs)

    __init__.__wrapped__ = original
    setattr(__init__, _PATCHED_ATTR, True)
    cls.__init__ = __init__


def _incompatibilities(args: Any) -> list[str]:
    problems = []
    if args.speculative_config:
        problems.append("speculative decoding (--speculative-config)")
    if args.kv_transfer_config is not None:
        problems.append("KV connectors (--kv-transfer-config)")
    if args.kv_offloading_size:
        problems.append("KV offloading (--kv-offloading-size)")
    if args.async_scheduling:
        problems.append("--async-scheduling")
    if args.enable_dbo or args.ubatch_size > 1:
        # vLLM splits a step into micro-batches whose metadata restarts at
        # request 0; the per-head page tables are built for the whole batch.
        problems.append("micro-batching (--enable-dbo / --ubatch-size > 1)")
    if args.pipeline_parallel_size != 1:
        # Each stage would hold a slice of the layers: the joint choice over
        # all layers of a sequence needs them in one worker.
        problems.append("pipeline parallelism (--pipeline-parallel-size must be 1)")
    if args.kv_cache_dtype not in ("auto", None):
        problems.append(f"--kv-cache-dtype {args.kv_cache_dtype}")
    if args.scheduler_cls not in (None, SCHEDULER_CLS, VLLM_SCHEDULER_CLS):
        # vLLM's synchronous scheduler is what ours extends; any other class
        # (vLLM's own async or diffusion scheduler included) would be dropped.
        problems.append(f"a custom --scheduler-cls ({args.scheduler_cls}; leave it unset or "
                        f"name {VLLM_SCHEDULER_CLS})")
    if args.worker_cls not in ("auto", CPU_WORKER_CLS, GPU_WORKER_CLS):
        problems.append(f"a custom --worker-cls ({args.worker_cls})")
    return problems


def _check_model(vllm_config: Any) -> None:
    model = vllm_config.model_config
    problems = []
    if model.use_mla:
        problems.append("MLA attention")
    if model.get_sliding_window() is not None:
        problems.append("sliding-window attention")
    if model.is_hybrid or model.is_attention_free:
        problems.append("hybrid / attention-free layers")
    if model.is_encoder_decoder:
        problems.append("encoder-decoder models")
    if problems:
        raise KVCompressConfigError(
            "kv_compress",
            f"model {model.model} is not supported ({', '.join(problems)}); "
            "KV-Compress needs plain full attention",
        )


def _check_prefix_caching_layouts(vllm_config: Any, logger) -> None:
    """CPU, prefix caching asked for: a cached block is read by requests other
    than its writer, so every request's pages must be in one layout.  Makes
    the worker's layout decision in advance (``PageLayouts.decide``, its one
    home) and refuses, naming the option, where requests would use two."""
    from kvcompress_vllm.attention.cpu_prefill import PageLayouts

    cache, model = vllm_config.cache_config, vllm_config.model_config
    try:
        layouts = PageLayouts.decide(model.dtype, cache.block_size, model.get_head_size(),
                                     cache.cache_dtype)
        layouts.check_prefix_caching(True)
    except (RuntimeError, ValueError) as e:  # two layouts, or a layout setting refused
        raise KVCompressConfigError("enable_prefix_caching", str(e)) from None
    logger.info("KV-Compress with prefix caching: blocks other requests share are kept "
                "intact; a request's other blocks leave the cache when it is first compressed")


def _select_cuda_path(args: Any, logger) -> None:
    """CUDA: our attention backend in vLLM's ``CUSTOM`` slot (the GPU worker
    registers it) and vLLM's V1 model runner (the builder maps batch rows to
    requests through the V1 runner's ``input_batch``; the environment
    variable is inherited by the engine and worker processes).  Logs the
    experimental-status warning.  (``compat.check_runtime_hooks`` has
    checked the CUDA-side hooks already.)"""
    import os

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    chosen = args.attention_backend
    if isinstance(chosen, str):
        chosen = None if chosen == "auto" else AttentionBackendEnum[chosen.upper()]
    configured = getattr(args.attention_config, "backend", None)
    if chosen not in (None, custom) or configured not in (None, custom):
        raise KVCompressConfigError(
            "kv_compress",
            f"needs its own attention backend (CUSTOM) on CUDA; got "
            f"{(chosen or configured).name}: drop --attention-backend",
        )
    if configured is None:
        args.attention_backend = custom
    v2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if v2 is not None and v2.strip().lower() in ("1", "true", "yes", "on"):
        raise KVCompressConfigError(
            "kv_compress",
            f"runs on vLLM's V1 model runner on CUDA; unset VLLM_USE_V2_MODEL_RUNNER (={v2})",
        )
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    logger.warning(
        "KV-Compress on CUDA is EXPERIMENTAL: %s. Please report problems.", CUDA_VERIFIED
    )


def _check_cuda_config(vllm_config: Any) -> None:
    """What the Triton kernels need, checked before any process starts."""
    from kvcompress_vllm.attention.cuda_backend import HEAD_SIZES

    problems = []
    if vllm_config.use_v2_model_runner:
        problems.append(
            "vLLM resolved to the V2 model runner (a feature that needs it, or a cached "
            "VLLM_USE_V2_MODEL_RUNNER); KV-Compress runs on the V1 runner"
        )
    head_size = vllm_config.model_config.get_head_size()
    if head_size not in HEAD_SIZES:
        problems.append(f"head size {head_size} (supported: {', '.join(map(str, HEAD_SIZES))})")
    block_size = vllm_config.cache_config.block_size
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        problems.append(f"--block-size {block_size} (a power of two >= 16 is needed)")
    if problems:
        raise KVCompressConfigError(
            "kv_compress", "on CUDA, not supported: " + "; ".join(problems)
        )


def _wrap_create_engine_config(cls: type) -> None:
    original = cls.create_engine_config
    if getattr(original, _PATCHED_ATTR, False):
        return

    def create_engine_config(self, *args, **kwargs):
        cfg = config_from_additional(self.additional_config)  # validates
        if cfg is None or not cfg.active:
            return original(self, *args, **kwargs)
        from vllm import envs
        from vllm.platforms import current_platform

        from kvcompress_vllm.plugin import PLUGIN_NAME

        if envs.VLLM_PLUGINS is not None and PLUGIN_NAME not in envs.VLLM_PLUGINS:
            # The engine-argument hook works without the plugin, but the
            # engine core and the frontend need what its register() installs.
            raise KVCompressConfigError(
                "VLLM_PLUGINS",
                f"is {','.join(envs.VLLM_PLUGINS)!r}, which leaves out the {PLUGIN_NAME!r} "
                f"plugin that KV-Compress needs (KV-cache spec, request validation, metrics); "
                f"add {PLUGIN_NAME} to it or unset it",
            )

        from kvcompress_vllm import compat
        from kvcompress_vllm.log import get_logger

        compat.check_runtime_hooks()
        logger = get_logger(__name__)
        problems = _incompatibilities(self)
        if problems:
            raise KVCompressConfigError(
                "kv_compress", "not supported together with " + "; ".join(problems)
            )
        if current_platform.is_cpu():
            worker_cls = CPU_WORKER_CLS
        elif current_platform.is_cuda():
            worker_cls = GPU_WORKER_CLS
            _select_cuda_path(self, logger)
        else:
            raise KVCompressConfigError(
                "kv_compress",
                f"the {current_platform.device_name} platform is not supported "
                "(CPU and NVIDIA CUDA only)",
            )
        # Prefix caching: kept where asked for on CPU (checked below, once the
        # layouts are known); else off, vLLM's default (on) included.
        if not (self.enable_prefix_caching and current_platform.is_cpu()):
            if self.enable_prefix_caching:
                logger.warning("KV-Compress: prefix caching is turned off (not supported on "
                               "%s yet)", current_platform.device_name)
            elif current_platform.is_cpu() and self.enable_prefix_caching is None:
                logger.info("KV-Compress: prefix caching is off by default (vLLM's default is "
                            "on): blocks other requests share stay uncompressed, so requests "
                            "with a common prefix would compress less; --enable-prefix-caching "
                            "turns it on (do so for beam search, which prefills the prompt "
                            "again at every step without it)")
            self.enable_prefix_caching = False
        self.async_scheduling = False
        self.scheduler_cls = SCHEDULER_CLS
        self.worker_cls = worker_cls
        vllm_config = original(self, *args, **kwargs)
        _check_model(vllm_config)
        if current_platform.is_cpu() and vllm_config.cache_config.enable_prefix_caching:
            _check_prefix_caching_layouts(vllm_config, logger)
        if worker_cls == GPU_WORKER_CLS:
            _check_cuda_config(vllm_config)
        logger.info(
            "KV-Compress enabled: keep rate %.3g, protected window %d, scorer %s",
            cfg.rate,
            cfg.protected_window,
            cfg.scorer,
        )
        return vllm_config

    create_engine_config.__wrapped__ = original
    setattr(create_engine_config, _PATCHED_ATTR, True)
    cls.create_engine_config = create_engine_config


def _wrap_cli(cls: type) -> None:
    add_original = cls.add_cli_args
    if getattr(add_original, _PATCHED_ATTR, False):
        return

    def add_cli_args(parser, *args, **kwargs):
        parser = add_original(parser, *args, **kwargs)
        if not any(FLAG in action.option_strings for action in parser._actions):
            group = parser.add_argument_group(
                "KV-Compress", "Paged KV-cache eviction (kvcompress-vllm plugin)."
            )
            group.add_argument(
                FLAG,
                type=_rate_arg,
                default=None,
                metavar="R",
                help=(
                    "Fraction of each sequence's compressible KVs that is KEPT, "
                    "0 < R <= 1 (1 = off). The newest tokens (protected window) "
                    "are always kept. Other settings: --additional-config "
                    "'{\"kv_compress\": {...}}'."
                ),
            )
        return parser

    setattr(add_cli_args, _PATCHED_ATTR, True)
    cls.add_cli_args = staticmethod(add_cli_args)

    from_original = cls.from_cli_args.__func__

    def from_cli_args(inner_cls, args: argparse.Namespace):
        engine_args = from_original(inner_cls, args)
        rate = getattr(args, KWARG, None)
        if rate is not None:
            engine_args.additional_config = fold_rate(engine_args.additional_config, rate, FLAG)
        return engine_args

    cls.from_cli_args = classmethod(from_cli_args)


def patch_engine_args(module: Any = None) -> None:
    """Install the four wrappers on ``vllm.engine.arg_utils`` (idempotent)."""
    if module is None:
        import vllm.engine.arg_utils as module
    _wrap_init(module.EngineArgs)
    _wrap_init(module.AsyncEngineArgs)
    _wrap_cli(module.EngineArgs)
    _wrap_create_engine_config(module.EngineArgs)
