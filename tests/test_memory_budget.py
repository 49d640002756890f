"""Peak memory of one compression stays bounded at long context.

A 32768-token request on a Llama-3-8B-like KV shape (32 layers, 8 KV heads,
head_dim 128, block size 128, bf16: a 4.3 GB pool) is compressed at keep rate
0.25 with every scorer and both allocation modes.  The growth of the peak RSS
during ``KVCompressWorkerState.apply_eviction`` alone must stay under
``PEAK_BOUND_BYTES``.  Runs in a subprocess so that this process's memory is
untouched (and the peak is that of the compression only).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 128
TOKENS = 32768
ROWS = LAYERS * KV_HEADS  # R: (layer, KV head) rows of the request
CACHE_ELEMENT = 2  # bf16
CHUNK_BYTES = 64 << 20  # kvcompress_vllm.scorers.CHUNK_BYTES (checked in the child)

#: The documented bound (``KVCompressWorkerState.apply_eviction``,
#: ``kvcompress_vllm.scorers.base``):
#:   order int32 [R, C] + unit costs float32 [R, C/N]   4*R*C*(1 + 1/N)   =  32.25 MiB
#:   one chunk: fp32 keys <= max(B, 4*C*D) = B, their bf16 gather B/2,
#:   per-KV score/sort temporaries 48/(4*D) * B           (1 + 1/2 + 12/128) * B = 102 MiB
#: = 134 MiB for R = 256, C = 32768, N = D = 128, B = 64 MiB.  The bound
#: allows twice that for allocator slack and the small O(R * max_pages)
#: table temporaries.  The un-chunked gather it replaces held the fp32 keys
#: of every head at once: 4*R*C*D = 4 GiB.
FORMULA_BYTES = 4 * ROWS * TOKENS * (1 + 1 / BLOCK) + (1 + CACHE_ELEMENT / 4 + 12 / HEAD_DIM) * CHUNK_BYTES
PEAK_BOUND_BYTES = int(2 * FORMULA_BYTES)
OLD_KEY_GATHER_BYTES = 4 * ROWS * TOKENS * HEAD_DIM


def child() -> None:
    import torch
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

    from kvcompress_vllm import ops, scorers
    from kvcompress_vllm.config import ALLOCATIONS, SCORERS, KVCompressConfig, RequestPolicy
    from kvcompress_vllm.plan import EvictionPlan, StepPlan
    from kvcompress_vllm.core import PageGeometry, pages_to_evict
    from kvcompress_vllm.worker.state import HeadPool, KVCompressWorkerState

    assert scorers.CHUNK_BYTES == CHUNK_BYTES
    blocks_needed = TOKENS // BLOCK
    num_blocks = blocks_needed + 1
    layer_numel = num_blocks * KV_HEADS * BLOCK * 2 * HEAD_DIM
    storage = torch.empty(LAYERS * layer_numel, dtype=torch.bfloat16)
    # Random K/V, cheaply: one random chunk copied over the whole pool (this
    # also makes every page resident before anything is measured).
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1 << 24, generator=g).to(torch.bfloat16)
    for part in storage.split(noise.numel()):
        part.copy_(noise[: part.numel()])
        noise = noise.roll(7919)
    layers = [storage[i * layer_numel:(i + 1) * layer_numel].view(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM)
              for i in range(LAYERS)]
    pool = HeadPool.from_layer_caches(layers)
    cfg = KVCompressConfig(rate=0.25)
    state = KVCompressWorkerState(cfg, pool, max_model_len=TOKENS, max_num_reqs=2)
    ops.load_library()
    blocks = list(range(blocks_needed))
    geom = PageGeometry(BLOCK, ROWS)

    def scheduler_output(new=(), scheduled=None):
        new_reqs = [NewRequestData(req_id=rid, prompt_token_ids=[0] * n, mm_features=[], sampling_params=None,
                                   pooling_params=None, block_ids=(list(b),), num_computed_tokens=0,
                                   lora_request=None) for rid, b, n in new]
        cached = CachedRequestData(req_ids=[], resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
                                   new_block_ids=[], num_computed_tokens=[], num_output_tokens=[])
        so = SchedulerOutput(
            scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached,
            num_scheduled_tokens=dict(scheduled or {}), total_num_scheduled_tokens=sum((scheduled or {}).values()),
            scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={}, finished_req_ids=set(),
            free_encoder_mm_hashes=[],
        )
        so.kv_compress = StepPlan(prefill_ends={rid: n for rid, _, n in new})
        return so

    def register() -> None:
        state.table.remove("r")
        state.begin_step(scheduler_output(new=[("r", blocks, TOKENS)], scheduled={"r": TOKENS}))
        state.end_step()
        # Identity layout: block b holds tokens b*N .. b*N + N-1 of every head.
        pos = pool.positions.view(LAYERS, num_blocks, KV_HEADS, BLOCK)
        pos[:, :blocks_needed] = (torch.arange(blocks_needed).view(-1, 1, 1) * BLOCK
                                  + torch.arange(BLOCK).view(1, 1, -1)).to(torch.int32)
        pool.metrics.uniform_(generator=g)

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    results = []
    for name in SCORERS:
        # ``adaptive`` ranks by keydiff or kvcompress (both measured with each
        # allocation); what it adds, its sampled rows, does not depend on it.
        for allocation in ALLOCATIONS if name != "adaptive" else ALLOCATIONS[:1]:
            register()
            policy = RequestPolicy(rate=0.25, max_cache_tokens=None, protected_window=cfg.protected_window,
                                   sink_tokens=cfg.sink_tokens, scorer=name, compress_interval=BLOCK,
                                   allocation=allocation)
            num_pages = pages_to_evict(geom, policy, TOKENS, 0)
            keep = geom.blocks_needed(TOKENS, num_pages)
            plan = EvictionPlan(req_id="r", num_pages=num_pages, num_tokens=TOKENS,
                                pages_after=geom.pages_in_use(TOKENS, num_pages),
                                released_block_ids=tuple(blocks[keep:]),
                                protected_window=policy.protected_window, sink_tokens=policy.sink_tokens,
                                scorer=name, allocation=allocation)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            before = status("VmRSS")
            state.apply_eviction(plan)
            peak = status("VmHWM")
            req = state.table.requests["r"]
            kept = int(state.table.kv_count[req.slot].sum())
            results.append({
                "scorer": name, "allocation": allocation, "num_pages": num_pages,
                "kept_fraction": kept / (ROWS * TOKENS), "peak_growth": peak - before,
                "ms": state.pending_stats.compaction_ms,
            })
            state.pending_stats.compaction_ms = 0.0
    print("RESULTS " + json.dumps(results), flush=True)


def _child(_dir):
    """The child, a ``background`` job (it measures memory, not time)."""
    env = dict(os.environ)
    # Fixed malloc thresholds: freed buffers go back to the OS, so each
    # measurement sees its own allocations (not memory kept from the last one).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 20))
    return [sys.executable, __file__, "child"], env


@pytest.mark.background.with_args(_child)
def test_compression_peak_memory_is_bounded(background):
    proc = background.result(timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    report = "\n".join(
        f"{r['scorer']:>12} {r['allocation']:>7}: peak +{r['peak_growth'] / 2**20:7.1f} MiB, "
        f"{r['ms']:7.0f} ms, kept {r['kept_fraction']:.3f}"
        for r in results
    )
    print(report)
    from kvcompress_vllm.config import ALLOCATIONS, SCORERS

    assert len(results) == len(SCORERS) * len(ALLOCATIONS) - 1  # every scorer, both allocations (adaptive: one)
    assert PEAK_BOUND_BYTES < OLD_KEY_GATHER_BYTES / 8  # the old key gather would fail
    for r in results:
        # Rate 0.25 keeps a quarter of the compressible KVs (+ the protected window).
        assert 0.25 < r["kept_fraction"] < 0.26, report
        assert r["peak_growth"] < PEAK_BOUND_BYTES, (
            f"{r['scorer']}/{r['allocation']}: peak RSS grew by {r['peak_growth'] / 2**20:.0f} MiB "
            f"during one compression, bound {PEAK_BOUND_BYTES / 2**20:.0f} MiB\n{report}"
        )


if __name__ == "__main__" and sys.argv[1:] == ["child"]:
    child()
