"""Compile every kernel configuration for real GPUs without a GPU.

``python -m kvcompress_vllm.triton_kernels._compile_check [--quick] [ARCH ...]``

The wrappers are driven with ``meta`` tensors (shapes only, no data) and with
``TRITON_INTERPRET`` off; each ``kernel[grid](...)`` launch is intercepted and
compiled ahead of time with ``triton.compile`` for ``GPUTarget("cuda", arch)``
(default archs 80 and 90), down to a cubin with the ``ptxas`` that ships in
the triton wheel.  This checks what the interpreter cannot: that the kernels
are valid compiled Triton (types, loop-carried values, early returns, dot
shapes, shared memory).  It prints one line per compiled kernel (shared
memory, registers and spills from ``ptxas -v``) and exits non-zero on any
failure.  Nothing is launched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import attention, cache_write, compact  # noqa: E402

def _signature(fn, args, kwargs):
    """Signature, constexprs and attributes as ``JITFunction.run`` builds them
    (ints equal to 1 become constexprs; 16-divisible ints and pointers get
    ``tt.divisibility``)."""
    sig, constexprs, attrs = {}, {}, {}
    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
            constexprs[name] = v
            continue
        ty, key = native_specialize_impl(BaseBackend, v, False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            constexprs[name] = v
        elif isinstance(key, str):
            attrs[(i,)] = BaseBackend.parse_attr(key)
    options = {k: v for k, v in kwargs.items() if k not in names}
    return sig, constexprs, attrs, options


def _ptxas_usage(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        res = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True, text=True, check=True,
        )
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}"


# Opt-in shared memory per block (bytes) of the data-centre parts.
_SMEM_LIMIT = {80: 166912, 90: 232448}
_SMEM_CONSUMER = 101376  # sm_86 / sm_89


class _Interceptor:
    def __init__(self, fn, archs, log, usage):
        self.fn, self.archs, self.log, self.usage = fn, archs, log, usage

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            sig, constexprs, attrs, options = _signature(self.fn, args, kwargs)
            for arch in self.archs:
                src = ASTSource(self.fn, sig, constexprs, attrs)
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                shown = {n: (str(v) if not isinstance(v, (int, bool)) else v)
                         for n, v in constexprs.items()
                         if n in ("G", "HEAD_DIM", "PAGE", "BLOCK_M", "BLOCK_N", "SPLIT",
                                  "METRICS", "DOT_DTYPE", "BLOCK_R", "BLOCK_D")}
                shared = k.metadata.shared
                line = f"sm_{arch} {self.fn.__name__} {shown} shared={shared}"
                if self.usage:
                    line += " " + _ptxas_usage(k.asm["ptx"], arch)
                if shared > _SMEM_CONSUMER:
                    line += " (too much shared memory for sm_86/sm_89)"
                self.log.append(line)
                if shared > _SMEM_LIMIT.get(arch, _SMEM_CONSUMER):
                    raise RuntimeError(f"shared memory over the sm_{arch} limit: {line}")
        return launch


def main(archs: list[int], quick: bool = False) -> list[str]:
    """Compile the configurations; ``quick``: a representative subset, no
    ``ptxas -v`` report (used by the tests)."""
    archs = list(archs)  # the interceptors share this list (narrowed for Hopper-only cases)
    log: list[str] = []
    patched = []
    for mod in (attention, compact, cache_write):
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(mod, name, _Interceptor(obj, archs, log, usage=not quick))
                patched.append((mod, name, obj))
    meta = torch.device("meta")

    def attn(group, head_dim, page, dtype, num_tokens, num_reqs, metrics, hits=False, **knobs):
        """``hits``: with ``metric_k_start`` (prefix-cache hitters)."""
        hkv = 2
        q = torch.empty(num_tokens, hkv * group, head_dim, dtype=dtype, device=meta)
        kv = torch.empty(64, 2, page, head_dim, dtype=dtype, device=meta)
        pt = torch.empty(num_reqs, hkv, 8, dtype=torch.int32, device=meta)
        kl = torch.empty(num_reqs, hkv, dtype=torch.int32, device=meta)
        qsl = torch.empty(num_reqs + 1, dtype=torch.int32, device=meta)
        m = torch.empty(64, page, dtype=torch.float32, device=meta) if metrics else None
        mqs = torch.empty(num_reqs, dtype=torch.int32, device=meta)
        mks = torch.empty(num_reqs, dtype=torch.int32, device=meta) if hits else None
        attention._launch(q, kv, pt, kl, qsl, head_dim**-0.5, m, mqs, torch.empty_like(q),
                          mks, **knobs)

    try:
        if quick:
            attn(4, 128, 16, torch.bfloat16, 8, 8, True, hits=True)  # decode, hitters
            attn(3, 64, 32, torch.float16, 300, 2, True)  # prefill chunk, G = 3
            attn(8, 64, 16, torch.bfloat16, 8, 8, True, hits=True, num_splits=4)  # split-KV x3
            attn(4, 128, 16, torch.bfloat16, 8, 8, True, scores=False)  # decode, recomputed
        else:
            # decode (block_m 16) and prefill tiles, all dtypes and head dims
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for head_dim in (64, 128):
                    attn(4, head_dim, 16, dtype, 8, 8, True)  # decode
                    attn(4, head_dim, 16, dtype, 300, 2, True)  # prefill chunk
            attn(8, 128, 128, torch.bfloat16, 8, 8, False)
            attn(3, 128, 32, torch.bfloat16, 300, 2, True)
            attn(16, 128, 16, torch.bfloat16, 300, 2, True)
            attn(8, 128, 16, torch.bfloat16, 8, 8, True, num_splits=4)  # split-KV
            # prefix-cache hitters (metric_k_start): fused and split
            attn(4, 128, 16, torch.bfloat16, 300, 2, True, hits=True)
            attn(4, 128, 16, torch.bfloat16, 8, 8, True, hits=True, num_splits=4)
            # The rest of what the CUDA backend can launch: head size 32, no
            # GQA, 64-token pages, and the Llama-3-8B shape (G = 4, D = 128,
            # 16-token pages) on the split-KV decode path with metrics.
            for dtype in (torch.bfloat16, torch.float16):
                attn(4, 32, 16, dtype, 8, 8, True)
                attn(4, 32, 16, dtype, 300, 2, True)
            attn(1, 128, 16, torch.bfloat16, 8, 8, True)
            attn(1, 128, 64, torch.bfloat16, 300, 2, True)
            attn(4, 128, 16, torch.bfloat16, 8, 8, True, num_splits=8)
            # decode metrics recomputed from K (batches beyond DECODE_SCORES_BYTES)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                attn(4, 128, 16, dtype, 8, 8, True, scores=False)
            attn(4, 128, 16, torch.bfloat16, 8, 8, True, hits=True, scores=False, num_splits=4)
        # Hopper's prefill tiles (``attention._launch`` picks them on sm_90 only).
        if 90 in archs:
            shown = list(archs)
            archs[:] = [90]
            try:
                for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16):
                    attn(4, 128, 16, dtype, 300, 2, True, block_m=128, block_n=128)
                    if not quick:
                        attn(4, 128, 16, dtype, 300, 2, True, hits=True, block_m=128, block_n=128)
                        attn(8, 128, 32, dtype, 300, 2, False, block_m=128, block_n=128)
            finally:
                archs[:] = shown

        for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
            kv = torch.empty(64, 2, 16, 128, dtype=dtype, device=meta)
            compact.compact_heads(
                kv, torch.empty(64, 16, device=meta),
                torch.empty(64, 16, dtype=torch.int32, device=meta),
                torch.empty(4, 8, dtype=torch.int32, device=meta),
                torch.empty(4, dtype=torch.int32, device=meta),
                torch.empty(4, 20, dtype=torch.int32, device=meta),
                torch.empty(4, dtype=torch.int32, device=meta))
            key = torch.empty(5, 2, 128, dtype=dtype, device=meta)
            cache_write.write_kv(key, key, kv, torch.empty(5, 2, dtype=torch.int64, device=meta),
                                 torch.empty(64, 16, device=meta),
                                 torch.empty(64, 16, dtype=torch.int32, device=meta),
                                 torch.empty(5, dtype=torch.int64, device=meta))
    finally:
        for mod, name, obj in patched:
            setattr(mod, name, obj)
    return log


if __name__ == "__main__":
    argv = sys.argv[1:]
    quick = "--quick" in argv
    archs = [int(a) for a in argv if a != "--quick"] or [80, 90]
    lines = main(archs, quick=quick)
    print("\n".join(lines))
    print(f"compiled {len(lines)} kernels OK")
