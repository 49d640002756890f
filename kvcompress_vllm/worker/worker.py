"""Worker classes (``worker_cls``) for engines with KV-Compress active.

They register the KV-Compress attention backend before the model is built,
create the worker state once vLLM has allocated the KV cache, and wrap each
step: ``begin_step`` (requests, eviction plans, compaction, page capacity)
before the forward pass, stats back to the scheduler after it.
"""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from kvcompress_vllm import ops
from kvcompress_vllm.attention.cpu_prefill import PageLayouts
from kvcompress_vllm.attention.vllm_cpu import vllm_kernel_build
from kvcompress_vllm.log import get_logger
from kvcompress_vllm.worker.common import KVCompressWorkerMixin, kv_budget_after_plugin

logger = get_logger(__name__)

CPU_BACKEND = "kvcompress_vllm.attention.cpu_backend.KVCompressCPUBackend"

def register_cpu_attention_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    _cached_get_attn_backend.cache_clear()


class KVCompressCPUWorker(KVCompressWorkerMixin, CPUWorker):
    """``CPUWorker`` running KV-Compress."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        self._kvc_init(vllm_config, register_cpu_attention_backend)
        super().__init__(vllm_config, *args, **kwargs)

    def determine_available_memory(self) -> int:
        """vLLM's KV budget minus the plugin's page tables and per-slot metadata."""
        return kv_budget_after_plugin(super().determine_available_memory(), self.vllm_config)

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        pool = self._install_state(kv_cache_config)
        _, _, block_size, head_dim = pool.kv_pages.shape
        layouts = PageLayouts.decide(pool.kv_pages.dtype, block_size, head_dim,
                                     self.vllm_config.cache_config.cache_dtype)
        # Requests whose metric is never read stay in vLLM's in-page layout and
        # are attended by vLLM's kernel (attention/cpu_packed.py); so do those
        # that record the metric where our kernel reads it; the decode rows of
        # the former run on our kernel where it reads the layout fast.
        pool.packing = layouts.packing
        pool.metric_packed = layouts.metric_packed
        pool.decode_ours = layouts.decode_ours
        if layouts.packing is not None:
            logger.info(
                "KV-Compress: %s requests stay in vLLM's %s page layout (our kernel: %s "
                "path, vLLM's: %s; decode rows of metric-free requests on %s kernel)",
                "all compressible" if pool.metric_packed else "metric-free",
                layouts.packing.isa, ops.cpu_isa(), vllm_kernel_build(),
                "our" if pool.decode_ours else "vLLM's",
            )
        # With prefix caching a block one request wrote may be read by another:
        # every request must be in one layout (create_engine_config checked the
        # same decision before the engine started).
        layouts.check_prefix_caching(self.vllm_config.cache_config.enable_prefix_caching)
        logger.info(
            "KV-Compress: %d layers x %d KV heads x %d blocks = %d head-pages of %d "
            "tokens; keep rate %.3g, scorer %s",
            pool.num_layers,
            pool.num_kv_heads,
            pool.num_blocks,
            pool.kv_pages.shape[0],
            pool.kv_pages.shape[2],
            self.kvc_config.rate,
            self.kvc_config.scorer,
        )
