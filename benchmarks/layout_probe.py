"""Layout probe: how much of the decode kernel's gap to vLLM's CPU kernel is the page layout?

Our head-pages store K and V as plain ``[N, D]`` rows (docs/design.md, section
2), so QK needs a horizontal reduction per dot product and PV interleaves V
rows in registers.  ``layout_probe.cpp`` times the decode inner loop of one KV
head (per block of 128 keys: QK, the block softmax, PV; one thread) on that
layout with the production AVX-512-BF16 micro-kernels, and on a packed layout
-- K as ``[N/16, D/2, 16, 2]``, V as ``[N/2, D, 2]`` (``pack_page`` below) --
with two kernels that read it as it lies: AVX-512-BF16 vertical dot products
and AMX tiles.

In the same process and thread it times vLLM's ``cpu_attention_with_kv_cache``
and our ``paged_head_attention`` (metrics off) on one request of one KV head,
and reports the projection ``ours - inner(plain) + inner(packed)``: our kernel
with the inner loop swapped and everything else (call overhead, online
softmax, the output) unchanged.  This is an estimate for a layout change that
is not built: compaction, cache writes, the Triton kernels and every reader of
the pages would change with it (docs/performance.md, section 2).

Needs AVX-512-BF16 (and AMX tiles for the AMX column).  Builds the probe with
``torch.utils.cpp_extension`` (about 30 s the first time).

    python benchmarks/layout_probe.py            # writes docs/layout_probe.md
    python benchmarks/layout_probe.py --quick    # two rows, prints only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

BLOCK = 128
ROWS = [  # (shape, G = query heads per KV head, D, ctx)
    ("SmolLM2-135M", 3, 64, 512), ("SmolLM2-135M", 3, 64, 2048), ("SmolLM2-135M", 3, 64, 8192),
    ("Llama-3-8B", 4, 128, 512), ("Llama-3-8B", 4, 128, 2048), ("Llama-3-8B", 4, 128, 8192),
]
QUICK = [ROWS[1], ROWS[3]]
VARIANTS = {"plain": 0, "packed_avx512": 1, "packed_amx": 2}


def pack_page(k: torch.Tensor, v: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain ``[ctx, D]`` K and V (pages of ``block`` keys back to back) -> the
    packed layouts: K ``[pages, block/16, D/2, 16, 2]`` (per 16-key group and
    dim pair, the group's 16 keys' two values), V ``[pages, block/2, D, 2]``
    (per key pair, the pair's two values of each dim)."""
    ctx, d = k.shape
    pages = ctx // block
    kp = k.view(pages, block // 16, 16, d // 2, 2).permute(0, 1, 3, 2, 4).contiguous()
    vp = v.view(pages, block // 2, 2, d).permute(0, 1, 3, 2).contiguous()
    return kp, vp


def load_probe():
    from torch.utils import cpp_extension

    build = ROOT / "build" / "layout_probe"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="kvc_layout_probe",
        sources=[str(ROOT / "benchmarks" / "layout_probe.cpp")],
        extra_cflags=["-O3", "-std=c++17"],
        build_directory=str(build),
        verbose=False,
    )


def time_probe(probe, q, k, v, variant: int, out: torch.Tensor, rounds: int = 7,
               budget_s: float = 0.05) -> float:
    """Best ns per pass of ``variant`` over ``rounds`` timed runs of ~budget_s."""
    once = probe.time_passes(q, k, v, variant, 1, out)
    passes = max(1, int(budget_s * 1e9 / max(once, 1.0)))
    return min(probe.time_passes(q, k, v, variant, passes, out) / passes for _ in range(rounds))


def run_row(probe, vops, get_isa, shape, g, d, ctx, seed=0, amx=True) -> dict:
    from bench_attention import stock_decode, time_interleaved

    from kvcompress_vllm import ops

    gen = torch.Generator().manual_seed(seed)
    pages = ctx // BLOCK
    # One request, one KV head: the stock cache [pages, 1, N, 2D] is our
    # head-pages [pages, 2, N, D] (K rows then V rows per page).
    cache = (torch.randn(pages, 1, BLOCK, 2 * d, generator=gen) * 0.5).to(torch.bfloat16)
    query = torch.randn(1, g, d, generator=gen).to(torch.bfloat16)
    qsl = torch.tensor([0, 1], dtype=torch.int32)
    seq_lens = torch.tensor([ctx], dtype=torch.int32)
    block_table = torch.arange(pages, dtype=torch.int32).view(1, -1)
    scale = d**-0.5
    isa = get_isa(torch.bfloat16, BLOCK, d, "auto")
    stock, _ = stock_decode(vops, isa, cache, block_table, query, seq_lens, scale)
    out_ours = torch.empty_like(query)
    kv_pages = cache.view(pages, 2, BLOCK, d)
    page_table = block_table.view(1, 1, -1)
    kv_lens = torch.tensor([[ctx]], dtype=torch.int32)
    mqs = torch.zeros(1, dtype=torch.int32)

    def ours():
        ops.paged_head_attention(query, kv_pages, page_table, kv_lens, qsl, scale, None, mqs, out_ours)

    full = time_interleaved({"stock": stock, "ours": ours}, repeats=41, budget_s=1.0)
    # The probe's inputs: the same K/V bytes, plain and packed.
    k = kv_pages[:, 0].reshape(ctx, d).contiguous()
    v = kv_pages[:, 1].reshape(ctx, d).contiguous()
    kp, vp = pack_page(k, v)
    q = query[0].contiguous()
    outs, inner = {}, {}
    for name, variant in VARIANTS.items():
        if name == "packed_amx" and not amx:
            continue
        outs[name] = torch.zeros(g, d)
        kk, vv = (k, v) if name == "plain" else (kp, vp)
        inner[name] = time_probe(probe, q, kk, vv, variant, outs[name]) / ctx  # ns per key
    # The variants compute the same thing (bf16 products, fp32 sums in another order).
    ref = outs["plain"]
    diff = max(float((o - ref).abs().max() / ref.abs().max()) for o in outs.values())
    stock_ns, ours_ns = full["stock"] * 1e6 / ctx, full["ours"] * 1e6 / ctx
    row = dict(shape=shape, g=g, d=d, ctx=ctx, isa=isa, stock=stock_ns, ours=ours_ns,
               diff=diff, **{f"inner_{k}": t for k, t in inner.items()})
    for name in inner:
        if name != "plain":
            row[f"proj_{name}"] = (ours_ns - inner["plain"] + inner[name]) / stock_ns
    return row


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def table(rows: list[dict]) -> str:
    head = ("| shape (G/D) | ctx | stock ns/key | ours ns/key (ours/stock) | inner loop ns/key: "
            "plain | packed AVX-512 | packed AMX | projected ours/stock: packed AVX-512 | packed AMX |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        amx = r.get("inner_packed_amx")
        lines.append(
            f"| {r['shape']} ({r['g']}/{r['d']}) | {r['ctx']} | {r['stock']:.2f} | "
            f"{r['ours']:.2f} ({r['ours'] / r['stock']:.2f}) | {r['inner_plain']:.2f} | "
            f"{r['inner_packed_avx512']:.2f} | {'--' if amx is None else f'{amx:.2f}'} | "
            f"{r['proj_packed_avx512']:.2f} | "
            f"{'--' if amx is None else format(r['proj_packed_amx'], '.2f')} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two rows, print only")
    ap.add_argument("--out", default=None, help="markdown file (default: docs/layout_probe.md "
                    "for the full run; --quick prints only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bench_attention import load_stock

    from kvcompress_vllm import ops

    ops.load_library()
    if torch.ops.kvcompress.cpu_isa() not in ("avx512_bf16", "avx512_amx"):
        print(f"layout probe: needs the AVX-512-BF16 path (in use: {torch.ops.kvcompress.cpu_isa()})")
        return 1
    vops, get_isa = load_stock()  # also asks for AMX tile permission where there are tiles
    amx = torch.cpu._is_amx_tile_supported()
    t0 = time.perf_counter()
    probe = load_probe()
    print(f"probe built/loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for shape, g, d, ctx in QUICK if args.quick else ROWS:
        rows.append(run_row(probe, vops, get_isa, shape, g, d, ctx, amx=amx))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    worst = max(r["diff"] for r in rows)
    text = (
        f"# Layout probe: the decode inner loop on plain vs packed head-pages\n\n"
        f"Generated by `python benchmarks/layout_probe.py{' --quick' if args.quick else ''}`: "
        f"one request, one KV head, one decode query per query head (G rows), bf16, "
        f"128-key pages, one thread, {cpu_name()}; "
        f"stock = vLLM's `cpu_attention_with_kv_cache` (isa `{rows[0]['isa']}`), ours = "
        f"`paged_head_attention` without metrics, both on the same cache bytes (medians, "
        f"taking turns); inner loop = QK, block softmax and PV over the same K/V bytes "
        f"(best of 7; plain = the production AVX-512-BF16 micro-kernels on today's `[N, D]` "
        f"rows, packed = K `[N/16, D/2, 16, 2]`, V `[N/2, D, 2]`). Projected = (ours - inner "
        f"plain + inner packed) / stock: our kernel with only the inner loop replaced. "
        f"Largest output difference between the variants: {worst:.1e} of the largest output.\n\n"
        + table(rows) + "\n"
    )
    out = args.out or (None if args.quick else str(ROOT / "docs" / "layout_probe.md"))
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
