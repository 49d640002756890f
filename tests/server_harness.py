"""A real `vllm serve` process for the server tests: free loopback port,
bounded start-up, /metrics parsing, always stopped at the end.

Each test module starts at most one server (module-scoped fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VLLM = str(Path(sys.executable).with_name("vllm"))
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read().decode()

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """/metrics as {(sample name, labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(self.get("/metrics")):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        found = [v for (n, ls), v in self.metrics().items() if n == name and want <= ls]
        if not found:
            raise KeyError(f"{name}{labels} not on /metrics")
        return sum(found)

    def wait_idle(self, timeout: float = 60) -> dict:
        """Wait until no request runs or waits; returns the last scrape."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            running = sum(v for (n, _), v in m.items() if n == "vllm:num_requests_running")
            waiting = sum(v for (n, _), v in m.items() if n == "vllm:num_requests_waiting")
            usage = sum(v for (n, _), v in m.items() if n == "vllm:kv_cache_usage_perc")
            if running == 0 and waiting == 0 and usage == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server not idle after {timeout}s: running={running} waiting={waiting} "
                    f"kv_cache_usage_perc={usage}"
                )
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM the whole process group, SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        # Engine/worker children are in the same group: make sure none outlives us.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def start_server(model_path: str, args: list[str], log: Path, env: dict | None = None,
                 attempts: int = 3) -> Server:
    """``vllm serve MODEL --served-model-name m ARGS`` on a free loopback port;
    returns once /health answers (raises with the log tail otherwise).  The
    port is free when picked but only bound by vLLM tens of seconds later:
    if something took it meanwhile, start again on another."""
    for attempt in range(attempts):
        try:
            return _start_server(model_path, args, log, env)
        except RuntimeError as e:
            if "Address already in use" not in str(e) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _start_server(model_path: str, args: list[str], log: Path, env: dict | None) -> Server:
    port = free_port()
    cmd = [VLLM, "serve", model_path, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "m", *args]
    full_env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO", **(env or {})}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env=full_env)
    server = Server(proc, port, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n"
                                   f"{server.log_tail(10**6)[-6000:]}"
                                   + ("\nAddress already in use" if "Address already in use"
                                      in server.log_tail(10**6) else ""))
            try:
                server.get("/health", timeout=2)
                return server
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not start in {START_TIMEOUT_S}s:\n"
                                       f"{server.log_tail()}") from None
                time.sleep(0.5)
    except BaseException:
        server.stop(timeout=10)
        raise


@contextlib.contextmanager
def serving(model_path: str, args: list[str], log: Path, env: dict | None = None):
    """``start_server`` for the length of a ``with`` block (a module fixture
    yields inside it); the server is stopped however the block ends."""
    server = start_server(model_path, args, log, env)
    try:
        yield server
    finally:
        server.stop()


async def gather_streams(url: str, bodies: list[dict], *, timeout: float = 420,
                         disconnect_after: dict[int, int] | None = None) -> list:
    """``stream_chat`` every body concurrently over one ``httpx.AsyncClient``
    (connection limit above the number of streams); results in body order.
    ``disconnect_after``: body index -> chunks after which that client hangs up."""
    import httpx

    limits = httpx.Limits(max_connections=max(64, len(bodies)))
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        return await asyncio.gather(*[
            stream_chat(client, url, body, timeout=timeout,
                        disconnect_after=(disconnect_after or {}).get(i))
            for i, body in enumerate(bodies)
        ])


def chat_prompt_tokens(tokenizer, messages: list[dict]) -> int:
    """Prompt tokens of a chat request, counted like vLLM's chat endpoint
    (render the template, then tokenize without adding special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def exact_chat_messages(tokenizer, target: int, seed: int) -> tuple[list[dict], str]:
    """Chat messages whose templated prompt is exactly ``target`` tokens: a
    passkey document padded with one-token words.  Returns (messages, key)."""
    from kvcompress_vllm import tasks

    question = "\n\nWhat is the pass key? Answer with the number."
    overhead = chat_prompt_tokens(tokenizer, [{"role": "user", "content": question}])
    body_len = max(0, target - overhead - 24)
    if body_len >= 48:
        task = tasks.passkey(tokenizer, body_len, depth=0.5, seed=seed)
        doc, key = task.prompt.rsplit(" What is the pass key?", 1)[0], task.answer
    else:
        key = str(10000 + seed)
        doc = f"The pass key is {key}."
    pad = 0
    for _ in range(50):
        content = doc + " ok" * pad + question
        messages = [{"role": "user", "content": content}]
        n = chat_prompt_tokens(tokenizer, messages)
        if n == target:
            return messages, key
        pad += target - n
        if pad < 0:
            doc, pad = doc[: len(doc) // 2], 0
    raise RuntimeError(f"could not build a chat prompt of exactly {target} tokens (last {n})")


@dataclass
class StreamResult:
    status: int
    text: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    usage: dict | None = None
    kv_transfer_params: dict | None = None
    done: bool = False  # saw "data: [DONE]"
    error: str | None = None  # error body, error event, or the exception that ended the stream
    disconnected: bool = False  # we closed the connection on purpose


async def stream_chat(client, url: str, body: dict, *, disconnect_after: int | None = None,
                      timeout: float = 300, first_chunk=None,
                      first_chunk_count: int = 1) -> StreamResult:
    """POST a streaming chat completion with an ``httpx.AsyncClient``; parse
    the SSE stream.  ``disconnect_after``: close the connection after that
    many content chunks (a client going away mid-stream).  ``first_chunk``: an
    ``asyncio.Event`` set once ``first_chunk_count`` content chunks arrived."""
    import asyncio
    import json

    import httpx

    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    result = StreamResult(status=0)
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                result = StreamResult(status=r.status_code)
                if r.status_code != 200:
                    result.error = (await r.aread()).decode(errors="replace")
                    return result
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        result.done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        result.error = json.dumps(event["error"])
                        continue
                    for choice in event.get("choices", ()):
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            result.text += delta["content"]
                            result.chunks += 1
                            if first_chunk is not None and result.chunks >= first_chunk_count:
                                first_chunk.set()
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
                    if event.get("usage"):
                        result.usage = event["usage"]
                    if event.get("kv_transfer_params"):
                        result.kv_transfer_params = event["kv_transfer_params"]
                    if disconnect_after is not None and result.chunks >= disconnect_after:
                        result.disconnected = True
                        break  # leaving the block closes the connection
                return result
    except (httpx.HTTPError, TimeoutError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result


def coherent(text: str) -> bool:
    """Readable model output: non-empty, printable, mostly letters/digits/
    spaces/punctuation, no decoding garbage."""
    if not text.strip() or "\ufffd" in text:
        return False
    ok = sum(ch.isalnum() or ch.isspace() or ch in ".,;:!?'\"()-" for ch in text)
    return ok / len(text) >= 0.9 and any(ch.isalnum() for ch in text)


def wait_group_gone(pgid: int, timeout: float = 15) -> list[str]:
    """Wait until no process of group ``pgid`` is left; returns the command
    lines of the ones still there after ``timeout`` (empty = all gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getpgid(int(pid)) != pgid:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
            if state != "Z":
                left.append(f"{pid} [{state}] {cmd}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
