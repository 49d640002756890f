"""Priority scheduling under a tight KV budget: stock vLLM vs KV-Compress.

With ``--scheduling-policy priority`` vLLM admits the most urgent waiting
request first and, when a running request needs a block and none is free,
preempts the least urgent running one; a preempted request later replays its
prompt and everything it had generated.  Under memory pressure that can
thrash: the same low-priority requests preempted and re-admitted again and
again.  This benchmark measures that, side by side, on one arrival schedule.

Load (seeded): ``--requests`` random-token prompts of 256-2048 tokens, 64-512
output tokens each (greedy, ``ignore_eos``), priorities 0-3 (0 first, vLLM's
rule), arriving as a Poisson process of ``--arrival-rate`` requests/s; a KV
budget of ``--budget-tokens`` uncompressed tokens (kv_cache_memory_bytes, the
same for every engine).  One fresh in-process engine per configuration
(``--configs``, default all of):

* ``stock:fcfs``, ``stock:priority``  -- vLLM alone (``VLLM_PLUGINS=``);
* ``kvc1:priority``    -- the plugin on, every request at rate 1.0 (nothing evicted);
* ``kvc0.25:priority`` -- every request at rate 0.25.

Per configuration: preemptions; requests preempted at least once and the most
times one request was; *recomputed tokens* (tokens computed beyond each
request's prompt and outputs, i.e. the replays: the cost of thrashing); peak
running requests; wall time and output tokens/s; and per priority class the
mean time from arrival to first token and to the last.

    python benchmarks/priority_thrash.py            # ~12 min here
    python benchmarks/priority_thrash.py --quick    # 2 engines, 8 short requests (~1.5 min)

Writes docs/priority_thrash.csv and .md (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

from engine_probe import probe
from engine_process import emit, run_child

HERE = Path(__file__).resolve().parent
CONFIGS = ["stock:fcfs", "stock:priority", "kvc1:priority", "kvc0.25:priority"]
QUICK_CONFIGS = ["stock:priority", "kvc0.25:priority"]


def workload(seed: int, num: int, arrival_rate: float, quick: bool) -> list[dict]:
    """The requests in arrival order: ``arrival_s``, ``priority``, ``prompt``
    (token ids), ``output``."""
    rng = random.Random(seed)
    lo, hi, out_lo, out_hi = (128, 512, 16, 64) if quick else (256, 2048, 64, 512)
    t, reqs = 0.0, []
    for i in range(num):
        t += rng.expovariate(arrival_rate)
        reqs.append(dict(
            id=f"req-{i}", arrival_s=t, priority=rng.randint(0, 3),
            prompt=[rng.randrange(100, 20000) for _ in range(rng.randint(lo, hi))],
            output=rng.randint(out_lo, out_hi),
        ))
    return reqs


def run_engine(spec: dict) -> dict:
    """One configuration in this process (EngineCore in-process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kind, policy = spec["config"].split(":")
    plugin = kind.startswith("kvc")
    kwargs = dict(enforce_eager=True, seed=0, enable_prefix_caching=False,
                  max_model_len=spec["max_model_len"], kv_cache_memory_bytes=spec["budget_bytes"],
                  max_num_seqs=64, max_num_batched_tokens=2048, scheduling_policy=policy)
    if plugin:
        kwargs["additional_config"] = {"kv_compress": {"rate": 1.0, "enabled": True}}
    llm = LLM(spec["model"], **kwargs)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    if scheduler.policy.value != policy:
        raise RuntimeError(f"{spec['config']}: the engine schedules by {scheduler.policy.value}")
    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 400)))] * 2,  # warm-up
                 SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    record = probe(llm)  # from here on: the warm-up is not counted
    rate = float(kind[3:]) if plugin else None
    reqs = workload(**spec["workload"])  # drawn again here: the same seed, the same requests
    pending = collections.deque(reqs)
    arrived, first, done, outputs = {}, {}, {}, {}
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0]["arrival_s"] <= now:
            r = pending.popleft()
            params = SamplingParams(temperature=0.0, max_tokens=r["output"], ignore_eos=True,
                                    extra_args={"kv_compress_rate": rate} if plugin else None)
            engine.add_request(r["id"], TokensPrompt(prompt_token_ids=r["prompt"]), params,
                               priority=r["priority"])
            arrived[r["id"]] = now
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.05, pending[0]["arrival_s"] - now)))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = t
            if out.finished:
                done[out.request_id] = t
                outputs[out.request_id] = len(out.outputs[0].token_ids)
    wall = time.perf_counter() - start
    if set(done) != {r["id"] for r in reqs}:
        raise RuntimeError(f"{spec['config']}: {len(reqs) - len(done)} requests did not finish")
    needed = sum(len(r["prompt"]) + max(0, outputs[r["id"]] - 1) for r in reqs)
    summary, preempted = record.summary(), record.preempted
    res = {
        "config": spec["config"], "wall_s": wall, "output_tok_s": sum(outputs.values()) / wall,
        "preemptions": sum(preempted.values()), "requests_preempted": len(preempted),
        "most_preemptions_of_one": max(preempted.values(), default=0),
        "recomputed_tokens": summary["scheduled_tokens"] - needed,
        "peak_running": summary["peak_running"],
        "num_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1,
    }
    for p in range(4):
        ids = [r["id"] for r in reqs if r["priority"] == p]
        res[f"p{p}_requests"] = len(ids)
        res[f"p{p}_ttft_s"] = sum(first[i] - arrived[i] for i in ids) / max(1, len(ids))
        res[f"p{p}_e2e_s"] = sum(done[i] - arrived[i] for i in ids) / max(1, len(ids))
    priority = {r["id"]: r["priority"] for r in reqs}
    by_priority = collections.Counter()
    for rid, n in preempted.items():  # the core's ids: "<ours>-<random suffix>"
        by_priority[priority[rid.rsplit("-", 1)[0]]] += n
    res["preempted_by_priority"] = "/".join(str(by_priority[p]) for p in range(4))
    return res


def run_config(spec: dict) -> dict:
    return run_child([__file__, "--worker", json.dumps(spec)], name=spec["config"],
                     stock=not spec["config"].startswith("kvc"))


def table(rows: list[dict]) -> str:
    lines = ["| config | out tok/s | wall s | preempt | requests preempted | most of one | "
             "recomputed tokens | preempted by priority 0/1/2/3 | peak running | blocks | "
             "e2e s p0 / p1 / p2 / p3 | ttft s p0 / p1 / p2 / p3 |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        e2e = " / ".join(f"{r[f'p{p}_e2e_s']:.1f}" for p in range(4))
        ttft = " / ".join(f"{r[f'p{p}_ttft_s']:.1f}" for p in range(4))
        lines.append(
            f"| {r['config']} | {r['output_tok_s']:.1f} | {r['wall_s']:.1f} | {r['preemptions']} | "
            f"{r['requests_preempted']} | {r['most_preemptions_of_one']} | {r['recomputed_tokens']} | "
            f"{r['preempted_by_priority']} | {r['peak_running']} | {r['num_blocks']} | {e2e} | {ttft} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 engines, 8 short requests")
    parser.add_argument("--model", default=None)
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, from {','.join(CONFIGS)} (KIND:POLICY; kvcR = the "
                        "plugin with every request at rate R)")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--arrival-rate", type=float, default=0.5, help="requests per second")
    parser.add_argument("--budget-tokens", type=int, default=6144,
                        help="the KV budget holds this many uncompressed tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(HERE.parent / "docs"))
    args = parser.parse_args()
    if args.worker:
        emit(run_engine(json.loads(args.worker)))
        return 0
    configs = (args.configs.split(",") if args.configs
               else QUICK_CONFIGS if args.quick else CONFIGS)
    for c in configs:
        kind, _, policy = c.partition(":")
        if policy not in ("fcfs", "priority") or not (kind == "stock" or kind.startswith("kvc")):
            parser.error(f"--configs: {c!r} is not KIND:POLICY (stock or kvcRATE; fcfs or priority)")
        if kind.startswith("kvc"):
            try:
                ok = 0 < float(kind[3:]) <= 1
            except ValueError:
                ok = False
            if not ok:
                parser.error(f"--configs: {c!r}: the rate after 'kvc' must be in (0, 1]")
    from kvcompress_vllm.model import kv_budget_bytes, prepare_default_model

    num = 8 if args.quick else args.requests
    budget_tokens = 1536 if args.quick else args.budget_tokens
    arrival_rate = 4.0 if args.quick else args.arrival_rate
    model = args.model or str(prepare_default_model())
    load = dict(seed=args.seed, num=num, arrival_rate=arrival_rate, quick=args.quick)
    requests = workload(**load)
    max_model_len = max(1024, -(-max(len(r["prompt"]) + r["output"] + 16 for r in requests) // 128) * 128)
    budget = kv_budget_bytes(model, 1, budget_tokens, max_num_seqs=64, max_model_len=max_model_len)
    rows = []
    for config in configs:
        t0 = time.perf_counter()
        rows.append(run_config(dict(config=config, model=model, workload=load,
                                    budget_bytes=budget, max_model_len=max_model_len)))
        print(f"[{config}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "priority_thrash" + ("_quick" if args.quick else "")
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    counts = collections.Counter(r["priority"] for r in requests)
    header = (f"{num} requests (priority 0/1/2/3: {'/'.join(str(counts[p]) for p in range(4))}), "
              f"{arrival_rate:g}/s Poisson arrivals, seed {args.seed}; KV budget "
              f"{budget_tokens} uncompressed tokens ({budget / 2**20:.0f} MiB)")
    text = header + "\n\n" + table(rows)
    (out_dir / f"{stem}.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
