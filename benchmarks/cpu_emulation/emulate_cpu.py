"""Answer torch's CPU probes as an older x86 CPU would (benchmark-only).

vLLM picks its kernel library, and its attention layout, by torch's CPU
probes and nothing else (``CpuPlatform.import_kernels``, ``_get_attn_isa``),
so after ``emulate(cpu)`` -- before vLLM loads its kernels -- this process
runs that CPU's vLLM build on this one:

* ``avx2``   -- a CPU without AVX-512 (AMD Zen 2/3, Intel client cores):
  vLLM loads ``vllm._C_AVX2``;
* ``avx512`` -- AVX-512 without BF16 (Intel Skylake-SP to Ice Lake):
  vLLM loads ``vllm._C_AVX512``.

Neither has AMX tiles.  The probes stay patched for the process: vLLM's
``import_kernels`` runs again on later imports, and loading a second build of
its ``_C`` namespace aborts.  The cores themselves stay this machine's: the
emulation gets the instruction sets right, not the older CPU's clocks,
caches or memory.
"""

from typing import NamedTuple


class EmulatedCpu(NamedTuple):
    """What runs on an emulated CPU: vLLM's kernel build, torch's
    ``ATEN_CPU_CAPABILITY``, oneDNN's ``ONEDNN_MAX_CPU_ISA`` and the plugin's
    kernel path (``KVCOMPRESS_CPU_ISA``)."""

    vllm_build: str
    aten_capability: str
    onednn_isa: str
    our_path: str


CPUS = {
    "avx2": EmulatedCpu("_C_AVX2", "avx2", "AVX2", "avx2"),
    "avx512": EmulatedCpu("_C_AVX512", "avx512", "AVX512_CORE", "avx512"),
}


def emulate(cpu: str) -> None:
    if cpu not in CPUS:
        raise ValueError(f"emulated CPU {cpu!r}: expected one of {', '.join(CPUS)}")
    import torch

    def _no() -> bool:
        return False

    if cpu == "avx2":
        torch.cpu._is_avx512_supported = _no
        torch.cpu._is_avx512_vnni_supported = _no
    torch.cpu._is_avx512_bf16_supported = _no
    torch.cpu._is_amx_tile_supported = _no
    torch.cpu._is_amx_fp16_supported = _no
