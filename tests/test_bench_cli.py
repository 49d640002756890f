"""`vllm bench throughput --kv-compress-rate R` end to end, and the flag in
vLLM's CLI help (`vllm bench serve` against a compressed server is in
test_server.py, which owns a server)."""

import json
import os
import subprocess

import pytest

from server_harness import VLLM
from subproc import run

pytestmark = pytest.mark.engine


def test_vllm_cli_lists_flag():
    # The three CLIs start side by side (each is mostly vLLM's import time).
    procs = {sub: subprocess.Popen([VLLM, *sub, "--help=kv-compress-rate"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
             for sub in (("serve",), ("bench", "throughput"), ("bench", "latency"))}
    try:
        for sub, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, (sub, stderr[-2000:])
            assert "--kv-compress-rate" in stdout and "KEPT" in stdout, sub
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def test_bench_throughput_runs_with_flag(model_path, tmp_path):
    """The offline benchmark with vLLM's stats logging on (its default): the
    metrics payload is consumed before vLLM's own logging stat logger."""
    out = run(
        [VLLM, "bench", "throughput", "--model", model_path, "--kv-compress-rate", "0.5",
         "--dataset-name", "random", "--random-input-len", "400", "--random-output-len", "8",
         "--num-prompts", "4", "--max-model-len", "1024", "--enforce-eager",
         "--kv-cache-memory-bytes", str(128 << 20),
         "--output-json", str(tmp_path / "t.json")],
        timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"},
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "Throughput:" in text and "KV-Compress enabled" in text
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["num_requests"] == 4
