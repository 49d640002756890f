"""`vllm serve MODEL --kv-compress-rate R` through vLLM's own console script,
and `vllm bench throughput --kv-compress-rate R`."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvcompress_vllm import tasks

pytestmark = pytest.mark.engine

VLLM = str(Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    cmd = [
        VLLM, "serve", model_path, "--kv-compress-rate", "0.5",
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "m",
        "--max-model-len", "4096", "--kv-cache-memory-bytes", str(256 << 20),
        "--enforce-eager",
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"})
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(1)
        yield port, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{server[0]}/v1", api_key="x", max_retries=0)


def test_chat_request_is_compressed(client, server, model_path):
    from transformers import AutoTokenizer

    task = tasks.passkey(AutoTokenizer.from_pretrained(model_path), 1200, depth=0.4, seed=3)
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
    assert "KV-Compress enabled" in server[1].read_text()


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


def test_vllm_cli_lists_flag():
    for sub in (["serve"], ["bench", "throughput"], ["bench", "latency"]):
        out = subprocess.run([VLLM, *sub, "--help=kv-compress-rate"], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "--kv-compress-rate" in out.stdout and "KEPT" in out.stdout


def test_bench_throughput_runs_with_flag(model_path):
    out = subprocess.run(
        [VLLM, "bench", "throughput", "--model", model_path, "--kv-compress-rate", "0.5",
         "--dataset-name", "random", "--random-input-len", "400", "--random-output-len", "8",
         "--num-prompts", "4", "--max-model-len", "1024", "--enforce-eager",
         "--kv-cache-memory-bytes", str(128 << 20)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"},
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "Throughput:" in text and "KV-Compress enabled" in text
