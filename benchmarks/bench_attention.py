"""Decode-step attention: kvcompress paged_head_attention vs vLLM's stock CPU attention.

Three ways of ours: our kernel with metrics off / on, on plain pages and on
pages in vLLM's in-page layout on this CPU -- its AMX layout, or its vec layout
(K transposed) where the CPU has no AMX -- (packed: the engine's decode path on this
CPU, metrics on for requests whose scorer reads the attention metric, off for
the others -- the default scorer), and ``per-head``: vLLM's kernel called
with one sequence per (request, KV head) over packed pages
(``attention/cpu_packed.py``), its per-layer scheduler metadata included --
the engine's path for the prompt rows of metric-free requests, and for their
decode rows with ``KVCOMPRESS_PACKED_DECODE=vllm`` or where our kernel does
not read vLLM's layout fast.

Both kernels read the same bytes: the stock cache ``[num_blocks, H, N, 2D]``
(viewed by vLLM as ``[num_blocks, H, 2N, D]`` and split into K/V halves) is, per
(block, KV head), exactly one kvcompress head-page ``[2, N, D]``; so the cache is
viewed as ``kv_pages [num_blocks * H, 2, N, D]`` and head ``h`` of request ``b``
gets the page ids ``block * H + h`` of the request's blocks.

Usage:  python benchmarks/bench_attention.py [--quick] [--check] [--threads 2] [--out FILE]
                                             [--isa auto|avx2|avx512|avx512_bf16|avx512_amx]
                                             [--vllm-lib auto|avx2|avx512]
The full run also writes the table to docs/bench_attention.md; --quick (a
subset, < 1 minute) only prints it unless --out is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "benchmarks" / "cpu_emulation"))
from emulate_cpu import CPUS as EMULATED_CPUS  # noqa: E402
from emulate_cpu import emulate  # noqa: E402

SHAPES = {
    # name: (Hq, H, D)
    "SmolLM2-135M": (9, 3, 64),
    "Llama-3-8B": (32, 8, 128),
}
BATCHES = (1, 8, 32)
CONTEXTS = (512, 2048, 8192)
QUICK = [  # (shape, batch, ctx)
    ("SmolLM2-135M", 1, 2048),
    ("SmolLM2-135M", 32, 2048),
    ("Llama-3-8B", 1, 8192),
    ("Llama-3-8B", 8, 2048),
    ("Llama-3-8B", 32, 512),
]


def ops_lib() -> str:
    """Path of the kvcompress kernel library that is (or will be) loaded."""
    import kvcompress_vllm

    return str(sorted(Path(kvcompress_vllm.__file__).parent.glob("_C*.so"))[0])


def load_stock(vllm_lib: str = "auto"):
    """vLLM's kernel library (``auto``: the one vLLM loads on this CPU;
    ``avx2``: ``vllm._C_AVX2``, the build vLLM loads on CPUs without AVX-512;
    ``avx512``: ``vllm._C_AVX512``, its build for AVX-512 CPUs without BF16 --
    so that a newer machine can time what an older CPU would run)."""
    if vllm_lib != "auto":  # torch's CPU probes answer as that CPU's would
        emulate(vllm_lib)
    import vllm  # noqa: F401  (must precede vllm._custom_ops)
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    from vllm import _custom_ops as vops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    # vLLM picks its AMX kernel where the CPU has AMX tiles; Linux only lets a
    # process use them after asking (arch_prctl), which vLLM's worker does at
    # start-up through torch but a bare benchmark process must do itself.
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()

    return vops, _get_attn_isa


def time_interleaved(fns: dict, repeats: int, warmup: int = 3, budget_s: float = 0.0,
                     rounds: int = 8) -> dict:
    """Median ms per call of each callable.  The callables take turns in
    rounds (noise from other processes on the machine hits all of them
    alike); in each turn a callable runs a block of consecutive calls and the
    first call of a block is not counted, so that a kernel is timed in its own
    cache steady state, not the other kernel's (they read the same bytes).
    Short calls get more repeats (about budget_s seconds in all)."""
    t0 = time.perf_counter()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_call = (time.perf_counter() - t0) / (warmup * len(fns))
    # Warm up for ~0.2 s more (thread pool, caches, clocks) before timing.
    for _ in range(int(0.2 / max(per_call * len(fns), 1e-9))):
        for fn in fns.values():
            fn()
    repeats = max(repeats, min(4000, int(budget_s / max(per_call * len(fns), 1e-9))))
    block = max(2, -(-repeats // rounds) + 1)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for i in range(block):
                t0 = time.perf_counter()
                fn()
                if i:
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def stock_decode(vops, isa: str, cache: torch.Tensor, block_table: torch.Tensor,
                 query: torch.Tensor, seq_lens: torch.Tensor, scale: float):
    """One decode step of vLLM's CPU attention over ``cache`` (``[num_blocks,
    H, N, 2D]``, vLLM's layout), one query token per request (``query [R, Hq,
    D]``): returns ``(call, out)``; ``call()`` runs the kernel into ``out``."""
    num_blocks, h, block, _ = cache.shape
    batch, hq, d = query.shape
    key_cache, value_cache = cache.view(num_blocks, h, 2 * block, d).chunk(2, dim=2)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    sched = vops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch, num_heads=hq, num_kv_heads=h, head_dim=d, seq_lens=seq_lens,
        dtype=query.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=True,
    )
    out = torch.empty_like(query)

    def call():
        vops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=qsl, seq_lens=seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
            scheduler_metadata=sched, s_aux=None,
        )

    return call, out


def bench_one(vops, get_isa, shape: str, batch: int, ctx: int, block: int, repeats: int,
              dtype=torch.bfloat16, seed: int = 0, check: bool = False,
              budget_s: float = 1.0) -> dict:
    from kvcompress_vllm import ops

    hq, h, d = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    blocks_per_req = (ctx + block - 1) // block
    num_blocks = batch * blocks_per_req
    # Stock layout [num_blocks, H, N, 2D]; blocks of a request are scattered.
    cache = (torch.randn(num_blocks, h, block, 2 * d, generator=g) * 0.5).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    block_table = perm.view(batch, blocks_per_req).contiguous()
    query = torch.randn(batch, hq, d, generator=g).to(dtype)
    scale = d**-0.5
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32)

    # ---- stock vLLM CPU attention
    isa = get_isa(dtype, block, d, "auto")
    stock, _ = stock_decode(vops, isa, cache, block_table, query, seq_lens, scale)

    # ---- kvcompress on the same bytes
    kv_pages = cache.view(num_blocks * h, 2, block, d)
    page_table = (block_table.long()[:, None, :] * h + torch.arange(h)[None, :, None]).to(torch.int32)
    kv_lens = torch.full((batch, h), ctx, dtype=torch.int32)
    metrics = torch.zeros(num_blocks * h, block)
    mqs = torch.zeros(batch, dtype=torch.int32)
    out_ours = torch.empty_like(query)

    def ours(m):
        ops.paged_head_attention(query, kv_pages, page_table, kv_lens, qsl, scale, m, mqs, out_ours)

    # The same KVs in vLLM's in-page layout on this CPU (the engine's layout
    # for compressible requests): its AMX layout, or its vec layout (K
    # transposed) on CPUs without AMX; the AMX one where our kernel reads
    # neither (head dims / block sizes it does not take).
    from kvcompress_vllm.attention import cpu_packed
    from kvcompress_vllm.ops import reference as ref_ops

    packing = cpu_packed.PagePacking.learn(dtype, block, d, isa).offsets
    layout = ops.packing_layout(packing)
    if layout is None:
        packing, layout = ref_ops.amx_packing(block, d), "amx (not vLLM's here)"
    packed_pages = torch.empty_like(kv_pages)
    flat = kv_pages.reshape(kv_pages.shape[0], 2, -1)
    for half in range(2):
        packed_pages.view(kv_pages.shape[0], 2, -1)[:, half, packing[half].view(-1).long()] = flat[:, half]
    all_packed = torch.ones(batch, dtype=torch.bool)
    out_packed = torch.empty_like(query)

    def ours_packed(m):
        ops.paged_head_attention(query, packed_pages, page_table, kv_lens, qsl, scale, m, mqs,
                                 out_packed, packing, all_packed)

    if check:
        # Our kernel vs the reference (vLLM's vec/amx kernels store K transposed
        # inside a block, so the stock output of these bytes is not comparable).
        from kvcompress_vllm.ops import reference

        want = torch.empty_like(query)
        m_want, m_got = torch.zeros_like(metrics), torch.zeros_like(metrics)
        reference.paged_head_attention(query, kv_pages, page_table, kv_lens, qsl, scale,
                                       m_want, mqs, want)
        ops.paged_head_attention(query, kv_pages, page_table, kv_lens, qsl, scale, m_got,
                                 mqs, out_ours)
        torch.testing.assert_close(out_ours.float(), want.float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(m_got, m_want, rtol=2e-2, atol=1e-6)
        m_got.zero_()
        ours_packed(m_got)
        torch.testing.assert_close(out_packed.float(), want.float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(m_got, m_want, rtol=2e-2, atol=1e-6)
    per_head, kernel_only = per_head_decode(isa, kv_pages, page_table, kv_lens, query, scale, check)
    t = time_interleaved(
        {"stock": stock, "off": lambda: ours(None), "on": lambda: ours(metrics),
         "packed_off": lambda: ours_packed(None), "packed_on": lambda: ours_packed(metrics),
         "per_head": per_head, "kernel_only": kernel_only}, repeats, budget_s=budget_s,
    )
    s, off, on, ph, ko = t["stock"], t["off"], t["on"], t["per_head"], t["kernel_only"]
    return dict(shape=shape, batch=batch, ctx=ctx, isa=isa, layout=layout, stock=s, off=off,
                on=on, ph=ph,
                p_on=t["packed_on"], r_off=off / s, r_on=on / s, r_ph=ph / s, r_ko=ko / s,
                r_poff=t["packed_off"] / s, r_pon=t["packed_on"] / s)


def per_head_decode(isa: str, kv_pages: torch.Tensor, page_table: torch.Tensor,
                    kv_lens: torch.Tensor, query: torch.Tensor, scale: float, check: bool):
    """The engine's path for metric-free requests over the same bytes:
    ``(call, kernel_only)`` -- one layer's ``attend_packed`` plus its scheduler
    metadata (the builder makes one per layer), and ``attend_packed`` alone.
    With ``check``, the output on pages packed by our writer against the
    reference over the plain pages."""
    import dataclasses

    from kvcompress_vllm.attention import cpu_packed, vllm_cpu

    batch, hq, d = query.shape
    h, block = page_table.shape[1], kv_pages.shape[2]
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    kernel = vllm_cpu.StockKernel(num_heads=hq, num_kv_heads=h, head_dim=d, dtype=query.dtype,
                                  isa=isa)
    ph = cpu_packed.plan_packed(torch.ones(batch, dtype=torch.bool), page_table[None],
                                kv_lens[None], qsl, kernel, kv_pages)
    one_head = dataclasses.replace(kernel, num_heads=hq // h, num_kv_heads=1)
    out = torch.empty_like(query)

    seq_lens, block_table, _ = ph.layers[0]

    def call():
        sched = vllm_cpu.scheduler_metadata(one_head, seq_lens, ph.qsl, isa)
        ph.layers[0] = (seq_lens, block_table, sched)
        cpu_packed.attend_packed(ph, 0, query, out, scale)

    if check:
        from kvcompress_vllm import ops
        from kvcompress_vllm.ops import reference

        packing = cpu_packed.PagePacking.learn(query.dtype, block, d, isa)
        packed = torch.zeros_like(kv_pages)
        p = kv_pages.shape[0]
        ops.write_kv(kv_pages[:, 0].reshape(-1, 1, d), kv_pages[:, 1].reshape(-1, 1, d), packed,
                     torch.arange(p * block).view(-1, 1), None, None,
                     torch.zeros(p * block, dtype=torch.int64), packing=packing.offsets)
        want = torch.empty_like(query)
        reference.paged_head_attention(query, kv_pages, page_table, kv_lens, qsl, scale, None,
                                       torch.ones(batch, dtype=torch.int32), want)
        packed_ph = cpu_packed.plan_packed(torch.ones(batch, dtype=torch.bool), page_table[None],
                                           kv_lens[None], qsl, kernel, packed)
        cpu_packed.attend_packed(packed_ph, 0, query, out, scale)
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=0)
    return call, lambda: cpu_packed.attend_packed(ph, 0, query, out, scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a subset that runs in < 1 minute")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--out", default=None,
                    help="markdown file for the table (default: docs/bench_attention.md for "
                         "the full run; --quick only prints unless --out is given)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--isa", default="auto",
                    help="ISA path of our kernels (torch.ops.kvcompress.set_cpu_isa): auto "
                         "(the best this CPU has), avx2, avx512, avx512_bf16 or avx512_amx")
    ap.add_argument("--vllm-lib", default="auto", choices=("auto", *EMULATED_CPUS),
                    help="vLLM's kernel library: auto (the one vLLM loads on this CPU), "
                         "avx2 (vllm._C_AVX2, what vLLM runs on CPUs without AVX-512) or "
                         "avx512 (vllm._C_AVX512, on AVX-512 CPUs without BF16); with --isa "
                         "avx2, times an older CPU's kernels on this one")
    ap.add_argument("--check", action="store_true",
                    help="also check our outputs/metrics against ops.reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vops, get_isa = load_stock(args.vllm_lib)
    from kvcompress_vllm import ops

    ops.load_library()
    torch.ops.kvcompress.set_cpu_isa(args.isa)
    our_isa = torch.ops.kvcompress.cpu_isa()
    from kvcompress_vllm.attention.vllm_cpu import vllm_kernel_build

    build = vllm_kernel_build()  # what vLLM loaded, from this process's mappings
    want = EMULATED_CPUS[args.vllm_lib].vllm_build if args.vllm_lib != "auto" else build
    if build != want:
        raise SystemExit(f"--vllm-lib {args.vllm_lib}: vLLM loaded {build}, not {want}")
    print(f"ours: {our_isa} path; vLLM's kernel library: {build}", flush=True)
    repeats = args.repeats or (25 if args.quick else 41)
    if args.quick:
        cases = QUICK
    else:
        cases = [(s, b, c) for s in SHAPES for b in BATCHES for c in CONTEXTS]
    rows = []
    header = ("| shape (Hq/H/D) | batch | ctx | stock ms | ours ms, packed, metrics on | "
              "per-head ms | plain off/stock | plain on/stock | packed off/stock | "
              "packed on/stock | per-head/stock | per-head kernel only/stock |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    print(header)
    print(sep)
    for shape, b, c in cases:
        r = bench_one(vops, get_isa, shape, b, c, args.block_size, repeats, check=args.check,
                      budget_s=0.5 if args.quick else 1.5)
        hq, h, d = SHAPES[shape]
        line = (f"| {shape} ({hq}/{h}/{d}) | {b} | {c} | {r['stock']:.3f} | {r['p_on']:.3f} | "
                f"{r['ph']:.3f} | {r['r_off']:.2f} | {r['r_on']:.2f} | {r['r_poff']:.2f} | "
                f"{r['r_pon']:.2f} | {r['r_ph']:.2f} | {r['r_ko']:.2f} |")
        print(line, flush=True)
        rows.append(line)
        isa, layout = r["isa"], r["layout"]
    out = args.out or (None if args.quick else str(ROOT / "docs" / "bench_attention.md"))
    if out and not args.no_write:
        cpu = "unknown CPU"
        try:
            for ln in open("/proc/cpuinfo"):
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        import vllm

        vllm_version = vllm.__version__
        vllm_lib = f"vllm.{build or '(build not found)'}" + (
            " (AVX-512 + BF16)" if build == "_C" else "") + (
            f", loaded by --vllm-lib {args.vllm_lib}" if args.vllm_lib != "auto" else "")
        text = "\n".join([
            "# Decode-step attention: kvcompress vs vLLM stock CPU attention",
            "",
            f"Generated by `python benchmarks/bench_attention.py{' --quick' if args.quick else ''}`: "
            f"one decode step (1 query token per request), bf16, block size {args.block_size}, "
            f"{args.threads} torch threads, {cpu}; stock: vLLM {vllm_version} `{vllm_lib}`, "
            f"isa `{isa}`; ours: `{Path(ops_lib()).name}`, `{our_isa}` path. "
            f"Times are medians over at least {repeats} calls after warm-up (more for short "
            "calls: about 1.5 s of calls per row); the seven variants take turns in 8 rounds, "
            "each turn a block of consecutive calls whose first call is not counted. Both kernels read the same cache bytes: the stock cache "
            "`[num_blocks, H, N, 2D]` viewed as head-pages `[num_blocks * H, 2, N, D]`, "
            "page id `block * H + h` (vLLM's kernel stores K transposed inside a block, so "
            "the two interpret the bytes differently but do the same memory traffic and "
            "FLOPs). Our kernel: `off`: metrics=None; `on`: metrics recorded for every decode "
            "query; `plain`: head-pages as plain `[N, D]` rows; `packed`: the same KVs in "
            f"vLLM's in-page layout for this isa, here `{layout}` (`ops.reference.amx_packing`, "
            "the `avx512_amx` path reads it with AMX tiles; or `ops.reference.vec_packing`, "
            "K transposed, on CPUs without AMX) -- the engine's decode path on the AVX-512 "
            "paths of our kernel: `packed on` for requests that record the "
            "metric, `packed off` for the others (the default scorer; "
            "`KVCOMPRESS_PACKED_DECODE=auto`); `per-head`: vLLM's kernel with one sequence "
            "per (request, KV head) over head-pages in vLLM's layout, plus that layer's "
            "scheduler metadata (computed once per layer and step; stock computes one per "
            "step for all layers) -- the engine's path for metric-free decode rows with "
            "`KVCOMPRESS_PACKED_DECODE=vllm`; `kernel only`: the same without the metadata.",
            "",
            header,
            sep,
            *rows,
            "",
            "Rows whose KV cache (batch x ctx x H x D x 4 bytes) is at most a few MB "
            "(e.g. batch 1 up to ctx 2048) stay in the L2 caches between calls, so "
            "they measure compute and per-call overhead; the other rows stream the cache "
            "from L3 or DRAM (depending on the CPU's L3 size). "
            "The ratios are those of the medians; on a shared "
            "machine expect +-10% noise on the sub-0.1 ms rows.",
            "",
        ])
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
