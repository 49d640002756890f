"""`vllm serve` with the plugin installed but KV compression off: per-request
KV-Compress options are a 400 (not a silent no-op), the server stays stock
(no kv_compress metrics or statistics)."""

import json

import pytest

from server_harness import serving

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    with serving(
        model_path,
        ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(128 << 20),
         "--enforce-eager"],
        tmp_path_factory.mktemp("stock") / "serve.log",
    ) as srv:
        yield srv


def _post(server, path, body):
    import httpx

    r = httpx.post(server.url + path, content=json.dumps(body),
                   headers={"Content-Type": "application/json"}, timeout=120)
    return r.status_code, r.json()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("xargs", [{"kv_compress_rate": 0.5}, {"kv_compress_scorer": "keydiff"},
                                   {"max_cache_tokens": 256}, {"protected_window": 8},
                                   {"kv_compress_allocation": "uniform"}])
def test_options_without_compression_are_400(server, xargs, stream):
    status, body = _post(server, "/v1/chat/completions",
                         {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                          "max_tokens": 2, "stream": stream, "vllm_xargs": xargs})
    assert status == 400, body
    err = body["error"]
    assert err["param"] == "extra_args" and "not enabled" in err["message"], err
    assert "--kv-compress-rate" in err["message"]


def test_stock_server_serves_and_exposes_no_kv_compress_state(server):
    status, body = _post(server, "/v1/chat/completions",
                         {"model": "m", "messages": [{"role": "user", "content": "Say hello."}],
                          "max_tokens": 4, "temperature": 0.0,
                          "vllm_xargs": {"unrelated_key": 1}})  # other xargs pass through
    assert status == 200 and body["choices"][0]["message"]["content"].strip(), body
    assert not (body.get("kv_transfer_params") or {}).get("kv_compress")
    text = server.get("/metrics")
    assert "vllm:kv_cache_usage_perc" in text and "vllm:generation_tokens_total" in text
    assert "kv_compress" not in text
    assert "KV-Compress enabled" not in server.log_tail(10**7)
