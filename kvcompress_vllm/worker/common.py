"""What the CPU and GPU workers share: the KV budget left after the plugin's
own memory, and the per-step wrapping around vLLM's worker.

``KVCompressWorkerMixin`` goes before vLLM's worker class in the bases
(``class KVCompressCPUWorker(KVCompressWorkerMixin, CPUWorker)``); the
subclass names its attention backend registration, its state class and the
cache layout, and whether ``begin_step`` runs under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch

from kvcompress_vllm.config import active_config
from kvcompress_vllm.core.geometry import head_table_bytes, max_pages_per_head
from kvcompress_vllm.log import get_logger
from kvcompress_vllm.plan import attach_stats
from kvcompress_vllm.worker.state import (
    METADATA_BYTES_PER_SLOT,
    HeadPool,
    KVCompressWorkerState,
    set_state,
)

logger = get_logger(__name__)


def kv_budget_after_plugin(available: int, vllm_config, workspace_bytes: int = 0) -> int:
    """vLLM's KV budget (bytes) minus what KV-Compress keeps beside it.

    * the per-request head page tables and their per-step copies
      (``core.geometry.head_table_bytes``), sized for ``max_num_seqs``;
    * ``workspace_bytes`` of eviction temporaries (device memory on GPU; on CPU
      they come from host memory outside the KV budget, so 0);
    * per KV slot, the float32 metric and int32 position next to K and V
      (``METADATA_BYTES_PER_SLOT``): the rest is split between KV pages and
      their metadata.
    """
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    heads = model.get_num_layers(parallel) * model.get_num_kv_heads(parallel)
    max_pages = max_pages_per_head(model.max_model_len, vllm_config.cache_config.block_size)
    max_seqs = vllm_config.scheduler_config.max_num_seqs
    tables = head_table_bytes(max_seqs, heads, max_pages)
    reserved = tables + workspace_bytes
    if reserved >= available:
        raise ValueError(
            f"KV-Compress: the per-request head page tables ({tables} bytes: "
            f"max_num_seqs={max_seqs} x {heads} (layer, KV head)s x {max_pages} pages) "
            f"and the eviction workspace ({workspace_bytes} bytes, "
            f"max_model_len={model.max_model_len}) need {reserved} bytes but the KV budget "
            f"is {available} bytes; lower max_num_seqs or max_model_len, or raise the KV "
            "cache space (kv_cache_memory_bytes / gpu_memory_utilization)"
        )
    available -= reserved
    kv_bytes = 2 * model.get_head_size() * model.dtype.itemsize
    return available * kv_bytes // (kv_bytes + METADATA_BYTES_PER_SLOT)


class KVCompressWorkerMixin:
    """Per-step wrapping shared by the CPU and GPU workers: ``begin_step``
    before vLLM's step, the worker stats attached to its output after."""

    #: Run ``begin_step`` under ``torch.inference_mode`` (GPU: the state's
    #: device tensors are then inference tensors like the runner's).
    begin_step_inference_mode: bool = False

    def _kvc_init(self, vllm_config, register_backend: Callable[[], None]) -> None:
        self.kvc_config = active_config(vllm_config)
        if self.kvc_config is None:
            raise RuntimeError(f"{type(self).__name__} needs kv_compress enabled")
        register_backend()
        self.kvc_state: KVCompressWorkerState | None = None

    def _install_state(
        self, kv_cache_config, layout=None,
        state_cls: type[KVCompressWorkerState] = KVCompressWorkerState,
    ) -> HeadPool:
        """View the allocated cache as head-pages and make the worker state."""
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise RuntimeError(
                f"KV-Compress needs one KV-cache group, got {len(kv_cache_config.kv_cache_groups)}"
            )
        runner = self.model_runner
        (group,) = kv_cache_config.kv_cache_groups
        layer_caches = [
            runner.compilation_config.static_forward_context[name].kv_cache
            for name in group.layer_names
        ]
        pool = HeadPool.from_layer_caches(layer_caches, layout)
        state = state_cls(
            self.kvc_config,
            pool,
            max_model_len=self.vllm_config.model_config.max_model_len,
            max_num_reqs=self.vllm_config.scheduler_config.max_num_seqs,
        )
        state.runner = runner
        self.kvc_state = state
        set_state(state)
        return pool

    def execute_model(self, scheduler_output):
        mode = torch.inference_mode() if self.begin_step_inference_mode else contextlib.nullcontext()
        with mode:
            self.kvc_state.begin_step(scheduler_output)
        output = super().execute_model(scheduler_output)
        if output is not None:
            return self._attach_stats(output)
        return output

    def sample_tokens(self, grammar_output):
        return self._attach_stats(super().sample_tokens(grammar_output))

    def _attach_stats(self, output):
        if not self.kvc_state.in_step or output is None:
            return output  # (None: no output this call; the stats go with the next)
        output = copy.copy(output)  # EMPTY_MODEL_RUNNER_OUTPUT is shared
        attach_stats(output, self.kvc_state.end_step())
        return output
