"""The GPU worker (``worker_cls``) for engines with KV-Compress active on CUDA.

``KVCompressGPUWorker`` subclasses vLLM's GPU ``Worker`` and drives vLLM's
V1 ``GPUModelRunner`` (``engine_args`` sets ``VLLM_USE_V2_MODEL_RUNNER=0``:
the builder maps batch rows to requests through the V1 runner's
``input_batch.req_ids``, the same contract as on CPU, where vLLM always runs
the V1 runner).  It

* registers ``KVCompressCUDABackend`` as vLLM's ``CUSTOM`` attention backend
  before the model is built (``create_engine_config`` selects ``CUSTOM``);
* takes the plugin's device memory (per-slot metric + position, the per-step
  page-table copies, eviction temporaries) out of vLLM's KV budget;
* views the allocated cache as head-pages through the platform's layout
  (``worker.layouts``) and runs the platform-neutral eviction, compaction and
  migration of ``KVCompressWorkerState`` on it: scoring and the compaction /
  migration copies run on the GPU (``ops`` dispatches CUDA tensors to the
  Triton kernels), the per-request page tables stay on the host;
* wraps each step: ``begin_step`` before the forward pass, stats back to the
  scheduler after it.

Experimental: nothing here has run on a real GPU yet (see README).
"""

from __future__ import annotations

import copy

import torch
from vllm.v1.worker.gpu_worker import Worker

from kvcompress_vllm import scorers
from kvcompress_vllm.config import active_config
from kvcompress_vllm.core.geometry import head_table_bytes, max_pages_per_head
from kvcompress_vllm.log import get_logger
from kvcompress_vllm.plan import attach_stats
from kvcompress_vllm.worker.layouts import layout_for_platform
from kvcompress_vllm.worker.state import (
    METADATA_BYTES_PER_SLOT,
    HeadPool,
    KVCompressWorkerState,
    set_state,
)

logger = get_logger(__name__)

CUDA_BACKEND = "kvcompress_vllm.attention.cuda_backend.KVCompressCUDABackend"


def register_cuda_attention_backend() -> None:
    """Point vLLM's ``CUSTOM`` attention backend at ours (this process)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    register_backend(AttentionBackendEnum.CUSTOM, CUDA_BACKEND)
    _cached_get_attn_backend.cache_clear()


class DeviceWorkerState(KVCompressWorkerState):
    """The GPU worker's state: the base class's code unchanged (request
    tracking, device-side gathering and scoring, selection, compaction via
    ``ops.compact_heads``, migration via ``HeadPool.copy_pages``); a name of
    its own so the GPU path can grow device-specific parts here."""


def eviction_workspace_bytes(max_model_len: int, head_dim: int) -> int:
    """Device temporaries of one compression (``apply_eviction``): scoring a
    chunk of heads keeps its fp32 keys (key scorers) or per-KV score/sort
    temporaries within ``max(CHUNK_BYTES, 4 * C * D)``; twice that covers
    the cache-dtype gather, index tensors and the compaction pairs."""
    return 2 * max(scorers.CHUNK_BYTES, 4 * max_model_len * head_dim)


def kv_budget_after_plugin(available: int, vllm_config) -> int:
    """vLLM's device KV budget minus what KV-Compress keeps on the device.

    * per-step page-table copies (``core.geometry.head_table_bytes``, an
      upper bound: it also counts the host-side persistent tables);
    * eviction temporaries (``eviction_workspace_bytes``);
    * per KV slot, the float32 metric and int32 position next to K and V
      (``METADATA_BYTES_PER_SLOT``): the rest is split between KV pages and
      their metadata.
    """
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    heads = model.get_num_layers(parallel) * model.get_num_kv_heads(parallel)
    max_pages = max_pages_per_head(model.max_model_len, vllm_config.cache_config.block_size)
    max_seqs = vllm_config.scheduler_config.max_num_seqs
    reserved = head_table_bytes(max_seqs, heads, max_pages) + eviction_workspace_bytes(
        model.max_model_len, model.get_head_size()
    )
    if reserved >= available:
        raise ValueError(
            f"KV-Compress: page tables and eviction workspace need {reserved} bytes of "
            f"device memory (max_num_seqs={max_seqs} x {heads} (layer, KV head)s x "
            f"{max_pages} pages, max_model_len={model.max_model_len}) but the KV budget "
            f"is {available} bytes; lower max_num_seqs or max_model_len, or raise "
            "gpu_memory_utilization / kv_cache_memory_bytes"
        )
    available -= reserved
    kv_bytes = 2 * model.get_head_size() * model.dtype.itemsize
    return available * kv_bytes // (kv_bytes + METADATA_BYTES_PER_SLOT)


class KVCompressGPUWorker(Worker):
    """vLLM's GPU ``Worker`` running KV-Compress (V1 model runner)."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        self.kvc_config = active_config(vllm_config)
        if self.kvc_config is None:
            raise RuntimeError("KVCompressGPUWorker needs kv_compress enabled")
        if vllm_config.use_v2_model_runner:
            raise RuntimeError(
                "KV-Compress on CUDA runs on vLLM's V1 model runner, but this engine "
                "resolved to the V2 runner (VLLM_USE_V2_MODEL_RUNNER, or a feature "
                "that requires V2); set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        register_cuda_attention_backend()
        super().__init__(vllm_config, *args, **kwargs)
        self.kvc_state: KVCompressWorkerState | None = None

    def determine_available_memory(self) -> int:
        return kv_budget_after_plugin(super().determine_available_memory(), self.vllm_config)

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        runner = self.model_runner
        if not isinstance(runner, GPUModelRunner):
            raise RuntimeError(
                f"KV-Compress needs vLLM's V1 GPUModelRunner, got {type(runner).__name__}"
            )
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise RuntimeError(
                f"KV-Compress needs one KV-cache group, got {len(kv_cache_config.kv_cache_groups)}"
            )
        (group,) = kv_cache_config.kv_cache_groups
        layer_caches = [
            runner.compilation_config.static_forward_context[name].kv_cache
            for name in group.layer_names
        ]
        pool = HeadPool.from_layer_caches(layer_caches, layout_for_platform())
        state = DeviceWorkerState(
            self.kvc_config,
            pool,
            max_model_len=self.vllm_config.model_config.max_model_len,
            max_num_reqs=self.vllm_config.scheduler_config.max_num_seqs,
        )
        state.runner = runner
        self.kvc_state = state
        set_state(state)
        logger.info(
            "KV-Compress (CUDA, experimental): %d layers x %d KV heads x %d blocks = %d "
            "head-pages of %d tokens on %s; keep rate %.3g, scorer %s",
            pool.num_layers,
            pool.num_kv_heads,
            pool.num_blocks,
            pool.kv_pages.shape[0],
            pool.kv_pages.shape[2],
            pool.kv_pages.device,
            self.kvc_config.rate,
            self.kvc_config.scorer,
        )

    def execute_model(self, scheduler_output):
        with torch.inference_mode():
            self.kvc_state.begin_step(scheduler_output)
        output = super().execute_model(scheduler_output)
        if output is not None:
            return self._attach_stats(output)
        return output

    def sample_tokens(self, grammar_output):
        return self._attach_stats(super().sample_tokens(grammar_output))

    def _attach_stats(self, output):
        if not self.kvc_state.in_step:
            return output
        output = copy.copy(output)  # EMPTY_MODEL_RUNNER_OUTPUT is shared
        attach_stats(output, self.kvc_state.end_step())
        return output
