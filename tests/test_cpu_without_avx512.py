"""The kernels on a CPU that has AVX2 and no AVX-512, as the CPU itself says.

The machines this project runs on have AVX-512 (often with BF16), so the
other tests reach the AVX2 path only by asking for it
(``set_cpu_isa("avx2")``), and ``benchmarks/cpu_emulation`` runs engines as
on an older CPU by answering torch's probes.  Neither would notice an
AVX-512 instruction executed on the way (the host runs it), nor a choice made
from the real CPUID.  Here the tests run under QEMU's user-mode emulator as
a Haswell (``qemu-x86_64 -cpu Haswell-v4``: AVX2, FMA, F16C; no AVX-512):
CPUID says so to torch, to vLLM (which then loads ``_C_AVX2``) and to our
library, and an AVX-512 instruction would stop the process with SIGILL.

What runs there: which paths each library picks, then the kernel tests of
``CASES`` (the quick form, 113 tests, 1.5 min here alone; in ``make test``
a ``background`` job beside the tests before it; ``KVC_NO_AVX512_FULL=1``
runs the whole files, 284 tests, 4 min): our attention, write and compaction kernels against
the reference, vLLM's AVX2 writer against the in-page layout we learn from
it, packed requests on vLLM's kernel per KV head, batch gathering, KeyDiff
and the prefill paths.  The emulator runs the model's matmuls some 300x
slower than the host, so an engine is not started by default: ``KVC_NO_AVX512_ENGINE=1`` adds one plugin and one stock
engine on short prompts (7-9 min here; docs/performance.md, "On a CPU
without AVX-512, under QEMU").

Needs ``qemu-x86_64`` (Debian's ``qemu-user``; ``make test`` installs it
where it can) on an x86_64 host; skips otherwise, saying why.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import pytest
from subproc import run

TESTS = Path(__file__).resolve().parent
BENCHMARKS = TESTS.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from throughput_sweep import EMULATED_CPUS  # noqa: E402  (one home: build, capability, path)

#: (vLLM's build, torch's capability, our path) on a CPU without AVX-512, as
#: ``throughput_sweep.worker_cpu`` reports them.
WANT = (EMULATED_CPUS["avx2"].vllm_build, EMULATED_CPUS["avx2"].aten_capability,
        EMULATED_CPUS["avx2"].our_path)
#: The start of each script under the emulator: ``worker_cpu`` importable.
FIND = f"import sys\nsys.path.insert(0, {str(BENCHMARKS)!r})\nfrom throughput_sweep import worker_cpu\n"

#: QEMU's CPU model: Haswell without TSX, with IBRS -- AVX2 + FMA + F16C.
CPU_MODEL = "Haswell-v4"

#: Quick form: file -> the ``-k`` expression of its tests that run (None: all).
#: Each expression names its module, since ``-k`` applies to every file.
CASES = {
    "test_cpu_kernels.py": "dispatch or write or compact or (avx2 and not packed_pages and "
                           "not random) or (random and avx2-3-64) or (packed_pages and avx2-128-3-64)",
    "test_cpu_packed.py": "learned_packing or vllm_kernel_build or choice or packed_decode_step "
                          "or ((packed_requests_run or compaction or row_split) and [0)",
    "test_gather_batch.py": None,
    "test_keydiff_kernel.py": "not kvpress or kvpress[0",
    "test_cpu_prefill.py": "not split_matches or [True-0] or [False-1]",
}

#: What the process must find before the tests run (``WANT``), then the tests.
PREAMBLE = FIND + f"""
import torch, pytest
import vllm
from vllm.platforms import current_platform
current_platform.import_kernels()
found = worker_cpu(None, True)
print("found", found, flush=True)
if found != {WANT!r}:
    sys.exit(f"expected {WANT!r} on a CPU without AVX-512, found {{found}}")
for path in ("avx512", "avx512_bf16", "avx512_amx"):
    try:
        torch.ops.kvcompress.set_cpu_isa(path)
    except RuntimeError as e:
        assert "lacks" in str(e), e
    else:
        sys.exit(f"set_cpu_isa({{path!r}}) was accepted on a CPU without AVX-512")
torch.ops.kvcompress.set_cpu_isa("auto")
sys.exit(pytest.main(sys.argv[1:]))
"""


def _qemu() -> str:
    if platform.machine() != "x86_64":
        pytest.skip(f"runs x86_64 code under qemu-x86_64; this host is {platform.machine()}")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 not found: install Debian's qemu-user (make test tries to)")
    version = run([qemu, "--version"], timeout=60).stdout
    found = re.search(r"version (\d+)\.(\d+)", version)
    if found is None or tuple(map(int, found.groups())) < (7, 2):
        # Before 7.2 QEMU's TCG drops AVX2 / FMA from the CPU model (with a warning).
        pytest.skip(f"qemu-x86_64 emulates AVX2 from 7.2 on; this one says {version.strip()!r}")
    return qemu


def _cpu_decides() -> dict:
    """This environment without what would choose a path for the CPU."""
    env = dict(os.environ)
    for name in ("KVCOMPRESS_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                 "KVC_EMULATE_CPU", "PYTEST_ADDOPTS",
                 # debug switches that would route around the kernels under test
                 "KVCOMPRESS_VLLM_KERNELS", "KVCOMPRESS_CPU_PREFILL", "KVCOMPRESS_METRIC_PAGES",
                 "KVCOMPRESS_PACKED_DECODE"):
        env.pop(name, None)
    return env


def _under(qemu: str, script: str, args: list[str]) -> list[str]:
    """The command line of ``python -c script *args`` on ``CPU_MODEL``."""
    return [qemu, "-cpu", CPU_MODEL, sys.executable, "-c", script, *args]


def _without_warnings(stderr: str) -> str:
    """``stderr`` without QEMU's warnings about features of the model it does
    not emulate."""
    return "\n".join(line for line in stderr.splitlines() if "TCG doesn't support" not in line)


def pytest_args(full: bool) -> list[str]:
    """One pytest run over the files of ``CASES`` (``full``: all their tests)."""
    args = ["-q", "--color=no", "-p", "no:cacheprovider", "-rs", "--rootdir", str(TESTS.parent)]
    args += [str(TESTS / name) for name in CASES]
    if full:
        return args
    # -k applies to every file: each part names its module (a keyword of its tests).
    parts = [Path(name).stem + (f" and ({expr})" if expr else "") for name, expr in CASES.items()]
    return args + ["-k", " or ".join(f"({part})" for part in parts)]


def _full() -> bool:
    return os.environ.get("KVC_NO_AVX512_FULL") == "1"


def _kernel_tests(_dir):
    """The emulated pytest run, a ``background`` job: it starts when the
    session's tests are collected and runs beside them at the lowest CPU
    priority (``subproc.Background``)."""
    return _under(_qemu(), PREAMBLE, pytest_args(_full())), _cpu_decides()


@pytest.mark.background.with_args(_kernel_tests)
def test_kernels_on_a_cpu_without_avx512(background):
    full = _full()
    proc = background.result(timeout=1800 if full else 900)
    stderr = _without_warnings(proc.stderr)
    out = proc.stdout + stderr
    assert proc.returncode == 0, f"under {CPU_MODEL} (rc {proc.returncode}):\n{out[-6000:]}"
    assert f"found {WANT!r}" in out, out[-3000:]
    summary = re.findall(r"^.*\b(\d+) passed.*$", proc.stdout, re.M)
    passed = int(summary[-1]) if summary else 0
    # The quick form selects 113 tests (284 in all): a -k part that stops matching shows here.
    assert passed >= (280 if full else 110), f"too few tests ran under {CPU_MODEL}: {out[-2000:]}"
    print(f"under {CPU_MODEL}: {passed} passed")


#: One engine under the emulator: ``spec`` in argv[1], a line ``RESULT {json}`` out.
ENGINE = FIND + """
import json, os
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
spec = json.loads(sys.argv[1])
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(spec["model"], **spec["engine"])
runs = []
for batch in spec["batches"]:  # one generate() each, so a batch is scheduled alone
    params = [SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                             extra_args=x) for x in batch["extra_args"]]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch["prompts"]], params,
                        use_tqdm=False)
    runs.append([{"tokens": list(o.outputs[0].token_ids),
                  "stats": (o.kv_transfer_params or {}).get("kv_compress")} for o in outs])
found = worker_cpu(None, spec["plugin"])
print("RESULT " + json.dumps({"found": found, "runs": runs}), flush=True)
llm.llm_engine.engine_core.shutdown()
"""


def _engine(qemu: str, spec: dict, plugin: bool) -> dict:
    env = _cpu_decides()
    if not plugin:
        env.update(VLLM_PLUGINS="", KVCOMPRESS_VLLM_AUTOPATCH="0")
    proc = run(_under(qemu, ENGINE, [json.dumps({**spec, "plugin": plugin})]), timeout=1500, env=env)
    stderr = _without_warnings(proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, \
        f"engine under {CPU_MODEL} (rc {proc.returncode}):\n{stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.engine
@pytest.mark.skipif(os.environ.get("KVC_NO_AVX512_ENGINE") != "1",
                    reason="7-9 min under the emulator: KVC_NO_AVX512_ENGINE=1 runs it")
def test_engines_on_a_cpu_without_avx512(model_path):
    """A plugin engine at rate 0.25 compresses one request and serves one at
    rate 1.0; a stock engine serves that one too, alone as in the plugin's
    engine, and gives the same tokens.  Both engines find vLLM's ``_C_AVX2``
    and torch's AVX2 kernels, ours its AVX2 path.

    The rate-1.0 request, alone in its steps, runs on vLLM's own path: its
    tokens show that the plugin leaves stock vLLM's results alone there.  Our
    AVX2 kernels serve the compressed request, whose tokens have no reference
    here (the kernel tests above compare those kernels with the reference)."""
    import random

    qemu = _qemu()
    rng = random.Random(0)
    compressed, stock_like = ([rng.randrange(100, 40000) for _ in range(160)] for _ in range(2))
    spec = {"model": model_path, "max_tokens": 12,
            "engine": dict(enforce_eager=True, seed=0, max_model_len=512, max_num_seqs=4,
                           block_size=32, max_num_batched_tokens=512,
                           kv_cache_memory_bytes=32 << 20)}
    plugin = _engine(qemu, {**spec, "engine": {**spec["engine"], "kv_compress_rate": 0.25},
                            "batches": [{"prompts": [stock_like], "extra_args": [{"kv_compress_rate": 1.0}]},
                                        {"prompts": [compressed], "extra_args": [None]}]}, True)
    stock = _engine(qemu, {**spec, "batches": [{"prompts": [stock_like], "extra_args": [None]}]}, False)
    assert plugin["found"] == list(WANT), plugin["found"]
    assert stock["found"] == [*WANT[:2], None], stock["found"]
    (kept,), (squeezed,) = plugin["runs"]
    assert squeezed["stats"]["compressions"] >= 1 and squeezed["stats"]["kept_fraction"] < 0.6, squeezed
    assert len(squeezed["tokens"]) == spec["max_tokens"]
    assert kept["stats"]["compressions"] == 0, kept
    assert kept["tokens"] == stock["runs"][0][0]["tokens"]
    print(f"under {CPU_MODEL}: plugin {plugin['found']}, compressed request {squeezed['stats']}")
