"""Prefill-chunk attention: our kernel alone vs the split path vs vLLM's CPU kernel.

One layer, one request, one prefill chunk of ``q`` queries over ``ctx`` KVs
(``q == ctx``: a first chunk; ``q < ctx``: a later chunk, earlier KVs already in
the pages), bf16, block size 128, the default observation window (the last 32
queries add to the metric):

* ``stock``: vLLM's ``cpu_attention_with_kv_cache`` on its own cache layout
  (AMX where the CPU has it) -- what a stock engine spends;
* ``own``: ``ops.paged_head_attention`` for every row (``KVCOMPRESS_CPU_PREFILL=own``);
* ``split``: what the plugin runs (``attention/cpu_prefill.py``): rows before
  the window by vLLM's kernel over a scratch copy of the request's KVs (gather
  + ``cpu_attn_reshape_and_cache`` included in the time), the window rows and
  the metric by ours.  The plan (once per step for all layers) is not timed.

Usage:  python benchmarks/bench_prefill.py [--quick] [--threads 2] [--out FILE]
The full run writes docs/bench_prefill.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_attention import SHAPES, load_stock, time_interleaved  # noqa: E402

CASES = [(s, q, ctx) for s in SHAPES for q, ctx in
         ((512, 512), (1024, 1024), (2048, 2048), (2048, 4096), (512, 4096))]
QUICK = [("SmolLM2-135M", 1024, 1024), ("SmolLM2-135M", 512, 4096)]
WINDOW = 32
BLOCK = 128


def bench_one(vops, get_isa, shape: str, q_len: int, ctx: int, budget_s: float) -> dict:
    from kvcompress_vllm import ops
    from kvcompress_vllm.attention import cpu_prefill

    hq, h, d = SHAPES[shape]
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    nb = -(-ctx // BLOCK)
    cache = (torch.randn(nb, h, BLOCK, 2 * d, generator=g) * 0.5).to(dtype)
    query = torch.randn(q_len, hq, d, generator=g).to(dtype)
    scale = d**-0.5
    isa = get_isa(dtype, BLOCK, d, "auto")
    # Stock: the request's blocks in order, vLLM's layout written by vLLM's op.
    kv_view = cache.view(nb, h, 2 * BLOCK, d)
    key_cache, value_cache = kv_view.chunk(2, dim=2)
    qsl = torch.tensor([0, q_len], dtype=torch.int32)
    seq = torch.tensor([ctx], dtype=torch.int32)
    bt = torch.arange(nb, dtype=torch.int32)[None]
    sched = vops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=hq, num_kv_heads=h, head_dim=d, seq_lens=seq, dtype=dtype,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=True)
    out_s = torch.empty_like(query)

    def stock():
        vops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out_s,
            query_start_loc=qsl, seq_lens=seq, scale=scale, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=bt, softcap=0.0, scheduler_metadata=sched, s_aux=None)

    # Ours: head-pages [nb * h, 2, N, D] (plain layout), a page per (block, head).
    kv_pages = torch.randn(nb * h, 2, BLOCK, d, generator=g).to(dtype)
    page_table = (torch.arange(nb)[None, None, :] * h + torch.arange(h)[None, :, None]).int()
    kv_lens = torch.full((1, h), ctx, dtype=torch.int32)
    metrics = torch.zeros(nb * h, BLOCK)
    mqs = torch.tensor([q_len - WINDOW], dtype=torch.int32)
    out_o = torch.empty_like(query)

    def own():
        ops.paged_head_attention(query, kv_pages, page_table, kv_lens, qsl, scale, metrics,
                                 mqs, out_o)

    kernel = cpu_prefill.StockKernel(num_heads=hq, num_kv_heads=h, head_dim=d, dtype=dtype,
                                     isa=get_isa(dtype, cpu_prefill.SCRATCH_BLOCK, d, "auto"))
    plan = cpu_prefill.plan_stock_prefill(page_table[None], kv_lens[None], qsl, mqs, True,
                                          BLOCK, kernel)
    out_p = torch.empty_like(query)

    def split():
        cpu_prefill.run_split(plan, 0, query, kv_pages, page_table, kv_lens, scale, metrics,
                              out_p)

    t = time_interleaved({"stock": stock, "own": own, "split": split}, 5, budget_s=budget_s,
                         rounds=4)
    return dict(t, isa=isa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vops, get_isa = load_stock()
    from kvcompress_vllm import ops

    ops.load_library()
    our_isa = torch.ops.kvcompress.cpu_isa()
    header = ("| shape (Hq/H/D) | queries | ctx | stock ms | own ms | split ms | own/stock | "
              "split/stock |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    print(header)
    print(sep)
    rows = []
    isa = "?"
    for shape, q, ctx in QUICK if args.quick else CASES:
        r = bench_one(vops, get_isa, shape, q, ctx, budget_s=0.5 if args.quick else 2.0)
        hq, h, d = SHAPES[shape]
        line = (f"| {shape} ({hq}/{h}/{d}) | {q} | {ctx} | {r['stock']:.2f} | {r['own']:.2f} | "
                f"{r['split']:.2f} | {r['own'] / r['stock']:.2f} | {r['split'] / r['stock']:.2f} |")
        print(line, flush=True)
        rows.append(line)
        isa = r["isa"]
    out = args.out or (None if args.quick else str(HERE.parent / "docs" / "bench_prefill.md"))
    if out:
        text = "\n".join([
            "# Prefill-chunk attention: our kernel, the split path, vLLM's CPU kernel",
            "",
            f"Generated by `python benchmarks/bench_prefill.py`: one layer, one request, one "
            f"prefill chunk, bf16, block size {BLOCK}, {args.threads} torch threads; the last "
            f"{WINDOW} queries record the metric. stock: vLLM's kernel (isa `{isa}`); own: our "
            f"kernel for every row (`{our_isa}` path); split: rows before the window by vLLM's "
            "kernel over a scratch copy of the request's KVs (gather and vLLM's "
            "reshape-and-cache included), the window rows and the metric by ours -- what the "
            "plugin runs. Medians of interleaved calls (see bench_attention.md).",
            "",
            header, sep, *rows, "",
        ])
        Path(out).write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
