"""Throughput of stock vLLM vs KV-Compress on four load shapes, with the two
ceilings compression cannot beat measured in the same run (default model, CPU).

Load shapes (random-token prompts, ``ignore_eos``: every request produces
exactly its output length; all requests submitted at once via ``LLM.generate``):

* ``mixed``          16 x 1152 in /  384 out  (3:1)
* ``prefill-heavy``   9 x 2560 in /  256 out  (10:1)
* ``decode-heavy``   12 x  256 in / 1024 out  (1:4, the reasoning-style load
                     where continual decode compression matters most)
* ``many-requests``  32 x  640 in /  128 out  (per-step work that grows with
                     the number of running requests)
* ``shared-prefix``  16 x 1280 in /  256 out, the first 1024 tokens the same
                     in every prompt (only with ``--shapes``; for prefix
                     caching, which every engine runs without unless a
                     ``--variant`` turns it on)

Budgets (``kv_cache_memory_bytes``, the same for every shape): *tight* holds
``--tight-tokens`` (6144) uncompressed KV tokens: a quarter of all the
requests of a shape (``mixed``, ``prefill-heavy``, ``many-requests``; 40% for
``decode-heavy``), i.e. what a keep rate of 0.25 would need if compression were
exact; *ample* holds every request of the largest shape
uncompressed -- "stock vLLM with unlimited KV memory".

Engines (one fresh process each, all shapes run in it one after another after
a warm-up): stock tight, stock ample, plugin tight, plugin ample.  The
plugin's keep rate is chosen per request (``kv_compress_rate``), so ``kvc 1``
(machinery on, nothing evicted: the overhead configuration) and ``kvc 0.25``
run in the same engine.  Stock runs load nothing of the plugin
(``VLLM_PLUGINS=`` and ``KVCOMPRESS_VLLM_AUTOPATCH=0``).

Ceilings per shape, measured in the same run:

* **prefill-only**: the same prompts with one output token, on the stock
  ample engine -- no configuration can finish before its prompts are computed;
* **stock unlimited**: stock vLLM with the ample budget.  *Fraction of
  ceiling* = plugin at the tight budget / stock unlimited.

Per row (in-process mode): output tokens/s, ratio to stock at the same budget,
fraction of the ceiling, peak running requests, preemptions, mean running
requests in decode-only steps, KV kept, and where the wall time went:
scheduling (``schedule`` + ``update_from_output``, eviction planning
included), batch building (vLLM's input preparation and attention metadata,
the plugin's page-table bookkeeping), eviction (scoring, selection,
compaction, page moves), the forward pass (the rest of the worker's step) and
other (engine loop, output processing).

Modes: ``inproc`` (EngineCore in this process, the model on both cores: the
per-step breakdown needs it) and ``mp`` (vLLM's default multi-process engine,
what ``LLM(...)`` and ``vllm serve`` users get; on this 2-vCPU machine vLLM
binds its worker to one core).  ``mp`` rows report end-to-end figures only.

    python benchmarks/throughput_sweep.py                 # both modes (~50 min here)
    python benchmarks/throughput_sweep.py --modes inproc  # (~21 min)
    python benchmarks/throughput_sweep.py --quick         # smoke run (~5 min)
    python benchmarks/throughput_sweep.py --scorer kvcompress   # the paper's metric

Every row records the plugin's scorer (``scorer`` column; the default
scorer unless ``--scorer``).

Drift: this VM's speed moves by 20-40% over minutes to an hour, and the
engines run one after another, so a single pass biases ratios between engines
that ran far apart.  ``--rounds 2`` runs every engine twice, the second time
in the reverse order, jobs inside each engine too (A B C D, D C B A), so
every job's two runs sit at mirrored times; rows average the rounds (rates
harmonically: total work / total time, so a drift linear in time cancels),
the ratios are taken between those averages and the ``*_per_round`` columns
show each round's own ratio (their spread is the noise the average works
against).  Per-round rows go to ``throughput_rounds.csv``.

Writes docs/throughput.csv and docs/throughput.png (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE / "cpu_emulation"))
sys.path.insert(0, str(HERE))
from emulate_cpu import CPUS as EMULATED_CPUS  # noqa: E402  (one home: build, capability, path)
from engine_process import emit, run_child  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    #: Leading tokens every prompt of the shape shares (a system prompt).
    shared_prefix: int = 0


SHAPES = [
    Shape("mixed", 16, 1152, 384),
    Shape("prefill-heavy", 9, 2560, 256),
    Shape("decode-heavy", 12, 256, 1024),
    Shape("many-requests", 32, 640, 128),
]
QUICK_SHAPES = [
    Shape("mixed", 4, 384, 32),
    Shape("prefill-heavy", 3, 768, 16),
    Shape("decode-heavy", 3, 256, 288),  # > 2 pages of output: decode-time compressions
    Shape("many-requests", 12, 512, 16),
]
#: Only by name (``--shapes``): prompts that share a system prompt, for
#: prefix caching (``--variant 'pc={"enable_prefix_caching": true}'``).
EXTRA_SHAPES = [
    Shape("shared-prefix", 16, 1280, 256, shared_prefix=1024),
]
PLUGIN_RATES = {"tight": [0.25, 1.0], "ample": [0.25]}


class PerfControl:
    """``perf record --control fifo:CTL,ACK`` from inside the engine process
    (``KVC_PERF_CTL=CTL,ACK``): the profile covers the jobs, not start-up."""

    def __init__(self, ctl: str | None = None, ack: str | None = None) -> None:
        self.ctl, self.ack = ctl, ack

    @classmethod
    def from_env(cls) -> "PerfControl":
        value = os.environ.get("KVC_PERF_CTL")
        return cls(*value.split(",")) if value else cls()

    def send(self, command: str) -> None:
        if self.ctl is None:
            return
        with open(self.ctl, "w") as ctl:
            ctl.write(command + "\n")
        with open(self.ack) as ack:
            ack.readline()


# --------------------------------------------------------------------------- timing
def instrument(llm):
    """Time the scheduler, the worker step and its parts (in-process engine):
    a ``wall_timers.Timers`` (``run_engine`` puts this folder on the path)."""
    from wall_timers import Timers

    core = llm.llm_engine.engine_core.engine_core
    timers = Timers()
    timers.wrap(core.scheduler, "update_from_output", "schedule")  # probe times schedule()
    timers.wrap(core.model_executor, "execute_model", "worker")
    timers.wrap(core.model_executor, "sample_tokens", "worker")
    worker = core.model_executor.driver_worker.worker
    runner = worker.model_runner
    for attr in ("_update_states", "_prepare_inputs", "_build_attention_metadata"):
        timers.wrap(runner, attr, "batch_vllm")  # build_batch runs inside the last one
    state = getattr(worker, "kvc_state", None)
    if state is not None:
        timers.wrap(state, "begin_step", "begin_step")  # includes apply_eviction
        timers.wrap(state, "apply_eviction", "eviction")
    return timers


# --------------------------------------------------------------------------- worker
def emulation_env(cpu: str) -> dict[str, str]:
    """Environment of an engine process run as on ``cpu`` (``EMULATED_CPUS``):
    benchmarks/cpu_emulation/sitecustomize.py answers torch's CPU probes as
    that CPU would, so vLLM loads that CPU's kernel library and layout.

    Inductor's cache, and vLLM's compile cache (where Inductor's goes when
    vLLM compiles the model, i.e. without ``enforce_eager``), get directories
    of their own per emulated CPU: Inductor's FX graph cache is not keyed by
    ``ATEN_CPU_CAPABILITY``, so a kernel generated natively (AVX-512: 16 int32
    lanes) was reused and compiled for AVX2 (8 lanes), which garbled vLLM's
    vocab-parallel embedding indices at tp=2."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    from vllm import envs

    emulated = EMULATED_CPUS[cpu]
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    path = os.environ.get("PYTHONPATH")
    return {
        "KVC_EMULATE_CPU": cpu,
        "PYTHONPATH": str(HERE / "cpu_emulation") + (os.pathsep + path if path else ""),
        "TORCHINDUCTOR_CACHE_DIR": f"{inductor}_emulate_{cpu}",
        "VLLM_CACHE_ROOT": f"{envs.VLLM_CACHE_ROOT}_emulate_{cpu}",
        "ATEN_CPU_CAPABILITY": emulated.aten_capability,
        "ONEDNN_MAX_CPU_ISA": emulated.onednn_isa,
        "KVCOMPRESS_CPU_ISA": emulated.our_path,
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # check_emulation's collective_rpc(callable)
    }


def check_emulation(llm, cpu: str, plugin: bool) -> None:
    """Raise unless this engine's workers really run as on ``cpu``: vLLM's
    kernel build of that CPU, torch's capability and (plugin engines) the
    plugin's kernel path, asked of each worker (``worker_cpu``)."""
    emulated = EMULATED_CPUS[cpu]
    want = (emulated.vllm_build, emulated.aten_capability,
            os.environ["KVCOMPRESS_CPU_ISA"] if plugin else None)  # that CPU's, or a --variant's
    for got in llm.collective_rpc(worker_cpu, args=(plugin,)):
        if tuple(got) != want:
            raise RuntimeError(f"--emulate-cpu {cpu}: a worker runs (vLLM's build, torch's "
                               f"capability, our path) = {tuple(got)}, not {want}")


def worker_cpu(worker, plugin: bool) -> tuple:
    """In a worker: (vLLM's kernel build, torch's CPU capability, the plugin's
    kernel path or None)."""
    import torch

    from kvcompress_vllm.attention.vllm_cpu import vllm_kernel_build

    ours = None
    if plugin:
        from kvcompress_vllm import ops

        ours = ops.cpu_isa()
    return vllm_kernel_build(), torch.backends.cpu.get_cpu_capability().lower(), ours


def run_engine(spec: dict) -> list[dict]:
    """One engine; runs every job of ``spec["jobs"]`` on it in order."""
    inproc = spec["mode"] == "inproc"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if inproc else "1"
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # No prefix caching anywhere: the plugin turns it off, and in a stock
    # engine the prefill-only job would otherwise hit the blocks cached by the
    # full run of the same prompts and measure no prefill at all.
    engine_kwargs = dict(
        enforce_eager=True, seed=0, enable_prefix_caching=False,
        max_model_len=spec["max_model_len"],
        kv_cache_memory_bytes=spec["budget_bytes"], max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
    )
    if spec["plugin"]:
        # Every job sets its own rate; no scorer named: the plugin's default
        # (benchmarks/profile_engine.py builds specs without one).
        kvc = {"rate": 1.0, "enabled": True}
        if spec.get("scorer"):
            kvc["scorer"] = spec["scorer"]
        engine_kwargs["additional_config"] = {"kv_compress": kvc}
    engine_kwargs.update(spec.get("engine_kwargs", {}))
    llm = LLM(spec["model"], **engine_kwargs)
    if spec.get("emulate_cpu"):
        check_emulation(llm, spec["emulate_cpu"], spec["plugin"])
    rec = timers = scheduler = None
    if inproc:
        from engine_probe import probe

        rec = probe(llm)
        timers = instrument(llm)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    # Warm-up: a few short requests (first-call allocations, thread pools).
    llm.generate([TokensPrompt(prompt_token_ids=list(range(100, 400)))] * 2,
                 SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    results = []
    perf = PerfControl.from_env()  # benchmarks/profile_engine.py: sample only the jobs
    perf.send("enable")
    for job in spec["jobs"]:
        shape = Shape(**job["shape"])
        if engine_kwargs.get("enable_prefix_caching"):
            # Jobs of one engine run the same prompts: each may share only
            # within itself, not hit what an earlier job left in the cache.
            llm.reset_prefix_cache()
        rng = random.Random(job["seed"])
        prefix = [rng.randrange(100, 20000) for _ in range(shape.shared_prefix)]
        prompts = [
            TokensPrompt(prompt_token_ids=prefix + [
                rng.randrange(100, 20000) for _ in range(shape.input_len - shape.shared_prefix)])
            for _ in range(shape.num_prompts)
        ]
        extra = {"kv_compress_rate": job["rate"]} if job["rate"] is not None else None
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True,
                                extra_args=extra)
        first_step = len(rec.steps) if rec else 0
        before = timers.snapshot() if timers else {}
        totals_before = asdict(scheduler.kvc_totals) if hasattr(scheduler, "kvc_totals") else {}
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        kept = [o.kv_transfer_params["kv_compress"]["kept_fraction"] for o in outs if o.kv_transfer_params]
        res = {
            "shape": shape.name, "job": job["name"], "wall_s": wall, "output_tokens": out_tokens,
            "output_tok_s": out_tokens / wall, "requests_s": len(outs) / wall,
            "mean_kept_fraction": sum(kept) / len(kept) if kept else 1.0,
        }
        if rec is not None:
            from engine_probe import EngineProbe

            window = EngineProbe(steps=rec.steps[first_step:], end=time.perf_counter())
            res.update(window.summary())
            after = timers.snapshot()
            spent = {k: after[k] - before.get(k, 0.0) for k in after}
            sched_s = spent["schedule"] + sum(
                s.schedule_s for s in rec.steps[first_step:])
            eviction_s = spent.get("eviction", 0.0)
            bookkeeping_s = spent["batch_vllm"] + spent.get("begin_step", 0.0) - eviction_s
            forward_s = spent["worker"] - spent["batch_vllm"] - spent.get("begin_step", 0.0)
            res.update(
                schedule_share=sched_s / wall, batch_share=bookkeeping_s / wall,
                eviction_share=eviction_s / wall, forward_share=forward_s / wall,
                other_share=max(0.0, 1 - (sched_s + spent["worker"]) / wall),
                prefill_share=res["prefill_s"] / wall,
            )
            if totals_before:
                totals = asdict(scheduler.kvc_totals)
                res["compressions"] = totals["compressions"] - totals_before["compressions"]
                res["blocks_released"] = totals["blocks_released"] - totals_before["blocks_released"]
        res["job"] += spec.get("label_suffix", "")
        results.append(res)
        print(f"  {spec['name']} {job['name']} {shape.name}: {res['output_tok_s']:.1f} out tok/s "
              f"in {wall:.0f} s", file=sys.stderr, flush=True)
    perf.send("disable")
    if scheduler is not None:
        results.append({"num_blocks": scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1})
    return results


def run_config(spec: dict) -> list[dict]:
    return run_child([__file__, "--worker", json.dumps(spec)], name=spec["name"],
                     stock=not spec["plugin"], env=spec.get("env"), verbose=spec.get("verbose", False))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    configs = list(dict.fromkeys(f"{r['config']} {r['budget']}" for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        width = 0.8 / len(configs)
        for k, cfg in enumerate(configs):
            vals = []
            for shape in shapes:
                row = next((r for r in rows if r["mode"] == mode and r["shape"] == shape
                            and f"{r['config']} {r['budget']}" == cfg), None)
                ceiling = next((r for r in rows if r["mode"] == mode and r["shape"] == shape
                                and r["config"] == "stock" and r["budget"] == "ample"), None)
                vals.append(row["output_tok_s"] / ceiling["output_tok_s"] if row and ceiling else 0)
            ax.bar([i + (k - len(configs) / 2 + 0.5) * width for i in range(len(shapes))], vals,
                   width=width, label=cfg)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_ylabel("output tok/s / stock with unlimited KV")
        ax.set_title(f"{mode} engine")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, 2 CPU cores: fraction of the stock-unlimited ceiling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | shape | budget | config | out tok/s | vs stock | of ceiling | wall s | prefill-only s | "
        "memory bound | peak running | preempt | mean decode batch | kept | sched | batch build | eviction | forward | other |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(r, key):
        return f"{100 * r[key]:.1f}%" if key in r else "n/a"

    def spread(r, key, fmt):  # "(lo-hi)" of the rounds' own ratios, when there are several
        vals = [float(x) for x in str(r.get(f"{key}_per_round", "")).split("/") if x]
        return f" ({fmt(min(vals))}-{fmt(max(vals))})" if len(vals) > 1 else ""

    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['shape']} | {r['budget']} | {r['config']} | {r['output_tok_s']:.1f} | "
            f"{r['vs_stock']:.2f}x{spread(r, 'vs_stock', lambda v: f'{v:.2f}')} | "
            f"{100 * r['of_ceiling']:.0f}%{spread(r, 'of_ceiling', lambda v: f'{100 * v:.0f}')} | {r['wall_s']:.1f} | "
            f"{r['prefill_only_s']:.1f} | {r['memory_bound']} | {r.get('peak_running', 'n/a')} | {r.get('preemptions', 'n/a')} | "
            + (f"{r['mean_running_decode']:.1f}" if "mean_running_decode" in r else "n/a")
            + f" | {100 * r['mean_kept_fraction']:.0f}% | {pct(r, 'schedule_share')} | "
            f"{pct(r, 'batch_share')} | {pct(r, 'eviction_share')} | {pct(r, 'forward_share')} | "
            f"{pct(r, 'other_share')} |"
        )
    return "\n".join(lines)


#: What identifies a row across rounds.
ROW_KEY = ("mode", "shape", "budget", "config")


def engine_order(items: list, rnd: int) -> list:
    """Round ``rnd`` (0-based) runs the engines -- and the jobs inside each --
    forward when even, reversed when odd: A B C D, D C B A, A B C D, ...  Over
    an even number of rounds every job's runs then have the same mean time,
    so a linear drift of the machine weighs on every job equally."""
    return list(items) if rnd % 2 == 0 else list(reversed(items))


#: Rates among the per-job fields: averaged harmonically (same work every
#: round, so that is total work / total time, and a drift linear in time cancels).
RATE_FIELDS = ("output_tok_s", "requests_s")


def average_rounds(raw: list[dict]) -> list[dict]:
    """One row per ``ROW_KEY``: numeric fields averaged over its rounds (rates
    harmonically, ``RATE_FIELDS``; times and counts arithmetically; a field
    equal in every round is kept as is), others taken from the first round;
    ``rounds`` = how many were averaged."""
    groups: dict[tuple, list[dict]] = {}
    for r in raw:
        groups.setdefault(tuple(r[k] for k in ROW_KEY), []).append(r)
    out = []
    for group in groups.values():
        row = dict(group[0])
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round":
                vals = [g[k] for g in group if k in g]
                if len(set(vals)) == 1:
                    continue  # the same in every round: kept as is (counts stay ints)
                row[k] = (len(vals) / sum(1 / v for v in vals) if k in RATE_FIELDS
                          else sum(vals) / len(vals))
        row.pop("round", None)
        row["rounds"] = len(group)
        out.append(row)
    return out


def with_ratios(raw: list[dict], shapes: list[Shape], tight_tokens: int) -> list[dict]:
    """The report rows (prefill-only runs dropped): each row's ratio to stock
    at its budget and to stock unlimited (``of_ceiling``), the prefill-only
    ceiling and the memory bound, from rows of the same mode, shape and round
    (rows without a ``round``: averaged ones)."""
    rows = []
    for r in raw:
        if r["config"] == "prefill-only":
            continue
        same = [x for x in raw if x["mode"] == r["mode"] and x["shape"] == r["shape"]
                and x.get("round") == r.get("round")]
        stock = next(x for x in same if x["config"] == "stock" and x["budget"] == r["budget"])
        ceiling = next(x for x in same if x["config"] == "stock" and x["budget"] == "ample")
        prefill = next(x for x in same if x["config"] == "prefill-only")
        shape = next(s for s in shapes if s.name == r["shape"])
        rows.append({**r, "vs_stock": r["output_tok_s"] / stock["output_tok_s"],
                     "of_ceiling": r["output_tok_s"] / ceiling["output_tok_s"],
                     "prefill_only_s": prefill["wall_s"],
                     "memory_bound": memory_bound(shape, r, tight_tokens)})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def memory_bound(shape: Shape, row: dict, tight_tokens: int) -> int:
    """Requests the budget can hold at once at the row's measured kept
    fraction: one prompt uncompressed (its prefill must complete before it is
    scored) and the others at their final compressed size."""
    if row["budget"] == "ample":
        return shape.num_prompts
    seq = shape.input_len + shape.output_len
    compressed = max(1.0, row["mean_kept_fraction"] * seq)
    fits = 1 + int(max(0, tight_tokens - shape.input_len) // compressed)
    return min(shape.num_prompts, fits)


def parse_variant(variant: str, taken: set[str]) -> tuple[bool, str, str, dict]:
    """``--variant [stock:]NAME=JSON`` -> ``(plugin, "tight", NAME, kwargs)``;
    kwargs' ``env`` (always present) maps variable names to strings.  Raises
    ValueError naming ``--variant`` for an empty, taken or malformed one."""
    label, eq, raw = variant.partition("=")
    plugin = not label.startswith("stock:")
    label = label.removeprefix("stock:")
    if not label or not eq or label in taken:
        raise ValueError(f"--variant: expected a new, non-empty [stock:]NAME=JSON (got {variant!r})")
    try:
        kwargs = json.loads(raw)
        if not isinstance(kwargs, dict):
            raise ValueError(f"expected a JSON object, got {raw!r}")
        env = kwargs.pop("env", {})
        if not isinstance(env, dict):
            raise ValueError(f"env must be an object, got {env!r}")
    except ValueError as err:
        raise ValueError(f"--variant {variant!r}: {err}") from None
    return plugin, "tight", label, dict(kwargs, env={k: str(v) for k, v in env.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small smoke run (~5 min)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--modes", default="inproc,mp", help="inproc, mp or both (comma-separated)")
    parser.add_argument("--shapes", default=None, help="subset of shape names (comma-separated)")
    parser.add_argument("--mp-shapes", default=None,
                        help="shapes run in mp mode (default: the same as inproc)")
    parser.add_argument("--scorer", default=None,
                        help="the plugin engines' scorer (default: the plugin's default scorer)")
    parser.add_argument("--tight-tokens", type=int, default=6144,
                        help="the tight budget holds this many uncompressed KV tokens")
    parser.add_argument("--out-dir", default=str(HERE.parent / "docs"))
    parser.add_argument("--verbose", action="store_true", help="show the engines' stderr")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every engine this many times, alternating forward and reverse "
                        "order (2: A B C D D C B A), and average (see Drift above)")
    parser.add_argument("--emulate-cpu", choices=tuple(EMULATED_CPUS), default=None,
                        help="run every engine as on an older x86 CPU: avx2 (no AVX-512: vLLM's "
                        "_C_AVX2, torch's and oneDNN's AVX2 kernels, the plugin's avx2 path) or "
                        "avx512 (AVX-512 without BF16: vLLM's _C_AVX512, the plugin's avx512 path); "
                        "benchmarks/cpu_emulation/sitecustomize.py.  Same cores: the instruction "
                        "sets are the older CPU's, the clocks, caches and memory this machine's")
    parser.add_argument("--variant", action="append", default=[], metavar="[stock:]NAME=JSON",
                        help="also run the plugin at the tight budget (rate 0.25) with these extra "
                        "engine arguments, e.g. 'optimistic={\"scheduler_reserve_full_isl\": false}' "
                        "(admit a request once its first chunk fits, not its whole prompt) or "
                        "'bs32={\"block_size\": 32}' (finer pages); rows are labelled 'kvc 0.25 NAME'. "
                        "With the prefix 'stock:' the engine is stock vLLM at the tight budget instead, "
                        "e.g. 'stock:b48={\"num_gpu_blocks_override\": 49}' (stock with the plugin's "
                        "block count); rows are labelled 'stock NAME'. Variants run in every mode of --modes. "
                        "A key \"env\" sets environment variables of that engine's process instead of an "
                        "engine argument, e.g. 'own={\"env\": {\"KVCOMPRESS_CPU_PREFILL\": \"own\"}}' (every "
                        "request in the plugin's own page layout and kernels)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: engine passes must be >= 1 (got {args.rounds})")
    if args.worker:
        emit(run_engine(json.loads(args.worker)))
        return 0

    from kvcompress_vllm.model import kv_budget_bytes, prepare_default_model

    model = args.model or str(prepare_default_model())
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = [s for s in shapes + ([] if args.quick else EXTRA_SHAPES) if s.name in wanted]
    tight_tokens = 1536 if args.quick else args.tight_tokens
    modes = ["inproc"] if args.quick else args.modes.split(",")
    max_seq = max(s.input_len + s.output_len for s in shapes)
    max_model_len = max(1024, -(-(max_seq + 16) // 128) * 128)
    max_num_seqs = 64
    budgets = {
        "tight": kv_budget_bytes(model, 1, tight_tokens, max_num_seqs=max_num_seqs,
                                 max_model_len=max_model_len),
        "ample": max(
            kv_budget_bytes(model, s.num_prompts, s.input_len + s.output_len,
                            max_num_seqs=max_num_seqs, max_model_len=max_model_len)
            for s in shapes
        ),
    }

    def jobs_for(plugin: bool, budget: str, mode: str) -> list[dict]:
        jobs = []
        for i, shape in enumerate(shapes):
            if mode == "mp" and args.mp_shapes and shape.name not in args.mp_shapes.split(","):
                continue
            common = dict(shape=asdict(shape), seed=i)
            if not plugin:
                jobs.append(dict(common, name="stock", rate=None, max_tokens=shape.output_len))
                if budget == "ample":
                    jobs.append(dict(common, name="prefill-only", rate=None, max_tokens=1))
            else:
                for rate in PLUGIN_RATES[budget]:
                    jobs.append(dict(common, name=f"kvc {rate:g}", rate=rate, max_tokens=shape.output_len))
        return jobs

    from kvcompress_vllm.config import KVCompressConfig, KVCompressConfigError, check_scorer

    try:  # the plugin engines' scorer, passed to them and recorded per row
        scorer = check_scorer(args.scorer, "--scorer") if args.scorer else KVCompressConfig.scorer
    except KVCompressConfigError as err:
        parser.error(str(err))
    if args.emulate_cpu:  # every engine process (run_config copies this environment)
        os.environ.update(emulation_env(args.emulate_cpu))
    cpu = args.emulate_cpu or "native"
    raw: list[dict] = []
    sweep_start = time.perf_counter()
    blocks = {}
    engines = [(plugin, budget, "", {}) for plugin in (False, True) for budget in ("tight", "ample")]
    for variant in args.variant:
        try:
            engines.append(parse_variant(variant, {e[2] for e in engines}))
        except ValueError as err:
            parser.error(str(err))
    for mode in modes:
        for rnd in range(args.rounds):
            for plugin, budget, label, extra_kwargs in engine_order(engines, rnd):
                name = f"{mode}/{'kvc' if plugin else 'stock'}/{budget}" + (f"/{label}" if label else "")
                if args.rounds > 1:
                    name += f"/round{rnd + 1}"
                jobs = jobs_for(plugin, budget, mode)
                if label and plugin:
                    jobs = [j for j in jobs if j["rate"] == 0.25]
                jobs = engine_order(jobs, rnd)  # mirrored inside the engine too
                engine_kwargs = dict(extra_kwargs)
                spec = dict(
                    name=name, mode=mode, plugin=plugin, model=model, budget_bytes=budgets[budget],
                    max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=2048, jobs=jobs, verbose=args.verbose,
                    env=engine_kwargs.pop("env", {}),
                    engine_kwargs=engine_kwargs, label_suffix=f" {label}" if label else "",
                    scorer=scorer, emulate_cpu=args.emulate_cpu,
                )
                t0 = time.perf_counter()
                results = run_config(spec)
                if results and "num_blocks" in results[-1]:
                    blocks[name] = results.pop()["num_blocks"]
                for res in results:
                    raw.append({"mode": mode, "budget": budget, "round": rnd + 1,
                                "config": res["job"], "scorer": scorer if plugin else "",
                                "cpu": cpu, **res})
                print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)

    per_round = with_ratios(raw, shapes, tight_tokens)
    rows = with_ratios(average_rounds(raw), shapes, tight_tokens)
    for r in rows:  # each round's own ratios: their spread is the drift between engines
        mine = [x for x in per_round if all(x[k] == r[k] for k in ROW_KEY)]
        for k in ("vs_stock", "of_ceiling"):
            r[f"{k}_per_round"] = "/".join(f"{x[k]:.3f}" for x in sorted(mine, key=lambda x: x["round"]))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    csv_path = out_dir / f"throughput{suffix}.csv"
    write_csv(csv_path, rows)
    if args.rounds > 1:
        write_csv(out_dir / f"throughput{suffix}_rounds.csv", per_round)
    plot(rows, out_dir / f"throughput{suffix}.png")
    print(f"\nbudgets: tight = {budgets['tight'] / 2**20:.0f} MiB ({tight_tokens} KV tokens), "
          f"ample = {budgets['ample'] / 2**20:.0f} MiB; blocks per engine: {blocks}")
    print("shapes: " + ", ".join(f"{s.name} {s.num_prompts} x {s.input_len}/{s.output_len}" for s in shapes))
    print(f"plugin scorer: {scorer}")
    print(table(rows))
    print(f"\nwrote {csv_path} (sweep wall time {(time.perf_counter() - sweep_start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
