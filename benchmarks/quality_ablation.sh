#!/usr/bin/env bash
# Metric ablations behind docs/quality.md ("Metric ablations (window, pooling)"):
# every scorer at keep rates 0.5 / 0.25 (`uniform`: kvcompress with the uniform
# allocation), then the paper's attention metric (`kvcompress`, the default
# scorer when this ablation was run) with a larger observation window and with
# other pooling widths, on the --medium task set
# (2000-token prompts, 8 tasks).  About 12 minutes here; CSVs land in
# docs/quality_ablation/ (override with OUT=dir).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/quality_ablation}
PY=${PY:-.venv/bin/python}
run() { "$PY" benchmarks/quality.py --medium --out-dir "$OUT" --rates 0.5,0.25 "$@"; }
run --scorers kvcompress,uniform,keydiff,knorm,streamingllm,random --tag _base
run --scorers kvcompress --observation-window 64 --tag _w64
run --scorers kvcompress --observation-window 128 --tag _w128
run --scorers kvcompress --pooling-kernel 1 --tag _k1
run --scorers kvcompress --pooling-kernel 15 --tag _k15
