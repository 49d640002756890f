"""Long-context accuracy vs keep rate, per scorer (default model, CPU).

Tasks (generated locally and deterministically, ``kvcompress_vllm.tasks``):
passkey retrieval at several lengths and depths, multi-key retrieval (ask for
one of several labelled keys), and repeat-a-random-digit-string (fraction of
digits reproduced).  One engine with KV-Compress enabled serves everything;
the keep rate and the scorer are chosen per request (``extra_args``), so all
configurations see identical prompts and identical engine settings.

    python benchmarks/quality.py            # full sweep (about 75 min here)
    python benchmarks/quality.py --quick    # smoke run (< 3 min)
    python benchmarks/quality.py --long-output --rates 0.5,0.25 \
        --scorers kvcompress,kvcompress+uniform,keydiff,keydiff+uniform   # joint vs uniform

Writes docs/quality.csv and docs/quality.png (``--out-dir`` to change).

``--scorers`` takes configuration labels: a scorer name (joint allocation),
``<scorer>+uniform`` for that scorer with ``kv_compress_allocation:
"uniform"``, and ``uniform`` as short for ``kvcompress+uniform`` (the control
for variable per-head budgets; it was a scorer name before).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCORERS = ["kvcompress", "uniform", "random", "streamingllm", "knorm", "keydiff"]


def request_options(label: str) -> dict:
    """``extra_args`` for a configuration label (see the module docstring)."""
    scorer, _, allocation = label.partition("+")
    if scorer == "uniform" and not allocation:
        scorer, allocation = "kvcompress", "uniform"
    extra = {"kv_compress_scorer": scorer}
    if allocation:
        extra["kv_compress_allocation"] = allocation
    return extra
RATES = [1.0, 0.5, 0.25, 0.125, 0.0625]


def build_tasks(tokenizer, size: str):
    from kvcompress_vllm import tasks

    out = []
    if size == "medium":  # for metric ablations: one length, several seeds
        for i, depth in enumerate((0.2, 0.5, 0.8)):
            out.append(tasks.passkey(tokenizer, 2000, depth, seed=100 + i))
        for seed in range(3):
            out.append(tasks.multikey(tokenizer, 2000, num_keys=4, seed=200 + seed))
        for seed in range(2):
            out.append(tasks.digit_repeat(tokenizer, 200, seed=300 + seed))
        return out
    if size == "long":  # long outputs: several decode-time re-compressions
        for seed in range(6):
            out.append(tasks.digit_repeat(tokenizer, 600, seed=400 + seed))
        for i, depth in enumerate((0.1, 0.3, 0.5, 0.7, 0.9, 0.5)):
            t = tasks.passkey(tokenizer, 1500, depth, seed=500 + i)
            out.append(dataclasses.replace(t, kind="continue"))
        return out
    if size == "quick":
        for depth in (0.25, 0.75):
            out.append(tasks.passkey(tokenizer, 1000, depth, seed=int(depth * 100)))
        out.append(tasks.multikey(tokenizer, 1000, num_keys=3, seed=1))
        out.append(tasks.digit_repeat(tokenizer, 160, seed=1))
        return out
    for length in (1000, 2500, 6000):
        for i, depth in enumerate((0.2, 0.5, 0.8)):
            out.append(tasks.passkey(tokenizer, length, depth, seed=length + i))
    for length in (1500, 3000):
        for seed in range(2):
            out.append(tasks.multikey(tokenizer, length, num_keys=4, seed=length + seed))
    for seed in range(2):
        out.append(tasks.digit_repeat(tokenizer, 300, seed=seed))
    return out


CONTINUE_TOKENS = 512


def prefix_agreement(tokens: list[int], reference: list[int]) -> float:
    """Fraction of the uncompressed greedy continuation reproduced before the
    first differing token (1.0 = identical)."""
    same = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        same += 1
    return same / max(1, len(reference))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 3 min)")
    parser.add_argument("--medium", action="store_true", help="one length, more seeds (ablations)")
    parser.add_argument(
        "--long-output", action="store_true",
        help="long generations (>= 512 tokens, a re-compression every block): 600-digit "
        "repeats, and 512-token continuations scored by agreement with the uncompressed one",
    )
    parser.add_argument("--observation-window", type=int, default=None)
    parser.add_argument("--pooling-kernel", type=int, default=None)
    parser.add_argument("--tag", default="", help="suffix for the output files")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out-dir", default=str(HERE.parent / "docs"))
    parser.add_argument("--scorers", default=",".join(SCORERS))
    parser.add_argument("--rates", default=",".join(map(str, RATES)))
    args = parser.parse_args()

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    from kvcompress_vllm.model import prepare_default_model

    model = args.model or str(prepare_default_model())
    scorers = args.scorers.split(",")
    rates = [float(r) for r in args.rates.split(",")]
    if args.quick:
        scorers, rates = ["kvcompress", "streamingllm", "keydiff"], [1.0, 0.25]
    server = {"rate": 1.0, "enabled": True}
    if args.observation_window is not None:
        server["observation_window"] = args.observation_window
    if args.pooling_kernel is not None:
        server["pooling_kernel"] = args.pooling_kernel
    llm = LLM(
        model, enforce_eager=True, seed=0, max_model_len=8192,
        kv_cache_memory_bytes=1536 << 20, max_num_batched_tokens=4096, max_num_seqs=32,
        additional_config={"kv_compress": server},
    )
    tokenizer = llm.get_tokenizer()
    size = "quick" if args.quick else "medium" if args.medium else "long" if args.long_output else "full"
    items = build_tasks(tokenizer, size)
    prompts, params, keys = [], [], []
    for task in items:
        configs = [("full", 1.0)] + [(s, r) for s in scorers for r in rates if r < 1.0]
        for scorer, rate in configs:
            extra = {"kv_compress_rate": rate}
            if scorer != "full":
                extra.update(request_options(scorer))
            max_tokens = len(task.answer) + 8 if task.kind == "digit_repeat" else 12
            if task.kind == "continue":
                max_tokens = CONTINUE_TOKENS
            prompts.append(task.prompt)
            params.append(SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=task.kind == "continue",
                extra_args=extra))
            keys.append((task, scorer, rate))
    total_tokens = sum(t.num_tokens for t, _, _ in keys)
    print(f"{len(items)} tasks x configs = {len(prompts)} requests, {total_tokens} prompt tokens", flush=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    wall = time.perf_counter() - start

    cells = defaultdict(list)  # (kind, length bucket, scorer, rate) -> scores
    kept = defaultdict(list)
    full_tokens = {
        task.prompt: list(out.outputs[0].token_ids)
        for (task, scorer, _), out in zip(keys, outs) if scorer == "full"
    }
    for (task, scorer, rate), out in zip(keys, outs):
        if task.kind == "continue":
            score = prefix_agreement(list(out.outputs[0].token_ids), full_tokens[task.prompt])
        else:
            score = task.score(out.outputs[0].text)
        bucket = task.num_tokens // 500 * 500
        for kind in (task.kind, "all"):
            cells[(kind, bucket if kind != "all" else 0, scorer, rate)].append(score)
        stats = (out.kv_transfer_params or {}).get("kv_compress", {})
        kept[(scorer, rate)].append(stats.get("kept_fraction", 1.0))

    rows = []
    for (kind, bucket, scorer, rate), scores in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], -kv[0][3])):
        rows.append({
            "task": kind, "length": bucket, "scorer": scorer, "rate": rate, "n": len(scores),
            "accuracy": sum(scores) / len(scores),
            "mean_kept_fraction": sum(kept[(scorer, rate)]) / len(kept[(scorer, rate)]),
        })
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = ("" if size == "full" else f"_{size}") + args.tag
    with open(out_dir / f"quality{suffix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, scorers, out_dir / f"quality{suffix}.png")

    kinds = sorted({r["task"] for r in rows if r["task"] != "all"})
    print(f"\nengine kv_compress settings: {server}")
    print(f"wall time {wall:.0f} s; accuracy (%) by task, averaged over lengths/depths:")
    print("| scorer | rate | " + " | ".join(kinds) + " | all | kept |")
    print("|---|---:|" + "---:|" * (len(kinds) + 2))
    for scorer in ["full", *scorers]:
        for rate in sorted({r["rate"] for r in rows if r["scorer"] == scorer}, reverse=True):
            vals = []
            for kind in [*kinds, "all"]:
                cell = [r for r in rows if r["task"] == kind and r["scorer"] == scorer and r["rate"] == rate]
                acc = sum(r["accuracy"] * r["n"] for r in cell) / max(1, sum(r["n"] for r in cell))
                vals.append(f"{100 * acc:.0f}")
            k = sum(kept[(scorer, rate)]) / len(kept[(scorer, rate)])
            print(f"| {scorer} | {rate:g} | " + " | ".join(vals) + f" | {100 * k:.0f}% |")
    print(f"\nwrote {out_dir / f'quality{suffix}.csv'}")
    llm.llm_engine.engine_core.shutdown()
    return 0


def plot(rows, scorers, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("passkey", "multikey", "digit_repeat", "continue", "all") if any(r["task"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.8), sharey=True)
    for ax, kind in zip(axes, kinds):
        full = [r for r in rows if r["task"] == kind and r["scorer"] == "full"]
        base = sum(r["accuracy"] * r["n"] for r in full) / max(1, sum(r["n"] for r in full))
        for scorer in scorers:
            pts = defaultdict(list)
            for r in rows:
                if r["task"] == kind and r["scorer"] == scorer:
                    pts[r["rate"]].append((r["accuracy"], r["n"]))
            xs = sorted(pts)
            ys = [sum(a * n for a, n in pts[x]) / sum(n for _, n in pts[x]) for x in xs]
            ax.plot(xs + [1.0], [100 * y for y in ys] + [100 * base], marker="o", label=scorer)
        ax.set_xscale("log", base=2)
        ax.set_title(kind)
        ax.set_xlabel("keep rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: accuracy vs KV keep rate per scorer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
