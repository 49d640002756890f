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
* wraps each step (``worker.common.KVCompressWorkerMixin``, shared with the
  CPU worker): ``begin_step`` before the forward pass, stats back to the
  scheduler after it.

Experimental: nothing here has run on a real GPU yet (see README).
"""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from kvcompress_vllm import scorers
from kvcompress_vllm.config import active_config
from kvcompress_vllm.log import get_logger
from kvcompress_vllm.worker.common import KVCompressWorkerMixin, kv_budget_after_plugin
from kvcompress_vllm.worker.layouts import layout_for_platform
from kvcompress_vllm.worker.state import KVCompressWorkerState

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


def gpu_workspace_bytes(max_model_len: int, head_dim: int) -> int:
    """What the GPU worker keeps out of the KV budget besides the per-slot
    metadata and page tables: one compression's temporaries and decode
    attention's score scratch (``triton_kernels.DECODE_SCORES_BYTES``)."""
    from kvcompress_vllm.triton_kernels import DECODE_SCORES_BYTES

    return eviction_workspace_bytes(max_model_len, head_dim) + DECODE_SCORES_BYTES


class KVCompressGPUWorker(KVCompressWorkerMixin, Worker):
    """vLLM's GPU ``Worker`` running KV-Compress (V1 model runner)."""

    begin_step_inference_mode = True

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        if active_config(vllm_config) is not None and vllm_config.use_v2_model_runner:
            raise RuntimeError(
                "KV-Compress on CUDA runs on vLLM's V1 model runner, but this engine "
                "resolved to the V2 runner (VLLM_USE_V2_MODEL_RUNNER, or a feature "
                "that requires V2); set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        self._kvc_init(vllm_config, register_cuda_attention_backend)
        super().__init__(vllm_config, *args, **kwargs)

    def determine_available_memory(self) -> int:
        model = self.vllm_config.model_config
        workspace = gpu_workspace_bytes(model.max_model_len, model.get_head_size())
        return kv_budget_after_plugin(
            super().determine_available_memory(), self.vllm_config, workspace
        )

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        if not isinstance(self.model_runner, GPUModelRunner):
            raise RuntimeError(
                "KV-Compress needs vLLM's V1 GPUModelRunner, got "
                f"{type(self.model_runner).__name__}"
            )
        pool = self._install_state(kv_cache_config, layout_for_platform(), DeviceWorkerState)
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
