"""The CUDA backend and GPU worker state driven the way vLLM's V1 GPU runner
drives them, without an engine (helpers for ``test_cuda_backend.py``).

* The KV cache is allocated by vLLM's own ``allocate_kv_cache`` (the function
  the V1 GPU runner calls) for our backend's spec and layout (``LBHNC``): one
  buffer, every layer a ``[B, H, N, 2D]`` view.
* ``Harness.schedule`` plays the scheduler: it hands out blocks from a
  shuffled free list, applies block-aligned evictions with exactly the
  scheduler's accounting (``core.PageGeometry``), releases tail blocks and
  builds real vLLM ``SchedulerOutput`` objects carrying the ``StepPlan``.
* ``Harness.forward`` plays the runner: ``begin_step``, the batch order in
  ``runner.input_batch.req_ids``, a ``CommonAttentionMetadata``-shaped
  object, the metadata builder once per step and the impl once per layer.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import torch
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
)
from vllm.v1.worker.utils import allocate_kv_cache

from kvcompress_vllm.attention.cuda_backend import KVCompressCUDABackend
from kvcompress_vllm.config import KVCompressConfig
from kvcompress_vllm.core import PageGeometry
from kvcompress_vllm.ops import reference
from kvcompress_vllm.plan import EvictionPlan, StepPlan
from kvcompress_vllm.worker.gpu_worker import DeviceWorkerState
from kvcompress_vllm.worker.layouts import LBHNC
from kvcompress_vllm.worker.state import HeadPool, set_state


def layer_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]


def allocate_gpu_layout(num_layers, num_blocks, num_kv_heads, block_size, head_dim, dtype, device):
    """Per-layer caches as vLLM's V1 GPU runner allocates them for our backend."""
    spec = KVCompressCUDABackend.customize_spec(
        FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv_heads,
                          head_size=head_dim, dtype=dtype)
    )
    names = layer_names(num_layers)
    page = spec.page_size_bytes
    config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * num_blocks * num_layers, layers=names,
                                        layer_stride=page * num_blocks, block_stride=page)],
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
    )
    caches = allocate_kv_cache(config, device, KVCompressCUDABackend.supported_kv_cache_layouts()[0])
    return spec, [caches[n] for n in names]


class Harness:
    def __init__(self, *, num_layers=2, num_blocks=40, num_kv_heads=2, group=1, head_dim=32,
                 block_size=16, dtype=torch.float32, device=torch.device("cpu"),
                 max_model_len=256, seed=0, scorer="kvcompress", allocation="joint", **cfg):
        self.L, self.H, self.G, self.D, self.N = num_layers, num_kv_heads, group, head_dim, block_size
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator().manual_seed(seed)
        self.spec, self.layer_caches = allocate_gpu_layout(
            num_layers, num_blocks, num_kv_heads, block_size, head_dim, dtype, device)
        # Garbage in never-written slots, so a read of one shows up.
        for cache in self.layer_caches:
            cache.copy_(torch.randn(cache.shape, generator=self.gen).to(dtype))
        self.cfg = KVCompressConfig(**cfg)
        self.scorer, self.allocation = scorer, allocation
        pool = HeadPool.from_layer_caches(self.layer_caches, LBHNC)
        self.state = DeviceWorkerState(self.cfg, pool, max_model_len=max_model_len, max_num_reqs=8)
        self.state.runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=[]))
        set_state(self.state)
        self.geom = PageGeometry(block_size, num_layers * num_kv_heads)
        self.free = torch.randperm(num_blocks, generator=self.gen).tolist()
        self.reqs: dict[str, dict] = {}
        backend = KVCompressCUDABackend
        self.builder = backend.get_builder_cls()(self.spec, layer_names(num_layers), None, device)
        self.impls = [
            backend.get_impl_cls()(num_kv_heads * group, head_dim, head_dim**-0.5, num_kv_heads)
            for _ in range(num_layers)
        ]

    # -- scheduler side ----------------------------------------------------
    def _alloc(self, count: int) -> list[int]:
        if count > len(self.free):
            raise RuntimeError(f"test harness ran out of blocks ({count} > {len(self.free)})")
        out, self.free = self.free[:count], self.free[count:]
        return out

    def schedule(self, tokens: dict[str, int], *, new=(), evict=None, finished=()):
        """One scheduler step: ``evict[rid]`` head-pages of running requests
        (planned on the tokens already in the cache), then ``tokens[rid]``
        new tokens; requests in ``new`` start their prefill (prompt length
        ``new[rid]``)."""
        evict = dict(evict or {})
        new = dict(new)
        for rid in finished:
            self.free.extend(self.reqs.pop(rid)["blocks"])
        plans = []
        for rid, pages in evict.items():
            r = self.reqs[rid]
            n, evicted = r["tokens"], r["evicted"] + pages
            keep = self.geom.blocks_needed(n, evicted)
            released = r["blocks"][keep:]
            plans.append(EvictionPlan(
                req_id=rid, num_pages=pages, num_tokens=n,
                pages_after=self.geom.pages_in_use(n, evicted),
                released_block_ids=tuple(released), protected_window=self.cfg.protected_window,
                sink_tokens=self.cfg.sink_tokens, scorer=self.scorer, allocation=self.allocation))
            r["blocks"], r["evicted"] = r["blocks"][:keep], evicted
            self.free.extend(released)
        new_reqs, cached_ids, cached_blocks, prefill_ends = [], [], [], {}
        for rid, t in tokens.items():
            if rid in new:
                blocks = self._alloc(self.geom.blocks_needed(t, 0))
                self.reqs[rid] = dict(blocks=blocks, tokens=t, evicted=0)
                prefill_ends[rid] = new[rid]
                new_reqs.append(NewRequestData(
                    req_id=rid, prompt_token_ids=[0] * new[rid], mm_features=[],
                    sampling_params=None, pooling_params=None, block_ids=(list(blocks),),
                    num_computed_tokens=0, lora_request=None))
            else:
                r = self.reqs[rid]
                need = self.geom.blocks_needed(r["tokens"] + t, r["evicted"]) - len(r["blocks"])
                blocks = self._alloc(max(0, need))
                r["blocks"] += blocks
                r["tokens"] += t
                cached_ids.append(rid)
                cached_blocks.append((list(blocks),) if blocks else None)
        cached = CachedRequestData(
            req_ids=cached_ids, resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
            new_block_ids=cached_blocks, num_computed_tokens=[0] * len(cached_ids),
            num_output_tokens=[0] * len(cached_ids))
        so = SchedulerOutput(
            scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached,
            num_scheduled_tokens=dict(tokens), total_num_scheduled_tokens=sum(tokens.values()),
            scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
            finished_req_ids=set(finished), free_encoder_mm_hashes=[])
        so.kv_compress = StepPlan(evictions=plans, prefill_ends=prefill_ends)
        return so

    # -- runner side -------------------------------------------------------
    def begin(self, so) -> None:
        self.state.begin_step(so)

    def qkv(self, num_tokens: int):
        g = self.gen
        q = torch.randn(num_tokens, self.H * self.G, self.D, generator=g).to(self.dtype)
        k = torch.randn(num_tokens, self.H, self.D, generator=g).to(self.dtype)
        v = torch.randn(num_tokens, self.H, self.D, generator=g).to(self.dtype)
        return q, k, v

    def build(self, req_ids: list[str]):
        """The builder's metadata for the batch order ``req_ids``."""
        self.state.runner.input_batch.req_ids = list(req_ids)
        lens = [self.state.table.requests[r].step_tokens for r in req_ids]
        qsl = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0).to(torch.int32)
        common = SimpleNamespace(
            num_reqs=len(req_ids), num_actual_tokens=int(qsl[-1]),
            query_start_loc=qsl.to(self.device), query_start_loc_cpu=qsl)
        return self.builder.build(0, common)

    def forward(self, req_ids: list[str], pad_tokens: int = 3):
        """Builder once, impl per layer (with ``pad_tokens`` padding rows like
        a CUDA-graph-padded batch).  Returns ``(metadata, [(q, k, v, out)] per
        layer)`` with the pool before the step in ``self.before``."""
        meta = self.build(req_ids)
        pool = self.state.pool
        self.before = [t.clone() for t in (pool.kv_pages, pool.metrics, pool.positions)]
        results = []
        t = meta.num_actual_tokens
        for layer in range(self.L):
            q, k, v = self.qkv(t + pad_tokens)
            q, k, v = q.to(self.device), k.to(self.device), v.to(self.device)
            out = torch.full_like(q, float("nan"))
            self.impls[layer].forward(None, q, k, v, self.layer_caches[layer], meta, out)
            results.append((q[:t].cpu(), k[:t].cpu(), v[:t].cpu(), out[:t].cpu()))
        return meta, results

    def reference_step(self, meta, results):
        """The same step with the PyTorch reference on a copy of the pool taken
        before it: (kv_pages, metrics, positions, outputs per layer)."""
        kv, metrics, positions = (t.cpu().clone() for t in self.before)
        batch = meta.batch
        ref_state = copy.copy(self.state)
        ref_state.pool = dataclasses.replace(self.state.pool, kv_pages=kv, metrics=metrics,
                                             positions=positions)
        outs = []
        for layer, (q, k, v, _) in enumerate(results):
            reference.write_kv(k, v, kv, batch.write_slots[layer], metrics, positions,
                               batch.token_positions)
            out = torch.zeros_like(q)
            reference.paged_head_attention(
                q, kv, batch.page_table[layer], batch.kv_lens[layer], batch.query_start_loc,
                self.D**-0.5, metrics if batch.record_metrics else None, batch.metric_q_start, out)
            if batch.pool_rows:
                ref_state.pool_prompt_metrics(batch, layer)
            outs.append(out)
        return kv, metrics, positions, outs

    def head_kvs(self, rid: str) -> dict:
        """{(layer, head): {position: (k, v)}} of everything a request holds."""
        table, pool = self.state.table, self.state.pool
        req = table.requests[rid]
        kv_pages, positions = pool.kv_pages.cpu(), pool.positions.cpu()
        out = {}
        for layer in range(self.L):
            for h in range(self.H):
                n = int(table.kv_count[req.slot, layer, h])
                pages = table.page_table[req.slot, layer, h]
                kvs = {}
                for j in range(n):
                    p, s = int(pages[j // self.N]), j % self.N
                    kvs[int(positions[p, s])] = (kv_pages[p, 0, s].clone(), kv_pages[p, 1, s].clone())
                out[layer, h] = kvs
        return out

    def end(self):
        return self.state.end_step()

