"""GPU device check for the KV-Compress Triton kernels (needs only torch + triton).

1. **Correctness**: every Triton kernel (``paged_head_attention`` fused, split-KV,
   with and without metrics; ``write_kv``; ``compact_heads``) against the
   plain-PyTorch reference (``kvcompress_vllm/ops/reference.py``, run on the
   CPU) on random paged cases with ragged per-head KV counts.
2. **Timing**: decode (1 query per request) and prefill (the last chunk of a
   prompt: ``--prefill-chunk`` queries at the end of the context, the last
   ``--window`` of them recording metrics) attention over per-head pages,
   with and without the fused metric, against
   ``torch.nn.functional.scaled_dot_product_attention`` over the same KVs laid
   out densely (``[B, H, ctx, D]``, GQA through ``enable_gqa``; prefill with a
   bottom-right causal mask).  Llama-3-8B attention shape (32 query / 8 KV
   heads, head dim 128, bf16, 16-token pages) at batch 1/32/128 and context
   2k/8k/32k (one layer's worth of heads; configurations that do not fit in
   free GPU memory are reported as skipped).

Writes a markdown table (stdout, and ``--out``; a full GPU run defaults to
``docs/gpu_kernels.md``).  Exits non-zero if a correctness check fails.

    python benchmarks/gpu_kernels.py            # on a CUDA machine
    python benchmarks/gpu_kernels.py --quick    # small smoke run; also runs on
                                                # CPU under TRITON_INTERPRET=1

The kernels and the reference are loaded from this checkout's ``kernels/``
and ``kvcompress_vllm/ops/reference.py`` by file path (the installed
``kvcompress_vllm.triton_kernels`` otherwise), so neither vLLM nor the
plugin's vLLM-facing code is imported.  Target (issue 11): decode attention
with metrics within 1.3x of dense SDPA at batch >= 32, context >= 8k.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.3

LLAMA3_8B = dict(num_q_heads=32, num_kv_heads=8, head_dim=128)
BATCHES = (1, 32, 128)
CONTEXTS = (2048, 8192, 32768)
QUICK_BATCHES = (2,)  # --quick: a smoke run of every code path, not a measurement
QUICK_CONTEXTS = (160,)
OUT_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------
# loading (no vLLM)
# --------------------------------------------------------------------------
def _load_file(name: str, path: Path, package_dir: Path | None = None):
    kwargs = {"submodule_search_locations": [str(package_dir)]} if package_dir else {}
    spec = importlib.util.spec_from_file_location(name, path, **kwargs)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_kernels():
    """(triton kernels package, its attention module, reference module)."""
    kdir, ref = ROOT / "kernels", ROOT / "kvcompress_vllm" / "ops" / "reference.py"
    if (kdir / "__init__.py").exists() and ref.exists():
        kernels = _load_file("kvc_triton_kernels", kdir / "__init__.py", kdir)
        reference = _load_file("kvc_reference", ref)
        attention = importlib.import_module("kvc_triton_kernels.attention")
        return kernels, attention, reference
    from kvcompress_vllm import triton_kernels as kernels  # installed package
    from kvcompress_vllm.ops import reference
    from kvcompress_vllm.triton_kernels import attention

    return kernels, attention, reference


# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------
def paged_case(num_reqs, num_kv_heads, group, head_dim, block_size, dtype, kv_lens, q_lens,
               device, seed=0, spare_pages=5):
    """Random per-(request, KV head) pages (a random permutation of the pool)."""
    g = torch.Generator().manual_seed(seed)
    kv_lens = torch.as_tensor(kv_lens, dtype=torch.int32).view(num_reqs, num_kv_heads)
    pages_per_head = (kv_lens + block_size - 1) // block_size
    max_pages = max(1, int(pages_per_head.max()))
    total = int(pages_per_head.sum()) + spare_pages
    perm = torch.randperm(total, generator=g).to(torch.int32)
    page_table = torch.full((num_reqs, num_kv_heads, max_pages), -1, dtype=torch.int32)
    flat_counts = pages_per_head.view(-1).tolist()
    starts = [0]
    for c in flat_counts:
        starts.append(starts[-1] + c)
    rows = page_table.view(-1, max_pages)
    for i, c in enumerate(flat_counts):
        rows[i, :c] = perm[starts[i]:starts[i] + c]
    q_lens = torch.as_tensor(q_lens, dtype=torch.int64)
    qsl = torch.zeros(num_reqs + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    num_tokens = int(qsl[-1])
    # Data is drawn on the device (the largest timed pool is ~17 GB).
    dg = torch.Generator(device=device).manual_seed(seed)
    kv_pages = torch.randn(total, 2, block_size, head_dim, generator=dg, device=device, dtype=dtype)
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=dg, device=device,
                        dtype=dtype)
    return dict(
        query=query, kv_pages=kv_pages,
        page_table=page_table.to(device), kv_lens=kv_lens.to(device),
        query_start_loc=qsl.to(device),
        metrics=torch.rand(total, block_size, generator=dg, device=device),
        scale=head_dim**-0.5,
    )


def ragged_case(num_reqs, num_kv_heads, group, head_dim, block_size, dtype, max_kv, max_q, device, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    q_lens = [1 if max_q == 1 or r % 2 == 0 else int(torch.randint(2, max_q + 1, (1,), generator=g))
              for r in range(num_reqs)]
    kv = torch.randint(1, max_kv + 1, (num_reqs, num_kv_heads), generator=g)
    kv = torch.maximum(kv, torch.tensor(q_lens).view(-1, 1))
    case = paged_case(num_reqs, num_kv_heads, group, head_dim, block_size, dtype, kv, q_lens,
                      device, seed)
    mqs = [0 if q == 1 else int(torch.randint(0, q + 1, (1,), generator=g)) for q in q_lens]
    case["metric_q_start"] = torch.tensor(mqs, dtype=torch.int32, device=device)
    return case


# --------------------------------------------------------------------------
# 1. correctness
# --------------------------------------------------------------------------
def _cpu(t):
    return None if t is None else t.detach().cpu()


def check_attention(kernels, attention, reference, device, name, *, group, head_dim, block_size,
                    dtype, max_q, metrics=True, knobs=None, num_reqs=4, num_kv_heads=8, max_kv=300,
                    seed=0):
    case = ragged_case(num_reqs, num_kv_heads, group, head_dim, block_size, dtype, max_kv, max_q,
                       device, seed)
    args = [case[k] for k in ("query", "kv_pages", "page_table", "kv_lens", "query_start_loc")]
    ref_out = torch.zeros(args[0].shape, dtype=dtype)
    ref_metrics = _cpu(case["metrics"]).clone()
    reference.paged_head_attention(*map(_cpu, args), case["scale"], ref_metrics if metrics else None,
                                   _cpu(case["metric_q_start"]), ref_out)
    out = torch.zeros_like(case["query"])
    got_metrics = case["metrics"].clone() if metrics else None
    if knobs:
        attention._launch(*args, case["scale"], got_metrics, case["metric_q_start"], out, **knobs)
    else:
        kernels.paged_head_attention(*args, case["scale"], got_metrics, case["metric_q_start"], out)
    out_err = (out.cpu().float() - ref_out.float()).abs().max().item()
    ok = bool(torch.isfinite(out.cpu().float()).all()) and out_err <= OUT_ATOL[dtype]
    detail = f"max |out - ref| = {out_err:.2e} (tol {OUT_ATOL[dtype]:.0e})"
    if metrics:
        m_err = (got_metrics.cpu() - ref_metrics).abs()
        rel = (m_err / ref_metrics.abs().clamp_min(1e-6)).max().item()
        m_ok = bool((m_err <= 2e-5 + 1e-4 * ref_metrics.abs()).all())
        ok = ok and m_ok
        detail += f"; metrics max abs {m_err.max().item():.2e}, max rel {rel:.2e}"
    return name, ok, detail


def check_write_kv(kernels, reference, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens, heads, head_dim, block = 37, 8, 128, 16
    pages = tokens * heads // block + 6
    kv = torch.randn(pages, 2, block, head_dim, generator=g).to(dtype)
    metrics = torch.rand(pages, block, generator=g)
    positions = torch.randint(0, 1000, (pages, block), generator=g, dtype=torch.int32)
    slots = torch.randperm(pages * block, generator=g)[: tokens * heads].view(tokens, heads).clone()
    slots[torch.rand(tokens, heads, generator=g) < 0.2] = -1
    qkv = torch.randn(tokens, 3 * heads, head_dim, generator=g).to(dtype)
    key, value = qkv[:, heads:2 * heads], qkv[:, 2 * heads:]
    tok = torch.randint(0, 1 << 20, (tokens,), generator=g)
    want = [kv.clone(), metrics.clone(), positions.clone()]
    reference.write_kv(key, value, want[0], slots, want[1], want[2], tok)
    got = [t.clone().to(device) for t in (kv, metrics, positions)]
    kernels.write_kv(key.to(device), value.to(device), got[0], slots.to(device), got[1], got[2],
                     tok.to(device))
    ok = all(torch.equal(w.view(torch.uint8) if w.dtype != torch.int32 else w,
                         x.cpu().view(torch.uint8) if x.dtype != torch.int32 else x.cpu())
             for w, x in zip(want, got))
    return f"write_kv {str(dtype).removeprefix('torch.')}", ok, "bit-exact" if ok else "differs"


def check_compact(kernels, reference, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    heads, block, head_dim = 24, 16, 128
    lens = torch.randint(1, 300, (heads,), generator=g, dtype=torch.int32)
    pages = (lens + block - 1) // block
    total = int(pages.sum()) + 3
    perm = torch.randperm(total, generator=g).to(torch.int32)
    table = torch.full((heads, int(pages.max())), -1, dtype=torch.int32)
    lists, cursor = [], 0
    for s in range(heads):
        n = int(pages[s])
        table[s, :n] = perm[cursor:cursor + n]
        cursor += n
        count = int(torch.randint(0, int(lens[s]) + 1, (1,), generator=g))
        lists.append(torch.randperm(int(lens[s]), generator=g)[:count].sort().values.to(torch.int32))
    width = max(1, max(len(e) for e in lists))
    idx = torch.full((heads, width), -1, dtype=torch.int32)
    for s, e in enumerate(lists):
        idx[s, :len(e)] = e
    counts = torch.tensor([len(e) for e in lists], dtype=torch.int32)
    kv = torch.randn(total, 2, block, head_dim, generator=g).to(dtype)
    metrics = torch.rand(total, block, generator=g)
    positions = torch.randint(0, 1 << 20, (total, block), generator=g, dtype=torch.int32)
    want = [kv.clone(), metrics.clone(), positions.clone()]
    reference.compact_heads(*want, table, lens, idx, counts)
    got = [t.clone().to(device) for t in (kv, metrics, positions)]
    kernels.compact_heads(*got, table.to(device), lens.to(device), idx.to(device), counts.to(device))
    ok = all(torch.equal(w.contiguous().view(torch.uint8), x.cpu().contiguous().view(torch.uint8))
             for w, x in zip(want, got))
    return f"compact_heads {str(dtype).removeprefix('torch.')}", ok, "bit-exact" if ok else "differs"


def run_checks(kernels, attention, reference, device, quick):
    g, d, n = 4, 128, 16  # Llama-3-8B group, head dim, vLLM's CUDA block size
    checks = [
        ("attention decode bf16", dict(group=g, head_dim=d, block_size=n, dtype=torch.bfloat16, max_q=1)),
        ("attention mixed bf16", dict(group=g, head_dim=d, block_size=n, dtype=torch.bfloat16, max_q=24)),
        ("attention split-KV decode bf16", dict(group=g, head_dim=d, block_size=n, dtype=torch.bfloat16,
                                                 max_q=1, knobs=dict(num_splits=4))),
        ("attention decode bf16, no metrics", dict(group=g, head_dim=d, block_size=n,
                                                    dtype=torch.bfloat16, max_q=1, metrics=False)),
        ("attention decode bf16, metric scores recomputed from K",
         dict(group=g, head_dim=d, block_size=n, dtype=torch.bfloat16, max_q=1,
              knobs=dict(scores=False))),
    ]
    if not quick:
        checks += [
            ("attention mixed fp16 G=8 N=32", dict(group=8, head_dim=d, block_size=32,
                                                   dtype=torch.float16, max_q=24)),
            ("attention mixed fp32 G=1 D=64", dict(group=1, head_dim=64, block_size=n,
                                                   dtype=torch.float32, max_q=24)),
            ("attention split-KV mixed bf16", dict(group=g, head_dim=d, block_size=n,
                                                    dtype=torch.bfloat16, max_q=12,
                                                    knobs=dict(num_splits=3, block_m=16))),
            ("attention decode bf16 N=128", dict(group=g, head_dim=d, block_size=128,
                                                  dtype=torch.bfloat16, max_q=1, max_kv=1000)),
        ]
    def guarded(name, fn, *a, **kw):
        # A check that raises (a compile error, say) is a failed row; the others still run.
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001
            return name, False, "raised " + _one_line(e, 300)

    results = []
    for i, (name, kw) in enumerate(checks):
        if quick:
            kw = dict(kw, num_reqs=2, num_kv_heads=2, max_kv=min(kw.get("max_kv", 300), 100))
        results.append(guarded(name, check_attention, kernels, attention, reference, device, name,
                               seed=i, **kw))
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32):
        dt = str(dtype).removeprefix("torch.")
        results.append(guarded(f"write_kv {dt}", check_write_kv, kernels, reference, device, dtype))
        results.append(guarded(f"compact_heads {dt}", check_compact, kernels, reference, device,
                               dtype))
    return results


# --------------------------------------------------------------------------
# 2. timing
# --------------------------------------------------------------------------
def timed(fn, device, reps: int, warmup: int, budget_ms: float = 1500.0,
          min_reps: int = 3) -> float:
    """Median milliseconds per call; after one timed warm-up call the number of
    repetitions is cut so that one measurement takes about ``budget_ms``
    (at least ``min_reps``)."""
    for _ in range(max(0, warmup - 1)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = 1000 * (time.perf_counter() - t0)
    reps = max(min_reps, min(reps, int(budget_ms / max(first, 1e-3))))
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _sdpa(q, k, v, causal_lower_right=None):
    f = torch.nn.functional.scaled_dot_product_attention
    mask = None
    if causal_lower_right is not None:
        from torch.nn.attention.bias import causal_lower_right as clr

        mask = clr(*causal_lower_right)
    try:
        return f(q, k, v, attn_mask=mask, enable_gqa=True)
    except TypeError:  # torch < 2.5: no enable_gqa
        rep = q.shape[1] // k.shape[1]
        return f(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


def bytes_needed(batch, ctx, q_len, shape, dtype) -> int:
    e = torch.tensor([], dtype=dtype).element_size()
    kv = batch * shape["num_kv_heads"] * ctx * 2 * shape["head_dim"] * e
    metrics = batch * shape["num_kv_heads"] * ctx * 4
    q = batch * q_len * shape["num_q_heads"] * shape["head_dim"] * e * 4
    return 2 * kv + metrics + q + (256 << 20)  # paged + dense copies, metrics, q/out, slack


def _one_line(err: Exception, limit: int) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters (table cells)."""
    return " ".join(f"{type(err).__name__}: {err}".split())[:limit]


class AgreementError(RuntimeError):
    """The paged kernel and SDPA over the same KVs disagree."""


def time_config(kernels, device, phase, batch, ctx, q_len, window, shape, dtype, block, reps, warmup,
                min_reps=3):
    hq, hkv, d = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"]
    group = hq // hkv
    case = paged_case(batch, hkv, group, d, block, dtype, [ctx] * (batch * hkv), [q_len] * batch,
                      device, seed=batch + ctx, spare_pages=0)
    args = [case[k] for k in ("query", "kv_pages", "page_table", "kv_lens", "query_start_loc")]
    scale = case["scale"]
    out = torch.empty_like(case["query"])
    metrics = case["metrics"]
    mqs = torch.full((batch,), max(0, q_len - window), dtype=torch.int32, device=device)

    def kvc(with_metrics):
        return lambda: kernels.paged_head_attention(*args, scale, metrics if with_metrics else None,
                                                    mqs, out)

    # The same KVs, densely: [B, H, ctx, D] (page rows in logical order).
    pt = case["page_table"].long()
    k_dense = case["kv_pages"][pt, 0].reshape(batch, hkv, ctx, d)
    v_dense = case["kv_pages"][pt, 1].reshape(batch, hkv, ctx, d)
    q_dense = case["query"].view(batch, q_len, hq, d).transpose(1, 2)
    clr = (q_len, ctx) if q_len > 1 else None
    sdpa = lambda: _sdpa(q_dense, k_dense, v_dense, clr)  # noqa: E731
    # The two agree (same KVs): a cross-check of the benchmark itself.
    kvc(False)()
    dense_out = sdpa().transpose(1, 2).reshape(batch * q_len, hq, d)
    agree = (dense_out.float() - out.float()).abs().max().item()
    if not agree <= 4 * OUT_ATOL[dtype]:
        raise AgreementError(
            f"{phase} batch {batch} ctx {ctx}: paged attention and SDPA over the same KVs "
            f"differ by {agree:.3e} (> {4 * OUT_ATOL[dtype]:.0e})"
        )
    row = dict(phase=phase, batch=batch, ctx=ctx, q_len=q_len,
               sdpa_ms=timed(sdpa, device, reps, warmup, min_reps=min_reps),
               kvc_ms=timed(kvc(False), device, reps, warmup, min_reps=min_reps),
               kvc_metrics_ms=timed(kvc(True), device, reps, warmup, min_reps=min_reps),
               max_diff=agree)
    del k_dense, v_dense, case
    return row


def run_timing(kernels, device, args, shape, dtype):
    """One row per (phase, batch, ctx): decode rows first (they carry the
    target).  A configuration that raises is reported as a failed row and the
    others still run; a disagreement between the kernel and SDPA marks the
    row ``mismatch`` (a correctness failure, see ``main``).  Configurations not
    started within ``--time-budget`` seconds are reported as skipped."""
    batches = QUICK_BATCHES if args.quick else BATCHES
    contexts = QUICK_CONTEXTS if args.quick else CONTEXTS
    chunk = 32 if args.quick else args.prefill_chunk
    reps, warmup, min_reps = (1, 1, 1) if args.quick else (args.reps, args.warmup, 3)
    prefill_batches = batches if args.quick else tuple(args.prefill_batches)
    start = time.perf_counter()
    rows = []
    for phase, q_len in (("decode", 1), ("prefill", chunk)):
        for batch in batches if phase == "decode" else prefill_batches:
            for ctx in contexts:
                if args.time_budget and time.perf_counter() - start > args.time_budget:
                    rows.append(dict(phase=phase, batch=batch, ctx=ctx, q_len=q_len,
                                     skipped=f"--time-budget {args.time_budget:g} s spent"))
                    print(_row_md(rows[-1]), flush=True)
                    continue
                need = bytes_needed(batch, ctx, q_len, shape, dtype)
                if device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info()
                    if need > 0.9 * free:
                        rows.append(dict(phase=phase, batch=batch, ctx=ctx, q_len=q_len,
                                         skipped=f"needs {need / 2**30:.1f} GiB, "
                                                 f"{free / 2**30:.1f} GiB free"))
                        continue
                try:
                    rows.append(time_config(kernels, device, phase, batch, ctx, q_len, args.window,
                                            shape, dtype, args.block_size, reps, warmup, min_reps))
                except AgreementError as e:
                    rows.append(dict(phase=phase, batch=batch, ctx=ctx, q_len=q_len,
                                     skipped=f"**mismatch**: {e}", mismatch=True))
                except Exception as e:  # noqa: BLE001 -- report it, time the others
                    rows.append(dict(phase=phase, batch=batch, ctx=ctx, q_len=q_len,
                                     skipped=f"failed: {_one_line(e, 200)}"))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(_row_md(rows[-1]), flush=True)
    return rows


def run_sweep(attention, device, args, shape, dtype) -> str:
    """``--sweep``: decode and prefill time over the tiling knobs of
    ``attention._launch`` (KV splits and KV tile for decode; query and KV tile
    for prefill), with metrics on and off, next to what the default heuristics
    pick.  Markdown table; the basis of ``_choose_splits`` and the tile
    defaults on Hopper."""
    hq, hkv, d = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"]
    group = hq // hkv
    lines = ["| phase | batch | ctx | block_m | block_n | splits | ms | ms with metrics | default |",
             "|---|---|---|---|---|---|---|---|---|"]
    quick = args.quick
    decode = [(b, c) for b in ((1, 2) if quick else (1, 8, 32, 64, 128))
              for c in ((256,) if quick else (8192, 32768))]
    prefill = [(b, c) for b in ((1,) if quick else (1, 8)) for c in ((256,) if quick else (8192, 32768))]
    plans = [("decode", 1, b, c, [(None, bn, sp) for bn in (64, 128)
                                  for sp in ((1, 2) if quick else (1, 2, 3, 4, 8, 16, 32))])
             for b, c in decode]
    chunk = 32 if quick else args.prefill_chunk
    plans += [("prefill", chunk, b, c, [(bm, bn, 1) for bm in (32, 64, 128) for bn in (32, 64, 128)])
              for b, c in prefill]
    budget = 50.0 if quick else 250.0
    for phase, q_len, batch, ctx, knobs in plans:
        case = paged_case(batch, hkv, group, d, args.block_size, dtype, [ctx] * (batch * hkv),
                          [q_len] * batch, device, seed=batch + ctx, spare_pages=0)
        a = [case[k] for k in ("query", "kv_pages", "page_table", "kv_lens", "query_start_loc")]
        out = torch.empty_like(case["query"])
        mqs = torch.full((batch,), max(0, q_len - args.window), dtype=torch.int32, device=device)
        for bm, bn, sp in [(None, None, None)] + knobs:
            def call(metrics, bm=bm, bn=bn, sp=sp):
                return lambda: attention._launch(*a, case["scale"], metrics, mqs, out,
                                                 block_m=bm, block_n=bn, num_splits=sp)
            try:
                ms = timed(call(None), device, 50, 2, budget_ms=budget, min_reps=3)
                ms_m = timed(call(case["metrics"]), device, 50, 2, budget_ms=budget, min_reps=3)
                cells = f"{ms:.3f} | {ms_m:.3f}"
            except Exception as e:  # noqa: BLE001 -- e.g. out of shared memory: report, go on
                cells = "failed: " + _one_line(e, 120) + " |"
            default = sp is None
            line = (f"| {phase} | {batch} | {ctx} | {bm or '-'} | {bn or '-'} | {sp or '-'} | "
                    f"{cells} | {'default' if default else ''} |")
            lines.append(line)
            print(line, flush=True)
        del case, a, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return "\n".join(lines)


def _row_md(r) -> str:
    head = f"| {r['phase']} | {r['batch']} | {r['ctx']} | {r['q_len']} |"
    if "skipped" in r:
        return head + f" skipped: {r['skipped']} | | | | | |"
    ratio = r["kvc_ms"] / r["sdpa_ms"]
    ratio_m = r["kvc_metrics_ms"] / r["sdpa_ms"]
    target = ""
    if r["phase"] == "decode" and r["batch"] >= 32 and r["ctx"] >= 8192:
        target = "yes" if ratio_m <= TARGET_RATIO else "**no**"
    return (head + f" {r['sdpa_ms']:.3f} | {r['kvc_ms']:.3f} | {r['kvc_metrics_ms']:.3f} | "
            f"{ratio:.2f} | {ratio_m:.2f} | {target} |")


def render(checks, rows, device_desc, args, shape, dtype, interpreted) -> str:
    lines = [
        "# KV-Compress Triton kernels on " + device_desc,
        "",
        f"`python benchmarks/gpu_kernels.py{' --quick' if args.quick else ''}`; torch "
        f"{torch.__version__}, triton {_triton_version()}, {platform.python_version()}.",
    ]
    if interpreted:
        lines += ["", "**CPU under the Triton interpreter: a smoke run; the times are not "
                      "performance numbers.**"]
    lines += ["", "## Correctness (vs `ops/reference.py`)", "", "| check | ok | detail |",
              "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**FAILED**'} | {detail} |" for name, ok, detail in checks]
    lines += [
        "", "## Attention time (median ms per call, one layer)", "",
        f"Shape: {shape['num_q_heads']} query / {shape['num_kv_heads']} KV heads, head dim "
        f"{shape['head_dim']}, {str(dtype).removeprefix('torch.')}, {args.block_size}-token pages; "
        f"prefill = the last {rows[-1]['q_len'] if rows else args.prefill_chunk} queries of a "
        f"prompt of `ctx` tokens, the last {args.window} of them recording metrics; decode "
        "records metrics for every query. SDPA reads the same KVs laid out densely. "
        f"Target: decode with metrics <= {TARGET_RATIO}x SDPA at batch >= 32, ctx >= 8k.",
        "",
        "| phase | batch | ctx | q/req | SDPA ms | KVC ms | KVC+metrics ms | KVC / SDPA | "
        "KVC+metrics / SDPA | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row_md(r) for r in rows]
    worst = max((r.get("max_diff", 0.0) for r in rows), default=0.0)
    lines += ["", f"Largest |KVC - SDPA| output difference over the timed cases: {worst:.2e}.", ""]
    return "\n".join(lines)


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (also on CPU, interpreted)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown output (default: docs/gpu_kernels.md for a full GPU run)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--window", type=int, default=32, help="observation window (prefill metrics)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="calls before timing (the first compiles)")
    p.add_argument("--prefill-batches", type=int, nargs="+", default=list(BATCHES),
                   help="batch sizes of the prefill rows")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; timing rows not started by then are reported as skipped (0: none)")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--sweep", action="store_true",
                   help="only the tiling sweep (KV splits / tiles, decode and prefill) -> --out")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    if not cuda:
        if not args.quick:
            print("no CUDA device: only --quick runs here (under the Triton interpreter)",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    device = torch.device("cuda" if cuda else "cpu")
    kernels, attention, reference = load_kernels()
    dtype = DTYPES[args.dtype]
    shape = LLAMA3_8B
    device_desc = (f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
                   if cuda else "CPU (Triton interpreter)")
    print(f"# {device_desc}", flush=True)

    if args.sweep:
        text = (f"# Tiling sweep on {device_desc}\n\n`python benchmarks/gpu_kernels.py --sweep`; "
                f"torch {torch.__version__}, triton {_triton_version()}. Median ms per call, one "
                f"layer, {shape['num_q_heads']} query / {shape['num_kv_heads']} KV heads, head dim "
                f"{shape['head_dim']}, {args.dtype}, {args.block_size}-token pages; '-' = the "
                "default choice.\n\n" + run_sweep(attention, device, args, shape, dtype) + "\n")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        return 0
    checks = run_checks(kernels, attention, reference, device, args.quick)
    for name, ok, detail in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    rows = [] if args.skip_timing else run_timing(kernels, device, args, shape, dtype)
    text = render(checks, rows, device_desc, args, shape, dtype, interpreted=not cuda)
    print(text)
    out = args.out
    if out is None and cuda and not args.quick:
        out = ROOT / "docs" / "gpu_kernels.md"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    if "vllm" in sys.modules:  # the promise in the docstring
        print("note: vllm was imported by something in this process", file=sys.stderr)
    mismatches = [r for r in rows if r.get("mismatch")]
    return 0 if all(ok for _, ok, _ in checks) and not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
