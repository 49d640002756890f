"""Worker classes (``worker_cls``) for engines with KV-Compress active.

They register the KV-Compress attention backend before the model is built,
create the worker state once vLLM has allocated the KV cache, and wrap each
step: ``begin_step`` (requests, eviction plans, compaction, page capacity)
before the forward pass, stats back to the scheduler after it.
"""

from __future__ import annotations

import copy

from vllm.v1.worker.cpu_worker import CPUWorker

from kvcompress_vllm.config import active_config
from kvcompress_vllm.log import get_logger
from kvcompress_vllm.plan import attach_stats
from kvcompress_vllm.core.geometry import head_table_bytes, max_pages_per_head
from kvcompress_vllm.worker.state import (
    METADATA_BYTES_PER_SLOT,
    HeadPool,
    KVCompressWorkerState,
    set_state,
)

logger = get_logger(__name__)

CPU_BACKEND = "kvcompress_vllm.attention.cpu_backend.KVCompressCPUBackend"

def register_cpu_attention_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import _cached_get_attn_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    _cached_get_attn_backend.cache_clear()


class KVCompressCPUWorker(CPUWorker):
    """``CPUWorker`` running KV-Compress."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        self.kvc_config = active_config(vllm_config)
        if self.kvc_config is None:
            raise RuntimeError("KVCompressCPUWorker needs kv_compress enabled")
        register_cpu_attention_backend()
        super().__init__(vllm_config, *args, **kwargs)
        self.kvc_state: KVCompressWorkerState | None = None

    def determine_available_memory(self) -> int:
        """vLLM's KV budget minus the plugin's own per-sequence memory.

        * The per-request head page tables and their per-step copies
          (``core.geometry.head_table_bytes``), sized for ``max_num_seqs``.
        * The per-slot metric and position next to each K/V pair
          (``METADATA_BYTES_PER_SLOT``): the rest is split between KV pages
          and their metadata.
        """
        available = super().determine_available_memory()
        config = self.vllm_config
        model = config.model_config
        heads = model.get_num_layers(config.parallel_config) * model.get_num_kv_heads(
            config.parallel_config
        )
        max_pages = max_pages_per_head(model.max_model_len, config.cache_config.block_size)
        max_seqs = config.scheduler_config.max_num_seqs
        table_bytes = head_table_bytes(max_seqs, heads, max_pages)
        if table_bytes >= available:
            raise ValueError(
                f"KV-Compress: the per-request head page tables need {table_bytes} bytes "
                f"(max_num_seqs={max_seqs} x {heads} (layer, KV head)s x {max_pages} pages) "
                f"but the KV budget is {available} bytes; lower max_num_seqs or "
                "max_model_len, or raise the KV cache space"
            )
        available -= table_bytes
        kv_bytes = 2 * model.get_head_size() * model.dtype.itemsize
        return available * kv_bytes // (kv_bytes + METADATA_BYTES_PER_SLOT)

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        runner = self.model_runner
        (group,) = kv_cache_config.kv_cache_groups
        layer_caches = [
            runner.compilation_config.static_forward_context[name].kv_cache
            for name in group.layer_names
        ]
        pool = HeadPool.from_layer_caches(layer_caches)
        state = KVCompressWorkerState(
            self.kvc_config,
            pool,
            max_model_len=self.vllm_config.model_config.max_model_len,
            max_num_reqs=self.vllm_config.scheduler_config.max_num_seqs,
        )
        state.runner = runner
        self.kvc_state = state
        set_state(state)
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

    def execute_model(self, scheduler_output):
        state = self.kvc_state
        state.begin_step(scheduler_output)
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
