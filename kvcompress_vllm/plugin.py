"""``vllm.general_plugins`` entry point, run once in every vLLM process.

It only installs hooks that are inert until ``additional_config["kv_compress"]``
turns KV-Compress on: the engine-argument wrappers, the KV-cache spec registry
entry, request validation in the frontend (before a stream starts:
``serving.py``, which also ends open requests cleanly on shutdown), and the
Prometheus stat logger (``metrics.py``) added to the frontend's
``StatLoggerManager``.  The scheduler, worker and
attention backend are swapped in by ``engine_args.create_engine_config`` only
for engines that enable compression.
"""

from __future__ import annotations

#: The ``vllm.general_plugins`` entry point's name (setup.py), as
#: ``VLLM_PLUGINS`` lists it.
PLUGIN_NAME = "kvcompress"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from kvcompress_vllm import compat
    from kvcompress_vllm.engine_args import patch_engine_args
    from kvcompress_vllm.metrics import patch_stat_logger_manager
    from kvcompress_vllm.request_validation import patch_input_processor
    from kvcompress_vllm.scheduler.kv_cache_manager import register_kv_cache_spec
    from kvcompress_vllm.serving import patch_async_generate, patch_async_shutdown

    try:
        compat.check_engine_hooks()
    except compat.IncompatibleVLLMError as e:
        # vLLM loads every installed plugin in every process: say how to run
        # vLLM without this one.
        raise compat.IncompatibleVLLMError(
            f"{e}. To run vLLM without kvcompress-vllm, set VLLM_PLUGINS to the plugins "
            f"you want (VLLM_PLUGINS= for none) or pip uninstall kvcompress-vllm"
        ) from None
    patch_engine_args()
    patch_input_processor()
    patch_stat_logger_manager()
    patch_async_generate()
    patch_async_shutdown()
    register_kv_cache_spec()
    _registered = True
