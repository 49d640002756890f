"""benchmarks/layout_probe: the packed page layout and the probe's kernels.

The probe's packed kernels (AVX-512-BF16 and AMX) must compute what the
production micro-kernels compute on the plain layout, or its timings compare
different work.  ``pack_page`` is checked element by element against the
layout its docstring states.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import layout_probe  # noqa: E402


def test_pack_page_places_every_element_where_the_layout_says():
    block, d = 32, 8
    ctx = 2 * block
    k = torch.arange(ctx * d, dtype=torch.float32).view(ctx, d)
    v = -k
    kp, vp = layout_probe.pack_page(k, v, block)
    assert kp.shape == (2, block // 16, d // 2, 16, 2) and vp.shape == (2, block // 2, d, 2)
    for i in range(ctx):
        page, n = divmod(i, block)
        for dim in range(d):
            assert kp[page, n // 16, dim // 2, n % 16, dim % 2] == k[i, dim]
            assert vp[page, n // 2, dim, n % 2] == v[i, dim]


def _has_avx512_bf16() -> bool:
    from kvcompress_vllm import ops

    ops.load_library()
    return torch.ops.kvcompress.cpu_isa() in ("avx512_bf16", "avx512_amx")


@pytest.mark.skipif(not _has_avx512_bf16(), reason="the probe needs AVX-512-BF16")
def test_packed_kernels_compute_what_the_production_micro_kernels_compute():
    probe = layout_probe.load_probe()
    amx = torch.cpu._is_amx_tile_supported()
    if amx:
        torch.cpu._init_amx()
    gen = torch.Generator().manual_seed(0)
    for g, d, ctx in [(1, 64, 128), (3, 64, 384), (4, 128, 256), (2, 128, 128)]:
        q = torch.randn(g, d, generator=gen).to(torch.bfloat16)
        k = torch.randn(ctx, d, generator=gen).to(torch.bfloat16)
        v = torch.randn(ctx, d, generator=gen).to(torch.bfloat16)
        kp, vp = layout_probe.pack_page(k, v)
        plain = torch.zeros(g, d)
        probe.time_passes(q, k, v, 0, 1, plain)
        assert plain.abs().max() > 0
        for variant in (1, 2) if amx else (1,):
            out = torch.full((g, d), float("nan"))
            probe.time_passes(q, kp, vp, variant, 2, out)  # a pass starts from O = 0
            torch.testing.assert_close(out, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max()))
    with pytest.raises(RuntimeError, match="G in 1..4"):
        probe.time_passes(torch.zeros(5, 64, dtype=torch.bfloat16), k[:, :64].contiguous(),
                          v[:, :64].contiguous(), 1, 1, torch.zeros(5, 64))
