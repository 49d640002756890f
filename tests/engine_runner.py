"""Run greedy generation in a fresh interpreter and print the results as JSON.

Started by the tests as a subprocess, so that the two sides of a
bit-identity comparison run under the same conditions: a fresh process with
the same environment and CPU affinity, none of the state that earlier
in-process engines leave in the pytest process (vLLM freezes its environment
variables once an engine has started, and binds the process's OpenMP threads).

* ``plugin: false`` (stock): started with ``VLLM_PLUGINS=`` (no general plugin
  loaded) and ``KVCOMPRESS_VLLM_AUTOPATCH=0``, so nothing of kvcompress-vllm is
  active: the reference that the plugin must reproduce.
* ``plugin: true``: kvcompress-vllm loaded as users get it; ``engine`` carries
  its ``additional_config``.

stdin:  {"model": ..., "engine": {...}, "prompt_token_ids": [[...]],
         "max_tokens": N, "logprobs": K}
stdout: last line = {"outputs": [{"token_ids": [...], "logprobs": [[[tok, lp], ...], ...],
                                  "kv_transfer_params": {...} | null}],
                     "scheduler_cls": ..., "scheduler_type": ..., "worker_cls": ...}
"""

import json
import os
import sys


def main() -> None:
    spec = json.load(sys.stdin)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(spec["model"], **spec["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=spec.get("logprobs"))
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompt_token_ids"]]
    results = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        comp = out.outputs[0]
        lps = None
        if comp.logprobs is not None:
            lps = [[[tok, lp.logprob] for tok, lp in step.items()] for step in comp.logprobs]
        results.append({"token_ids": list(comp.token_ids), "logprobs": lps,
                        "kv_transfer_params": out.kv_transfer_params})
    cfg = llm.llm_engine.vllm_config
    print(json.dumps({
        "outputs": results,
        "scheduler_cls": str(cfg.scheduler_config.scheduler_cls),
        "scheduler_type": type(llm.llm_engine.engine_core.engine_core.scheduler).__name__,
        "worker_cls": cfg.parallel_config.worker_cls,
    }))
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
