"""What the tensor-parallel eviction rule costs, measured on real metrics.

Under tensor parallelism every rank holds ``H/tp`` KV heads of every layer and
must evict the same number of head-pages per request (so one block
accounting is exact on all ranks); each rank picks its pages from its own
heads.  Without TP the choice is joint over all ``L*H`` heads.  This script
prefills prompts on the default model (tp = 1, rate 1.0 with the machinery
on, so nothing is evicted), reads every request's per-KV metric from the
worker, and computes for several keep rates the *attention mass evicted*
(sum of the metric over the evicted KVs, relative to the total) by

* ``joint``: the cheapest page-units over all heads (what tp = 1 does), and
* ``per-rank tp=k``: heads split into k ranks the way vLLM shards KV heads
  (contiguous head ranges), each rank evicting 1/k of the pages from its
  own heads,

with the plugin's own selection code (``worker.selection``).  A lower
evicted mass means the kept KVs carry more of the observed attention.

    python benchmarks/tp_rule_cost.py          # ~2 min here

SmolLM2 has 3 KV heads, so the split that fits it is tp = 3 (one head per
rank); tp = 2 is reported on a model with an even number of KV heads only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def read_metrics(llm, req_ids):
    def read(worker, rids):
        from kvcompress_vllm.worker.state import get_state

        state = get_state()
        out = {}
        for rid in rids:
            req = state.table.requests[rid]
            pages, counts = state.table.head_rows(req)
            n = int(counts.max())
            j = torch.arange(n)
            page = pages[:, j // state.block_size].long()
            slot = (j % state.block_size).expand_as(page)
            out[rid] = (state.pool.metrics[page, slot].tolist(),
                        state.pool.positions[page, slot].tolist(),
                        state.table.num_layers, state.table.num_kv_heads)
        return out

    (result,) = llm.collective_rpc(read, args=(req_ids,))
    return result


def evicted_mass(metrics, positions, num_heads, num_layers, rate, tp, block, protected, sinks):
    from kvcompress_vllm.core import PageGeometry, pages_to_evict
    from kvcompress_vllm.config import KVCompressConfig, request_policy
    from kvcompress_vllm.core.policy import protected_mask
    from kvcompress_vllm.worker.selection import select_evictions

    n = metrics.shape[1]
    scores = metrics.clone().masked_fill(protected_mask(positions, n, protected, sinks), float("inf"))
    policy = request_policy(KVCompressConfig(rate=rate, protected_window=protected,
                                             sink_tokens=sinks), None, block)
    # Per rank: L * H/tp heads, the same page count on every rank.
    geom = PageGeometry(block, num_layers * num_heads // tp)
    per_rank = pages_to_evict(geom, policy, n, 0)
    heads = torch.arange(num_layers * num_heads).view(num_layers, num_heads)
    mass = 0.0
    if tp == 1:
        chosen = select_evictions(scores, per_rank, block)
        rows = [(r, chosen.evict_idx[r]) for r in range(scores.shape[0])]
    else:
        rows = []
        for rank in range(tp):
            idx = heads[:, rank * num_heads // tp:(rank + 1) * num_heads // tp].reshape(-1)
            chosen = select_evictions(scores[idx], per_rank, block)
            rows += [(int(idx[i]), chosen.evict_idx[i]) for i in range(idx.numel())]
    for r, ev in rows:
        ev = ev[ev >= 0].long()
        mass += float(metrics[r, ev].sum())
    return mass / float(metrics.sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rates", default="0.5,0.25,0.125")
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from kvcompress_vllm import tasks
    from kvcompress_vllm.config import KVCompressConfig
    from kvcompress_vllm.model import prepare_default_model

    model = args.model or str(prepare_default_model())
    llm = LLM(model, enforce_eager=True, max_model_len=4096, kv_cache_memory_bytes=512 << 20,
              additional_config={"kv_compress": {"rate": 1.0, "enabled": True}})
    core = llm.llm_engine
    tok = llm.get_tokenizer()
    cfg = KVCompressConfig()
    items = [tasks.passkey(tok, 1500 + 300 * i, depth=(i + 1) / (args.prompts + 1), seed=i)
             for i in range(args.prompts)]
    rids = []
    for i, task in enumerate(items):
        ext = f"p{i}"
        rids.append(core.add_request(ext, task.prompt, SamplingParams(max_tokens=64, ignore_eos=True)))
    sched = core.engine_core.engine_core.scheduler
    while any(sched.requests[r].num_computed_tokens < sched.requests[r].num_prompt_tokens
              for r in rids):
        core.step()
    data = read_metrics(llm, rids)
    rates = [float(r) for r in args.rates.split(",")]
    _, _, num_layers, num_heads = next(iter(data.values()))
    splits = [1] + [k for k in (2, 3, 4, 8) if num_heads % k == 0 and k <= num_heads]
    print(f"{len(rids)} passkey prompts of 1500-{1500 + 300 * (args.prompts - 1)} tokens; "
          f"{num_layers} layers x {num_heads} KV heads; block {sched.geometry.block_size}")
    print("| keep rate | " + " | ".join("joint" if k == 1 else f"per-rank tp={k}" for k in splits)
          + " |")
    print("|---:|" + "---:|" * len(splits))
    for rate in rates:
        cells = []
        for k in splits:
            vals = []
            for metrics, positions, _, _ in data.values():
                m = torch.tensor(metrics)
                p = torch.tensor(positions)
                vals.append(evicted_mass(m, p, num_heads, num_layers, rate, k,
                                         sched.geometry.block_size, cfg.protected_window,
                                         cfg.sink_tokens))
            mean = sum(vals) / len(vals)
            if k == 1:
                joint = mean
                cells.append(f"{1e6 * mean:.0f} ppm")
            else:
                cells.append(f"{1e6 * mean:.0f} ppm ({mean / joint:.2f}x joint)")
        print(f"| {rate:g} | " + " | ".join(cells) + " |")
    print("(mean attention mass evicted, parts per million of the request's total metric; "
          "lower is better)")
    core.abort_request([f"p{i}" for i in range(len(rids))])
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
