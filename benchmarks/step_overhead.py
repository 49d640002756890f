"""Per-step worker bookkeeping of KV-Compress vs the number of running requests
(no engine; default model shape: 30 layers x 3 KV heads, head dim 64, 128-token
pages).

One decode step of R running requests, each holding ``--context`` tokens
(compressed to about a quarter, or not): ``begin_step`` (page-table growth for
this step's tokens) + ``build_batch`` (the attention tensors: page tables,
KV lengths, write slots, positions) + ``end_step``.  For comparison, in the same
run, the per-request page-table growth loop the worker used before
``HeadPageTable.append_tokens`` batched it.  Reported: median ms per step and
us per running request.

    python benchmarks/step_overhead.py            # R = 1 .. 256 (~1 min)
    python benchmarks/step_overhead.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvcompress_vllm.config import KVCompressConfig
from kvcompress_vllm.core import PageGeometry
from kvcompress_vllm.plan import EvictionPlan
from kvcompress_vllm.testing import scheduler_output
from kvcompress_vllm.worker.state import HeadPool, KVCompressWorkerState

L, H, N, D = 30, 3, 128, 64


def make_state(num_reqs: int, context: int, compress: bool) -> tuple[KVCompressWorkerState, list[str]]:
    blocks_per_req = -(-(context + 2 * N) // N)
    num_blocks = num_reqs * blocks_per_req
    storage = torch.zeros(L * num_blocks * H * N * 2 * D, dtype=torch.bfloat16)
    per_layer = num_blocks * H * N * 2 * D
    layers = [storage[l * per_layer:(l + 1) * per_layer].view(num_blocks, H, N, 2 * D) for l in range(L)]
    state = KVCompressWorkerState(KVCompressConfig(), HeadPool.from_layer_caches(layers),
                                  max_model_len=blocks_per_req * N, max_num_reqs=num_reqs)
    ids = [f"r{i}" for i in range(num_reqs)]
    new = [(rid, range(i * blocks_per_req, (i + 1) * blocks_per_req), context)
           for i, rid in enumerate(ids)]
    state.begin_step(scheduler_output(new=new, scheduled={rid: context for rid in ids},
                                      prefill_ends={rid: context for rid in ids}))
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32) * context
    batch = state.build_batch(ids, qsl)
    positions = state.pool.positions.view(-1)
    metrics = state.pool.metrics.view(-1)
    for layer in range(L):  # what the attention kernel writes for each token
        for h in range(H):
            slots = batch.write_slots[layer, :, h]
            positions[slots] = batch.token_positions.to(torch.int32)
            metrics[slots] = torch.rand(slots.numel())
    state.end_step()
    if compress:  # evict about three quarters of every request's pages
        geometry = PageGeometry(block_size=N, pages_per_block=L * H)
        pages = L * H * (3 * (context // N) // 4)
        keep = geometry.blocks_needed(context, pages)  # + one block to grow into
        plans = [
            EvictionPlan(req_id=rid, num_pages=pages, num_tokens=context,
                         pages_after=geometry.pages_in_use(context, pages),
                         released_block_ids=tuple(range(i * blocks_per_req + keep + 1,
                                                        (i + 1) * blocks_per_req)),
                         protected_window=32, sink_tokens=4, scorer="kvcompress")
            for i, rid in enumerate(ids)
        ]
        state.begin_step(scheduler_output(plans=plans, scheduled={}, cached=[(rid, None) for rid in ids]))
        state.end_step()
    return state, ids


def legacy_growth(state: KVCompressWorkerState, scheduled: dict[str, int]) -> None:
    """The per-request loop ``begin_step`` ran before ``append_tokens``."""
    table = state.table
    for rid, num_new in scheduled.items():
        req = table.requests[rid]
        table.ensure_capacity(req, num_new)
        table.kv_count[req.slot] += num_new
        req.num_tokens += num_new
        req.step_tokens = num_new


def time_steps(state, ids, steps: int, legacy: bool) -> float:
    times = []
    qsl = torch.arange(len(ids) + 1, dtype=torch.int32)
    for _ in range(steps):
        so = scheduler_output(scheduled={rid: 1 for rid in ids}, cached=[(rid, None) for rid in ids])
        t0 = time.perf_counter()
        if legacy:
            state.in_step = True
            state._batch = None
            so.kv_compress = None
            legacy_growth(state, so.num_scheduled_tokens)
        else:
            state.begin_step(so)
        state.build_batch(ids, qsl)
        state.end_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = [1, 16, 64] if args.quick else [1, 8, 32, 64, 128, 256]
    print(f"one decode step, {L} layers x {H} KV heads, {N}-token pages, context {args.context}\n")
    print("| running requests | cache | batched growth ms/step | us/request | per-request loop (before) ms/step | before / now |")
    print("|---:|---|---:|---:|---:|---:|")
    for compress in (False, True):
        for r in counts:
            state, ids = make_state(r, args.context, compress)
            now = time_steps(state, ids, args.steps, legacy=False)
            state, ids = make_state(r, args.context, compress)
            before = time_steps(state, ids, args.steps, legacy=True)
            print(f"| {r} | {'compressed' if compress else 'full'} | {1e3 * now:.2f} | "
                  f"{1e6 * now / r:.0f} | {1e3 * before:.2f} | {before / now:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
