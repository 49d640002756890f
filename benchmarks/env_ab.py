"""Two settings of one of the plugin's environment switches, alternated in
fresh processes: end-to-end time and where it goes.

Each run is one fresh in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
on the default model, the plugin with ``--scorer`` at ``--rate``, and the
switch ``--env`` set to one of ``--values``.  After a warm-up it runs every
load of ``--loads`` (random-token prompts, greedy, ``ignore_eos``, all
submitted at once) and times each one: the whole ``generate``, the plugin's
attention layers (``KVCompressCPUImpl.forward``, cache write included), the
rest of the model's ``forward``, the attention metadata builder and what
happens outside the model runner's ``execute_model`` and ``sample_tokens``
(scheduler, ``begin_step``, output processing).  Runs alternate A B B A A B
... so that this shared VM's drift falls on both sides and the second run of
a pair is not always the same setting; each pair gives B/A ratios, and their
geometric mean is reported.

    # decode rows of metric-free packed requests: our kernel vs vLLM's per head
    python benchmarks/env_ab.py --env KVCOMPRESS_PACKED_DECODE --values ours,vllm --pairs 3
    python benchmarks/env_ab.py --quick ...   # 1 pair, small loads (~2 min)
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

from engine_process import emit, run_child

#: name: (requests, prompt tokens, output tokens)
LOADS = {
    "decode": (12, 256, 768),
    "mixed": (16, 1152, 256),
    "many": (32, 640, 128),
    "tiny": (4, 128, 32),
}


def child(args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvcompress_vllm.attention import cpu_backend

    from wall_timers import Timers

    timer = Timers()
    timers, wrap = timer.total, timer.wrap
    wrap(cpu_backend.KVCompressCPUImpl, "forward", "attention")
    wrap(cpu_backend.KVCompressCPUMetadataBuilder, "build", "builder")
    llm = LLM(args.model, enforce_eager=True, seed=0, enable_prefix_caching=False,
              max_model_len=2048, kv_cache_memory_bytes=args.kv_mib << 20, max_num_seqs=64,
              max_num_batched_tokens=2048,
              additional_config={"kv_compress": {"enabled": True, "rate": 1.0,
                                                 "scorer": args.scorer}})
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    wrap(runner, "execute_model", "runner")
    wrap(runner, "sample_tokens", "runner")
    wrap(runner.model, "forward", "forward")
    extra = {"kv_compress_rate": args.rate}
    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 400)))] * 2,
                 SamplingParams(max_tokens=8, ignore_eos=True, extra_args=extra), use_tqdm=False)
    rng = random.Random(2)
    res = {}
    for name in args.loads.split(","):
        n, prompt, output = LOADS[name]
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 20000) for _ in range(prompt)])
                   for _ in range(n)]
        params = SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True,
                                extra_args=extra)
        timers.clear()
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        res[name] = {"wall": time.perf_counter() - t, **timers}
        res[name]["forward w/o attention"] = (timers.get("forward", 0.0)
                                              - timers.get("attention", 0.0))
        res[name]["outside the runner"] = res[name]["wall"] - timers.get("runner", 0.0)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", required=True, help="the environment variable to switch")
    ap.add_argument("--values", required=True, help="A,B: its two values")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--loads", default="decode,mixed", help=f"of {', '.join(LOADS)}")
    ap.add_argument("--scorer", default="keydiff")
    ap.add_argument("--rate", type=float, default=0.25)
    ap.add_argument("--kv-mib", type=int, default=600, help="KV cache budget (MiB)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        emit(child(args))
        return
    values = args.values.split(",")
    if len(values) != 2:
        sys.exit(f"--values: expected two comma-separated values, got {args.values!r}")
    if args.quick:
        args.pairs, args.loads = 1, "tiny"
    for name in args.loads.split(","):
        if name not in LOADS:
            sys.exit(f"--loads: unknown load {name!r} (one of {', '.join(LOADS)})")
    if args.model is None:
        from kvcompress_vllm.model import prepare_default_model

        args.model = str(prepare_default_model())
    runs = []
    for i in range(2 * args.pairs):
        value = values[(i + i // 2) % 2]  # A B B A A B ...
        cmd = [__file__, "--child", "--env", args.env, "--values", args.values,
               "--loads", args.loads, "--scorer", args.scorer, "--rate", str(args.rate),
               "--kv-mib", str(args.kv_mib), "--model", args.model]
        runs.append((value, run_child(cmd, name=f"{args.env}={value}", stock=False,
                                      env={args.env: value})))
        print(f"run {i + 1}: {args.env}={value} "
              + ", ".join(f"{k} {v['wall']:.1f} s" for k, v in runs[-1][1].items()), flush=True)

    a_name, b_name = values
    print(f"\n{args.env}: {b_name} / {a_name}, scorer {args.scorer}, rate {args.rate}, "
          f"{args.kv_mib} MiB of KV, {args.pairs} alternated pairs\n")
    keys = ("wall", "attention", "forward w/o attention", "builder", "outside the runner")
    print("| load | pair | " + " | ".join(f"{k} B/A" for k in keys) + " | seconds A / B: "
          + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * (2 * len(keys)))
    summary = []
    for name in args.loads.split(","):
        ratios = {k: [] for k in keys}
        for p in range(args.pairs):
            x, y = runs[2 * p], runs[2 * p + 1]
            a, b = (x[1][name], y[1][name]) if x[0] == a_name else (y[1][name], x[1][name])
            for key in ratios:
                ratios[key].append(max(b.get(key, 0.0), 1e-9) / max(a.get(key, 0.0), 1e-9))
            print(f"| {name} | {p + 1} | "
                  + " | ".join(f"{ratios[k][-1]:.3f}" for k in keys) + " | "
                  + " | ".join(f"{a.get(k, 0):.1f} / {b.get(k, 0):.1f}" for k in keys) + " |")
        geo = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in ratios.items()}
        summary.append(f"{name}: " + ", ".join(
            f"{k} {v:.3f} ({min(ratios[k]):.3f}-{max(ratios[k]):.3f})" for k, v in geo.items()))
    print(f"\ngeometric means over the pairs ({b_name}/{a_name}):")
    for line in summary:
        print("  " + line)


if __name__ == "__main__":
    main()
