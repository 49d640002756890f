"""`vllm serve MODEL --kv-compress-rate R` through vLLM's own console script:
per-request statistics, Prometheus metrics on /metrics and `vllm bench serve`
against it (`vllm bench throughput` is in test_bench_cli.py)."""

import json
import math
import subprocess

import pytest

from kvcompress_vllm import tasks
from server_harness import VLLM, serving

pytestmark = pytest.mark.engine

KV_BYTES = 256 << 20


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    with serving(
        model_path,
        ["--kv-compress-rate", "0.5", "--max-model-len", "4096",
         "--kv-cache-memory-bytes", str(KV_BYTES), "--enforce-eager"],
        tmp_path_factory.mktemp("server") / "serve.log",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def test_chat_request_is_compressed(client, server, tokenizer):
    task = tasks.passkey(tokenizer, 1200, depth=0.4, seed=3)
    document = task.prompt.rsplit(" What is the pass key?", 1)[0]
    resp = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": document + "\n\nWhat is the pass key? Answer with the number."}],
        temperature=0.0, max_tokens=20,
    )
    assert task.answer in resp.choices[0].message.content
    stats = resp.model_extra["kv_transfer_params"]["kv_compress"]
    assert stats["rate"] == 0.5 and stats["compressions"] >= 1
    assert stats["kept_fraction"] < 0.6
    assert "KV-Compress enabled" in server.log_tail(10**7)


def test_bad_request_gets_400_and_server_keeps_serving(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt="Hi", max_tokens=4,
                                  extra_body={"vllm_xargs": {"kv_compress_rate": 1.5}})
    assert "kv_compress_rate" in str(err.value) and "(0, 1]" in str(err.value)
    resp = client.completions.create(model="m", prompt="The capital of France is",
                                     max_tokens=4, temperature=0.0,
                                     extra_body={"vllm_xargs": {"kv_compress_rate": 0.25}})
    assert resp.choices[0].text.strip()


def _num_gpu_blocks(server) -> int:
    for (name, labels), _ in server.metrics().items():
        if name == "vllm:cache_config_info":
            return int(dict(labels)["num_gpu_blocks"])
    raise KeyError("vllm:cache_config_info not on /metrics")


def test_metrics_move_as_requests_are_compressed(client, server, tokenizer):
    """One long streamed request at rate 0.5: while it decodes, vLLM's own
    KV-cache usage shows the released blocks; afterwards every KV-Compress
    metric has moved by what this request did, labelled like vLLM's."""
    before = server.wait_idle()
    blocks = _num_gpu_blocks(server)
    labels = {"model_name": "m", "engine": "0"}

    def delta(name, **extra):
        return server.metric(name, **labels, **extra) - before.get(
            (name, frozenset({**labels, **extra}.items())), 0.0)

    task = tasks.passkey(tokenizer, 2000, depth=0.3, seed=11)
    stream = client.completions.create(
        model="m", prompt=task.prompt, max_tokens=300, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage_mid, chunks, final = None, 0, None
    for chunk in stream:
        if chunk.choices:
            chunks += 1
        if chunks == 40 and usage_mid is None:
            usage_mid = server.metric("vllm:kv_cache_usage_perc", **labels)
        if chunk.usage is not None:
            final = chunk
    n_prompt = final.usage.prompt_tokens
    assert final.usage.completion_tokens == 300
    # Uncompressed, prompt + 40 tokens would need ceil((n+40)/128) blocks; at
    # rate 0.5 about half of the compressible KVs are kept.
    uncompressed = math.ceil((n_prompt + 40) / 128)
    kept_tokens = 0.5 * (n_prompt + 40 - 32) + 32
    assert usage_mid * blocks <= math.ceil(kept_tokens / 128) + 2 < uncompressed

    after = server.wait_idle()  # usage back to 0: every block went back to the pool
    assert after[("vllm:kv_cache_usage_perc", frozenset(labels.items()))] == 0.0
    assert delta("vllm:kv_compress_compressions_total", trigger="prompt") == 1
    assert delta("vllm:kv_compress_compressions_total", trigger="interval") >= 2  # every 128 tokens
    assert delta("vllm:kv_compress_compressions_total", trigger="pressure") == 0
    assert delta("vllm:kv_compress_requests_compressed_total") == 1
    pages = delta("vllm:kv_compress_evicted_head_pages_total")
    assert pages > 0 and delta("vllm:kv_compress_evicted_kvs_total") == pages * 128
    assert delta("vllm:kv_compress_released_blocks_total") >= uncompressed // 2 - 2
    assert delta("vllm:kv_compress_eviction_time_seconds_count") >= 3
    assert delta("vllm:kv_compress_eviction_time_seconds_sum") > 0
    assert delta("vllm:kv_compress_request_kept_fraction_count") == 1
    assert 0.4 < delta("vllm:kv_compress_request_kept_fraction_sum") < 0.6
    assert delta("vllm:kv_compress_request_kept_fraction_bucket", le="0.6") == 1
    assert delta("vllm:kv_compress_request_kept_fraction_bucket", le="0.4") == 0
    # vLLM's own metrics are unaffected.
    assert delta("vllm:generation_tokens_total") == 300
    assert delta("vllm:prompt_tokens_total") == n_prompt
    assert delta("vllm:request_success_total", finished_reason="length") == 1


def test_bench_serve_against_compressed_server(server, model_path, tmp_path):
    """`vllm bench serve` (the client) runs unchanged against a compressed
    server; the server compresses its random prompts."""
    labels = {"model_name": "m", "engine": "0"}
    before = server.metric("vllm:kv_compress_compressions_total", **labels)
    out = subprocess.run(
        [VLLM, "bench", "serve", "--backend", "openai", "--base-url", server.url,
         "--model", "m", "--tokenizer", model_path, "--dataset-name", "random",
         "--random-input-len", "300", "--random-output-len", "8", "--ignore-eos",
         "--num-prompts", "4", "--num-warmups", "0", "--seed", "0", "--disable-tqdm",
         "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"],
        capture_output=True, text=True, timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 4 and result["total_output_tokens"] == 32, text[-2000:]
    assert server.metric("vllm:kv_compress_compressions_total", **labels) >= before + 4
