"""Run vLLM, torch and the plugin as they run on an older x86 CPU.

Benchmark-only.  Imported by Python at start-up when this directory is on
``PYTHONPATH`` (``throughput_sweep.py --emulate-cpu`` puts it there for its
engine processes, whose children inherit it).  ``KVC_EMULATE_CPU``:

* ``avx2``   -- a CPU without AVX-512 (AMD Zen 2/3, Intel client cores):
  vLLM loads ``vllm._C_AVX2``;
* ``avx512`` -- AVX-512 without BF16 (Intel Skylake-SP to Ice Lake):
  vLLM loads ``vllm._C_AVX512``.

vLLM picks its kernel library, and its attention layout, by torch's CPU
probes and nothing else (``CpuPlatform.import_kernels``, ``_get_attn_isa``),
so those probes answer as the older CPU would.  The rest comes from the
environment the sweep sets beside it: ``ATEN_CPU_CAPABILITY`` (torch's own
kernels), ``ONEDNN_MAX_CPU_ISA`` (its matmuls) and ``KVCOMPRESS_CPU_ISA``
(the plugin's kernels).  The cores themselves stay this machine's: the
emulation gets the instruction set right, not the older CPU's clocks,
caches or memory.
"""

import os

_CPU = os.environ.get("KVC_EMULATE_CPU")
if _CPU:
    if _CPU not in ("avx2", "avx512"):
        raise ValueError(f"KVC_EMULATE_CPU={_CPU!r}: expected avx2 or avx512")
    import torch

    def _no() -> bool:
        return False

    if _CPU == "avx2":
        torch.cpu._is_avx512_supported = _no
        torch.cpu._is_avx512_vnni_supported = _no
    torch.cpu._is_avx512_bf16_supported = _no
    torch.cpu._is_amx_tile_supported = _no
    torch.cpu._is_amx_fp16_supported = _no
