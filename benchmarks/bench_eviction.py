"""Cost of one compression on the worker (``apply_eviction``) with the default
scorer, KeyDiff, read in place from the pages (``ops.keydiff_scores``) vs
gathered first (``HeadKVs.keys()`` and the per-head torch loop, the path
before the kernel and still the CUDA pool's) -- side by side in one run, no
engine: default model shape (30 layers x 3 KV heads, head dim 64, 128-token
pages, bf16), one request of ``ctx`` tokens, pages in vLLM's in-page layout
(the CPU engine's layout for metric-free requests) or plain.  Reported:
median ms per compression and its phases (scoring with its key reads, sort
into page units, the choice, eviction lists, compaction), alternating the two
paths call by call.

    python benchmarks/bench_eviction.py            # (~1 min)
    python benchmarks/bench_eviction.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import D, H, L, N, make_state  # noqa: E402
from wall_timers import Timers  # noqa: E402

from kvcompress_vllm import ops, scorers  # noqa: E402
from kvcompress_vllm.attention.cpu_packed import PagePacking  # noqa: E402
from kvcompress_vllm.core import PageGeometry  # noqa: E402
from kvcompress_vllm.ops import reference  # noqa: E402
from kvcompress_vllm.plan import EvictionPlan  # noqa: E402
from kvcompress_vllm.worker import selection  # noqa: E402
from kvcompress_vllm.worker import state as worker_state  # noqa: E402

TIMERS = Timers()  # seconds per phase of the current call


def one_compression(ctx: int, packed: bool, in_place: bool, fraction: float) -> float:
    state, ids = make_state(1, ctx, False)
    state.pool.kv_pages.normal_()
    if packed:
        state.pool.packing = PagePacking(isa="amx", dtype=torch.bfloat16, block_size=N, head_dim=D,
                                         offsets=reference.amx_packing(N, D))
        state.table.requests[ids[0]].packed = True
    if not in_place:  # the gather path: no paged_keys
        gather = state._gather_request
        state._gather_request = lambda *a: dataclasses.replace(gather(*a), paged_keys=None)
    geometry = PageGeometry(block_size=N, pages_per_block=L * H)
    pages = int(L * H * (ctx // N) * fraction)
    keep = geometry.blocks_needed(ctx, pages)
    blocks = -(-(ctx + 2 * N) // N)
    plan = EvictionPlan(req_id=ids[0], num_pages=pages, num_tokens=ctx,
                        pages_after=geometry.pages_in_use(ctx, pages),
                        released_block_ids=tuple(range(keep + 1, blocks)),
                        protected_window=32, sink_tokens=4, scorer="keydiff")
    start = time.perf_counter()
    state.apply_eviction(plan)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calls", type=int, default=9)
    args = parser.parse_args()
    TIMERS.wrap(scorers.get_scorer("keydiff"), "score", "score")
    TIMERS.wrap(worker_state, "choose_pages", "choose")
    TIMERS.wrap(worker_state, "evict_indices", "lists")
    TIMERS.wrap(selection, "unit_costs", "sort")
    TIMERS.wrap(ops, "compact_heads", "compact")
    calls = 3 if args.quick else args.calls
    cases = [(640, 0.6), (1536, 0.75)] if not args.quick else [(640, 0.6)]
    print(f"apply_eviction, keydiff, {L} layers x {H} KV heads, D {D}, N {N}, bf16, "
          f"{torch.get_num_threads()} threads; median of {calls} calls per cell\n")
    print("| tokens | pages evicted | layout | path | ms | score | sort | lists | compact | in place / gathered |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for ctx, fraction in cases:
        for packed in (True, False):
            times = {True: [], False: []}
            phases = {True: {}, False: {}}
            for path in (True, False):  # warm-up
                one_compression(ctx, packed, path, fraction)
            for _ in range(calls):
                for path in (True, False):
                    TIMERS.total.clear()
                    times[path].append(one_compression(ctx, packed, path, fraction))
                    for k, v in TIMERS.snapshot().items():
                        phases[path].setdefault(k, []).append(v)
            med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
            for path in (True, False):
                ph = {k: statistics.median(v) * 1e3 for k, v in phases[path].items()}
                ratio = f"{med[True] / med[False]:.2f}" if path else ""
                print(f"| {ctx} | {int(L * H * (ctx // N) * fraction)} | {'vLLM in-page' if packed else 'plain'} "
                      f"| {'in place' if path else 'gathered'} | {med[path]:.1f} | {ph.get('score', 0):.1f} "
                      f"| {ph.get('sort', 0):.1f} | {ph.get('lists', 0):.1f} | {ph.get('compact', 0):.1f} | {ratio} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
