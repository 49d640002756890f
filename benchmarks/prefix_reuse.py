"""Prefix caching with compression when requests arrive one after another.

Requests that share a system prompt usually do not arrive together: a chat
server sees one, then the next after it finished.  With prefix caching the
second request should hit the prefix the first one computed.  A compression
keeps a request's shared blocks intact (docs/design.md, "Prefix caching"),
but a request that is alone with a new prefix shares nothing yet, so its
compression takes the prefix out of the cache.  This benchmark measures what
each configuration recomputes and how long the load takes.

Load: ``--requests`` prompts of one ``--prefix``-token system prompt and
``--user`` tokens of their own (random tokens), ``--output`` tokens each
(greedy, ``ignore_eos``), submitted ``--concurrency`` at a time, each group
after the previous one finished (1: one client, one request at a time).
``--turns``: the requests are instead the turns of one conversation, each
prompt the previous one, its answer and ``--user`` new tokens.  An
ample KV budget (no preemption: what is measured is the cache, not memory).
Each configuration is a fresh in-process engine in a child process:

* ``stock``, ``stock+pc``: stock vLLM (``VLLM_PLUGINS=``) without / with
  ``enable_prefix_caching``;
* ``kvc``, ``kvc+pc``: the plugin at ``--rate`` without / with prefix caching;
* ``kvc+pc-norecord``: as ``kvc+pc`` with ``KVCompressManager.record_uncached``
  recording nothing in the child -- the rule before this revision, where a
  prefix that a compression took out of the cache was compressed again by the
  next request that computed it.

Reports per configuration: wall time, prompt tokens computed (prompt tokens
less prefix-cache hits), requests that hit the prefix, the mean kept
fraction (KVs kept / the request's KVs: a shared or kept prefix counts as
kept by every request, though requests that run together store it once).
A plugin engine that preempted a request fails the run.

    python benchmarks/prefix_reuse.py                # ~3 min here
    python benchmarks/prefix_reuse.py --turns --requests 8   # one conversation of 8 turns
    python benchmarks/prefix_reuse.py --quick        # kvc+pc and kvc+pc-norecord (or --configs), 3 short requests (~1 min)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from engine_process import emit, run_child

CONFIGS = ("stock", "stock+pc", "kvc", "kvc+pc", "kvc+pc-norecord")


def child(config: str, args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvcompress_vllm.model import kv_budget_bytes

    total = args.prefix + (args.requests if args.turns else 1) * (args.user + args.output)
    max_model_len = max(1024, total + 128)
    budget = kv_budget_bytes(args.model, args.concurrency + 1, max_model_len, max_num_seqs=64,
                             max_model_len=max_model_len)
    kwargs = dict(enforce_eager=True, seed=0, max_model_len=max_model_len, max_num_seqs=64,
                  kv_cache_memory_bytes=budget, max_num_batched_tokens=2048,
                  enable_prefix_caching="+pc" in config)
    plugin = config.startswith("kvc")
    if plugin:
        kwargs["additional_config"] = {"kv_compress": {"rate": args.rate}}
    if config.endswith("-norecord"):
        from kvcompress_vllm.scheduler.kv_cache_manager import KVCompressManager

        KVCompressManager.record_uncached = lambda self: self.pending_uncached.clear()
    llm = LLM(args.model, **kwargs)
    llm.generate([TokensPrompt(prompt_token_ids=list(range(30000, 30300)))] * 2,
                 SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    rng = random.Random(0)
    prefix = [rng.randrange(100, 20000) for _ in range(args.prefix)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)
    outs = []
    if args.turns:  # one conversation: each prompt is the last one, its answer and a new question
        prompts, history = [], list(prefix)
        start = time.perf_counter()
        for _ in range(args.requests):
            history += [rng.randrange(100, 20000) for _ in range(args.user)]
            prompts.append(TokensPrompt(prompt_token_ids=list(history)))
            outs += llm.generate(prompts[-1:], params, use_tqdm=False)
            history += list(outs[-1].outputs[0].token_ids)
    else:
        prompts = [TokensPrompt(prompt_token_ids=prefix + [rng.randrange(100, 20000)
                                                           for _ in range(args.user)])
                   for _ in range(args.requests)]
        start = time.perf_counter()
        for i in range(0, len(prompts), args.concurrency):
            outs += llm.generate(prompts[i:i + args.concurrency], params, use_tqdm=False)
    wall = time.perf_counter() - start
    totals = getattr(llm.llm_engine.engine_core.engine_core.scheduler, "kvc_totals", None)
    if totals is not None and totals.preemptions:
        raise RuntimeError(f"{config}: {totals.preemptions} preemptions under the ample budget")
    if sum(len(o.outputs[0].token_ids) for o in outs) != args.requests * args.output:
        raise RuntimeError("a request ended early: the configurations would not compare")
    cached = [o.num_cached_tokens or 0 for o in outs]
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    shareable = args.prefix // block_size * block_size  # whole blocks of the prefix
    kept = [o.kv_transfer_params["kv_compress"]["kept_fraction"]
            for o in outs if o.kv_transfer_params and "kv_compress" in o.kv_transfer_params]
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    return {
        "config": config, "wall_s": wall,
        "prompt_tokens": prompt_tokens,
        "computed_tokens": prompt_tokens - sum(cached),
        "hits": sum(c >= shareable > 0 for c in cached),
        "cached_tokens": cached,
        "kept_fraction": sum(kept) / len(kept) if kept else 1.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--prefix", type=int, default=1024, help="shared system-prompt tokens")
    ap.add_argument("--user", type=int, default=256, help="tokens of each request's own")
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1, help="requests submitted together")
    ap.add_argument("--turns", action="store_true",
                    help="the requests are the turns of one conversation: each prompt is the "
                    "previous one, its answer and --user new tokens (one at a time)")
    ap.add_argument("--rate", type=float, default=0.25)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {CONFIGS}")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        # 2 prefix blocks + 320 own tokens: the second request is compressed around the kept prefix
        args.requests, args.prefix, args.user, args.output = 3, 256, 320, 8
        if args.configs == ",".join(CONFIGS):
            args.configs = "kvc+pc,kvc+pc-norecord"
    if args.turns and args.concurrency != 1:
        sys.exit("--turns: the turns of one conversation come one at a time (--concurrency 1)")
    if args.child:
        emit(child(args.child, args))
        return
    configs = [c.strip() for c in args.configs.split(",")]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        sys.exit(f"--configs: unknown {sorted(unknown)}; choose from {CONFIGS}")
    if args.model is None:
        from kvcompress_vllm.model import prepare_default_model

        args.model = str(prepare_default_model())
    rows = []
    for config in configs:
        cmd = [__file__, "--child", config, "--model", args.model]
        for key in ("requests", "prefix", "user", "output", "concurrency", "rate"):
            cmd += [f"--{key}", str(getattr(args, key))]
        cmd += ["--turns"] if args.turns else []
        rows.append(run_child(cmd, name=config, stock=config.startswith("stock")))
        print(f"{config}: {rows[-1]['wall_s']:.1f} s", flush=True)
    if args.turns:
        print(f"\none conversation of {args.requests} turns: a {args.prefix}-token system prompt, "
              f"each turn {args.user} new tokens and {args.output} out; plugin rate {args.rate}\n")
    else:
        print(f"\n{args.requests} requests of a {args.prefix}-token shared prefix + {args.user} own "
              f"tokens, {args.output} out, {args.concurrency} at a time; plugin rate {args.rate}\n")
    print("| config | wall s | prompt tokens computed | requests hitting the prefix | "
          "mean kept fraction | cached tokens per request |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['config']} | {r['wall_s']:.1f} | {r['computed_tokens']} of {r['prompt_tokens']} "
              f"| {r['hits']} of {args.requests} | {r['kept_fraction']:.2f} | "
              f"{' '.join(map(str, r['cached_tokens']))} |")


if __name__ == "__main__":
    main()
