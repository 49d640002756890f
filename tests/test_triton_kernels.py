"""Triton kernels vs ``kvcompress_vllm.ops.reference``.

Without a GPU the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1``, set here before triton is imported; tensors on the
CPU) on small shapes.  With a CUDA device the same tests run the compiled
kernels on the GPU (cases are moved to CUDA; the reference runs on the CPU);
``TRITON_INTERPRET=1`` forces the interpreter there too.

bfloat16 works in the interpreter because the kernels upcast to float32
before any math on CPU tensors (the interpreter stores bf16 as uint16, so its
``tl.dot``/arithmetic on bf16 are wrong); its fp32 -> bf16 cast truncates, so
bf16 outputs are compared to within one bf16 ulp.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set
# before triton and the kernel modules are imported.  It is removed again
# after the imports (and set back only while these tests run) so that other
# test modules, and the engine processes they start, do not inherit it.
_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from kernel_cases import (  # noqa: E402
    SHARED_MOVED_PAGES,
    make_attention_case,
    make_compaction_case,
    share_prefix_pages,
    two_heads_on_pages,
)

from kvcompress_vllm.ops import reference  # noqa: E402
from kvcompress_vllm.triton_kernels import (  # noqa: E402
    compact_heads,
    paged_head_attention,
    write_kv,
)
from kvcompress_vllm.triton_kernels import cache_write, compact  # noqa: E402, F401
from kvcompress_vllm.triton_kernels.attention import _launch  # noqa: E402

pytestmark = pytest.mark.triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]
if not _INTERPRET and not torch.cuda.is_available():  # TRITON_INTERPRET=0 set by hand
    pytest.skip("compiled Triton kernels need a CUDA device", allow_module_level=True)
DEVICE = torch.device("cpu" if _INTERPRET else "cuda")

# Output tolerance per dtype (bf16: one ulp at |x| ~ 1, plus rounding of p).
OUT_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if _SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _dev(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def _run_attention(case, *, with_metrics=True, query=None, **knobs):
    """Reference and Triton outputs/metrics for one AttentionCase."""
    query = case.query if query is None else query
    ref_out, ref_metrics = case.clone_outputs()
    reference.paged_head_attention(
        query, case.kv_pages, case.page_table, case.kv_lens, case.query_start_loc,
        case.scale, ref_metrics if with_metrics else None, case.metric_q_start, ref_out,
        metric_k_start=case.metric_k_start,
    )
    out, metrics = case.clone_outputs()
    out = out.to(DEVICE)
    metrics = metrics.to(DEVICE) if with_metrics else None
    args = _dev(query, case.kv_pages, case.page_table, case.kv_lens, case.query_start_loc)
    mqs = case.metric_q_start.to(DEVICE)
    mks = None if case.metric_k_start is None else case.metric_k_start.to(DEVICE)
    if knobs:
        _launch(*args, case.scale, metrics, mqs, out, mks, **knobs)
    else:
        paged_head_attention(*args, case.scale, metrics, mqs, out, mks)
    return ref_out, ref_metrics, out.cpu(), None if metrics is None else metrics.cpu()


def _check_attention(case, dtype, **kw):
    ref_out, ref_metrics, out, metrics = _run_attention(case, **kw)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=OUT_ATOL[dtype], rtol=0)
    if metrics is None:
        return
    # The metrics of unused pages and slots keep their start values.
    torch.testing.assert_close(metrics, ref_metrics, atol=2e-5, rtol=1e-4)
    assert not torch.equal(metrics, case.metrics), "no metric was accumulated"


# (group, head_dim, block_size, dtype, max_q, knobs)
ATTENTION_CASES = [
    # decode batches (max_q = 1)
    pytest.param(1, 64, 16, torch.float32, 1, {}, id="decode-g1-d64-n16-fp32"),
    pytest.param(4, 64, 32, torch.bfloat16, 1, {}, id="decode-g4-d64-n32-bf16"),
    pytest.param(8, 128, 128, torch.bfloat16, 1, {}, id="decode-g8-d128-n128-bf16"),
    # decode + prefill-chunk rows
    pytest.param(3, 64, 16, torch.float32, 12, {}, id="mixed-g3-d64-n16-fp32"),
    pytest.param(4, 64, 32, torch.bfloat16, 12, {}, id="mixed-g4-d64-n32-bf16"),
    pytest.param(1, 64, 16, torch.float16, 12, {}, id="mixed-g1-d64-n16-fp16"),
    # several query tiles per (request, head): metric adds from several programs
    pytest.param(4, 64, 16, torch.float32, 12, dict(block_m=16), id="qtiles-g4-bm16-fp32"),
    pytest.param(3, 64, 32, torch.bfloat16, 12, dict(block_m=16, block_n=16),
                 id="qtiles-g3-bm16-bn16-bf16"),
    # KV tile narrower / wider than a page
    pytest.param(8, 64, 32, torch.float32, 6, dict(block_n=16), id="bn16-n32-g8-fp32"),
    # split-KV (flash-decoding) path: partials, combine, metric kernel
    pytest.param(4, 64, 16, torch.float32, 1, dict(num_splits=3), id="split3-decode-g4-fp32"),
    pytest.param(8, 64, 16, torch.bfloat16, 1, dict(num_splits=4), id="split4-decode-g8-bf16"),
    pytest.param(3, 64, 32, torch.float32, 10, dict(num_splits=2, block_m=16),
                 id="split2-mixed-g3-bm16-fp32"),
    # decode metrics from the scores the softmax pass stored (the default for
    # decode up to DECODE_SCORES_BYTES), and recomputed from K (beyond it)
    pytest.param(4, 64, 16, torch.float32, 1, dict(scores=True), id="scores-decode-g4-fp32"),
    pytest.param(8, 64, 32, torch.bfloat16, 1, dict(scores=True, block_n=16),
                 id="scores-decode-g8-bn16-bf16"),
    pytest.param(4, 64, 16, torch.float32, 1, dict(scores=True, num_splits=3),
                 id="scores-split3-decode-g4-fp32"),
    pytest.param(4, 64, 16, torch.float32, 1, dict(scores=False), id="recompute-decode-g4-fp32"),
    pytest.param(4, 64, 16, torch.bfloat16, 1, dict(scores=False, num_splits=2),
                 id="recompute-split2-decode-g4-bf16"),
]


@pytest.mark.parametrize("group, head_dim, block_size, dtype, max_q, knobs", ATTENTION_CASES)
def test_paged_head_attention(group, head_dim, block_size, dtype, max_q, knobs):
    case = make_attention_case(
        num_reqs=4 if max_q > 1 else 3, num_kv_heads=2, group=group, head_dim=head_dim,
        block_size=block_size, dtype=dtype, max_kv=160, max_q=max_q, seed=group + block_size,
    )
    _check_attention(case, dtype, **knobs)


@pytest.mark.parametrize("knobs", [{}, dict(num_splits=2)], ids=["fused", "split2"])
def test_paged_head_attention_without_metrics(knobs):
    case = make_attention_case(num_reqs=4, num_kv_heads=2, group=4, head_dim=64,
                               block_size=16, dtype=torch.float32, max_kv=120, max_q=8, seed=7)
    _check_attention(case, torch.float32, with_metrics=False, **knobs)


@pytest.mark.parametrize("knobs", [{}, dict(num_splits=3), dict(block_n=32)],
                         ids=["fused", "split3", "bn32"])
@pytest.mark.parametrize("hits", [False, True], ids=["all-add", "metric_k_start"])
def test_paged_head_attention_requests_sharing_pages(knobs, hits):
    """Requests sharing their prefix pages (prefix-cache hits, n > 1 children)
    each add their metric to the shared slots (atomic adds from several
    programs), or, with ``metric_k_start`` (hitters), only to their own KVs:
    the sums equal the reference's."""
    case = share_prefix_pages(
        make_attention_case(num_reqs=6, num_kv_heads=2, group=3, head_dim=64, block_size=16,
                            dtype=torch.float32, min_kv=70, max_kv=120, max_q=6, seed=13),
        shared_pages=3, hits=hits,
    )
    _check_attention(case, torch.float32, **knobs)


@pytest.mark.parametrize("knobs", [dict(scores=True), dict(scores=True, num_splits=2),
                                   dict(scores=False)], ids=["scores", "scores-split2", "recompute"])
def test_decode_metrics_of_requests_sharing_pages(knobs):
    """Decode (one query per request) over shared prefix pages, hitters adding
    only from ``metric_k_start`` on: stored and recomputed scores both give the
    reference's sums."""
    case = share_prefix_pages(
        make_attention_case(num_reqs=6, num_kv_heads=2, group=3, head_dim=64, block_size=16,
                            dtype=torch.float32, min_kv=70, max_kv=120, max_q=1, seed=17),
        shared_pages=3, hits=True,
    )
    _check_attention(case, torch.float32, **knobs)


def test_stored_scores_stay_within_the_budgeted_scratch():
    """By default decode stores its scores only while the scratch fits in
    ``DECODE_SCORES_BYTES`` -- what the GPU worker keeps out of the KV budget
    -- and recomputes them beyond it (both give the reference's metrics, see
    the ``scores-*`` / ``recompute-*`` cases)."""
    from kvcompress_vllm.triton_kernels import DECODE_SCORES_BYTES
    from kvcompress_vllm.triton_kernels.attention import _stored_scores

    fits = DECODE_SCORES_BYTES // 4
    assert _stored_scores(None, True, True, fits)
    assert not _stored_scores(None, True, True, fits + 1)
    assert not _stored_scores(None, False, True, 1)  # no metrics
    assert not _stored_scores(None, True, False, 1)  # prefill rows
    assert _stored_scores(True, True, True, fits + 1)  # asked for: the caller's memory
    assert not _stored_scores(False, True, True, 1)


def test_gpu_worker_keeps_the_score_scratch_out_of_the_kv_budget():
    pytest.importorskip("vllm")
    from kvcompress_vllm.triton_kernels import DECODE_SCORES_BYTES
    from kvcompress_vllm.worker.gpu_worker import eviction_workspace_bytes, gpu_workspace_bytes

    assert gpu_workspace_bytes(4096, 128) == eviction_workspace_bytes(4096, 128) + DECODE_SCORES_BYTES


def test_stored_scores_are_refused_outside_decode():
    case = make_attention_case(num_reqs=3, num_kv_heads=2, group=2, head_dim=64, block_size=16,
                               dtype=torch.float32, max_kv=60, max_q=4, seed=5)
    with pytest.raises(ValueError, match="decode batches"):
        _run_attention(case, scores=True)


def test_paged_head_attention_empty_request_and_strided_query():
    """A request with no queries, metric_q_start past q_len, a query view."""
    case = make_attention_case(num_reqs=3, num_kv_heads=2, group=2, head_dim=64,
                               block_size=16, dtype=torch.float32, max_kv=100, max_q=6, seed=3)
    # Repeat request 1's boundary: request 1 becomes empty, 2 and 3 shift up.
    qsl = case.query_start_loc.tolist()
    case.query_start_loc = torch.tensor(qsl[:2] + qsl[1:], dtype=torch.int32)
    case.page_table = torch.cat([case.page_table[:1], case.page_table[:1], case.page_table[1:]])
    case.kv_lens = torch.cat([case.kv_lens[:1], case.kv_lens[:1], case.kv_lens[1:]])
    mqs = case.metric_q_start.tolist()
    case.metric_q_start = torch.tensor([mqs[0], 0, 10**6, mqs[2]], dtype=torch.int32)
    t, hq, d = case.query.shape
    wide = torch.randn(t, 3 * hq, d)  # like the q part of a fused qkv tensor
    wide[:, :hq] = case.query
    _check_attention(case, torch.float32, query=wide[:, :hq])


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="this triton has no NVIDIA backend",
)
def test_kernels_compile_for_gpus():
    """Compile the kernels to sm_90 cubins (with the wheel's ptxas) without a GPU:
    checks the compiled-Triton path that the interpreter does not exercise
    (the quick subset: decode with stored and with recomputed scores,
    prefill, split-KV x3, Hopper's 128 x 128 prefill tiles, compaction,
    cache write)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run(
        [sys.executable, "-m", "kvcompress_vllm.triton_kernels._compile_check", "--quick", "90"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "compiled 9 kernels OK" in res.stdout, res.stdout
    assert "'BLOCK_M': 128, 'BLOCK_N': 128" in res.stdout, res.stdout


def test_public_api_does_not_import_triton_eagerly():
    code = (
        "import sys, kvcompress_vllm.triton_kernels as k; "
        "assert 'triton' not in sys.modules, 'triton imported eagerly'; "
        "assert callable(k.paged_head_attention) and k.is_available()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------
# compaction
# --------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize(
    "head_dim, block_size, dtype, seed",
    [
        (64, 16, torch.float32, 0),
        (64, 32, torch.bfloat16, 1),
        (64, 16, torch.float16, 2),
        (128, 128, torch.bfloat16, 3),
    ],
)
def test_compact_heads_bit_exact(head_dim, block_size, dtype, seed):
    case = make_compaction_case(num_heads=12, head_dim=head_dim, block_size=block_size,
                                dtype=dtype, max_kv=300, seed=seed)
    # Also: a head with no evictions and a head that evicts everything.
    case.evict_counts[0] = 0
    length = int(case.kv_lens[1])
    if case.evict_idx.shape[1] >= length:
        case.evict_counts[1] = length
        case.evict_idx[1, :length] = torch.arange(length, dtype=torch.int32)
    expected = [t.clone() for t in (case.kv_pages, case.metrics, case.positions)]
    reference.compact_heads(*expected, case.page_table, case.kv_lens, case.evict_idx,
                            case.evict_counts)
    got = _dev(case.kv_pages.clone(), case.metrics.clone(), case.positions.clone())
    compact_heads(*got, *_dev(case.page_table, case.kv_lens, case.evict_idx, case.evict_counts))
    for name, e, g in zip(("kv_pages", "metrics", "positions"), expected, got):
        assert torch.equal(_bits(e), _bits(g.cpu())), f"{name} differs from the reference"
    assert not torch.equal(expected[0], case.kv_pages), "case moved nothing"


def test_compact_heads_nothing_to_evict():
    case = make_compaction_case(num_heads=4, head_dim=64, block_size=16,
                                dtype=torch.float32, max_kv=60, seed=5)
    case.evict_counts.zero_()
    got = _dev(case.kv_pages.clone(), case.metrics.clone(), case.positions.clone())
    compact_heads(*got, *_dev(case.page_table, case.kv_lens, case.evict_idx, case.evict_counts))
    for e, g in zip((case.kv_pages, case.metrics, case.positions), got):
        assert torch.equal(_bits(e), _bits(g.cpu()))


@pytest.mark.parametrize("pages0,pages1,ev0,ev1", **SHARED_MOVED_PAGES)
def test_compact_heads_refuses_a_page_two_movers_share(pages0, pages1, ev0, ev1):
    """The C++ kernel's rule (test_cpu_kernels.py), here on the Triton one:
    refused before anything moves, naming the page."""
    case = two_heads_on_pages(pages0, pages1, ev0, ev1)
    got = _dev(case.kv_pages.clone(), case.metrics.clone(), case.positions.clone())
    with pytest.raises(ValueError, match=r"page \d+ is moved within by one head but listed 2"):
        compact_heads(*got, *_dev(case.page_table, case.kv_lens, case.evict_idx,
                                  case.evict_counts))
    for e, g in zip((case.kv_pages, case.metrics, case.positions), got):
        assert torch.equal(_bits(e), _bits(g.cpu()))


def test_compact_heads_lets_heads_share_pages_below_their_first_hole():
    case = two_heads_on_pages([0, 1, 2], [0, 1, 3], [33, 35], [32])
    want = [case.kv_pages.clone(), case.metrics.clone(), case.positions.clone()]
    reference.compact_heads(*want, case.page_table, case.kv_lens, case.evict_idx,
                            case.evict_counts)
    got = _dev(case.kv_pages.clone(), case.metrics.clone(), case.positions.clone())
    compact_heads(*got, *_dev(case.page_table, case.kv_lens, case.evict_idx, case.evict_counts))
    for e, g in zip(want, got):
        assert torch.equal(_bits(e), _bits(g.cpu()))


# --------------------------------------------------------------------------
# write_kv
# --------------------------------------------------------------------------
def _write_case(num_tokens, num_heads, head_dim, block_size, cache_dtype, new_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    num_pages = num_tokens * num_heads // block_size + 6
    kv_pages = torch.randn(num_pages, 2, block_size, head_dim, generator=g).to(cache_dtype)
    metrics = torch.rand(num_pages, block_size, generator=g)
    positions = torch.randint(0, 1000, (num_pages, block_size), generator=g, dtype=torch.int32)
    # Distinct random slots; about one in five (token, head) skipped.
    slots = torch.randperm(num_pages * block_size, generator=g)[: num_tokens * num_heads]
    slots = slots.view(num_tokens, num_heads).clone()
    slots[torch.rand(num_tokens, num_heads, generator=g) < 0.2] = -1
    # key/value as views into a fused qkv-like tensor (non-contiguous rows).
    qkv = torch.randn(num_tokens, 3 * num_heads, head_dim, generator=g).to(new_dtype)
    key, value = qkv[:, num_heads : 2 * num_heads], qkv[:, 2 * num_heads :]
    token_positions = torch.randint(0, 1 << 20, (num_tokens,), generator=g)
    return key, value, kv_pages, slots, metrics, positions, token_positions


@pytest.mark.parametrize(
    "head_dim, block_size, cache_dtype, new_dtype, with_state",
    [
        (64, 16, torch.float32, torch.float32, True),
        (64, 32, torch.bfloat16, torch.bfloat16, True),
        (128, 16, torch.bfloat16, torch.float32, True),  # converted on store
        (64, 16, torch.float16, torch.float16, False),  # metrics/positions None
    ],
)
def test_write_kv(head_dim, block_size, cache_dtype, new_dtype, with_state):
    key, value, kv_pages, slots, metrics, positions, tok = _write_case(
        13, 3, head_dim, block_size, cache_dtype, new_dtype, seed=head_dim + block_size)
    if not with_state:
        metrics = positions = None
    expected = [None if t is None else t.clone() for t in (kv_pages, metrics, positions)]
    reference.write_kv(key, value, *expected[:1], slots, *expected[1:], tok)
    got = _dev(kv_pages.clone(), None if metrics is None else metrics.clone(),
               None if positions is None else positions.clone())
    k, v, s, t = _dev(key, value, slots, tok)
    write_kv(k, v, got[0], s, got[1], got[2], t)
    for e, g in zip(expected, got):
        if e is not None:
            assert torch.equal(_bits(e), _bits(g.cpu()))
