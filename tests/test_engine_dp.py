"""Data parallelism: ``vllm serve --data-parallel-size 2`` (one API server,
two engine cores, each with its own ``KVCompressScheduler`` and worker) with
per-request options and statistics across replicas."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

VLLM = str(Path(sys.executable).with_name("vllm"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    from kvcompress_vllm.model import build_random_model

    model = str(build_random_model("tiny-gqa4"))
    port = _free_port()
    log = tmp_path_factory.mktemp("dp") / "serve.log"
    cmd = [
        VLLM, "serve", model, "--kv-compress-rate", "0.25", "--data-parallel-size", "2",
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "m",
        "--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 << 20),
        "--max-num-seqs", "16", "--enforce-eager",
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


def test_dp2_serves_and_compresses_on_both_replicas(dp_server):
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    port, log = dp_server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    prompt = [(i * 37) % 20000 + 100 for i in range(700)]
    rates = [0.25, 0.5, 0.125, 1.0] * 4

    def one(rate):
        resp = client.completions.create(
            model="m", prompt=prompt, max_tokens=6, temperature=0.0,
            extra_body={"vllm_xargs": {"kv_compress_rate": rate}, "ignore_eos": True})
        return rate, resp.model_extra["kv_transfer_params"]["kv_compress"], resp.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, rates))
    assert all(text for _, _, text in results)
    for rate, stats, _ in results:
        assert stats["rate"] == rate
        if rate < 1.0:
            assert stats["compressions"] >= 1 and stats["kept_fraction"] < rate + 0.2
        else:
            assert stats["compressions"] == 0
    text = log.read_text()
    # Both engine cores run the plugin's worker ...
    assert text.count("KV-Compress: 4 layers x 4 KV heads") >= 2, text[-3000:]
    # ... and both served requests (vLLM's own per-engine counters); every
    # request with rate < 1 reported compressions above, so both compressed.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    served = {}
    for line in metrics.splitlines():
        if line.startswith("vllm:request_success_total{"):
            engine = line.split('engine="', 1)[1].split('"', 1)[0]
            served[engine] = served.get(engine, 0.0) + float(line.rsplit(" ", 1)[1])
    assert set(served) == {"0", "1"} and all(v > 0 for v in served.values()), served
