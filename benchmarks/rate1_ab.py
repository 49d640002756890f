"""Rate 1.0 against stock vLLM, alternated in fresh processes: where a step's
time goes when nothing is evicted.

Each run is one fresh in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
on the default model: ``--requests`` random-token prompts of ``--prompt``
tokens, ``--output`` tokens each (greedy, ``ignore_eos``), an ample KV budget
(no preemption: every request runs from start to end), after a warm-up.  The
plugin runs with ``kv_compress`` enabled and every request at
``kv_compress_rate=1.0`` (the machinery on, nothing evicted); stock with
``VLLM_PLUGINS=`` (nothing of the plugin loaded).  Runs alternate stock/plugin,
plugin/stock, ... so that this shared VM's drift falls on both sides; each
pair gives ratios, their geometric mean is reported.

Timed with wall-clock wrappers: the whole ``generate``; the model runner's
``execute_model`` (batch building + forward) and the model's ``forward``; the
attention layers (stock: vLLM's ``forward`` + its separate cache write; plugin:
the backend's ``forward``, cache write included); the attention metadata
builder; the scheduler's ``schedule`` + ``update_from_output``; the plugin
worker's ``begin_step`` (its page tables and plans; before the runner).
*Outside the runner* = everything else of a step (the scheduler, the plugin
worker's ``begin_step``, output processing).

    python benchmarks/rate1_ab.py --pairs 6          # ~20 min here
    python benchmarks/rate1_ab.py --quick            # 1 pair, 4 x 32 tokens (~1 min)
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

from engine_process import emit, run_child


def child(mode: str, model: str, requests: int, prompt: int, output: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.attention.backends import cpu_attn

    from wall_timers import Timers

    timer = Timers()
    timers, wrap = timer.total, timer.wrap
    wrap(cpu_attn.CPUAttentionBackendImpl, "forward", "attention")
    wrap(cpu_attn.CPUAttentionBackendImpl, "do_kv_cache_update", "attention")
    wrap(cpu_attn.CPUAttentionMetadataBuilder, "build", "metadata")
    from kvcompress_vllm.model import kv_budget_bytes

    max_model_len, max_num_seqs = max(1024, prompt + output + 128), max(64, requests)
    # Every request fits uncompressed, on stock and on the plugin (its
    # per-slot metadata and page tables counted): no preemption.
    budget = kv_budget_bytes(model, requests, prompt + output, max_num_seqs=max_num_seqs,
                             max_model_len=max_model_len)
    kwargs = dict(enforce_eager=True, seed=0, enable_prefix_caching=False, max_model_len=max_model_len,
                  kv_cache_memory_bytes=budget, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048)
    extra = None
    if mode == "plugin":
        from kvcompress_vllm.attention import cpu_backend

        wrap(cpu_backend.KVCompressCPUImpl, "forward", "attention")
        wrap(cpu_backend.KVCompressCPUMetadataBuilder, "build", "metadata")
        from kvcompress_vllm.worker.state import KVCompressWorkerState

        wrap(KVCompressWorkerState, "begin_step", "begin_step")
        kwargs["additional_config"] = {"kv_compress": {"enabled": True, "rate": 1.0}}
        extra = {"kv_compress_rate": 1.0}
    llm = LLM(model, **kwargs)
    core = llm.llm_engine.engine_core.engine_core
    wrap(core.scheduler, "schedule", "scheduler")
    wrap(core.scheduler, "update_from_output", "scheduler")
    runner = core.model_executor.driver_worker.worker.model_runner
    wrap(runner, "execute_model", "runner")
    wrap(runner.model, "forward", "forward")
    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 400)))] * 2,
                 SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    timers.clear()
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 20000) for _ in range(prompt)])
               for _ in range(requests)]
    params = SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True, extra_args=extra)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    timers["wall"] = time.perf_counter() - start
    timers["steps"] = output  # every request runs from the first step to the last
    if sum(len(o.outputs[0].token_ids) for o in outs) != requests * output:
        raise RuntimeError("a request ended early: the timings would not compare like with like")
    return timers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--output", type=int, default=512)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--child", choices=("stock", "plugin"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.requests, args.output = 1, 4, 32
    if args.child:
        emit(child(args.child, args.model, args.requests, args.prompt, args.output))
        return
    if args.model is None:
        from kvcompress_vllm.model import prepare_default_model

        args.model = str(prepare_default_model())
    runs = []
    for i in range(2 * args.pairs):
        mode = ("stock", "plugin")[(i + i // 2) % 2]  # stock plugin plugin stock ...
        cmd = [__file__, "--child", mode, "--model", args.model, "--requests",
               str(args.requests), "--prompt", str(args.prompt), "--output", str(args.output)]
        runs.append((mode, run_child(cmd, name=f"run {i + 1} ({mode})", stock=mode == "stock")))
        print(f"run {i + 1}: {mode} wall {runs[-1][1]['wall']:.1f} s", flush=True)

    def per_step_ms(r, key):
        return 1000 * r.get(key, 0.0) / r["steps"]

    rows, ratios = [], {"wall": [], "forward": [], "attention": [], "forward - attention": []}
    for p in range(args.pairs):
        a, b = runs[2 * p], runs[2 * p + 1]
        stock, plugin = (a[1], b[1]) if a[0] == "stock" else (b[1], a[1])
        for r in (stock, plugin):
            r["forward - attention"] = r["forward"] - r["attention"]
            r["outside"] = r["wall"] - r["runner"]
            r["runner - forward"] = r["runner"] - r["forward"]
        for key in ratios:
            ratios[key].append(plugin[key] / stock[key])
        rows.append((p + 1, stock, plugin))
    print(f"\n{args.requests} requests x {args.prompt} in / {args.output} out, rate 1.0 vs stock, "
          f"{args.pairs} alternated pairs\n")
    print("| pair | wall plugin/stock | forward | attention | forward w/o attention | ms/step: "
          "builder stock / plugin | runner w/o forward | outside the runner | scheduler | "
          "plugin's begin_step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p, s, q in rows:
        print(f"| {p} | {q['wall'] / s['wall']:.3f} | {q['forward'] / s['forward']:.3f} | "
              f"{q['attention'] / s['attention']:.3f} | "
              f"{q['forward - attention'] / s['forward - attention']:.3f} | "
              f"{per_step_ms(s, 'metadata'):.2f} / {per_step_ms(q, 'metadata'):.2f} | "
              f"{per_step_ms(s, 'runner - forward'):.2f} / {per_step_ms(q, 'runner - forward'):.2f} | "
              f"{per_step_ms(s, 'outside'):.2f} / {per_step_ms(q, 'outside'):.2f} | "
              f"{per_step_ms(s, 'scheduler'):.2f} / {per_step_ms(q, 'scheduler'):.2f} | "
              f"{per_step_ms(q, 'begin_step'):.3f} |")
    geo = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in ratios.items()}
    print("\ngeometric mean over the pairs (plugin/stock): "
          + ", ".join(f"{k} {v:.3f} ({min(ratios[k]):.3f}-{max(ratios[k]):.3f})" for k, v in geo.items()))


if __name__ == "__main__":
    main()
