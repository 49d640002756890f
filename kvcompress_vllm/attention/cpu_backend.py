"""KV-Compress attention backend for vLLM's CPU platform (overrides CPU_ATTN).

Registered only in worker processes of engines with KV-Compress active (see
``kvcompress_vllm.worker.worker``), so a plain vLLM engine in the same
environment never sees it.

Per layer and step, ``forward``:
1. writes the step's K/V of every (token, KV head) into that head's next slot
   (``ops.write_kv``; the slot comes from the head's own page table) -- in
   vLLM's in-page layout for packed requests (``cpu_packed``: those whose
   metric is never read, and where our kernel reads that layout those that
   record it too), and for requests that are never compressed in vLLM's
   layout at vLLM's slots (``cpu_prefill.write_kv_split``),
2. runs attention over each head's variable number of KVs, query heads of a
   GQA group reading their KV head's pages once, and adds each query's
   squared attention probabilities (summed over the group) to the metric of
   every KV it attends to (``ops.paged_head_attention``),
3. max-pools the prompt metric along keys for requests whose prompt just
   completed.

Prefill rows that add nothing to the metric (all rows of a chunk before the
observation window) go to vLLM's own CPU kernel instead, AMX where the CPU has
it, and so do all rows of requests that are never compressed, whose K/V stay in
vLLM's own layout (``cpu_prefill``), and the rows of packed requests before
their observation window (all rows when the metric is never read), one
sequence per KV head (``cpu_packed``; the split is planned once per step by
the builder).

The stock CPU path (vLLM's metadata, cache write and kernel) runs warm-up and
profiling steps (no registered requests) and every step whose requests are all
never compressed, once the builder has checked that vLLM's metadata agrees
with the worker's bookkeeping (``KVCompressWorkerState.check_stock_only``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
    _get_attn_isa,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from kvcompress_vllm import ops
from kvcompress_vllm.attention.cpu_packed import plan_packed
from kvcompress_vllm.attention.cpu_prefill import (
    SCRATCH_BLOCK,
    StockKernel,
    StockPrefill,
    VllmInputs,
    plan_stock_prefill,
    prefill_path,
    run_split,
    write_kv_split,
)
from kvcompress_vllm.worker.layouts import to_kvcompress_spec
from kvcompress_vllm.worker.state import AttentionBatch, get_state


@dataclass
class KVCompressMetadata:
    """Metadata of a step with some request in our layout (all layers share
    it); a step of never-compressed requests only gets vLLM's own."""

    num_actual_tokens: int
    batch: AttentionBatch
    #: Rows vLLM's kernel computes: prefill rows gathered from our pages, and
    #: every row (prefill or decode) of never-compressed requests (None: none).
    stock_prefill: StockPrefill | None


class KVCompressCPUBackend(CPUAttentionBackend):
    # K/V are written inside forward(): per head for requests in our layout,
    # through vLLM's slot mapping only for never-compressed requests.
    forward_includes_kv_cache_update: bool = True

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return to_kvcompress_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls() -> type["KVCompressCPUImpl"]:
        return KVCompressCPUImpl

    @staticmethod
    def get_builder_cls() -> type["KVCompressCPUMetadataBuilder"]:
        return KVCompressCPUMetadataBuilder


class KVCompressCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stock_kernel = (
            StockKernel(
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                dtype=self.dtype,
                isa=_get_attn_isa(self.dtype, SCRATCH_BLOCK, self.head_dim, self.kv_cache_dtype),
                split_kv=envs.VLLM_CPU_ATTN_SPLIT_KV,
            )
            if prefill_path() == "vllm"
            else None
        )
        # vLLM's kernel over head-pages in vLLM's layout: the ISA of its blocks.
        self._packed_kernel = (None if self._stock_kernel is None
                               else dataclasses.replace(self._stock_kernel, isa=self.isa))

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        state = get_state()
        if state is None or not state.in_step:
            # Profiling / warm-up: no KV-Compress requests exist yet.
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        num_tokens = common_attn_metadata.num_actual_tokens
        req_ids = state.runner.input_batch.req_ids[:num_reqs]
        qsl = common_attn_metadata.query_start_loc_cpu[: num_reqs + 1]

        def vllm_inputs(stock_layout: torch.Tensor) -> VllmInputs:
            return VllmInputs(
                stock_layout=stock_layout,
                seq_lens=common_attn_metadata.seq_lens[:num_reqs],
                block_table=common_attn_metadata.block_table_tensor[:num_reqs],
                slot_mapping=common_attn_metadata.slot_mapping[:num_tokens],
                isa=self.isa,
            )

        if self._stock_kernel is not None and state.check_stock_only(
            req_ids, qsl, common_attn_metadata.seq_lens[:num_reqs],
            common_attn_metadata.block_table_tensor,
        ):
            # All never compressed: vLLM's own metadata, cache write and kernel
            # (``forward``'s stock path), as a stock engine runs the step.
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        batch = state.build_batch(req_ids, qsl)
        stock = None
        if self._stock_kernel is not None:
            any_stock = batch.stock_layout is not None
            packed = None
            if batch.packed is not None:
                self._check_packing(state.pool.packing)
                packed = plan_packed(
                    batch.packed, batch.page_table, batch.kv_lens, batch.query_start_loc,
                    self._packed_kernel,
                    state.pool.kv_pages, req_ids, batch.metric_q_start,
                    decode_ours=state.pool.decode_ours,
                )
            stock = plan_stock_prefill(
                batch.page_table, batch.kv_lens, batch.query_start_loc,
                batch.metric_q_start, batch.record_metrics, state.block_size,
                self._stock_kernel,
                vllm_inputs=vllm_inputs(batch.stock_layout) if any_stock else None,
                packed=packed,
            )
        return KVCompressMetadata(num_actual_tokens=num_tokens, batch=batch, stock_prefill=stock)

    def _check_packing(self, packing) -> None:
        """The pool's packing must be the one vLLM's kernel reads in this group."""
        kernel = self._stock_kernel
        if packing is None or (packing.isa, packing.dtype, packing.head_dim) != (
            self.isa, kernel.dtype, kernel.head_dim
        ):
            raise RuntimeError(
                f"KV-Compress: requests in vLLM's layout, but the pool's packing "
                f"{None if packing is None else (packing.isa, packing.dtype, packing.head_dim)} "
                f"is not vLLM's kernel's ({self.isa}, {kernel.dtype}, {kernel.head_dim})"
            )


class KVCompressCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        unsupported = {
            "ALiBi": self.alibi_slopes is not None,
            "sliding window": self.sliding_window != -1,
            "logits soft-cap": bool(self.logits_soft_cap),
            "attention sinks": self.sinks is not None,
            "KV sharing across layers": self.kv_sharing_target_layer_name is not None,
            "quantized KV cache": self.is_fp8_kv_cache,
            f"attention type {self.attn_type}": self.attn_type != "decoder",
        }
        bad = [name for name, present in unsupported.items() if present]
        if bad:
            raise ValueError(f"KV-Compress does not support: {', '.join(bad)}")
        self._region: int | None = None

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not isinstance(attn_metadata, KVCompressMetadata):
            if isinstance(attn_metadata, CPUAttentionMetadata):
                n = attn_metadata.slot_mapping.shape[0]  # the rows vLLM's metadata maps
                self.do_kv_cache_update(layer, key[:n], value[:n], kv_cache,
                                        attn_metadata.slot_mapping)
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale, output_block_scale,
            )
        num_tokens = attn_metadata.num_actual_tokens
        state = get_state()
        pool = state.pool
        if self._region is None:
            self._region = pool.region_of(kv_cache)
        region = self._region
        batch = attn_metadata.batch
        write_kv_split(
            attn_metadata.stock_prefill,
            key[:num_tokens],
            value[:num_tokens],
            kv_cache,
            pool.kv_pages,
            batch.write_slots[region],
            pool.metrics,
            pool.positions,
            batch.token_positions,
            packing=pool.packing,
        )
        metrics = pool.metrics if batch.record_metrics else None
        if attn_metadata.stock_prefill is not None:
            run_split(
                attn_metadata.stock_prefill, region, query[:num_tokens], pool.kv_pages,
                batch.page_table[region], batch.kv_lens[region], self.scale, metrics,
                output[:num_tokens], kv_cache=kv_cache,
                packing=None if pool.packing is None else pool.packing.offsets,
                metric_k_start=batch.metric_k_start,
            )
        else:
            ops.paged_head_attention(
                query[:num_tokens],
                pool.kv_pages,
                batch.page_table[region],
                batch.kv_lens[region],
                batch.query_start_loc,
                self.scale,
                metrics,
                batch.metric_q_start,
                output[:num_tokens],
                metric_k_start=batch.metric_k_start,
            )
        if batch.pool_rows:
            state.pool_prompt_metrics(batch, region)
        return output
