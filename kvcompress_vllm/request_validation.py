"""Per-request KV-Compress options, validated in the frontend process.

``SamplingParams.extra_args`` (OpenAI API: ``"vllm_xargs"``) may carry the
keys of ``config.REQUEST_KEYS``: ``kv_compress_rate``, ``max_cache_tokens``,
``protected_window``, ``kv_compress_scorer`` and ``kv_compress_allocation``.
Bad values are rejected with a 400-style ``VLLMValidationError`` naming the
option and its allowed values, before the request reaches the engine, so one
bad request never disturbs the others.
"""

from __future__ import annotations

from kvcompress_vllm.config import (
    KVCompressConfigError,
    active_config,
    request_policy,
    uses_request_keys,
)

_PATCHED_ATTR = "_kvcompress_patched"


def validate_request(vllm_config, params) -> None:
    extra = getattr(params, "extra_args", None)
    if not uses_request_keys(extra):
        return
    from vllm.exceptions import VLLMValidationError

    cfg = active_config(vllm_config)
    if cfg is None:
        raise VLLMValidationError(
            "KV-Compress options were given in extra_args but KV compression is "
            "not enabled on this server (start it with --kv-compress-rate R, or "
            "--additional-config '{\"kv_compress\": {\"enabled\": true}}' to allow "
            "per-request rates)",
            parameter="extra_args",
        )
    block_size = vllm_config.cache_config.block_size or 1
    try:
        request_policy(cfg, extra, block_size)
    except KVCompressConfigError as e:
        raise VLLMValidationError(str(e), parameter=e.option, value=e.value) from None


def patch_input_processor() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params
    if getattr(original, _PATCHED_ATTR, False):
        return

    def _validate_params(self, params, supported_tasks):
        result = original(self, params, supported_tasks)
        if isinstance(params, SamplingParams):
            validate_request(self.vllm_config, params)
        return result

    setattr(_validate_params, _PATCHED_ATTR, True)
    InputProcessor._validate_params = _validate_params
