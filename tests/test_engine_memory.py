"""Under a tight KV budget, compression admits more sequences at once and
preempts less.

Budget: room for 3 uncompressed 2000-token sequences (plus the null block).
Workload: 8 concurrent passkey prompts of ~2000 tokens, 136 output tokens (a
sequence then needs 17 blocks, so three no longer fit: decode preempts).
Both runs use the plugin's scheduler (rate 1.0 with ``enabled`` vs 0.25), so
they count peak concurrency and preemptions the same way, and both check the
scheduler/worker page agreement every step (``debug_checks``).
"""

import pytest

from kvcompress_vllm import tasks

pytestmark = pytest.mark.engine

NUM_REQUESTS = 8
PROMPT_TOKENS = 2000
OUTPUT_TOKENS = 136


def budget_bytes(model_path: str) -> int:
    """Room for 3 uncompressed prompts (and the plugin's page tables)."""
    from conftest import ENGINE_DEFAULTS

    from kvcompress_vllm.model import kv_budget_bytes

    return kv_budget_bytes(
        model_path, num_seqs=3, seq_len=PROMPT_TOKENS,
        max_num_seqs=ENGINE_DEFAULTS["max_num_seqs"], max_model_len=ENGINE_DEFAULTS["max_model_len"],
    )


def run(engine_factory, model_path, rate: float):
    from vllm import SamplingParams

    engine = engine_factory(
        kv_cache_memory_bytes=budget_bytes(model_path),
        max_num_batched_tokens=2048,
        additional_config={"kv_compress": {"rate": rate, "enabled": True, "debug_checks": True}},
    )
    num_blocks = engine.scheduler.kv_cache_manager.block_pool.num_gpu_blocks
    assert num_blocks - 1 == 3 * -(-PROMPT_TOKENS // 128)
    prompts = [tasks.passkey(engine.tokenizer, PROMPT_TOKENS, depth=i / NUM_REQUESTS, seed=i)
               for i in range(NUM_REQUESTS)]
    outs = engine.generate(
        [t.prompt for t in prompts],
        SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True),
    )
    totals = engine.scheduler.kvc_totals
    correct = sum(t.answer in o.outputs[0].text[:16] for t, o in zip(prompts, outs))
    result = {
        "max_running": totals.max_running,
        "preemptions": totals.preemptions,
        # per request (kv_transfer_params["kv_compress"]["preemptions"])
        "request_preemptions": sum(o.kv_transfer_params["kv_compress"]["preemptions"]
                                   for o in outs),
        "correct": correct,
        "free_at_end": engine.free_blocks(),
        "num_blocks": num_blocks,
    }
    engine.shutdown()
    return result


@pytest.fixture(scope="module")
def results(engine_factory, model_path):
    return {rate: run(engine_factory, model_path, rate) for rate in (1.0, 0.25)}


def test_compression_raises_concurrency_and_cuts_preemptions(results):
    full, compressed = results[1.0], results[0.25]
    print("tight budget:", results)
    assert compressed["max_running"] > full["max_running"]
    assert compressed["preemptions"] < full["preemptions"]


def test_request_outputs_count_the_preemptions(results):
    assert results[1.0]["preemptions"] > 0
    for r in results.values():
        assert r["request_preemptions"] == r["preemptions"]


def test_no_blocks_leak_after_preemptions(results):
    for r in results.values():
        assert r["free_at_end"] == r["num_blocks"] - 1


def test_answers_survive_preemption_and_compression(results):
    # The 135M model itself misses the odd pass key; compression (4x) and
    # preemption (recompute) must not cost more than one extra miss.
    assert results[1.0]["correct"] >= NUM_REQUESTS - 2
    assert results[0.25]["correct"] >= results[1.0]["correct"] - 1
