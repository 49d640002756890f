"""Where an engine's time goes: a sampled CPU profile (``perf record -e
cpu-clock``; this VM exposes no hardware counters) of one load shape, stock
vLLM vs the plugin, grouped by library and by hottest symbols.

Each configuration is one in-process engine started by ``throughput_sweep.py
--worker``; ``perf`` samples every thread of it but only while the jobs run
(``--control`` fifos, enabled after warm-up), so start-up and model loading
are not in the profile.  Libraries: ``kvcompress _C`` (our attention, write,
compaction kernels), ``vllm _C`` (vLLM's attention and other CPU ops),
``libtorch_cpu`` (aten ops, oneDNN's dispatch), ``JIT (oneDNN)`` (the
matmul kernels oneDNN generates at run time -- AMX here), ``libgomp`` (OpenMP runtime: threads waiting at barriers),
``python`` (the interpreter: scheduling, batch building, engine loop), kernel.

    python benchmarks/profile_engine.py                   # ~8 min, writes docs/profile.md
    python benchmarks/profile_engine.py --quick           # ~4 min, prints only

Needs ``perf`` on PATH and ``perf_event_paranoid <= 2`` (user-space sampling of
one's own processes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_process import run_child  # noqa: E402
from throughput_sweep import Shape  # noqa: E402

# (label, shape, plugin, rate, budget tokens or None = every request uncompressed)
RUNS = [
    ("stock", Shape("decode-heavy", 12, 256, 512), False, None, None),
    ("kvc 1", Shape("decode-heavy", 12, 256, 512), True, 1.0, None),
    ("kvc 0.25", Shape("decode-heavy", 12, 256, 512), True, 0.25, None),
    ("stock", Shape("prefill-heavy", 9, 2560, 32), False, None, None),
    ("kvc 0.25", Shape("prefill-heavy", 9, 2560, 32), True, 0.25, None),
]
QUICK = [RUNS[0], RUNS[1]]


def group_of(dso: str) -> str:
    if dso.startswith("_C.cpython") or "kvcompress" in dso:
        return "kvcompress _C"
    if dso.startswith("_C") or "vllm" in dso:
        return "vllm _C"
    if "libtorch_cpu" in dso:
        return "libtorch_cpu"
    if "gomp" in dso or "iomp" in dso:
        return "libgomp"
    if "python" in dso:
        return "python"
    if "kernel" in dso:
        return "kernel"
    if "JIT" in dso or "anon" in dso or "memfd" in dso or dso.startswith("perf-"):
        return "JIT (oneDNN)"
    return "other"


def report(data: str, sort: str) -> list[tuple[float, str]]:
    out = subprocess.run(
        ["perf", "report", "-i", data, "--sort", sort, "--stdio", "--percent-limit", "0.3"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
        if m:
            text = re.sub(r"\s{2,}", " ", m.group(2)).replace("[.] ", "")
            rows.append((float(m.group(1)), text[:110]))
    return rows


def profile_one(label, shape, plugin, rate, budget_tokens, model, tmp: Path) -> dict:
    from kvcompress_vllm.model import kv_budget_bytes

    max_model_len = max(1024, -(-(shape.input_len + shape.output_len + 16) // 128) * 128)
    tokens = budget_tokens or shape.num_prompts * (shape.input_len + shape.output_len)
    spec = dict(
        name=f"profile/{label}", mode="inproc", plugin=plugin, model=model,
        budget_bytes=kv_budget_bytes(model, 1, tokens, max_num_seqs=64,
                                     max_model_len=max_model_len),
        max_model_len=max_model_len, max_num_seqs=64, max_num_batched_tokens=2048,
        jobs=[dict(shape=asdict(shape), seed=0, name=label, rate=rate,
                   max_tokens=shape.output_len)],
    )
    ctl, ack, data = tmp / "ctl", tmp / "ack", tmp / "perf.data"
    for fifo in (ctl, ack):
        if fifo.exists():
            fifo.unlink()
        os.mkfifo(fifo)
    perf = ["perf", "record", "-e", "cpu-clock", "-F", "499", "-D", "-1",
            "--control", f"fifo:{ctl},{ack}", "-o", str(data), "-q", "--"]
    result = run_child([HERE / "throughput_sweep.py", "--worker", json.dumps(spec)],
                       name=f"{label} {shape.name}", stock=not plugin, prefix=perf,
                       env={"KVC_PERF_CTL": f"{ctl},{ack}"})[0]
    groups: dict[str, float] = {}
    dsos = report(str(data), "dso")
    print("  libraries: " + "; ".join(f"{p:.1f}% {d}" for p, d in dsos[:10]), flush=True)
    for pct, dso in dsos:
        groups[group_of(dso)] = groups.get(group_of(dso), 0.0) + pct
    symbols = report(str(data), "dso,sym")[:12]
    return dict(label=label, shape=shape.name, wall_s=result["wall_s"],
                out_tok_s=result["output_tok_s"], groups=groups, symbols=symbols)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from kvcompress_vllm.model import prepare_default_model

    model = str(prepare_default_model())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in QUICK if args.quick else RUNS:
            r = profile_one(*run, model, Path(tmp))
            print(f"{r['label']} {r['shape']}: {r['out_tok_s']:.1f} out tok/s, "
                  + ", ".join(f"{k} {v:.1f}%" for k, v in sorted(r["groups"].items(),
                                                                 key=lambda kv: -kv[1])),
                  flush=True)
            rows.append(r)
    names = ["kvcompress _C", "vllm _C", "libtorch_cpu", "JIT (oneDNN)", "libgomp", "python",
             "kernel", "other"]
    lines = [
        "# Engine profiles: where the time goes",
        "",
        "Generated by `python benchmarks/profile_engine.py`: `perf record -e cpu-clock -F 499` "
        "of an in-process engine (both cores) while one load shape runs (warm-up and start-up "
        "excluded), ample KV budget (every request fits uncompressed), SmolLM2-135M, bf16. "
        "Shares are of all samples of all threads (2 cores x wall time).",
        "",
        "| shape | config | out tok/s | " + " | ".join(names) + " |",
        "|---|---|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['label']} | {r['out_tok_s']:.1f} | "
                     + " | ".join(f"{r['groups'].get(n, 0.0):.1f}%" for n in names) + " |")
    lines += ["", "Hottest symbols (share of samples; library, symbol):", ""]
    for r in rows:
        lines.append(f"- **{r['shape']} / {r['label']}**: "
                     + "; ".join(f"{p:.1f}% {s}" for p, s in r["symbols"][:8]))
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or (None if args.quick else str(HERE.parent / "docs" / "profile.md"))
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
