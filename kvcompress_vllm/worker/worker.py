"""Worker classes (``worker_cls``) for engines with KV-Compress active.

They register the KV-Compress attention backend before the model is built,
create the worker state once vLLM has allocated the KV cache, and wrap each
step: ``begin_step`` (requests, eviction plans, compaction, page capacity)
before the forward pass, stats back to the scheduler after it.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
from vllm.v1.worker.cpu_worker import CPUWorker

from kvcompress_vllm import ops
from kvcompress_vllm.attention.cpu_packed import (
    PagePacking,
    metric_pages_packed,
    packed_decode_ours,
)
from kvcompress_vllm.attention.cpu_prefill import prefill_path
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
        if prefill_path() == "vllm":
            # Requests whose metric is never read stay in vLLM's in-page layout
            # and are attended by vLLM's kernel (attention/cpu_packed.py).
            _, _, block_size, head_dim = pool.kv_pages.shape
            isa = _get_attn_isa(
                pool.kv_pages.dtype, block_size, head_dim, self.vllm_config.cache_config.cache_dtype
            )
            pool.packing = PagePacking.learn(pool.kv_pages.dtype, block_size, head_dim, isa)
            # So do requests that record the metric where our kernel reads it.
            pool.metric_packed = metric_pages_packed(pool.packing)
            # Their decode rows run on our kernel too where it reads it fast.
            pool.decode_ours = packed_decode_ours(pool.packing)
            logger.info(
                "KV-Compress: %s requests stay in vLLM's %s page layout (our kernel: %s "
                "path, vLLM's: %s; decode rows of metric-free requests on %s kernel)",
                "all compressible" if pool.metric_packed else "metric-free", isa,
                ops.cpu_isa(), vllm_kernel_build(), "our" if pool.decode_ours else "vLLM's",
            )
        check_prefix_caching_layout(self.vllm_config.cache_config.enable_prefix_caching, pool)
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


def check_prefix_caching_layout(enable_prefix_caching: bool, pool) -> None:
    """With prefix caching, a block one request wrote may be read by another,
    so every request's pages must be in one layout: our plain one (no
    packing: our prefill path for every request), or vLLM's, which requests
    that record the metric keep only where our kernel reads it
    (``HeadPool.metric_packed``).  Raises, naming the flag, otherwise."""
    if enable_prefix_caching and pool.packing is not None and not pool.metric_packed:
        raise RuntimeError(
            "KV-Compress with --enable-prefix-caching needs every request's pages in "
            "vLLM's layout, which our kernel does not read with the metric here "
            f"(prefill path {prefill_path()}, vLLM's layout "
            f"{'none' if pool.packing is None else pool.packing.isa}, our kernel's "
            f"path {ops.cpu_isa()}): drop --enable-prefix-caching, or set "
            "KVCOMPRESS_METRIC_PAGES=packed (all in vLLM's layout) or KVCOMPRESS_CPU_PREFILL=own "
            "(all in ours)"
        )
