"""Smoke runs of the benchmarks' --quick modes (no timing assertions: speed
goals live in benchmarks/ and docs/, never in tests)."""

import csv
import re
import sys
from pathlib import Path

import pytest
from subproc import run

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parent.parent


def _bench(script: str, *args: str, timeout: float = 600):
    """``benchmarks/<script> --quick *args`` in a process group of its own
    (killed whole on a timeout: ``subproc.run``)."""
    return run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], timeout=timeout)


def _quick(script: str, *args: str):
    """The ``make_cmd`` of a ``background`` job (engine-free quick forms):
    ``benchmarks/<script> --quick *args``."""
    return lambda _dir: ([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], None)


def _run(script: str, out_dir: Path, *extra: str):
    proc = _bench(script, "--out-dir", str(out_dir), *extra, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_throughput_sweep_quick(tmp_path):
    # A plugin variant run with an environment variable (every request in the
    # plugin's own page layout and kernels), rows labelled "kvc 0.25 own"
    # (stock variants, "stock:NAME=...", are parsed in test_sweep_rounds.py;
    # they run the same engine path as the stock rows). One of the four
    # shapes (--shapes; keeps the suite's time down: each shape is five
    # engines and their prefill-only runs).
    proc = _run("throughput_sweep.py", tmp_path, "--shapes", "decode-heavy",
                "--variant", 'own={"env": {"KVCOMPRESS_CPU_PREFILL": "own"}}')
    rows = list(csv.DictReader(open(tmp_path / "throughput_quick.csv")))
    shapes = {"decode-heavy"}
    assert {(r["shape"], r["budget"], r["config"]) for r in rows} == {
        (s, b, c) for s in shapes for b, c in [
            ("tight", "stock"), ("tight", "kvc 1"), ("tight", "kvc 0.25"),
            ("ample", "stock"), ("ample", "kvc 0.25"), ("tight", "kvc 0.25 own")]
    }
    # every engine's block count is reported
    blocks = dict(re.findall(r"'(inproc/[^']+)': (\d+)", proc.stdout))
    assert set(blocks) == {"inproc/stock/tight", "inproc/stock/ample", "inproc/kvc/tight",
                           "inproc/kvc/ample", "inproc/kvc/tight/own"}, blocks
    from kvcompress_vllm.config import KVCompressConfig

    # plugin rows record the scorer they ran (the default one here)
    assert {r["scorer"] for r in rows if not r["config"].startswith("stock")} == {KVCompressConfig.scorer}
    for r in rows:
        assert float(r["output_tok_s"]) > 0 and int(r["output_tokens"]) > 0
        assert 0 < float(r["prefill_share"]) < 1
        # both ceilings are measured for every row (the prefill-only run is a
        # separate timing, so it is not compared with wall_s: the quick shapes'
        # outputs are short enough for noise to put it either side)
        assert float(r["prefill_only_s"]) > 0
        assert float(r["of_ceiling"]) > 0
        shares = [float(r[k]) for k in ("schedule_share", "batch_share", "eviction_share",
                                         "forward_share", "other_share")]
        assert all(x >= 0 for x in shares) and 0.9 < sum(shares) < 1.1, shares
        if r["config"] == "stock" and r["budget"] == "ample":
            assert float(r["of_ceiling"]) == 1.0
    compressed = [r for r in rows if r["config"] in ("kvc 0.25", "kvc 0.25 own")]
    assert all(float(r["mean_kept_fraction"]) < 0.6 for r in compressed)
    assert all(int(r["compressions"]) > 0 and float(r["eviction_share"]) > 0 for r in compressed)
    assert (tmp_path / "throughput_quick.png").stat().st_size > 0
    assert "| inproc | decode-heavy | tight | kvc 0.25 |" in proc.stdout


def test_priority_thrash_quick(tmp_path):
    proc = _run("priority_thrash.py", tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "priority_thrash_quick.csv")))
    assert [r["config"] for r in rows] == ["stock:priority", "kvc0.25:priority"]
    for r in rows:
        assert float(r["output_tok_s"]) > 0
        assert sum(int(r[f"p{p}_requests"]) for p in range(4)) == 8
        # tokens computed beyond each request's prompt and outputs come from
        # preemptions, and only from them
        recomputed = int(r["recomputed_tokens"])
        assert recomputed > 0 if int(r["preemptions"]) else recomputed == 0, r
        assert sum(int(n) for n in r["preempted_by_priority"].split("/")) == int(r["preemptions"])
    assert "| kvc0.25:priority |" in proc.stdout


@pytest.mark.parametrize("config, message", [
    ("stock:lifo", "is not KIND:POLICY"),
    ("kvc0:priority", "must be in \\(0, 1\\]"),
])
def test_priority_thrash_refuses_bad_configs(config, message):
    proc = run([sys.executable, str(ROOT / "benchmarks" / "priority_thrash.py"), "--configs", config],
               timeout=120)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr[-2000:]


def test_quality_quick(tmp_path):
    proc = _run("quality.py", tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "quality_quick.csv")))
    full = [r for r in rows if r["scorer"] == "full" and r["task"] == "all"]
    assert len(full) == 1 and float(full[0]["accuracy"]) >= 0.75  # the model solves the tasks
    assert {r["scorer"] for r in rows} == {"full", "kvcompress", "streamingllm", "keydiff"}
    assert all(float(r["mean_kept_fraction"]) < 0.5 for r in rows if r["scorer"] != "full")
    assert (tmp_path / "quality_quick.png").stat().st_size > 0
    assert "| kvcompress | 0.25 |" in proc.stdout


# --check: our kernel and the per-head path (vLLM's kernel over packed
# head-pages) against the reference on every row
@pytest.mark.background.with_args(_quick("bench_attention.py", "--check"))
def test_attention_bench_quick(background):
    proc = background.result(timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stock" in proc.stdout and "SmolLM2" in proc.stdout and "per-head/stock" in proc.stdout


def _attention_bench_avx2(out_dir):
    import importlib.util

    vllm_dir = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])
    if not list(vllm_dir.glob("_C_AVX2*.so")):
        pytest.skip("this vLLM has no AVX2 build (x86-64 wheels only)")
    return _quick("bench_attention.py", "--vllm-lib", "avx2", "--isa", "avx2")(out_dir)


@pytest.mark.background.with_args(_attention_bench_avx2)
def test_attention_bench_quick_as_on_an_avx2_cpu(background):
    """bench_attention.py --vllm-lib avx2 --isa avx2: vLLM's AVX2 build (what it
    loads on a CPU without AVX-512) against our avx2 path, on this CPU; the
    benchmark refuses to run if vLLM loaded another build."""
    proc = background.result(timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours: avx2 path; vLLM's kernel library: _C_AVX2" in proc.stdout
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("| SmolLM2")]) == 2


@pytest.mark.background.with_args(_quick("bench_prefill.py"))
def test_prefill_bench_quick(background):
    """bench_prefill.py --quick: our kernel, the split path and vLLM's kernel on
    one prefill chunk (no timing assertions)."""
    proc = background.result(timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| SmolLM2")]
    assert len(rows) == 2 and all(len(r.split("|")) == 10 for r in rows)


def test_cluster_bench_quick(tmp_path):
    """Two data-parallel replicas behind one `vllm serve`, stock and rate
    0.25, loaded by `vllm bench serve`: the table, CSV and plot come out."""
    proc = _run("cluster_bench.py", tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "cluster_quick.csv")))
    assert {r["config"] for r in rows} == {"stock", "0.25"}
    for r in rows:
        assert float(r["output_tok_s"]) > 0 and int(r["completed"]) == 8
        # both replicas reported KV usage while the load ran
        assert r["peak_kv_usage_per_replica"].count("=") == 2
    assert (tmp_path / "cluster_quick.png").stat().st_size > 0
    assert "crossover" in proc.stdout


@pytest.mark.background.with_args(_quick("layout_probe.py"))
def test_layout_probe_quick(background):
    """layout_probe.py --quick: the probe's two rows, or a clear refusal on a
    CPU without the AVX-512-BF16 path (no timing assertions)."""
    proc = background.result(timeout=900)
    if proc.returncode == 1 and "needs the AVX-512-BF16 path" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| SmolLM2") or ln.startswith("| Llama")]
    assert len(rows) >= 2 and "projected" in proc.stdout


def test_rate1_ab_quick():
    """rate1_ab.py --quick: one stock / plugin pair at rate 1.0 in fresh
    processes, every request run to its end, a table of ratios (no timing
    assertions)."""
    proc = _bench("rate1_ab.py", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "run 1: stock" in proc.stdout and "run 2: plugin" in proc.stdout
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(float(c) > 0 for c in cells[1:5]), row  # both sides timed every part
    assert all(float(x) > 0 for x in cells[8].split(" / ")) and float(cells[9]) > 0, row  # scheduler, begin_step
    assert "geometric mean over the pairs" in proc.stdout


def test_env_ab_quick():
    """env_ab.py --quick: one pair of fresh engines with the two settings of
    an environment switch (here where metric-free decode rows run), a table
    of B/A ratios with every part timed on both sides (no timing
    assertions)."""
    proc = _bench("env_ab.py", "--env", "KVCOMPRESS_PACKED_DECODE", "--values", "ours,vllm", timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ("run 1: KVCOMPRESS_PACKED_DECODE=ours" in proc.stdout
            and "run 2: KVCOMPRESS_PACKED_DECODE=vllm" in proc.stdout)
    row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| tiny | 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(float(c) > 0 for c in cells[2:7]), row  # wall, attention, forward, builder, outside
    assert "geometric means over the pairs (vllm/ours)" in proc.stdout


@pytest.mark.background.with_args(_quick("bench_eviction.py"))
def test_eviction_bench_quick(background):
    """bench_eviction.py --quick: one compression with KeyDiff read in place and
    gathered, on both page layouts (no timing assertions)."""
    proc = background.result(timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln.split("|") for ln in proc.stdout.splitlines() if ln.startswith("| 640 |")]
    assert len(rows) == 4
    assert {(r[3].strip(), r[4].strip()) for r in rows} == {
        (layout, path) for layout in ("vLLM in-page", "plain") for path in ("in place", "gathered")}
    assert all(float(r[5]) > 0 for r in rows)


def test_prefix_reuse_quick():
    """prefix_reuse.py --quick: three requests with one 2-block prefix, one
    after another, with prefix caching; with the record of uncached prefixes
    the second keeps the prefix and the third hits it, without it (the rule
    before) nobody hits (hits are behaviour, not timing)."""
    proc = _bench("prefix_reuse.py")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {cells[0]: cells for cells in (
        [c.strip() for c in ln.strip("|").split("|")]
        for ln in proc.stdout.splitlines() if ln.startswith("| kvc"))}
    assert set(rows) == {"kvc+pc", "kvc+pc-norecord"}
    assert rows["kvc+pc"][5] == "0 0 256" and rows["kvc+pc"][3] == "1 of 3"
    assert rows["kvc+pc-norecord"][5] == "0 0 0"
    assert all(float(r[1]) > 0 and 0 < float(r[4]) <= 1 for r in rows.values())


def test_prefix_reuse_quick_conversation():
    """prefix_reuse.py --quick --turns: one conversation of three turns (each
    prompt the previous one, its answer and new tokens); the third turn hits
    the first turn's prompt (4 whole blocks), which the second kept."""
    proc = _bench("prefix_reuse.py", "--turns", "--configs", "kvc+pc")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = [[c.strip() for c in ln.strip("|").split("|")]
              for ln in proc.stdout.splitlines() if ln.startswith("| kvc")]
    assert row[0] == "kvc+pc" and row[5] == "0 0 512", row
    assert "one conversation of 3 turns" in proc.stdout
