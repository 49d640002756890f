"""The CUDA path without a GPU: backend, metadata builder, impl and GPU worker
state on vLLM's GPU cache layout, run by the Triton kernels.

Without a GPU the kernels run under the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1`` set before the kernel modules are imported, and
``ops.KERNELS = "triton"`` so that ``ops`` sends CPU tensors to Triton
instead of the C++ kernels).  With a CUDA device the same tests run the
compiled kernels on the GPU through the default dispatch.  No engine is
started: ``cuda_backend_cases.Harness`` allocates the cache with vLLM's own
``allocate_kv_cache`` and plays scheduler and runner.

Compared against ``kvcompress_vllm.ops.reference`` (outputs, metrics, cache
bytes, positions) over mixed prefill / chunked-prefill / decode batches with
ragged per-head KV counts, GQA groups 1-8; the eviction round trip is
checked against dense attention over exactly the kept KVs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch


def _interpreter_usable() -> bool:
    """Whether kernels can still run under the Triton interpreter in this
    process.  It needs ``TRITON_INTERPRET`` set before ``triton.language`` is
    imported (its standard library -- ``tl.cdiv``, ``tl.sum``, ... -- is jit
    functions decorated at import), and anything that imports
    ``torch._dynamo`` (vLLM does) imports it first.  When another test module
    did that earlier in this pytest process, the kernel tests below run in a
    fresh process instead (``test_kernel_tests_in_a_fresh_process``)."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(lang.standard.cdiv, InterpretedFunction)


_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
_FRESH_PROCESS_NEEDED = not torch.cuda.is_available() and not _interpreter_usable()
if _SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from cuda_backend_cases import Harness  # noqa: E402

from kvcompress_vllm import ops  # noqa: E402
from kvcompress_vllm.attention.cuda_backend import (  # noqa: E402
    KVCompressCUDABackend,
    KVCompressCUDAImpl,
    KVCompressCUDAMetadataBuilder,
)
from kvcompress_vllm.config import KVCompressConfigError  # noqa: E402
from kvcompress_vllm.scheduler.kv_cache_manager import KVCompressSpec  # noqa: E402
from kvcompress_vllm.worker.state import set_state  # noqa: E402

pytestmark = pytest.mark.triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
if _SET_INTERPRET:
    del os.environ["TRITON_INTERPRET"]
if not _INTERPRET and not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need a CUDA device", allow_module_level=True)
DEVICE = torch.device("cpu" if _INTERPRET else "cuda")

OUT_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


#: Tests that launch kernels in this process.
kernel_test = pytest.mark.skipif(
    _FRESH_PROCESS_NEEDED, reason="triton.language was imported before TRITON_INTERPRET was "
    "set: run in a fresh process by test_kernel_tests_in_a_fresh_process")


@pytest.fixture(autouse=True)
def _triton_on_this_device(monkeypatch):
    if _SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if DEVICE.type == "cpu":
        monkeypatch.setattr(ops, "KERNELS", "triton")
    yield
    set_state(None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _check_step(h: Harness, meta, results) -> None:
    """Triton step == reference step (outputs, metrics, cache bytes, positions)."""
    kv, metrics, positions, outs = h.reference_step(meta, results)
    pool = h.state.pool
    for layer, ((*_, out), ref) in enumerate(zip(results, outs)):
        assert torch.isfinite(out.float()).all(), f"layer {layer}: non-finite output"
        torch.testing.assert_close(out.float(), ref.float(), atol=OUT_ATOL[h.dtype], rtol=0,
                                   msg=lambda m: f"layer {layer}: {m}")
    assert torch.equal(_bits(pool.kv_pages.cpu()), _bits(kv)), "cache bytes differ"
    assert torch.equal(pool.positions.cpu(), positions), "positions differ"
    torch.testing.assert_close(pool.metrics.cpu(), metrics, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------
# the backend's declarations and the GPU layout
# --------------------------------------------------------------------------
@kernel_test
def test_backend_declares_its_layout_and_vllm_allocates_it():
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from kvcompress_vllm.worker.gpu_worker import CUDA_BACKEND, register_cuda_attention_backend

    backend = KVCompressCUDABackend
    assert backend.supported_kv_cache_layouts() == (KVCacheLayout.LBHNC,)
    assert backend.get_name() == "CUSTOM" and backend.forward_includes_kv_cache_update
    assert backend.get_builder_cls().get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    register_cuda_attention_backend()
    assert AttentionBackendEnum.CUSTOM.get_path() == CUDA_BACKEND
    assert AttentionBackendEnum.CUSTOM.get_class() is backend

    h = Harness(num_layers=3, num_blocks=6, num_kv_heads=2, head_dim=32, block_size=16,
                dtype=torch.bfloat16, device=DEVICE)
    assert isinstance(h.spec, KVCompressSpec)
    pool = h.state.pool
    L, B, H = 3, 6, 2
    assert pool.kv_pages.shape == (L * B * H, 2, 16, 32)
    for layer, cache in enumerate(h.layer_caches):
        assert cache.shape == (B, H, 16, 64)  # vLLM's [B, H, N, 2D] view
        assert pool.region_of(cache) == layer
        pages = cache.view(B, H, 2, 16, 32)  # the kernels' [2, N, D] head-page
        for b in (0, B - 1):
            for hh in range(H):
                page = pool.kv_pages[(layer * B + b) * H + hh]
                assert page.data_ptr() == pages[b, hh].data_ptr()
                assert torch.equal(_bits(page), _bits(pages[b, hh]))


@kernel_test
def test_profiling_run_returns_zeros_and_writes_nothing():
    h = Harness(device=DEVICE)
    set_state(None)  # a profiling run happens before the worker state exists
    common = SimpleNamespace(num_reqs=2, num_actual_tokens=5,
                             query_start_loc_cpu=torch.tensor([0, 3, 5], dtype=torch.int32))
    meta = h.builder.build(0, common)
    assert meta.batch is None and meta.device_batch is None
    before = h.layer_caches[0].clone()
    q, k, v = (t.to(DEVICE) for t in h.qkv(5))
    out = torch.full_like(q, float("nan"))
    h.impls[0].forward(None, q, k, v, h.layer_caches[0], meta, out)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(h.layer_caches[0], before)
    h.impls[0].forward(None, q, k, v, h.layer_caches[0], None, out)  # attn_metadata None
    assert torch.equal(out, torch.zeros_like(out))


# --------------------------------------------------------------------------
# metadata builder + impl vs the reference
# --------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize(
    "group, dtype",
    [(1, torch.float32), (2, torch.bfloat16), (4, torch.float16), (8, torch.bfloat16)],
    ids=["g1-fp32", "g2-bf16", "g4-fp16", "g8-bf16"],
)
def test_builder_and_impl_match_reference(group, dtype):
    """Five steps: full and chunked prefills, decodes, a request that
    completes its prompt (metric pooled), evictions that leave every head a
    different KV count, a multi-query step over ragged heads, a finished
    request whose blocks are reused; batch order is not the arrival order."""
    h = Harness(num_layers=2, num_blocks=40, num_kv_heads=2, group=group, head_dim=32,
                block_size=16, dtype=dtype, device=DEVICE, seed=group, rate=0.5,
                protected_window=4, sink_tokens=1, observation_window=8, pooling_kernel=3)
    steps = [
        dict(tokens={"a": 40, "b": 20}, new={"a": 40, "b": 45}, order=["a", "b"]),
        dict(tokens={"b": 20, "a": 1, "c": 7}, new={"c": 7}, evict={"a": 5}, order=["b", "a", "c"]),
        dict(tokens={"a": 1, "b": 5, "c": 1}, order=["c", "a", "b"]),  # b's prompt completes
        dict(tokens={"a": 1, "b": 1, "c": 1}, evict={"b": 6}, order=["a", "b", "c"]),
        dict(tokens={"a": 6, "b": 1, "d": 12}, new={"d": 12}, finished=["c"], order=["d", "a", "b"]),
    ]
    for i, s in enumerate(steps):
        so = h.schedule(s["tokens"], new=s.get("new", ()), evict=s.get("evict"),
                        finished=s.get("finished", ()))
        h.begin(so)
        meta, results = h.forward(s["order"])
        _check_step(h, meta, results)
        stats = h.end()
        assert stats.pages_evicted == sum(s.get("evict", {}).values()), f"step {i}"
        if i == 2:
            assert [row for row, *_ in meta.batch.pool_rows] == [2], "b's prompt metric pooled"
    counts = h.state.table.kv_count[h.state.table.requests["a"].slot]
    assert len(set(counts.view(-1).tolist())) > 1, "per-head counts are not ragged"
    # The device copy is what the kernels read.
    dev = meta.device_batch
    assert dev.page_table.device.type == DEVICE.type
    assert torch.equal(dev.page_table.cpu(), meta.batch.page_table)
    assert torch.equal(dev.write_slots.cpu(), meta.batch.write_slots)


@kernel_test
def test_builder_copies_once_per_step():
    h = Harness(device=DEVICE, rate=0.5)
    h.begin(h.schedule({"a": 9}, new={"a": 9}))
    first = h.build(["a"])
    again = h.build(["a"])
    assert again.device_batch is first.device_batch and again.batch is first.batch
    h.end()


# --------------------------------------------------------------------------
# the worker's head-page view of the GPU layout: write, evict, compact, attend
# --------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize(
    "scorer, allocation",
    [("kvcompress", "joint"), ("knorm", "uniform"), ("streamingllm", "joint")],
)
def test_gpu_layout_round_trip(scorer, allocation):
    N, L, H, G, D = 16, 2, 2, 2, 32
    h = Harness(num_layers=L, num_blocks=24, num_kv_heads=H, group=G, head_dim=D, block_size=N,
                dtype=torch.float32, device=DEVICE, seed=5, scorer=scorer, allocation=allocation,
                rate=0.25, protected_window=4, sink_tokens=1)
    n = 53
    h.begin(h.schedule({"r": n}, new={"r": n}))
    meta, results = h.forward(["r"])
    _check_step(h, meta, results)
    h.end()
    blocks = list(h.state.table.requests["r"].blocks)

    # write: token t of head (l, h) sits where vLLM keeps it, block t // N, slot t % N.
    B = h.layer_caches[0].shape[0]
    for layer, (_, k, v, _) in enumerate(results):
        pages = h.layer_caches[layer].view(B, H, 2, N, D).cpu()
        for t in (0, 17, n - 1):
            blk, slot = blocks[t // N], t % N
            assert torch.equal(pages[blk, :, 0, slot], k[t]) and torch.equal(pages[blk, :, 1, slot], v[t])

    # evict 9 of the 4 blocks x 4 (layer, head)s' pages: 7 pages fit in 2
    # blocks, the 2 tail blocks are released and their live pages migrate.
    if scorer == "kvcompress":
        # (layer 1, head 1) matters most: it keeps all 4 pages, so its pages in
        # the released blocks must migrate into free pages of the kept ones.
        for b in blocks:
            h.state.pool.metrics[(1 * B + b) * H + 1] += 1e3
    before = h.head_kvs("r")
    if DEVICE.type == "cpu":
        assert ops.backend_for(h.state.pool.kv_pages) == "triton"
    h.begin(h.schedule({}, evict={"r": 9}))
    stats = h.end()
    assert stats.pages_evicted == 9 and stats.kvs_evicted == 9 * N
    req = h.state.table.requests["r"]
    keep = h.geom.blocks_needed(n, 9)
    assert keep == 2 and req.blocks == blocks[:keep]
    counts = h.state.table.kv_count[req.slot]
    assert int((n - counts).sum()) == 9 * N and bool(((n - counts) % N == 0).all())
    if scorer == "kvcompress":
        assert counts.view(-1).tolist() == [5, 5, 5, n] and stats.pages_migrated == 2
    used = h.state.table.used_pages(req)
    assert used.unique().numel() == used.numel()
    assert not torch.isin(h.state.table.block_of_page(used), torch.tensor(blocks[keep:])).any()
    after = h.head_kvs("r")
    for key, kvs in after.items():
        assert set(kvs) <= set(before[key]) and {0, *range(n - 4, n)} <= set(kvs)
        for pos, (k, v) in kvs.items():
            assert torch.equal(k, before[key][pos][0]) and torch.equal(v, before[key][pos][1])

    # attend: one decode token over the compacted cache == dense attention over
    # exactly the kept KVs plus the new one.
    h.begin(h.schedule({"r": 1}))
    meta, results = h.forward(["r"])
    _check_step(h, meta, results)
    h.end()
    for layer, (q, k, v, out) in enumerate(results):
        for hh in range(H):
            kvs = after[layer, hh]
            keys = torch.stack([kvs[p][0] for p in sorted(kvs)] + [k[0, hh]])
            vals = torch.stack([kvs[p][1] for p in sorted(kvs)] + [v[0, hh]])
            qh = q[0, hh * G:(hh + 1) * G]
            probs = torch.softmax(qh @ keys.T * D**-0.5, dim=-1)
            torch.testing.assert_close(out[0, hh * G:(hh + 1) * G], probs @ vals, atol=1e-5, rtol=0)


@kernel_test
def test_gather_runs_on_the_pool_device():
    """DeviceWorkerState's gather equals the base class's (host) gather."""
    from kvcompress_vllm.worker.state import KVCompressWorkerState

    h = Harness(device=DEVICE, rate=0.5)
    h.begin(h.schedule({"a": 50}, new={"a": 50}))
    h.forward(["a"])
    h.end()
    req = h.state.table.requests["a"]
    got = h.state._gather_request(req, 1, 4, 50, "a")
    if DEVICE.type == "cpu":
        want = KVCompressWorkerState._gather_request(h.state, req, 1, 4, 50, "a")
        for name in ("metrics", "positions", "valid"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert torch.equal(got.keys(), want.keys())
    assert got.valid.device.type == DEVICE.type and got.keys().device.type == DEVICE.type


# --------------------------------------------------------------------------
# what the backend refuses
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(sliding_window=128), "sliding window"),
        (dict(head_size=80), "head size 80"),
        (dict(logits_soft_cap=30.0), "soft-cap"),
        (dict(kv_cache_dtype="fp8"), "KV cache dtype fp8"),
        (dict(kv_sharing_target_layer_name="model.layers.0.self_attn.attn"), "KV sharing"),
        (dict(num_kv_heads=3), "8 query heads for 3 KV heads"),
    ],
)
def test_impl_rejects_unsupported(kwargs, needle):
    args = dict(num_heads=8, head_size=64, scale=0.125, num_kv_heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        KVCompressCUDAImpl(**args)


def test_builder_is_cudagraph_never():
    from vllm.v1.attention.backend import AttentionCGSupport

    assert KVCompressCUDAMetadataBuilder._cudagraph_support == AttentionCGSupport.NEVER


# --------------------------------------------------------------------------
# selection in create_engine_config (no engine: a stand-in EngineArgs class)
# --------------------------------------------------------------------------
class _Platform:
    def __init__(self, kind):
        self.kind = kind
        self.device_name = kind

    def is_cpu(self):
        return self.kind == "cpu"

    def is_cuda(self):
        return self.kind == "cuda"


def _fake_engine_args(**overrides):
    from kvcompress_vllm.engine_args import _wrap_create_engine_config

    head_size = overrides.pop("head_size", 128)
    model = SimpleNamespace(use_mla=False, get_sliding_window=lambda: None, is_hybrid=False,
                            is_attention_free=False, is_encoder_decoder=False, model="m",
                            get_head_size=lambda: head_size)
    block_size = overrides.pop("block_size", 16)
    v2 = overrides.pop("v2", False)

    class Args:
        speculative_config = None
        kv_transfer_config = None
        kv_offloading_size = None
        async_scheduling = False
        enable_dbo = False
        ubatch_size = 1
        pipeline_parallel_size = 1
        kv_cache_dtype = "auto"
        scheduler_cls = None
        worker_cls = "auto"
        enable_prefix_caching = True
        attention_backend = None
        attention_config = SimpleNamespace(backend=None)
        additional_config = {"kv_compress": {"rate": 0.5}}

        def create_engine_config(self, *a, **k):
            self.seen_env = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
            return SimpleNamespace(model_config=model, use_v2_model_runner=v2,
                                   cache_config=SimpleNamespace(block_size=block_size))

    _wrap_create_engine_config(Args)
    args = Args()
    for k, val in overrides.items():
        setattr(args, k, val)
    return args


@pytest.fixture
def cuda_platform(monkeypatch):
    import vllm.platforms

    from kvcompress_vllm import compat

    compat.check_cuda_hooks()  # import the hooked modules on the real platform first
    monkeypatch.setattr(vllm.platforms, "_current_platform", _Platform("cuda"))
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)


def test_cuda_selects_gpu_worker_custom_backend_and_v1_runner(cuda_platform):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from kvcompress_vllm.engine_args import CUDA_VERIFIED, GPU_WORKER_CLS

    args = _fake_engine_args()
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    plugin_logger = logging.getLogger("vllm.kvcompress")
    plugin_logger.addHandler(handler)
    try:
        args.create_engine_config()
    finally:
        plugin_logger.removeHandler(handler)
    assert args.worker_cls == GPU_WORKER_CLS
    assert args.attention_backend == AttentionBackendEnum.CUSTOM
    assert args.seen_env == "0" and not args.enable_prefix_caching and not args.async_scheduling
    warnings = [r.getMessage() for r in seen if "EXPERIMENTAL" in r.getMessage()]
    assert len(warnings) == 1 and CUDA_VERIFIED in warnings[0]
    assert "interpreter" in warnings[0]
    args.create_engine_config()  # the same args again (e.g. a second LLM) still pass


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(attention_backend="FLASH_ATTN"), "own attention backend"),
        (dict(block_size=48), "block-size 48"),
        (dict(head_size=96), "head size 96"),
        (dict(v2=True), "V2 model runner"),
        (dict(enable_dbo=True), "micro-batching"),
        (dict(ubatch_size=2), "micro-batching"),
    ],
)
def test_cuda_rejects_what_the_kernels_cannot_run(cuda_platform, overrides, needle):
    args = _fake_engine_args(**overrides)
    with pytest.raises(KVCompressConfigError, match=needle):
        args.create_engine_config()


def test_cuda_rejects_v2_runner_env(cuda_platform, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(KVCompressConfigError, match="VLLM_USE_V2_MODEL_RUNNER"):
        _fake_engine_args().create_engine_config()


def test_other_platforms_keep_a_clear_error(monkeypatch):
    import vllm.platforms

    monkeypatch.setattr(vllm.platforms, "_current_platform", _Platform("rocm"))
    with pytest.raises(KVCompressConfigError, match="rocm platform is not supported"):
        _fake_engine_args().create_engine_config()


def test_cuda_hooks_exist_in_installed_vllm():
    from kvcompress_vllm import compat

    compat.check_cuda_hooks()


# --------------------------------------------------------------------------
# every kernel configuration compiles for sm_80 and sm_90 (no GPU needed)
# --------------------------------------------------------------------------
def _compile_check(_dir):
    import importlib.util

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    return [sys.executable, "-m", "kvcompress_vllm.triton_kernels._compile_check", "80", "90"], env


@pytest.mark.background.with_args(_compile_check)
def test_compile_check_all_configurations_sm80_sm90(background):
    res = background.result(timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "kernels OK" in res.stdout
    for arch in ("sm_80", "sm_90"):
        for kernel in ("_attn_fwd_kernel", "_attn_combine_kernel", "_attn_metric_kernel",
                       "_move_slots_kernel", "_write_kv_kernel"):
            assert f"{arch} {kernel}" in res.stdout, f"{arch} {kernel} not compiled"


# --------------------------------------------------------------------------
# the device check anyone with a GPU can run: its quick form runs here
# --------------------------------------------------------------------------
def _gpu_kernels_quick(out_dir):
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_kernels.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PYTHONPATH", None)  # torch + triton only: the script loads kernels/ by path
    return [sys.executable, str(script), "--quick", "--out", str(out_dir / "gpu_kernels.md")], env


@pytest.mark.background.with_args(_gpu_kernels_quick)  # its timings mean nothing on CPU anyway
def test_gpu_kernels_benchmark_quick_on_cpu(background):
    res = background.result(timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "vllm was imported" not in res.stderr
    text = (background.dir / "gpu_kernels.md").read_text()
    assert "Triton interpreter" in text and "**FAILED**" not in text
    for check in ("attention decode bf16", "attention mixed bf16", "attention split-KV decode bf16",
                  "attention decode bf16, metric scores recomputed from K",
                  "write_kv bfloat16", "compact_heads bfloat16"):
        assert f"| {check} | yes |" in text, check
    assert text.count("| decode |") == 1 and text.count("| prefill |") == 1


@pytest.mark.skipif(not _FRESH_PROCESS_NEEDED, reason="the kernel tests ran in this process")
def test_kernel_tests_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "not fresh_process and not benchmark_quick and not compile_check"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
    assert " skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]


# --------------------------------------------------------------------------
# ops dispatch by device
# --------------------------------------------------------------------------
def test_ops_dispatch_by_device(monkeypatch):
    cpu = torch.empty(1)
    # no GPU needed to ask: what backend_for reads of a CUDA tensor
    cuda = SimpleNamespace(device=torch.device("cuda"), is_cpu=False, is_cuda=True)
    monkeypatch.setattr(ops, "KERNELS", "auto")
    assert ops.backend_for(cpu) == "cpp" and ops.backend_for(cuda) == "triton"
    monkeypatch.setattr(ops, "KERNELS", "cpp")  # the old default name
    assert ops.backend_for(cpu) == "cpp" and ops.backend_for(cuda) == "triton"
    monkeypatch.setattr(ops, "KERNELS", "reference")
    assert ops.backend_for(cpu) == "reference" and ops.backend_for(cuda) == "reference"
    monkeypatch.setattr(ops, "KERNELS", "triton")
    assert ops.backend_for(cpu) == "triton"
    monkeypatch.setattr(ops, "KERNELS", "cuda")
    with pytest.raises(ValueError, match="KVCOMPRESS_VLLM_KERNELS='cuda'"):
        ops.backend_for(cpu)
    monkeypatch.setattr(ops, "KERNELS", "auto")
    with pytest.raises(RuntimeError, match="no kernels for meta tensors"):
        ops.backend_for(torch.empty(1, device="meta"))
