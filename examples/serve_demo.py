"""Serve the default model with KV-Compress and ask it one question.

Starts ``vllm serve MODEL --kv-compress-rate R`` (the plugin's flag on vLLM's
own CLI), waits for it, sends one chat request with the ``openai`` client --
a ~1500-token document with a pass key hidden in it -- prints the answer and
the KV compression the server achieved for that request, then stops the
server.

    python examples/serve_demo.py [--rate 0.3] [--port 8765] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"server not ready after {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=1500, help="length of the document")
    args = parser.parse_args()

    from kvcompress_vllm import model as default_model
    from kvcompress_vllm import tasks

    model = args.model or str(default_model.prepare_default_model())
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [
        str(vllm_bin), "serve", model,
        "--kv-compress-rate", str(args.rate),
        "--host", "127.0.0.1", "--port", str(args.port),
        "--served-model-name", "default",
        "--max-model-len", "4096",
        "--kv-cache-memory-bytes", str(512 << 20),
        "--enforce-eager",
    ]
    print("$", " ".join(cmd), flush=True)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvcompress-demo-{args.port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{args.port}/health", proc, timeout=600)
        from openai import OpenAI
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        task = tasks.passkey(tokenizer, args.tokens, depth=0.3, seed=7)
        document = task.prompt.rsplit(" What is the pass key?", 1)[0]
        client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused")
        question = "What is the pass key mentioned in the text? Answer with the number."
        resp = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": f"{document}\n\n{question}"}],
            temperature=0.0,
            max_tokens=24,
        )
        answer = resp.choices[0].message.content
        stats = (resp.model_extra or {}).get("kv_transfer_params") or {}
        kvc = stats.get("kv_compress")
        print(f"\nQ: {question}  (document: {resp.usage.prompt_tokens} tokens, "
              f"hidden key {task.answer})")
        print(f"A: {answer!r}  -> {'correct' if task.answer in answer else 'wrong'}")
        if kvc is None:
            print("KV compression: no statistics in the response (plugin not active?)")
            return 1
        print(
            f"KV compression (keep rate {kvc['rate']}): kept {kvc['kvs_kept']} of "
            f"{kvc['kvs_total']} KVs ({100 * kvc['kept_fraction']:.1f}%), "
            f"{kvc['pages_evicted']} head-pages evicted in {kvc['compressions']} "
            "compression(s)"
        )
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        print(f"(server stopped; log: {log_path})")


if __name__ == "__main__":
    sys.exit(main())
