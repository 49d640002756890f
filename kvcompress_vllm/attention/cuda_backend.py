"""KV-Compress attention backend for CUDA (vLLM's ``CUSTOM`` backend slot).

Registered as ``AttentionBackendEnum.CUSTOM`` by the GPU worker
(``worker/gpu_worker.py``) in engines with KV-Compress active, which
``engine_args.create_engine_config`` selects with ``attention_config.backend
= CUSTOM`` (the same as ``--attention-backend CUSTOM``).  A plain vLLM engine
in the same environment never sees it.

* **Cache layout** (``KVCompressCUDABackend.supported_kv_cache_layouts``):
  ``LBHNC`` only, so vLLM allocates every layer as a contiguous
  ``[B, H, N, 2D]`` region of one shared buffer and each (block, KV head) is
  one contiguous ``[2, N, D]`` head-page (``worker/layouts.py``).  The worker
  views the whole buffer as ``kv_pages [L*B*H, 2, N, D]`` with
  ``page_id = (l*B + b)*H + h``, the view the Triton kernels take.
* **Metadata builder**: once per step (all layers share the object) it asks
  the worker state for the step's per-(layer, request, KV head) page tables,
  KV counts and write slots (``KVCompressWorkerState.build_batch``, batched
  tensor ops on the host) and copies them to the device in one go.
* **Impl**: per layer, ``ops.write_kv`` stores the step's K/V in every head's
  next slot and ``ops.paged_head_attention`` attends over each head's own
  pages with the eviction metric fused into the same kernel; on CUDA tensors
  ``ops`` runs the Triton kernels (``kvcompress_vllm.triton_kernels``).
  Requests whose prompt completes in the step get their prompt metric
  max-pooled (``KVCompressWorkerState.pool_prompt_metrics``).

CUDA graphs: the builder reports ``AttentionCGSupport.NEVER``, so vLLM runs
attention eagerly between piecewise graphs (or without graphs).  Profiling
and warm-up runs (no registered requests) write nothing and return zeros, as
vLLM's own backends do.

Status: experimental -- verified only under the Triton interpreter on CPU
tensors and by compiling the kernels for sm_80/sm_90 (see README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kvcompress_vllm import ops
from kvcompress_vllm.worker.layouts import LBHNC, to_kvcompress_spec
from kvcompress_vllm.worker.state import AttentionBatch, get_state

#: Head sizes the Triton kernels are compiled and tested for (power of two;
#: 256 compiles for sm_80/sm_90 but spills and exceeds sm_86/sm_89 shared
#: memory at prefill tiles, so it is not offered).
HEAD_SIZES = (32, 64, 128)


@dataclass
class DeviceBatch:
    """``AttentionBatch``'s kernel inputs on the device (one set per step)."""

    page_table: torch.Tensor  # [L, R, H, width] int32
    kv_lens: torch.Tensor  # [L, R, H] int32
    write_slots: torch.Tensor  # [L, T, H] int64
    token_positions: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [R + 1] int32
    metric_q_start: torch.Tensor  # [R] int32
    metric_k_start: torch.Tensor | None  # [R] int32

    @classmethod
    def from_host(cls, batch: AttentionBatch, device: torch.device) -> "DeviceBatch":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return cls(
            page_table=move(batch.page_table),
            kv_lens=move(batch.kv_lens),
            write_slots=move(batch.write_slots),
            token_positions=move(batch.token_positions),
            query_start_loc=move(batch.query_start_loc),
            metric_q_start=move(batch.metric_q_start),
            metric_k_start=(None if batch.metric_k_start is None
                            else move(batch.metric_k_start)),
        )


@dataclass
class KVCompressCUDAMetadata:
    """One step's metadata (all layers share it).  ``batch`` is None in
    profiling / warm-up runs, which have no KV-Compress requests."""

    num_actual_tokens: int
    batch: AttentionBatch | None  # host tensors (pooling reads them)
    device_batch: DeviceBatch | None  # the same on the KV cache's device


class KVCompressCUDABackend(AttentionBackend):
    # K/V are written per head inside forward(), not through vLLM's slot mapping.
    forward_includes_kv_cache_update: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        # The layer looks its backend up as AttentionBackendEnum[get_name()].
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # A kernel block must be the whole vLLM block (a page is one block of
        # one head); MultipleOf keeps vLLM from splitting blocks.  The Triton
        # kernels also need a power of two, checked by create_engine_config.
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(HEAD_SIZES)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (LBHNC.vllm_layout,)

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        # bf16 tensor-core dots; the kernels are compile-checked for sm_80/sm_90.
        return capability is not None and capability.major >= 8

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return to_kvcompress_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls() -> type["KVCompressCUDAImpl"]:
        return KVCompressCUDAImpl

    @staticmethod
    def get_builder_cls() -> type["KVCompressCUDAMetadataBuilder"]:
        return KVCompressCUDAMetadataBuilder


class KVCompressCUDAMetadataBuilder(AttentionMetadataBuilder[KVCompressCUDAMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._last: tuple[AttentionBatch, DeviceBatch] | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        num_tokens = common_attn_metadata.num_actual_tokens
        state = get_state()
        if state is None or not state.in_step:
            # Profiling / warm-up: no KV-Compress requests exist yet.
            return KVCompressCUDAMetadata(num_tokens, None, None)
        num_reqs = common_attn_metadata.num_reqs
        req_ids = state.runner.input_batch.req_ids[:num_reqs]
        qsl = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1]
        batch = state.build_batch(req_ids, qsl)  # cached per step by the state
        if self._last is None or self._last[0] is not batch:
            self._last = (batch, DeviceBatch.from_host(batch, self.device))
        return KVCompressCUDAMetadata(num_tokens, batch, self._last[1])


class KVCompressCUDAImpl(AttentionImpl[KVCompressCUDAMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **extra,
    ) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding window": sliding_window is not None and sliding_window != -1,
            "logits soft-cap": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"KV cache dtype {kv_cache_dtype}": kv_cache_dtype not in ("auto", "float16", "bfloat16"),
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
            f"head size {head_size} (supported: {', '.join(map(str, HEAD_SIZES))})":
                head_size not in HEAD_SIZES,
            f"{num_heads} query heads for {self.num_kv_heads} KV heads":
                self.num_kv_heads <= 0 or num_heads % self.num_kv_heads != 0,
            f"options {sorted(extra)}": bool(extra),
        }
        bad = [name for name, present in unsupported.items() if present]
        if bad:
            raise ValueError(f"KV-Compress (CUDA backend) does not support: {', '.join(bad)}")
        self._region: int | None = None

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KVCompressCUDAMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("KV-Compress (CUDA backend): fused output quantization")
        if attn_metadata is None or attn_metadata.batch is None:
            return output.fill_(0)  # profiling / warm-up run
        state = get_state()
        pool = state.pool
        if self._region is None:
            region = pool.region_of(kv_cache)
            if not 0 <= region < pool.num_layers:
                raise RuntimeError(
                    f"KV-Compress: layer cache at offset {kv_cache.data_ptr() - pool.kv_pages.data_ptr()} "
                    f"bytes is outside the head-page pool of {pool.num_layers} layers"
                )
            self._region = region
        region = self._region
        host, dev = attn_metadata.batch, attn_metadata.device_batch
        num_tokens = attn_metadata.num_actual_tokens
        ops.write_kv(
            key[:num_tokens],
            value[:num_tokens],
            pool.kv_pages,
            dev.write_slots[region],
            pool.metrics,
            pool.positions,
            dev.token_positions,
        )
        ops.paged_head_attention(
            query[:num_tokens],
            pool.kv_pages,
            dev.page_table[region],
            dev.kv_lens[region],
            dev.query_start_loc,
            self.scale,
            pool.metrics if host.record_metrics else None,
            dev.metric_q_start,
            output[:num_tokens],
            metric_k_start=dev.metric_k_start,
        )
        if host.pool_rows:
            state.pool_prompt_metrics(host, region)
        return output
