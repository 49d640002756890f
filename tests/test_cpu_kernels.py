"""C++ CPU kernels (``kvcompress_vllm._C``) vs ``kvcompress_vllm.ops.reference``.

Random cases come from ``kernel_cases`` (shared with the Triton tests): per-head
KV counts that differ by several pages, disjoint random pages, decode rows and
prefill-chunk rows in one batch.  Metrics are checked on zero-initialised
buffers (so small contributions are not lost in the rounding of large start
values) and once more on random start values (accumulation, not overwrite).

The attention tests run on each ISA path of the kernels (``cpu_isa`` fixture:
the baseline AVX2 path and the AVX-512-BF16 path, switched at run time with
``torch.ops.kvcompress.set_cpu_isa``); the AVX-512 runs skip on CPUs without
AVX-512 F/BW/VL/DQ + AVX512-BF16.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from kernel_cases import (SHARED_MOVED_PAGES, make_attention_case, make_compaction_case,
                          share_prefix_pages, two_heads_on_pages)

from kvcompress_vllm import ops
from kvcompress_vllm.ops import reference

OUT_ATOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
METRIC_RTOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def _load_kernels():
    ops.load_library()  # fails loudly if _C*.so is missing
    assert hasattr(torch.ops.kvcompress, "paged_head_attention")


ISAS = ("avx2", "avx512", "avx512_bf16", "avx512_amx")


def _set_isa_or_skip(name: str) -> str:
    try:
        return torch.ops.kvcompress.set_cpu_isa(name)
    except RuntimeError as e:  # CPU without AVX-512-BF16
        pytest.skip(f"ISA path {name} unavailable: {e}")


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Run one test on one ISA path of the kernels; restore the path after."""
    before = _set_isa_or_skip(request.param)
    yield request.param
    torch.ops.kvcompress.set_cpu_isa(before)


@pytest.fixture
def num_threads():
    """Set torch's intra-op thread count for one test, restore it after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _strided(x: torch.Tensor, pad: int = 24) -> torch.Tensor:
    """``x`` [T, Hq, D] as a view into a wider row (like q in a fused qkv)."""
    t, hq, d = x.shape
    big = torch.full((t, hq * d + pad), float("nan"), dtype=x.dtype)
    view = big[:, : hq * d].view(t, hq, d)
    view.copy_(x)
    return view


def _strided_out(x: torch.Tensor) -> torch.Tensor:
    """An output view with a padded head stride: [T, Hq, D] of [T, Hq, D + 8]."""
    t, hq, d = x.shape
    return torch.zeros(t, hq, d + 8, dtype=x.dtype)[:, :, :d]


def _run_both(case, *, metrics: bool, strided: bool = False, zero_metrics: bool = True):
    ref_out, ref_m = case.clone_outputs()
    out, got_m = case.clone_outputs()
    if zero_metrics:
        ref_m.zero_()
        got_m.zero_()
    query = _strided(case.query) if strided else case.query
    if strided:
        out = _strided_out(case.query)
    reference.paged_head_attention(
        case.query, case.kv_pages, case.page_table, case.kv_lens, case.query_start_loc,
        case.scale, ref_m if metrics else None, case.metric_q_start, ref_out,
        metric_k_start=case.metric_k_start,
    )
    ops.paged_head_attention(
        query, case.kv_pages, case.page_table, case.kv_lens, case.query_start_loc,
        case.scale, got_m if metrics else None, case.metric_q_start, out,
        metric_k_start=case.metric_k_start,
    )
    return ref_out, out, ref_m, got_m


def _check(case, dtype, *, metrics: bool, strided: bool = False, zero_metrics: bool = True):
    before = case.metrics.clone()
    ref_out, out, ref_m, got_m = _run_both(
        case, metrics=metrics, strided=strided, zero_metrics=zero_metrics
    )
    torch.testing.assert_close(out.float(), ref_out.float(), atol=OUT_ATOL[dtype], rtol=0)
    if metrics:
        scale = ref_m.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(
            got_m, ref_m, rtol=METRIC_RTOL[dtype], atol=1e-6 * float(scale)
        )
    else:
        assert torch.equal(got_m, before if not zero_metrics else torch.zeros_like(before))
    assert torch.equal(case.metrics, before)  # inputs untouched
    return ref_m, got_m


# ---------------------------------------------------------------- attention

GROUPS = (1, 3, 4, 8)
HEAD_DIMS = (64, 128)
BLOCKS = (16, 32, 128)
DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize(
    "group,head_dim,block_size",
    list(itertools.product(GROUPS, HEAD_DIMS, BLOCKS)),
)
def test_attention_random(group, head_dim, block_size, cpu_isa):
    """Decode + prefill rows, metrics on and off, fp32 and bf16."""
    for i, dtype in enumerate(DTYPES):
        case = make_attention_case(
            num_reqs=4, num_kv_heads=2, group=group, head_dim=head_dim,
            block_size=block_size, dtype=dtype, max_kv=260, max_q=24,
            seed=group * 100 + head_dim + block_size + i,
        )
        _check(case, dtype, metrics=True)
        _check(case, dtype, metrics=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_q", [1, 40])
def test_attention_dtypes_strided(dtype, max_q, cpu_isa):
    """Strided query/output views (rows of a fused qkv / padded output)."""
    case = make_attention_case(
        num_reqs=5, num_kv_heads=2, group=4, head_dim=64, block_size=32, dtype=dtype,
        max_kv=200, max_q=max_q, seed=11 + max_q,
    )
    _check(case, dtype, metrics=True, strided=True)
    _check(case, dtype, metrics=False, strided=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_accumulates_metrics(dtype, cpu_isa):
    """Metrics are added to the existing (random) values."""
    case = make_attention_case(
        num_reqs=4, num_kv_heads=2, group=2, head_dim=64, block_size=16, dtype=dtype,
        max_kv=64, max_q=8, seed=5,
    )
    _check(case, dtype, metrics=True, zero_metrics=False)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("max_q", [1, 4])
def test_attention_long_heads_split(num_threads, threads, max_q, cpu_isa):
    """Few long heads: flash-decoding partitions (+ merge) when threads > 1."""
    num_threads(threads)
    for dtype in (torch.float32, torch.bfloat16):
        case = make_attention_case(
            num_reqs=2, num_kv_heads=1, group=4, head_dim=64, block_size=32, dtype=dtype,
            max_kv=2600, max_q=max_q, seed=threads * 10 + max_q,
        )
        _check(case, dtype, metrics=True)
        _check(case, dtype, metrics=False)


@pytest.mark.parametrize("threads", [1, 2])
def test_attention_long_prefill(num_threads, threads, cpu_isa):
    """Multi-tile prefill chunks, metric tiles grouped per head, GQA 8."""
    num_threads(threads)
    case = make_attention_case(
        num_reqs=3, num_kv_heads=2, group=8, head_dim=128, block_size=128,
        dtype=torch.bfloat16, max_kv=400, max_q=90, seed=21 + threads,
    )
    _check(case, torch.bfloat16, metrics=True)


def test_attention_odd_head_dim(cpu_isa):
    """head_dim not a multiple of 8 (fp32 staging path)."""
    for dtype in (torch.float32, torch.bfloat16):
        case = make_attention_case(
            num_reqs=4, num_kv_heads=2, group=3, head_dim=36, block_size=16, dtype=dtype,
            max_kv=150, max_q=12, seed=3,
        )
        _check(case, dtype, metrics=True)


def test_attention_empty_rows_and_metric_start(cpu_isa):
    """q_len == 0 rows are skipped; metric_q_start < 0 / > q_len edge values."""
    case = make_attention_case(
        num_reqs=4, num_kv_heads=2, group=2, head_dim=64, block_size=16,
        dtype=torch.float32, max_kv=100, max_q=6, seed=3,
    )
    # Drop request 1's query rows: it becomes an empty row of the batch.
    qsl = case.query_start_loc.tolist()
    n1 = qsl[2] - qsl[1]
    case.query = torch.cat([case.query[: qsl[1]], case.query[qsl[2] :]])
    case.query_start_loc = torch.tensor(
        qsl[:2] + [x - n1 for x in qsl[2:]], dtype=torch.int32
    )
    case.metric_q_start = torch.tensor([-3, 0, 100, 1], dtype=torch.int32)
    _check(case, torch.float32, metrics=True)
    _check(case, torch.float32, metrics=False)


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("max_q", [1, 24])
def test_attention_requests_sharing_pages_add_every_metric(num_threads, threads, max_q, cpu_isa):
    """Requests that share prefix pages (prefix-cache hitters and their writer,
    the n > 1 children of one prompt) all add their metric to the shared slots
    in one call, from tasks on different threads: no update is lost.  Before
    the per-page lock, a plain read-modify-write lost whole contributions (up
    to 60% of a slot's sum) in 2-10% of these calls; 50 calls per case."""
    num_threads(threads)
    for dtype in (torch.float32, torch.bfloat16):
        case = share_prefix_pages(
            make_attention_case(
                num_reqs=24, num_kv_heads=2, group=3, head_dim=64, block_size=16,
                dtype=dtype, min_kv=200, max_kv=260, max_q=max_q, seed=7 * threads + max_q,
            ),
            shared_pages=12,
        )
        ref_m, got_m = _check(case, dtype, metrics=True)
        scale = ref_m.abs().max().clamp_min(1e-30)
        shared = case.page_table[0, :, :12].reshape(-1).long()
        assert float(ref_m[shared].min()) > 0  # every request's queries reach the prefix
        for run in range(50):
            again = torch.zeros_like(got_m)
            ops.paged_head_attention(
                case.query, case.kv_pages, case.page_table, case.kv_lens, case.query_start_loc,
                case.scale, again, case.metric_q_start, torch.zeros_like(case.query),
            )
            # Only the order of the adds to a shared slot may differ (last bits).
            torch.testing.assert_close(
                again, got_m, rtol=1e-4, atol=1e-7 * float(scale),
                msg=lambda m, run=run: f"call {run + 2} lost metric updates: {m}",
            )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("max_q", [1, 24])
def test_attention_metric_k_start_leaves_a_hitters_hits_to_their_writer(
        num_threads, threads, max_q, cpu_isa):
    """With ``metric_k_start`` (the worker sets a prefix-cache hitter's hit
    count), a request's queries add metric only to its KVs from that index
    on: the shared prefix slots hold exactly what their writer (request 0)
    adds, computed here by a dense softmax over request 0 alone, and the
    kernel matches the reference everywhere (split decode rows included)."""
    num_threads(threads)
    shared_pages, block_size = 6, 16
    for dtype in (torch.float32, torch.bfloat16):
        case = share_prefix_pages(
            make_attention_case(
                num_reqs=6, num_kv_heads=2, group=3, head_dim=64, block_size=block_size,
                dtype=dtype, min_kv=120, max_kv=2000 if max_q == 1 else 200, max_q=max_q,
                seed=31 + threads + max_q,
            ),
            shared_pages=shared_pages, hits=True,
        )
        _, got_m = _check(case, dtype, metrics=True)
        # Request 0's own metric on its prefix, dense: softmax over its KVs.
        q0, q1 = int(case.query_start_loc[0]), int(case.query_start_loc[1])
        first = max(0, min(q1 - q0, int(case.metric_q_start[0])))
        hit = shared_pages * block_size
        for h in range(2):
            n = int(case.kv_lens[0, h])
            pages = case.page_table[0, h, : (n + block_size - 1) // block_size].long()
            keys = case.kv_pages[pages, 0].reshape(-1, 64)[:n].float()
            q = case.query[q0:q1, h * 3:(h + 1) * 3].float()  # [q, G, D]
            s = torch.einsum("qgd,kd->qgk", q, keys) * case.scale
            visible = torch.arange(n)[None, None, :] <= (n - (q1 - q0) + torch.arange(q1 - q0))[:, None, None]
            p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
            want = p[first:].square().sum(dim=(0, 1))[:hit]
            shared = case.page_table[0, h, :shared_pages].long()
            torch.testing.assert_close(got_m[shared].reshape(-1), want,
                                       rtol=METRIC_RTOL[dtype], atol=1e-6)


def _isa_available(name: str) -> bool:
    try:
        torch.ops.kvcompress.set_cpu_isa(name)
        return True
    except RuntimeError:
        return False


def test_cpu_isa_dispatch():
    """auto picks the best path this CPU has: AVX-512-BF16 + AMX, else
    AVX-512-BF16, else AVX-512 (F/BW/VL/DQ), else the baseline (never a path
    the CPU lacks; a KVC_AVX512=OFF build has none); bad names are rejected."""
    cpu_512 = bool(torch.cpu._is_avx512_supported())
    cpu_has = bool(torch.cpu._is_avx512_bf16_supported())
    cpu_amx = bool(torch.cpu._is_amx_tile_supported())
    before = torch.ops.kvcompress.set_cpu_isa("auto")
    try:
        has512 = _isa_available("avx512")
        has = _isa_available("avx512_bf16")
        amx = _isa_available("avx512_amx")
        if not os.environ.get("KVC_EMULATE_CPU"):  # benchmarks/cpu_emulation patches torch's probes
            assert cpu_512 or not has512
            assert (cpu_has and has512) or not has
            assert (cpu_amx and has) or not amx
        torch.ops.kvcompress.set_cpu_isa("auto")
        want = (("avx512_amx",) if amx else ("avx512_bf16",) if has else ("avx512",) if has512
                else ("avx2", "generic"))  # generic: KVC_CPU_ISA=generic
        assert torch.ops.kvcompress.cpu_isa() in want
        # Only the avx512 path runs the micro-kernels with BF16 emulated.
        for path, available in (("avx2", True), ("avx512", has512), ("avx512_bf16", has),
                                ("avx512_amx", amx)):
            if available:
                torch.ops.kvcompress.set_cpu_isa(path)
                assert torch.ops.kvcompress.cpu_isa_emulates_bf16() == (path == "avx512")
        torch.ops.kvcompress.set_cpu_isa("auto")
        if os.environ.get("KVCOMPRESS_CPU_ISA", "auto") == "auto":
            assert before == torch.ops.kvcompress.cpu_isa()
        with pytest.raises(RuntimeError, match="unknown CPU ISA"):
            torch.ops.kvcompress.set_cpu_isa("sse9")
        if not has512:
            with pytest.raises(RuntimeError, match="lacks"):
                torch.ops.kvcompress.set_cpu_isa("avx512")
        if not has:
            with pytest.raises(RuntimeError, match="lacks"):
                torch.ops.kvcompress.set_cpu_isa("avx512_bf16")
        if not amx:
            with pytest.raises(RuntimeError, match="lacks"):
                torch.ops.kvcompress.set_cpu_isa("avx512_amx")
    finally:
        torch.ops.kvcompress.set_cpu_isa(before)


@pytest.mark.parametrize("path", ["avx512_bf16", "avx512"])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("block_size", [16, 128])
def test_attention_avx512_bf16_shapes(path, head_dim, group, block_size):
    """The AVX-512 micro-kernels (bf16, head_dim % 32 == 0; ``avx512``: the
    AVX512-BF16 instructions emulated) on random shapes: every row grouping
    (4/2/1 rows), odd KV counts, decode + prefill, metrics on and off, 1 and 2
    threads; also close to the AVX2 path."""
    before = _set_isa_or_skip(path)
    threads = torch.get_num_threads()
    try:
        for t, max_q in ((1, 1), (2, 1), (2, 20)):
            torch.set_num_threads(t)
            case = make_attention_case(
                num_reqs=3, num_kv_heads=2, group=group, head_dim=head_dim,
                block_size=block_size, dtype=torch.bfloat16, max_kv=700, max_q=max_q,
                seed=head_dim + 10 * group + block_size + max_q + t,
            )
            _check(case, torch.bfloat16, metrics=True)
            _check(case, torch.bfloat16, metrics=False)
            _, fast, _, m_fast = _run_both(case, metrics=True)
            torch.ops.kvcompress.set_cpu_isa("avx2")
            _, base, _, m_base = _run_both(case, metrics=True)
            torch.ops.kvcompress.set_cpu_isa(path)
            torch.testing.assert_close(fast.float(), base.float(), atol=2e-2, rtol=0)
            torch.testing.assert_close(m_fast, m_base, rtol=1e-3, atol=1e-7)
    finally:
        torch.set_num_threads(threads)
        torch.ops.kvcompress.set_cpu_isa(before)


#: vLLM's in-page layouts our kernel reads: name -> offsets formula.
LAYOUTS = {name: offsets for name, (_, offsets) in ops.KERNEL_LAYOUTS.items()}


def _pack_requests(case, packed: torch.Tensor, layout: str = "amx") -> torch.Tensor:
    """Rewrite the head-pages of the requests with ``packed[r]`` in vLLM's
    in-page ``layout`` (``LAYOUTS``), and fill every slot past a head's last KV
    with NaN (stale slots must never reach the output).  Returns the packing."""
    num_pages, _, block, dim = case.kv_pages.shape
    packing = LAYOUTS[layout](block, dim)
    pages = case.kv_pages
    for r in range(case.page_table.shape[0]):
        for h in range(case.page_table.shape[1]):
            n = int(case.kv_lens[r, h])
            ids = case.page_table[r, h, : -(-n // block)].long()
            if n % block and pages.is_floating_point():
                pages[ids[-1], :, n % block :] = float("nan")
            if bool(packed[r]):
                plain = pages[ids].reshape(len(ids), 2, block * dim).clone()
                halves = pages.view(num_pages, 2, block * dim)
                for half in range(2):
                    halves[ids.view(-1, 1), half, packing[half].view(-1).long()] = plain[:, half]
    return packing


def _check_packed(case, packed: torch.Tensor, dtype, layout: str = "amx") -> None:
    """Pack the requests with ``packed[r]`` (``_pack_requests``) and compare our
    kernel with the reference on the same pages, metrics on and off: no NaN
    output, outputs and metrics within tolerance, metrics untouched when off."""
    packing = _pack_requests(case, packed, layout)
    for metrics in (True, False):
        ref_out, ref_m = case.clone_outputs()
        out, got_m = case.clone_outputs()
        ref_m.zero_()
        got_m.zero_()
        args = (case.query, case.kv_pages, case.page_table, case.kv_lens,
                case.query_start_loc, case.scale)
        reference.paged_head_attention(*args, ref_m if metrics else None,
                                       case.metric_q_start, ref_out, packing, packed)
        ops.paged_head_attention(*args, got_m if metrics else None, case.metric_q_start,
                                 out, packing, packed)
        assert not out.isnan().any()
        torch.testing.assert_close(out.float(), ref_out.float(), atol=OUT_ATOL[dtype], rtol=0)
        if metrics:
            torch.testing.assert_close(got_m, ref_m, rtol=METRIC_RTOL[dtype],
                                       atol=1e-6 * float(ref_m.abs().max()))
        else:
            assert not got_m.any()


@pytest.mark.parametrize("layout", [None, *sorted(LAYOUTS)])
@pytest.mark.parametrize("threads,max_q", [(1, 1), (2, 1), (2, 24)])
def test_avx512_emulation_computes_what_the_bf16_instructions_compute(threads, max_q, layout,
                                                                       num_threads):
    """The ``avx512`` path (AVX512-BF16's VDPBF16PS and VCVTNEPS2BF16 emulated)
    gives bit for bit the outputs and metrics of the ``avx512_bf16`` path, on
    plain pages and on each packed layout: the same products and sums in the
    same order, probabilities rounded to nearest even (a truncating rounding
    or another order of the two products would differ)."""
    before = _set_isa_or_skip("avx512_bf16")
    _set_isa_or_skip("avx512")
    num_threads(threads)
    try:
        for head_dim, group in ((64, 3), (128, 4), (32, 1)):
            case = make_attention_case(
                num_reqs=3, num_kv_heads=2, group=group, head_dim=head_dim, block_size=128,
                dtype=torch.bfloat16, max_kv=700, max_q=max_q, seed=head_dim + group + max_q,
            )
            packed = torch.tensor([True, False, True])
            packing = None if layout is None else _pack_requests(case, packed, layout)
            results = []
            for path in ("avx512", "avx512_bf16"):
                torch.ops.kvcompress.set_cpu_isa(path)
                out, metrics = case.clone_outputs()
                metrics.zero_()
                ops.paged_head_attention(
                    case.query, case.kv_pages, case.page_table, case.kv_lens,
                    case.query_start_loc, case.scale, metrics, case.metric_q_start, out,
                    packing, None if layout is None else packed)
                results.append((out, metrics))
            (out, metrics), (want, want_m) = results
            assert torch.equal(out, want), (head_dim, group)
            assert torch.equal(metrics, want_m), (head_dim, group)
    finally:
        torch.ops.kvcompress.set_cpu_isa(before)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("block_size", [16, 48, 128, 256])
def test_attention_packed_pages(layout, head_dim, group, block_size, cpu_isa, num_threads):
    """Requests whose head-pages are in one of vLLM's in-page layouts (AMX;
    vec: K transposed -- on 48-slot pages its 32-key steps meet a 16-key tail,
    on 256-slot pages every page holds two 128-key blocks, the second from slot 128),
    mixed with plain ones in one batch (``packed`` per request): decode and
    prefill rows, odd KV counts, NaN in stale slots, metrics on and off, 1 and
    2 threads (flash-decoding partitions), bf16 (AVX-512 micro-kernels where
    selected) and fp32 (staged rows); against the reference reading the same
    pages."""
    for threads, max_q, dtype in ((1, 1, torch.bfloat16), (2, 1, torch.bfloat16),
                                  (2, 24, torch.bfloat16), (2, 24, torch.float32)):
        num_threads(threads)
        case = make_attention_case(
            num_reqs=4, num_kv_heads=2, group=group, head_dim=head_dim, block_size=block_size,
            dtype=dtype, max_kv=700 if max_q == 1 else 300, max_q=max_q,
            seed=head_dim + 10 * group + block_size + max_q + threads,
        )
        _check_packed(case, torch.tensor([True, False, True, True]), dtype, layout)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("threads,max_q", [(1, 1), (2, 1), (2, 24)])
def test_attention_scores_that_climb(threads, max_q, layout, cpu_isa, num_threads):
    """Scores that rise along the KVs, by small steps and by large jumps, so
    that the running max of the online softmax moves by less and by more than
    the lazy-rescaling threshold (8) of the AVX-512 paths, within a block and
    across blocks and flash-decoding partitions, and once by more than exp's
    range (a reference that never moved would overflow); a lone spike far back.
    Plain and packed pages, metrics on and off, against the reference."""
    num_threads(threads)
    dtype = torch.bfloat16
    case = make_attention_case(
        num_reqs=3, num_kv_heads=2, group=4, head_dim=64, block_size=32, dtype=dtype,
        max_kv=900, max_q=max_q, seed=7 + threads + max_q,
    )
    block = case.kv_pages.shape[2]
    # score(t) ~ scale * 8 * K[t, 0] = K[t, 0]: dim 0 of the keys sets the
    # score of KV t, dim 0 of every query is 8 (= 1 / scale).
    case.query[..., 0] = 1 / case.scale
    gen = torch.Generator().manual_seed(threads)
    for r in range(case.page_table.shape[0]):
        for h in range(case.page_table.shape[1]):
            n = int(case.kv_lens[r, h])
            t = torch.arange(n)
            # A late jump past exp's range (~88) too: a reference max that
            # stopped moving would overflow there.
            climb = (2.5 * (t // 40) + 12.0 * (t >= n // 2) + 9.0 * (t >= 3 * n // 4)
                     + 110.0 * (t >= 7 * n // 8))
            climb = climb + 0.5 * torch.randn(n, generator=gen)
            climb[n // 5] += 30.0  # a spike the later keys climb past
            pages = case.page_table[r, h, t // block].long()
            case.kv_pages[pages, 0, t % block, 0] = climb.to(dtype)
    _check_packed(case, torch.tensor([True, False, True]), dtype, layout)


def test_attention_packed_rejects_other_layouts():
    """The C++ kernel reads two in-page layouts; any other packing is refused,
    naming them, and so is a packing without the per-request flags, and a
    layout code the op does not know."""
    case = make_attention_case(num_reqs=2, num_kv_heads=1, group=2, head_dim=64,
                               block_size=16, dtype=torch.bfloat16, max_kv=40, seed=1)
    out = torch.zeros_like(case.query)
    args = (case.query, case.kv_pages, case.page_table, case.kv_lens, case.query_start_loc,
            case.scale, None, case.metric_q_start, out)
    plain = torch.arange(16 * 64, dtype=torch.int32).view(1, 16, 64).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="AMX or vec in-page layout only"):
        ops.paged_head_attention(*args, plain, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"packing is for pages of \(32, 64\)"):
        ops.paged_head_attention(*args, reference.vec_packing(32, 64), torch.tensor([True, False]))
    with pytest.raises(RuntimeError, match="packed_layout must be 0"):
        torch.ops.kvcompress.paged_head_attention(*args, torch.tensor([True, False]), 2)
    with pytest.raises(ValueError, match="go together"):
        ops.paged_head_attention(*args, reference.amx_packing(16, 64), None)


def test_attention_rejects_bad_input():
    case = make_attention_case(
        num_reqs=2, num_kv_heads=2, group=2, head_dim=64, block_size=16,
        dtype=torch.float32, max_kv=50, seed=1,
    )
    out, m = case.clone_outputs()
    bad = case.kv_lens.clone()
    bad[0, 0] = 0  # fewer KVs than queries
    with pytest.raises(RuntimeError, match="kv_lens"):
        ops.paged_head_attention(case.query, case.kv_pages, case.page_table, bad,
                                 case.query_start_loc, case.scale, m, case.metric_q_start, out)
    pt = case.page_table.clone()
    pt[1, 1, 0] = case.kv_pages.shape[0]  # page out of range
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_head_attention(case.query, case.kv_pages, pt, case.kv_lens,
                                 case.query_start_loc, case.scale, m, case.metric_q_start, out)


# ---------------------------------------------------------------- write_kv


@pytest.mark.parametrize(
    "cache_dtype,src_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
     (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("tp_dtype", [torch.int64, torch.int32])
def test_write_kv(cache_dtype, src_dtype, tp_dtype):
    g = torch.Generator().manual_seed(0)
    num_pages, block, heads, dim, tokens = 20, 16, 3, 64, 9
    kv_pages = torch.randn(num_pages, 2, block, dim, generator=g).to(cache_dtype)
    metrics = torch.rand(num_pages, block, generator=g)
    positions = torch.randint(0, 1000, (num_pages, block), generator=g, dtype=torch.int32)
    # key/value as strided views of a fused qkv row: [T, (Hq + 2H) * D]
    qkv = torch.randn(tokens, (6 + 2 * heads) * dim, generator=g).to(src_dtype)
    key = qkv[:, 6 * dim : (6 + heads) * dim].view(tokens, heads, dim)
    value = qkv[:, (6 + heads) * dim :].view(tokens, heads, dim)
    perm = torch.randperm(num_pages * block, generator=g)[: tokens * heads]
    slots = perm.view(tokens, heads).clone()
    slots[2, 1] = -1
    slots[5, :] = -1
    token_pos = torch.arange(100, 100 + tokens, dtype=tp_dtype)
    for with_mp in (True, False):
        want = [kv_pages.clone(), metrics.clone(), positions.clone()]
        got = [kv_pages.clone(), metrics.clone(), positions.clone()]
        reference.write_kv(key, value, want[0], slots, want[1] if with_mp else None,
                           want[2] if with_mp else None, token_pos)
        ops.write_kv(key, value, got[0], slots, got[1] if with_mp else None,
                     got[2] if with_mp else None, token_pos)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_write_kv_rejects_bad_slot():
    kv_pages = torch.zeros(2, 2, 16, 8)
    key = torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.write_kv(key, key, kv_pages, torch.tensor([[32]]), None, None,
                     torch.zeros(1, dtype=torch.int64))


# ---------------------------------------------------------------- compact_heads


@pytest.mark.parametrize(
    "dtype,block_size,head_dim",
    [(torch.float32, 16, 64), (torch.bfloat16, 32, 128), (torch.float16, 128, 64),
     (torch.bfloat16, 16, 36)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_compact_heads_bit_exact(dtype, block_size, head_dim, seed):
    case = make_compaction_case(num_heads=12, head_dim=head_dim, block_size=block_size,
                                dtype=dtype, max_kv=300, seed=seed)
    case.evict_counts[0] = 0  # a head with no evictions
    n = int(case.kv_lens[1])  # a head that evicts everything
    case.evict_idx = torch.nn.functional.pad(
        case.evict_idx, (0, max(0, n - case.evict_idx.shape[1])), value=-1
    )
    case.evict_idx[1, :n] = torch.arange(n, dtype=torch.int32)
    case.evict_counts[1] = n
    want = [case.kv_pages.clone(), case.metrics.clone(), case.positions.clone()]
    got = [case.kv_pages.clone(), case.metrics.clone(), case.positions.clone()]
    reference.compact_heads(*want, case.page_table, case.kv_lens, case.evict_idx,
                            case.evict_counts)
    ops.compact_heads(*got, case.page_table, case.kv_lens, case.evict_idx, case.evict_counts)
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bit-exact


def test_compact_heads_rejects_unsorted():
    case = make_compaction_case(num_heads=2, head_dim=8, block_size=16,
                                dtype=torch.float32, max_kv=60, seed=5)
    case.kv_lens[:] = 40
    case.evict_idx = torch.tensor([[5, 3], [1, 2]], dtype=torch.int32)
    case.evict_counts = torch.tensor([2, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="ascending"):
        ops.compact_heads(case.kv_pages, case.metrics, case.positions, case.page_table,
                          case.kv_lens, case.evict_idx, case.evict_counts)


def _compact(case, fn):
    out = [case.kv_pages.clone(), case.metrics.clone(), case.positions.clone()]
    fn(*out, case.page_table, case.kv_lens, case.evict_idx, case.evict_counts)
    return out


@pytest.mark.parametrize("pages0,pages1,ev0,ev1", **SHARED_MOVED_PAGES)
def test_compact_heads_refuses_a_page_two_movers_share(pages0, pages1, ev0, ev1):
    """Heads are compacted in parallel: a page one head moves KVs within must
    be listed by no other head (which would read overwritten KVs or race),
    nor twice by that head.  Refused before anything moves, naming the page."""
    case = two_heads_on_pages(pages0, pages1, ev0, ev1)
    before = [case.kv_pages.clone(), case.metrics.clone(), case.positions.clone()]
    with pytest.raises(RuntimeError, match=r"page \d+ is moved within by one head but listed 2"):
        ops.compact_heads(case.kv_pages, case.metrics, case.positions, case.page_table,
                          case.kv_lens, case.evict_idx, case.evict_counts)
    got = [case.kv_pages, case.metrics, case.positions]
    assert all(torch.equal(a, b) for a, b in zip(got, before))


def test_compact_heads_lets_heads_share_pages_below_their_first_hole():
    """A shared prefix: both heads list pages 0 and 1, and evict only after
    them (block 2 on), so those pages are untouched -- allowed, and the result
    is the reference's."""
    case = two_heads_on_pages([0, 1, 2], [0, 1, 3], [33, 35], [32])
    want = _compact(case, reference.compact_heads)
    got = _compact(case, ops.compact_heads)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype,block_size,group", [(torch.float32, 16, 4),
                                                    (torch.bfloat16, 32, 3)])
def test_compaction_round_trip(dtype, block_size, group):
    """Evict random KVs -> compact -> decode attention with the new kv_lens
    equals reference attention over only the kept KVs (outputs and metrics,
    matched through the moved positions)."""
    g = torch.Generator().manual_seed(block_size)
    case = make_attention_case(num_reqs=3, num_kv_heads=2, group=group, head_dim=64,
                               block_size=block_size, dtype=dtype, max_kv=200, max_q=1,
                               seed=block_size + group)
    num_reqs, heads, max_pages = case.page_table.shape
    num_pages = case.kv_pages.shape[0]
    # Tag every slot with its (request, head, logical index) through positions.
    positions = torch.full((num_pages, block_size), -1, dtype=torch.int32)
    kept = {}
    evict_rows, counts = [], []
    for r in range(num_reqs):
        for h in range(heads):
            n = int(case.kv_lens[r, h])
            for j in range(n):
                positions[case.page_table[r, h, j // block_size], j % block_size] = (
                    (r * heads + h) << 16 | j
                )
            count = int(torch.randint(0, n, (1,), generator=g))  # keep >= 1
            ev = torch.randperm(n, generator=g)[:count].sort().values
            kept[r, h] = sorted(set(range(n)) - set(ev.tolist()))
            evict_rows.append(ev)
            counts.append(count)
    max_evict = max(1, max(counts))
    evict_idx = torch.full((num_reqs * heads, max_evict), -1, dtype=torch.int32)
    for s, ev in enumerate(evict_rows):
        evict_idx[s, : len(ev)] = ev
    evict_counts = torch.tensor(counts, dtype=torch.int32)
    kv_pages = case.kv_pages.clone()
    metrics = torch.zeros(num_pages, block_size)
    ops.compact_heads(kv_pages, metrics, positions, case.page_table.view(-1, max_pages),
                      case.kv_lens.view(-1), evict_idx, evict_counts)
    new_lens = case.kv_lens - evict_counts.view(num_reqs, heads)
    out = torch.zeros_like(case.query)
    ops.paged_head_attention(case.query, kv_pages, case.page_table, new_lens,
                             case.query_start_loc, case.scale, metrics,
                             case.metric_q_start, out)

    # Reference: the kept KVs in their original order, in fresh pages.
    ref_pages = torch.zeros_like(case.kv_pages)
    ref_table = torch.full_like(case.page_table, -1)
    ref_pos = torch.full((num_pages, block_size), -1, dtype=torch.int32)
    cursor = 0
    for r in range(num_reqs):
        for h in range(heads):
            for k, j in enumerate(kept[r, h]):
                if k % block_size == 0:
                    ref_table[r, h, k // block_size] = cursor
                    cursor += 1
                src = case.page_table[r, h, j // block_size], j % block_size
                dst = ref_table[r, h, k // block_size], k % block_size
                ref_pages[dst[0], :, dst[1]] = case.kv_pages[src[0], :, src[1]]
                ref_pos[dst] = (r * heads + h) << 16 | j
    ref_out = torch.zeros_like(case.query)
    ref_metrics = torch.zeros(num_pages, block_size)
    reference.paged_head_attention(case.query, ref_pages, ref_table, new_lens,
                                   case.query_start_loc, case.scale, ref_metrics,
                                   case.metric_q_start, ref_out)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=OUT_ATOL[dtype], rtol=0)
    # Metrics: compare per tagged KV (slot contents moved with their metric).
    got, want = {}, {}
    for r in range(num_reqs):
        for h in range(heads):
            for j in range(int(new_lens[r, h])):
                page, slot = int(case.page_table[r, h, j // block_size]), j % block_size
                got[int(positions[page, slot])] = float(metrics[page, slot])
                page, slot = int(ref_table[r, h, j // block_size]), j % block_size
                want[int(ref_pos[page, slot])] = float(ref_metrics[page, slot])
    live = {
        (r * heads + h) << 16 | j for (r, h), js in kept.items() for j in js
    }
    assert set(want) == live and set(got) == live
    got_live = torch.tensor([got[p] for p in sorted(live)])
    want_live = torch.tensor([want[p] for p in sorted(live)])
    torch.testing.assert_close(got_live, want_live, rtol=METRIC_RTOL[dtype], atol=1e-7)
