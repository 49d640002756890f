#!/usr/bin/env bash
# The GPU device check, for a CUDA machine with torch + triton and no vLLM:
# tests/test_triton_kernels.py on the compiled kernels, then
# benchmarks/gpu_kernels.py (correctness vs ops/reference.py, then timing).
#
#   benchmarks/gpu_check.sh OUTDIR      # writes env.txt, pytest.log, bench.log, gpu_kernels.md
#
# The package is assembled as it installs (kernels/ -> kvcompress_vllm/triton_kernels)
# in a temporary folder on PYTHONPATH; nothing is built or installed.
# TRITON_INTERPRET=0 is set so the tests cannot fall back to the interpreter.
set -u
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 KVCOMPRESS_VLLM_AUTOPATCH=0 TRITON_INTERPRET=${TRITON_INTERPRET:-0}
{ nvidia-smi -L; $py -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"; } 2>&1 | tee "$out/env.txt"
pkg=$(mktemp -d)
cp -r kvcompress_vllm tests pyproject.toml "$pkg/"
rm -rf "$pkg/kvcompress_vllm/triton_kernels"
cp -r kernels "$pkg/kvcompress_vllm/triton_kernels"
# Run from the assembled copy: ``python -m pytest`` puts the working folder first on sys.path.
(cd "$pkg" && PYTHONPATH="$pkg:$pkg/tests" timeout "${PYTEST_TIMEOUT:-200}" $py -m pytest -q \
    -p no:cacheprovider -rs tests/test_triton_kernels.py) 2>&1 | tee "$out/pytest.log"
rc1=${PIPESTATUS[0]}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout "${BENCH_TIMEOUT:-300}" $py benchmarks/gpu_kernels.py --out "$out/gpu_kernels.md" \
    ${BENCH_ARGS:---time-budget 150 --prefill-batches 1 8} 2>&1 | tee "$out/bench.log"
rc2=${PIPESTATUS[0]}
echo "pytest rc=$rc1, gpu_kernels rc=$rc2" | tee -a "$out/env.txt"
exit $((rc1 || rc2))
