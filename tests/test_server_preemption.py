"""A compressed `vllm serve` with a KV budget far below its load: requests are
preempted and resumed again and again while compression runs; then SIGTERM
with requests in flight in drain mode (`--shutdown-timeout`)."""

import asyncio
import os
import signal
import time

import pytest

from server_harness import coherent, exact_chat_messages, gather_streams, serving, stream_chat

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 1536
MAX_TOKENS = 64
LABELS = {"model_name": "m", "engine": "0"}


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from kvcompress_vllm.model import kv_budget_bytes

    # Room for two uncompressed 1024-token sequences (17 blocks of 128 tokens).
    budget = kv_budget_bytes(model_path, 2, 1024, max_num_seqs=16, max_model_len=MAX_MODEL_LEN)
    with serving(
        model_path,
        ["--kv-compress-rate", "0.25", "--max-model-len", str(MAX_MODEL_LEN),
         "--max-num-seqs", "16", "--max-num-batched-tokens", "512",
         "--kv-cache-memory-bytes", str(budget), "--enforce-eager",
         # Admit prompts whose whole prefill does not fit yet (vLLM's default
         # waits for room): decoding requests then run out of blocks.
         "--no-scheduler-reserve-full-isl",
         "--shutdown-timeout", "60"],
        tmp_path_factory.mktemp("storm") / "serve.log",
    ) as srv:
        yield srv


def _value(scrape, name, **extra):
    return scrape.get((name, frozenset({**LABELS, **extra}.items())), 0.0)


def test_preemption_storm_completes_without_leaks(server, tokenizer):
    before = server.wait_idle()
    blocks = next(int(dict(ls)["num_gpu_blocks"]) for (n, ls) in before
                  if n == "vllm:cache_config_info")
    # Opted-out and lightly compressed requests keep most of their KVs, so
    # compressing the others cannot make room for everything: vLLM preempts.
    options = [{"kv_compress_rate": 1.0}, {},
               {"kv_compress_rate": 0.9, "kv_compress_scorer": "streamingllm"},
               {"max_cache_tokens": 256}, {"kv_compress_rate": 0.8, "kv_compress_scorer": "knorm"}]
    lengths = [700 + 61 * i for i in range(10)]
    bodies = []
    for i, n in enumerate(lengths):
        messages, _ = exact_chat_messages(tokenizer, n, seed=300 + i)
        bodies.append({"model": "m", "messages": messages, "max_tokens": MAX_TOKENS,
                       "ignore_eos": True, "temperature": 0.0,
                       "vllm_xargs": options[i % len(options)]})
    # 10 x ~1000 prompt tokens into a cache of `blocks` x 128 tokens.
    assert sum(lengths) > 4 * blocks * 128
    t0 = time.monotonic()
    results = asyncio.run(gather_streams(server.url, bodies, timeout=480))
    elapsed = time.monotonic() - t0
    for i, res in enumerate(results):
        assert res.status == 200 and res.error is None, f"request {i}: {res.error}"
        assert res.finish_reason == "length" and res.usage["completion_tokens"] == MAX_TOKENS, \
            f"request {i}: {res}"
        assert coherent(res.text), f"request {i}: {res.text!r}"
    after = server.wait_idle(timeout=60)
    preempted = _value(after, "vllm:num_preemptions_total") - _value(
        before, "vllm:num_preemptions_total")
    pressure = _value(after, "vllm:kv_compress_compressions_total", trigger="pressure") - \
        _value(before, "vllm:kv_compress_compressions_total", trigger="pressure")
    prompt = _value(after, "vllm:kv_compress_compressions_total", trigger="prompt") - \
        _value(before, "vllm:kv_compress_compressions_total", trigger="prompt")
    print(f"storm: {len(bodies)} requests in {elapsed:.1f}s, {preempted:.0f} preemptions, "
          f"{prompt:.0f} prompt / {pressure:.0f} pressure compressions, {blocks} blocks")
    compressing = sum(1 for b in bodies if b["vllm_xargs"] != {"kv_compress_rate": 1.0})
    assert preempted >= 2 * len(bodies)  # preempted and resumed many times...
    assert prompt >= compressing and pressure >= 1  # ...while compression runs
    # No block leaked: all blocks are back in the pool.
    assert _value(after, "vllm:kv_cache_usage_perc") == 0.0
    assert server.alive()


def test_sigterm_drains_requests_in_flight(server, tokenizer):
    """With --shutdown-timeout, SIGTERM lets the running streams finish, then
    the server exits 0 within the timeout, with all its children."""
    async def scenario():
        import httpx

        bodies = []
        for i in range(4):
            messages, _ = exact_chat_messages(tokenizer, 300 + 200 * i, seed=400 + i)
            bodies.append({"model": "m", "messages": messages, "max_tokens": 120,
                           "ignore_eos": True, "temperature": 0.0})
        async with httpx.AsyncClient(timeout=httpx.Timeout(180)) as client:
            started = [asyncio.Event() for _ in bodies]
            tasks = [asyncio.create_task(stream_chat(client, server.url, b, timeout=180,
                                                     first_chunk=ev))
                     for b, ev in zip(bodies, started)]
            # Every request in the engine and decoding (a request added after
            # SIGTERM is refused by vLLM's engine core, as it should be).
            deadline = time.monotonic() + 120
            while not all(ev.is_set() for ev in started):
                assert time.monotonic() < deadline, "requests did not start decoding"
                await asyncio.sleep(0.3)
            t_sig = time.monotonic()
            os.kill(server.proc.pid, signal.SIGTERM)
            return await asyncio.gather(*tasks), t_sig

    results, t_sig = asyncio.run(scenario())
    code = server.proc.wait(timeout=90)
    exit_s = time.monotonic() - t_sig
    assert code == 0, server.log_tail()
    assert exit_s < 75, exit_s
    for i, res in enumerate(results):
        assert res.status == 200 and res.error is None, (i, res)
        assert res.finish_reason == "length" and res.usage["completion_tokens"] == 120, (i, res)
        assert coherent(res.text), (i, res.text)
    from server_harness import wait_group_gone

    assert wait_group_gone(server.proc.pid, timeout=15) == []
