"""Serving-cluster benchmark: stock vLLM vs KV-Compress at the same KV memory,
driven by vLLM's own load generator (``vllm bench serve``).

Local mode (default) starts, for each configuration, one deployment of
``--replicas`` data-parallel engine cores behind one ``vllm serve`` (stock:
the plugin not loaded, ``VLLM_PLUGINS=``; ``kvc R``: ``--kv-compress-rate R``),
each replica with ``--kv-bytes`` of KV cache, and sweeps the request rate.
Remote mode (``--base-url URL[,URL...]``) measures an existing deployment, one
``vllm bench serve`` per URL in parallel, aggregated (throughputs summed,
latency percentiles taken as the worst URL's).  Every point records output
tokens/s, requests/s, TTFT/TPOT/ITL percentiles and the peak
``vllm:kv_cache_usage_perc`` of every replica (scraped from ``/metrics``
while the load runs).  The crossover is the lowest request rate at which the
compressed deployment's output throughput exceeds stock's.

    python benchmarks/cluster_bench.py                 # ~15 min here
    python benchmarks/cluster_bench.py --quick         # smoke run (~3 min; one API server)
    python benchmarks/cluster_bench.py --base-url http://h1:8000,http://h2:8000 \\
        --model MODEL --label my-cluster               # an existing deployment

Writes ``cluster<tag>.csv`` / ``cluster<tag>.png`` into ``--out-dir`` (docs/).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
VLLM = str(Path(sys.executable).with_name("vllm"))
LATENCY_KEYS = [
    f"{stat}_{metric}_ms"
    for metric in ("ttft", "tpot", "itl")
    for stat in ("median", "p99")
]
RANGE_RATIO = 0.25
USAGE_RE = re.compile(r'^vllm:kv_cache_usage_perc\{([^}]*)\}\s+([0-9.eE+-]+)', re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """One ``vllm serve`` with N data-parallel replicas on a loopback port."""

    def __init__(self, args, rate: float | None, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            VLLM, "serve", args.model, "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", "m", "--data-parallel-size", str(args.replicas),
            # random prompts reach input_len * (1 + RANGE_RATIO) tokens
            "--max-model-len", str(int(args.input_len * (1 + RANGE_RATIO)) + args.output_len + 64),
            "--kv-cache-memory-bytes", str(args.kv_bytes), "--max-num-seqs", str(args.max_num_seqs),
            "--enforce-eager",
        ]
        if args.api_server_count is not None:
            cmd += ["--api-server-count", str(args.api_server_count)]
        env = dict(os.environ)
        if rate is None:
            env["VLLM_PLUGINS"] = ""  # stock vLLM: the plugin is not loaded at all
            env["KVCOMPRESS_VLLM_AUTOPATCH"] = "0"
        else:
            cmd += ["--kv-compress-rate", str(rate)]
        self.log = log_dir / f"serve-{'stock' if rate is None else rate}.log"
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become ready") from None
                time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()


class UsageScraper(threading.Thread):
    """Peak ``vllm:kv_cache_usage_perc`` per engine label of each URL."""

    def __init__(self, urls: list[str], period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.urls, self.period = urls, period
        self.peak: dict[str, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for i, url in enumerate(self.urls):
                try:
                    with urllib.request.urlopen(f"{url}/metrics", timeout=2) as r:
                        text = r.read().decode()
                except OSError:
                    continue
                for labels, value in USAGE_RE.findall(text):
                    engine = re.search(r'engine="([^"]*)"', labels)
                    key = f"{i}:{engine.group(1) if engine else '0'}"
                    self.peak[key] = max(self.peak.get(key, 0.0), float(value))
            self._halt.wait(self.period)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join()
        return self.peak


def bench_one(url: str, args, request_rate: float, num_prompts: int, out: Path) -> dict:
    """One ``vllm bench serve`` run; returns its saved JSON result."""
    cmd = [
        VLLM, "bench", "serve", "--backend", "vllm", "--base-url", url, "--endpoint",
        "/v1/completions", "--model", "m", "--served-model-name", "m",
        "--tokenizer", args.tokenizer or args.model,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--random-range-ratio", str(RANGE_RATIO),
        "--num-prompts", str(num_prompts), "--request-rate", str(request_rate),
        "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl",
        "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(out.parent),
        "--result-filename", out.name, "--ready-check-timeout-sec", "0",
    ]
    env = {**os.environ, "VLLM_PLUGINS": "", "KVCOMPRESS_VLLM_AUTOPATCH": "0"}
    proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{proc.stdout[-3000:]}")
    return json.loads(out.read_text())


def measure(urls: list[str], args, request_rate: float, tmp: Path, tag: str) -> dict:
    """Load every URL at ``request_rate / len(urls)`` at once; aggregate."""
    scraper = UsageScraper(urls)
    scraper.start()
    per_url = max(1, args.num_prompts // len(urls))
    rate_each = request_rate / len(urls)
    with ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(
            lambda iu: bench_one(iu[1], args, rate_each, per_url, tmp / f"{tag}-{iu[0]}.json"),
            enumerate(urls)))
    peak = scraper.stop()
    failed = per_url * len(urls) - sum(r["completed"] for r in results)
    if failed:
        print(f"WARNING: {failed} of {per_url * len(urls)} requests failed at "
              f"{request_rate} req/s; throughput counts completed requests only", flush=True)
    row = {
        "output_tok_s": sum(r["output_throughput"] for r in results),
        "request_s": sum(r["request_throughput"] for r in results),
        "completed": sum(r["completed"] for r in results),
        "duration_s": max(r["duration"] for r in results),
    }
    for key in LATENCY_KEYS:
        row[key] = max(r.get(key, float("nan")) for r in results)
    row["peak_kv_usage_per_replica"] = " ".join(
        f"{k}={100 * v:.0f}%" for k, v in sorted(peak.items()))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one rate, few prompts")
    parser.add_argument("--model", default=None, help="default: the project's default model")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--replicas", type=int, default=2, help="data-parallel engine cores")
    parser.add_argument("--configs", default="stock,0.25",
                        help="comma list: 'stock' and/or keep rates")
    parser.add_argument("--request-rates", default="0.5,2,inf")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=1500)
    parser.add_argument("--output-len", type=int, default=192)
    parser.add_argument("--kv-bytes", type=int, default=None,
                        help="KV cache bytes per replica (default: room for 3 uncompressed "
                        "requests of the workload)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--api-server-count", type=int, default=None,
                        help="API server processes of each deployment (default: vLLM's, one "
                        "per replica; --quick: 1, which starts ~10 s sooner here)")
    parser.add_argument("--base-url", default=None,
                        help="measure an existing deployment (comma list of URLs)")
    parser.add_argument("--label", default="remote", help="config name for --base-url")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out-dir", default=str(HERE.parent / "docs"))
    args = parser.parse_args()

    from tqdm import tqdm

    from kvcompress_vllm.model import kv_budget_bytes, prepare_default_model

    if args.quick:
        args.num_prompts, args.input_len, args.output_len = 8, 600, 32
        args.request_rates = "inf"
        args.tag = args.tag or "_quick"
        if args.api_server_count is None:
            args.api_server_count = 1
    args.model = args.model or str(prepare_default_model())
    if args.kv_bytes is None and not args.base_url:
        args.kv_bytes = kv_budget_bytes(args.model, 3, args.input_len + args.output_len)
    rates = [float(r) for r in args.request_rates.split(",")]
    configs = [args.label] if args.base_url else args.configs.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmpdir:
        tmp = Path(tmpdir)
        bar = tqdm(total=len(configs) * len(rates), desc="cluster bench", unit="point")
        for config in configs:
            deployment = None
            if args.base_url:
                urls = args.base_url.split(",")
            else:
                rate = None if config == "stock" else float(config)
                bar.set_postfix_str(f"starting {config} x{args.replicas}")
                deployment = Deployment(args, rate, tmp)
                deployment.wait_ready()
                urls = [deployment.url]
            try:
                for request_rate in rates:
                    bar.set_postfix_str(f"{config} @ {request_rate} req/s")
                    row = measure(urls, args, request_rate, tmp, f"{config}-{request_rate}")
                    rows.append({"config": config, "replicas": args.replicas,
                                 "request_rate": request_rate, **row})
                    bar.update()
            finally:
                if deployment is not None:
                    deployment.stop()
        bar.close()

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"cluster{args.tag}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out_dir / f"cluster{args.tag}.png")
    print_table(rows, args)
    print(f"\nwrote {csv_path}")
    return 0


def print_table(rows: list[dict], args) -> None:
    print(f"\n{args.replicas} replica(s), {args.kv_bytes} KV bytes each, "
          f"{args.num_prompts} prompts of ~{args.input_len} in / {args.output_len} out")
    print("| config | req/s offered | out tok/s | req/s | TTFT p50/p99 ms | TPOT p50/p99 ms "
          "| ITL p50/p99 ms | peak KV usage per replica |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['config']} | {r['request_rate']:g} | {r['output_tok_s']:.1f} | "
              f"{r['request_s']:.2f} | {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
              f"{r['median_tpot_ms']:.0f} / {r['p99_tpot_ms']:.0f} | "
              f"{r['median_itl_ms']:.0f} / {r['p99_itl_ms']:.0f} | {r['peak_kv_usage_per_replica']} |")
    stock = {r["request_rate"]: r for r in rows if r["config"] == "stock"}
    for config in sorted({r["config"] for r in rows} - {"stock"}):
        ratios = [(r["request_rate"], r["output_tok_s"] / stock[r["request_rate"]]["output_tok_s"])
                  for r in rows if r["config"] == config and r["request_rate"] in stock]
        if not ratios:
            continue
        print(f"{config} / stock output tok/s: " +
              ", ".join(f"{rate:g} req/s: {ratio:.2f}x" for rate, ratio in ratios))
        cross = next((rate for rate, ratio in ratios if ratio > 1.0), None)
        print(f"crossover ({config} beats stock) at: "
              f"{'none in the sweep' if cross is None else f'{cross:g} req/s'}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for config in sorted({r["config"] for r in rows}):
        pts = [r for r in rows if r["config"] == config]
        xs = list(range(len(pts)))
        labels = [f"{r['request_rate']:g}" for r in pts]
        axes[0].plot(xs, [r["output_tok_s"] for r in pts], marker="o", label=config)
        axes[1].plot(xs, [r["p99_ttft_ms"] / 1000 for r in pts], marker="o", label=config)
        for ax in axes:
            ax.set_xticks(xs, labels)
    axes[0].set_ylabel("output tokens/s (all replicas)")
    axes[1].set_ylabel("TTFT p99 (s)")
    for ax in axes:
        ax.set_xlabel("offered request rate (req/s; inf = all at once)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Serving cluster: stock vLLM vs KV-Compress at the same KV memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
