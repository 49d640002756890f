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

Robust suite (choosing the default scorer; docs/quality.md "Robust suite"):

    python benchmarks/quality.py --suite robust --split held-in --n 13 --in-process --no-full
    python benchmarks/quality.py --suite robust --split held-out --n 12 --in-process \
        --select-from docs/quality_robust_held-in.csv
    python benchmarks/quality.py --suite robust \
        --report docs/quality_robust_held-in.csv,docs/quality_robust_held-out.csv

cells = case (``tasks.ROBUST_CASES``) x length (1500, 3500 tokens), ``--n``
generated cases per cell and split (seed parity: even = held-in, odd =
held-out), every public scorer and candidate at keep rates 0.5 and 0.25 plus
the uncompressed reference; one CSV row per request (``split`` column),
appended after every ``--chunk`` cases (``--resume`` continues a stopped run).
The selection (``select_default``) looks at held-in rows only and picks, among
the combined candidates and the public scorers, the best worst-case margin
against the per-cell best public scorer; ``bar_test`` decides whether that
scorer is worse than the bar anywhere beyond noise (paired bootstrap over the
generated cases, Bonferroni over the cells), on each split.

Long-generation suite (``tasks.LONG_CASES``: needle prompts continued for 512
tokens, so a request is re-compressed while it decodes; `keydiff` vs
`kvcompress` by default, paired per generated case; each continuation scored
against the uncompressed one by ``overlap`` = ``tasks.word_recall`` and by the
agreeing prefix, ``score``):

    python benchmarks/quality.py --suite long --split all --n 24 --lengths 1500 --in-process
    python benchmarks/quality.py --suite long --report docs/quality_long_all.csv

``--scorers`` takes configuration labels: a scorer name (joint allocation),
``<scorer>+uniform`` for that scorer with ``kv_compress_allocation:
"uniform"``, and ``uniform`` as short for ``kvcompress+uniform`` (the control
for variable per-head budgets; it was a scorer name before).
"""

from __future__ import annotations

import argparse
import csv
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
            out.append(tasks.as_continuation(t))
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
    parser.add_argument("--scorers", default=None, help=f"default: {','.join(SCORERS)} "
                        "(robust suite: the public scorers and the candidates)")
    parser.add_argument("--rates", default=None, help="default: 1,0.5,0.25,0.125,0.0625 (robust: 0.5,0.25)")
    robust = parser.add_argument_group("robust suite (--suite robust)")
    robust.add_argument("--suite", choices=("classic", "robust", "long"), default="classic",
                        help="long: the long-generation suite (the robust suite's options but "
                        "--no-full and --select-from)")
    robust.add_argument("--split", choices=("held-in", "held-out", "all"), default=None,
                        help="seeds of this split only (even = held-in, odd = held-out; "
                        "default: held-in, or all for the long suite)")
    robust.add_argument("--n", type=int, default=13, help="cases per case x length cell")
    robust.add_argument("--lengths", default="1500,3500")
    robust.add_argument("--cases", default=None, help="default: every case of tasks.ROBUST_CASES")
    robust.add_argument("--no-full", action="store_true", help="skip the uncompressed reference")
    robust.add_argument("--in-process", action="store_true",
                        help="VLLM_ENABLE_V1_MULTIPROCESSING=0 (much faster prefill on few cores)")
    robust.add_argument("--resume", action="store_true",
                        help="keep the rows already in the output CSV and run only the missing requests")
    robust.add_argument("--chunk", type=int, default=8,
                        help="cases per engine call; the CSV is appended after each")
    robust.add_argument("--dry-run", action="store_true", help="print the size and stop")
    robust.add_argument("--select-from", default=None,
                        help="held-in CSV(s): run the public scorers and the candidate selected on them")
    robust.add_argument("--report", default=None,
                        help="comma-separated robust CSVs: print the tables and the selection, no engine")
    args = parser.parse_args()
    if args.chunk < 1:
        parser.error(f"--chunk: cases per engine call must be >= 1 (got {args.chunk})")
    if args.suite in ("robust", "long"):
        return robust_main(args)
    args.scorers = args.scorers or ",".join(SCORERS)
    args.rates = args.rates or ",".join(map(str, RATES))

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


# --- robust suite ---------------------------------------------------------------

#: The public scorers a default must match (the best of them, cell by cell).
PUBLIC = ["kvcompress", "keydiff", "knorm", "streamingllm"]
#: Combined candidates for the default (``kvcompress_vllm/scorers``).
CANDIDATES = ["metric_keydiff", "metric_keydiff_rank", "metric_keydiff_union", "adaptive"]
ROBUST_RATES = [0.5, 0.25]
#: Output tokens: needles need about 8, the 44 remaining copy digits ~46.
ROBUST_MAX_TOKENS = {"prose_copy": 52}
PREFILL_TOKENS_PER_S = 600  # measured in-process, 2 cores, 1.5k-3.5k prompts (estimate only)


def robust_cells(rows: list[dict]) -> dict:
    """(split, case, length, scorer, rate) -> [scores]."""
    cells = defaultdict(list)
    for r in rows:
        cells[(r["split"], r["case"], int(r["length"]), r["scorer"], float(r["rate"]))].append(float(r["score"]))
    return cells


def margins(rows: list[dict], split: str, candidates, public=PUBLIC, rates=ROBUST_RATES) -> dict:
    """For each candidate: ``(worst, per_cell)``, where ``per_cell[(case,
    length, rate)] = acc(candidate) - max over public scorers of acc`` on the
    given split, and ``worst`` is the minimum over all cells (both rates)."""
    cells = robust_cells(rows)
    mean = lambda xs: sum(xs) / len(xs)
    keys = sorted({(c, l) for (s, c, l, _, _) in cells if s == split})
    out = {}
    for cand in candidates:
        per_cell = {}
        for case, length in keys:
            for rate in rates:
                pub = [mean(cells[(split, case, length, p, rate)]) for p in public
                       if cells.get((split, case, length, p, rate))]
                got = cells.get((split, case, length, cand, rate))
                if pub and got:
                    per_cell[(case, length, rate)] = mean(got) - max(pub)
        if per_cell:
            out[cand] = (min(per_cell.values()), per_cell)
    return out


#: Significance of the bar test: one-sided, Bonferroni-corrected over the cells.
BAR_ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 4000


def select_default(rows: list[dict], pool=None) -> tuple[str | None, dict]:
    """The selection rule, on the ``held-in`` rows only: among the combined
    candidates *and* the public scorers, the one whose worst-case margin
    against the best public scorer (per case x length x rate cell) is largest
    (ties: the larger mean margin).  Whether it meets the bar is
    :func:`bar_test`'s answer, not the sign of this point estimate."""
    pool = pool or CANDIDATES + PUBLIC
    held_in = margins([r for r in rows if r["split"] == "held-in"], "held-in", pool)
    if not held_in:
        return None, held_in
    best = max(held_in, key=lambda c: (held_in[c][0], sum(held_in[c][1].values())))
    return best, held_in


def bar_test(rows: list[dict], split: str, scorer: str, public=PUBLIC, rates=ROBUST_RATES,
             alpha=BAR_ALPHA, resamples=BOOTSTRAP_RESAMPLES, seed=0) -> dict:
    """Is ``scorer`` at least as good as the best public scorer in every cell?

    Per cell (case x length x rate) the margin ``acc(scorer) - max_p acc(p)``
    is resampled by a paired bootstrap over the cell's generated cases (every
    configuration ran the same prompts, so a resample draws seeds, not rows;
    the max over public scorers is re-taken in every resample, so picking the
    luckiest public scorer per cell is part of what is resampled).  A cell
    *fails* when the upper ``1 - alpha / cells`` quantile of the margin is
    below 0: the scorer is worse there beyond noise, one-sided, at family-wise
    level ``alpha`` over all cells (Bonferroni).  Returns ``{(case, length,
    rate): (point margin, upper bound)}``; the scorer meets the bar on this
    split when no cell fails (:func:`meets_bar`)."""
    import numpy as np

    by_seed = defaultdict(dict)
    for r in rows:
        if r["split"] == split:
            by_seed[(r["case"], int(r["length"]), r["scorer"], float(r["rate"]))][int(r["seed"])] = float(r["score"])
    cells = sorted({(c, l, rt) for (c, l, sc, rt) in by_seed if sc == scorer and rt in rates})
    rng = np.random.default_rng(seed)
    out = {}
    for case, length, rate in cells:
        mine = by_seed[(case, length, scorer, rate)]
        pubs = [by_seed[(case, length, p, rate)] for p in public if (case, length, p, rate) in by_seed]
        seeds = sorted(set(mine).intersection(*pubs)) if pubs else []
        if not seeds:
            continue
        idx = rng.integers(0, len(seeds), (resamples, len(seeds)))
        arr = lambda d: np.array([d[s] for s in seeds])[idx].mean(axis=1)  # [resamples]
        diff = arr(mine) - np.max([arr(p) for p in pubs], axis=0)
        point = float(np.mean([mine[s] for s in seeds]) - max(np.mean([p[s] for s in seeds]) for p in pubs))
        out[(case, length, rate)] = (point, float(np.quantile(diff, 1 - alpha / len(cells))))
    return out


def meets_bar(test: dict) -> bool:
    """:func:`bar_test`'s verdict: no cell significantly below the bar."""
    return bool(test) and all(upper >= 0 for _, upper in test.values())


def robust_table(rows: list[dict], split: str, what: str = "accuracy") -> str:
    """Markdown: mean score (%) per scorer x rate (rows) and case x length (columns)."""
    cells = robust_cells(rows)
    keys = sorted({(c, l) for (s, c, l, _, _) in cells if s == split}, key=lambda k: (k[1], k[0]))
    has_full = any(s == split and sc == "full" for (s, _, _, sc, _) in cells)
    configs = [("full", 1.0)] * has_full + sorted(
        {(sc, rt) for (s, _, _, sc, rt) in cells if s == split and sc != "full"},
        key=lambda k: (-k[1], (PUBLIC + CANDIDATES).index(k[0]) if k[0] in PUBLIC + CANDIDATES else 99, k[0]))
    ns = sorted({len(v) for (s, *_), v in cells.items() if s == split})
    lines = [f"{split}, n = {'/'.join(map(str, ns))} per cell; {what} (%)",
             "", "| scorer | rate | " + " | ".join(f"{c} {l // 100 / 10:g}k" for c, l in keys) + " | mean |",
             "|---|---:|" + "---:|" * (len(keys) + 1)]
    for scorer, rate in configs:
        vals = []
        for case, length in keys:
            got = cells.get((split, case, length, scorer, rate))
            vals.append(100 * sum(got) / len(got) if got else float("nan"))
        lines.append(f"| {scorer} | {rate:g} | " + " | ".join(f"{v:.0f}" for v in vals)
                     + f" | {sum(vals) / len(vals):.1f} |")
    return "\n".join(lines)


def kept_table(rows: list[dict]) -> str:
    """Markdown: mean fraction of KVs kept per scorer x rate (all rows)."""
    kept = defaultdict(list)
    for r in rows:
        kept[(r["scorer"], float(r["rate"]))].append(float(r["kept_fraction"]))
    lines = ["| scorer | rate | kept | requests |", "|---|---:|---:|---:|"]
    for (scorer, rate), v in sorted(kept.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        lines.append(f"| {scorer} | {rate:g} | {100 * sum(v) / len(v):.1f}% | {len(v)} |")
    return "\n".join(lines)


def robust_report(rows: list[dict]) -> str:
    best, held_in = select_default(rows)
    bar_tests = {}

    def bar_of(split: str, scorer: str) -> dict:  # each bootstrap once per report
        if (split, scorer) not in bar_tests:
            bar_tests[split, scorer] = bar_test(rows, split, scorer)
        return bar_tests[split, scorer]

    out = []
    for split in ("held-in", "held-out"):
        if any(r["split"] == split for r in rows):
            out += [robust_table(rows, split), ""]
    out += ["Mean fraction of KVs kept:", "", kept_table(rows), ""]
    if best is not None:
        held_out_rows = [r for r in rows if r["split"] == "held-out"]
        held_in_rows = [r for r in rows if r["split"] == "held-in"]
        cells = robust_cells(held_in_rows)
        overall = {p: [sum(v) / len(v) for (s, _, _, sc, rt), v in cells.items() if sc == p and rt < 1]
                   for p in PUBLIC}
        top = max((p for p in PUBLIC if overall[p]), key=lambda p: sum(overall[p]) / len(overall[p]))
        fmt = lambda m: (f"{100 * m[0]:+.0f}", f"{100 * sum(m[1].values()) / len(m[1]):+.1f}") if m else ("--", "--")
        for title, public in ((f"the best public scorer per cell (max of {', '.join(PUBLIC)}): the bar", PUBLIC),
                              (f"`{top}`, the best public scorer overall on held-in (for reference)", [top])):
            out.append(f"Margin (points) vs {title}; worst = min over case x length x rate cells, "
                       "mean = mean over them:")
            out.append("")
            bar = len(public) > 1
            out.append("| scorer | held-in worst | held-in mean | held-out worst | held-out mean |"
                       + " cells worse beyond noise (held-in / held-out) |" * bar)
            out.append("|---|---:|---:|---:|---:|" + "---:|" * bar)
            names = CANDIDATES + [p for p in PUBLIC if bar or p not in public]
            hi_all = margins(held_in_rows, "held-in", names, public)
            ho_all = margins(held_out_rows, "held-out", names, public)
            for cand in names:
                if cand not in hi_all and cand not in ho_all:
                    continue
                tag = " (selected)" if cand == best else "" if cand in CANDIDATES else " (public)"
                cols = fmt(hi_all.get(cand)) + fmt(ho_all.get(cand))
                if bar:
                    fails = [sum(u < 0 for _, u in bar_of(split, cand).values()) if m else None
                             for split, m in (("held-in", hi_all.get(cand)), ("held-out", ho_all.get(cand)))]
                    cols += (" / ".join("--" if f is None else str(f) for f in fails),)
                out.append(f"| {cand}{tag} | " + " | ".join(cols) + " |")
            out.append("")
        verdict = {split: meets_bar(bar_of(split, best)) for split in ("held-in", "held-out")
                   if any(r["split"] == split and r["scorer"] == best for r in rows)}
        out.append(f"selected on held-in: {best} (worst margin {100 * held_in[best][0]:+.0f} points; "
                   + ", ".join(f"{split}: {'meets' if ok else 'does not meet'} the bar" for split, ok in verdict.items())
                   + f"; bar = no cell worse than the best public scorer beyond noise, paired bootstrap, "
                   f"one-sided family-wise {BAR_ALPHA:g})")
    return "\n".join(out)


#: The long suite compares these two by default (the default scorer and the paper's).
LONG_SCORERS = ["keydiff", "kvcompress"]


#: Fewer paired cases than this in a cell: no verdict (a bootstrap over 2-4
#: cases calls any consistent difference significant).
MIN_VERDICT_CASES = 5
#: The long suite's measures: CSV column -> what it is.
LONG_MEASURES = {
    "overlap": "words of the uncompressed continuation reproduced in order (tasks.word_recall), %",
    "score": "agreeing prefix: tokens before the first difference from the uncompressed continuation, %",
}


def long_report(rows: list[dict], scorers=None) -> str:
    """The long-generation suite's tables, for each measure (``LONG_MEASURES``):
    the mean per configuration and cell (both splits together: nothing is
    selected on this suite), then for every pair of scorers the per-cell
    difference and whether either is worse beyond noise (:func:`bar_test`
    with the other as the only "public" scorer, Bonferroni over the cells)."""
    rows = [dict(r, split="all") for r in rows]
    scorers = scorers or sorted({r["scorer"] for r in rows if r["scorer"] != "full"},
                                key=lambda sc: (LONG_SCORERS + [sc]).index(sc))
    out = ["Mean fraction of KVs kept:", "", kept_table(rows), ""]
    for measure, what in LONG_MEASURES.items():
        mrows = [dict(r, score=r[measure]) for r in rows if measure in r]
        if not mrows:
            continue
        out += [f"**{measure}**: {what}", "", robust_table(mrows, "all", measure), ""]
        seeds = defaultdict(set)  # (case, length, rate, scorer) -> seeds run
        for r in mrows:
            seeds[(r["case"], int(r["length"]), float(r["rate"]), r["scorer"])].add(int(r["seed"]))
        rates = sorted({float(r["rate"]) for r in mrows if r["scorer"] != "full"}, reverse=True)
        for i, a in enumerate(scorers):
            for b in scorers[i + 1:]:
                ab = bar_test(mrows, "all", a, [b], rates=rates)
                ba = bar_test(mrows, "all", b, [a], rates=rates)
                out += [f"`{a}` minus `{b}`, {measure} (points, paired by case; worse beyond noise: "
                        f"one-sided, family-wise {BAR_ALPHA:g} over the cells):", "",
                        "| case | length | rate | difference | verdict |", "|---|---:|---:|---:|---|"]
                for cell in sorted(ab, key=lambda k: (k[0], k[1], -k[2])):
                    if len(seeds[(*cell, a)] & seeds[(*cell, b)]) < MIN_VERDICT_CASES:
                        verdict = f"fewer than {MIN_VERDICT_CASES} cases"
                    else:
                        verdict = (f"{a} worse" if ab[cell][1] < 0 else f"{b} worse" if ba[cell][1] < 0
                                   else "within noise")
                    out.append(f"| {cell[0]} | {cell[1]} | {cell[2]:g} | {100 * ab[cell][0]:+.1f} | {verdict} |")
                out.append("")
    return "\n".join(out)


def read_rows(paths) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            rows += list(csv.DictReader(f))
    return rows


def long_params(task, extra: dict):
    """Sampling of a long-suite request: greedy, ``CONTINUE_TOKENS`` past EOS."""
    from vllm import SamplingParams

    if task.kind != "continue":
        raise ValueError(f"the long suite continues prompts; got a {task.kind!r} case")
    return SamplingParams(temperature=0.0, max_tokens=CONTINUE_TOKENS, ignore_eos=True, extra_args=extra)


def robust_main(args) -> int:
    long = args.suite == "long"
    args.split = args.split or ("all" if long else "held-in")
    if args.report:
        report = long_report if long else robust_report
        print(report(read_rows(args.report.split(","))))
        return 0
    if long and args.no_full:
        raise SystemExit("--no-full: the long suite scores continuations against the uncompressed one")
    if long and args.select_from:
        raise SystemExit("--select-from: nothing is selected on the long suite")
    if args.in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer

    from kvcompress_vllm import tasks
    from kvcompress_vllm.model import prepare_default_model

    model = args.model or str(prepare_default_model())
    scorers = args.scorers.split(",") if args.scorers else LONG_SCORERS if long else PUBLIC + CANDIDATES
    if args.select_from:
        held_in_rows = read_rows(args.select_from.split(","))
        best, held_in = select_default(held_in_rows)
        # The held-out run reports the public scorers, the selected scorer
        # and, if a public scorer was selected, the best combined candidate.
        cand, _ = select_default(held_in_rows, CANDIDATES)
        scorers = PUBLIC + [c for c in dict.fromkeys([best, cand]) if c not in PUBLIC]
        print(f"selected on {args.select_from}: {best} (held-in worst margin "
              f"{100 * held_in[best][0]:+.0f} points); running {','.join(scorers)}", flush=True)
    rates = [float(r) for r in (args.rates.split(",") if args.rates else ROBUST_RATES)]
    lengths = [int(x) for x in args.lengths.split(",")]
    cases = args.cases.split(",") if args.cases else None
    tokenizer = AutoTokenizer.from_pretrained(model)
    registry = tasks.LONG_CASES if long else tasks.ROBUST_CASES
    suite = tasks.robust_suite(tokenizer, args.n, args.split, lengths, cases, registry)
    configs = ([] if args.no_full else [("full", 1.0)]) + [(s, r) for s in scorers for r in rates]
    prompt_tokens = sum(t.num_tokens for *_, t in suite) * len(configs)
    print(f"{args.suite} suite, split {args.split}: {len(suite)} cases ({args.n} per case x length cell) x "
          f"{len(configs)} configs = {len(suite) * len(configs)} requests, {prompt_tokens} prompt tokens "
          f"(~{prompt_tokens / PREFILL_TOKENS_PER_S / 60:.1f} min at {PREFILL_TOKENS_PER_S} tok/s)", flush=True)
    if args.dry_run:
        return 0

    from vllm import LLM, SamplingParams

    llm = LLM(
        model, enforce_eager=True, seed=0, max_model_len=8192,
        kv_cache_memory_bytes=1536 << 20, max_num_batched_tokens=4096, max_num_seqs=32,
        additional_config={"kv_compress": {"rate": 1.0, "enabled": True}},
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"quality_{args.suite}_{args.split}{args.tag}.csv"
    # Rows are appended after every chunk of cases, so an hour-long run that
    # stops keeps what it measured; --resume skips the requests already there.
    done = read_rows([path]) if args.resume and path.exists() else []
    done_keys = {(r["case"], int(r["length"]), int(r["seed"]), r["scorer"], float(r["rate"])) for r in done}
    todo = [(case, length, seed, task, scorer, rate) for case, length, seed, task in suite
            for scorer, rate in configs if (case, length, seed, scorer, rate) not in done_keys]
    if done:
        print(f"resuming: {len(done)} requests already in {path}, {len(todo)} to run", flush=True)
    rows = list(done)
    start = time.perf_counter()
    tokens_run = 0
    chunk = args.chunk * len(configs)
    # The continuation cases are scored against the uncompressed continuation
    # of the same prompt, which runs in the same chunk (configs are contiguous
    # per case, "full" first); a resumed run re-runs nothing it cannot score.
    full_out: dict[tuple, tuple[list[int], str]] = {}  # (case, length, seed) -> (ids, text)
    for i in range(0, len(todo), chunk):
        part = todo[i:i + chunk]
        params = []
        for case, length, seed, task, scorer, rate in part:
            extra = {"kv_compress_rate": rate}
            if scorer != "full":
                extra.update(request_options(scorer))
            params.append(long_params(task, extra) if long else SamplingParams(
                temperature=0.0, max_tokens=ROBUST_MAX_TOKENS.get(case, 10), extra_args=extra))
        outs = llm.generate([k[3].prompt for k in part], params, use_tqdm=False)
        for (case, length, seed, task, scorer, rate), out in zip(part, outs):
            if scorer == "full":
                full_out[(case, length, seed)] = (list(out.outputs[0].token_ids), out.outputs[0].text)
        new_rows = []
        for (case, length, seed, task, scorer, rate), out in zip(part, outs):
            stats = (out.kv_transfer_params or {}).get("kv_compress", {})
            ids, text = list(out.outputs[0].token_ids), out.outputs[0].text
            overlap = None
            if task.kind == "continue":
                if (case, length, seed) not in full_out:
                    raise SystemExit(f"{case} {length} seed {seed}: no uncompressed continuation in this "
                                     "run to score against (do not --resume a partly run case)")
                ref_ids, ref_text = full_out[(case, length, seed)]
                score = prefix_agreement(ids, ref_ids)
                overlap = tasks.word_recall(ref_text, text)
            else:
                score = task.score(text)
            row = {
                "split": tasks.split_of(seed), "case": case, "length": length, "seed": seed,
                "prompt_tokens": task.num_tokens, "scorer": scorer, "rate": rate,
                "score": round(score, 4),
                "kept_fraction": round(stats.get("kept_fraction", 1.0), 4),
            }
            if long:
                row["overlap"] = round(overlap, 4)
                row["output_tokens"] = len(ids)
                row["compressions"] = stats.get("compressions", 0)
            row["output"] = out.outputs[0].text.strip()[:60]
            new_rows.append(row)
        write_header = not rows
        with open(path, "w" if write_header else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(new_rows[0].keys()))
            if write_header:
                writer.writeheader()
            writer.writerows(new_rows)
        rows += new_rows
        tokens_run += sum(k[3].num_tokens for k in part)
        elapsed = time.perf_counter() - start
        print(f"{i + len(part)}/{len(todo)} requests, {elapsed:.0f} s, {tokens_run / elapsed:.0f} prompt tok/s",
              flush=True)
    wall = time.perf_counter() - start
    print(f"\nwall time {wall:.0f} s ({tokens_run / max(wall, 1e-9):.0f} prompt tok/s); wrote {path}\n")
    print(long_report(rows) if long else robust_report(rows))  # includes the kept fractions
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
