"""Throughput of stock vLLM vs KV-Compress at several keep rates, under a tight
and an ample KV-cache budget (default model, CPU).

Each configuration runs in a fresh interpreter (stock vLLM with no plugin
loaded: ``VLLM_PLUGINS=`` and ``KVCOMPRESS_VLLM_AUTOPATCH=0``), on the same
random-token prompts with ``ignore_eos`` so every request produces exactly
``--output-len`` tokens.  Reported per run: output tokens/s, requests/s,
peak running requests, preemptions, peak/mean KV usage, the fraction of KVs
kept, the worker time spent on eviction (scoring, selection, compaction, page
migration), and the share of wall time spent in steps that contain prefill
work (on 2 CPU cores prefill is compute-bound and the same work for every
configuration, which bounds the gain).

    python benchmarks/throughput_sweep.py            # full sweep (~18 min here)
    python benchmarks/throughput_sweep.py --quick    # smoke run (< 3 min)

Writes docs/throughput.csv and docs/throughput.png (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATES = [1.0, 0.5, 0.25, 0.125]


# --------------------------------------------------------------------------- worker
def run_worker(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(HERE))
    import random

    from engine_probe import probe
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine_kwargs = dict(
        enforce_eager=True, seed=0, max_model_len=spec["max_model_len"],
        kv_cache_memory_bytes=spec["budget_bytes"], max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
    )
    if spec["rate"] is not None:
        engine_kwargs["additional_config"] = {"kv_compress": {"rate": spec["rate"], "enabled": True}}
    llm = LLM(spec["model"], **engine_kwargs)
    rng = random.Random(spec["seed"])
    prompts = [
        TokensPrompt(prompt_token_ids=[rng.randrange(100, 20000) for _ in range(spec["input_len"])])
        for _ in range(spec["num_prompts"])
    ]
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    rec = probe(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    rec.end = time.perf_counter()
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    num_blocks = scheduler.kv_cache_manager.block_pool.num_gpu_blocks
    totals = getattr(scheduler, "kvc_totals", None)  # None for stock vLLM
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    kept = [o.kv_transfer_params["kv_compress"]["kept_fraction"] for o in outs if o.kv_transfer_params]
    result = {
        "wall_s": wall,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall,
        "requests_s": len(outs) / wall,
        "num_blocks": num_blocks - 1,
        "mean_kept_fraction": sum(kept) / len(kept) if kept else 1.0,
        # worker time spent scoring, selecting, compacting and migrating pages
        "eviction_s": totals.compaction_ms / 1000 if totals else 0.0,
        "compressions": totals.compressions if totals else 0,
        "pages_migrated": totals.pages_migrated if totals else 0,
        **rec.summary(),
    }
    result["prefill_share"] = result["prefill_s"] / wall
    result["eviction_share"] = result["eviction_s"] / wall
    result["decode_tok_s"] = (out_tokens - len(outs)) / max(result["decode_s"], 1e-9)
    llm.llm_engine.engine_core.shutdown()
    return result


# --------------------------------------------------------------------------- driver
def run_config(spec: dict) -> dict:
    env = dict(os.environ)
    if spec["rate"] is None:  # stock vLLM, nothing of the plugin loaded
        env.update(VLLM_PLUGINS="", KVCOMPRESS_VLLM_AUTOPATCH="0")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"config {spec['name']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows}, key=lambda b: b != "tight")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for budget in budgets:
        sub = [r for r in rows if r["budget"] == budget]
        names = [r["config"] for r in sub]
        x = range(len(sub))
        off = -0.2 if budget == "tight" else 0.2
        axes[0].bar([i + off for i in x], [r["output_tok_s"] for r in sub], width=0.4, label=budget)
        axes[1].bar([i + off for i in x], [r["peak_running"] for r in sub], width=0.4, label=budget)
        axes[2].bar([i + off for i in x], [r["decode_tok_s"] for r in sub], width=0.4, label=budget)
        for ax in axes:
            ax.set_xticks(list(x), names, rotation=20)
    axes[0].set_title("output tokens/s (end to end)")
    axes[1].set_title("peak running requests")
    axes[2].set_title("output tokens/s in decode-only steps")
    axes[0].legend(title="KV budget")
    fig.suptitle("SmolLM2-135M, 2 CPU cores: stock vLLM vs KV-Compress keep rates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 3 min)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=1800)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--tight-seqs", type=int, default=4,
                        help="the tight budget holds this many uncompressed sequences")
    parser.add_argument("--out-dir", default=str(HERE.parent / "docs"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    from kvcompress_vllm.model import kv_budget_bytes, prepare_default_model

    model = args.model or str(prepare_default_model())
    if args.quick:
        args.num_prompts, args.input_len, args.output_len, args.tight_seqs = 6, 384, 48, 2
        rates = [None, 1.0, 0.25]
    else:
        rates = [None, *RATES]
    seq_len = args.input_len + args.output_len
    budgets = {
        "tight": kv_budget_bytes(model, args.tight_seqs, seq_len),
        "ample": kv_budget_bytes(model, args.num_prompts, seq_len),
    }
    rows = []
    sweep_start = time.perf_counter()
    for budget_name, budget in budgets.items():
        for rate in rates:
            name = "stock" if rate is None else f"kvc {rate:g}"
            spec = dict(
                name=name, model=model, rate=rate, budget_bytes=budget, seed=0,
                num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                max_model_len=max(1024, seq_len + 16), max_num_seqs=64, max_num_batched_tokens=2048,
            )
            t0 = time.perf_counter()
            res = run_config(spec)
            row = {"budget": budget_name, "config": name, "rate": rate, **res}
            rows.append(row)
            print(
                f"[{budget_name:5s}] {name:9s} {res['output_tok_s']:7.1f} out tok/s  "
                f"{res['requests_s']:.3f} req/s  peak running {res['peak_running']:2d}  "
                f"preemptions {res['preemptions']:3d}  peak KV {100 * res['peak_kv_usage']:5.1f}%  "
                f"prefill share {100 * res['prefill_share']:4.1f}%  "
                f"eviction {100 * res['eviction_share']:4.1f}%  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    csv_path = out_dir / f"throughput{suffix}.csv"
    keys = list(rows[0].keys())
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out_dir / f"throughput{suffix}.png")
    print(f"\nbudgets: tight = {budgets['tight'] / 2**20:.0f} MiB ({rows[0]['num_blocks']} blocks, "
          f"{args.tight_seqs} uncompressed sequences), ample = {budgets['ample'] / 2**20:.0f} MiB")
    print("| budget | config | out tok/s | vs stock | req/s | peak running | preemptions | "
          "peak KV | kept | decode-step tok/s | prefill share | eviction time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        stock = next(r for r in rows if r["budget"] == row["budget"] and r["config"] == "stock")
        print(f"| {row['budget']} | {row['config']} | {row['output_tok_s']:.1f} | "
              f"{row['output_tok_s'] / stock['output_tok_s']:.2f}x | {row['requests_s']:.3f} | "
              f"{row['peak_running']} | {row['preemptions']} | {100 * row['peak_kv_usage']:.0f}% | "
              f"{100 * row['mean_kept_fraction']:.0f}% | {row['decode_tok_s']:.1f} | "
              f"{100 * row['prefill_share']:.0f}% | {100 * row['eviction_share']:.1f}% |")
    print(f"\nwrote {csv_path} (sweep wall time {(time.perf_counter() - sweep_start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
