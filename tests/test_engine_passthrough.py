"""The plugin changes nothing unless asked to, and its own attention path
reproduces stock vLLM when nothing is evicted.

Reference: stock vLLM in a fresh interpreter with no plugin loaded
(``VLLM_PLUGINS=`` and ``KVCOMPRESS_VLLM_AUTOPATCH=0``), greedy decoding.
The bit-identity checks run the plugin in a fresh interpreter too
(``engine_runner.py``), so that both sides run vLLM's kernels under the same
conditions; the near-tie checks run in-process, where tests can look at the
scheduler.
"""

import json
import os
import sys
from pathlib import Path

import pytest
from subproc import run

from kvcompress_vllm import tasks

pytestmark = pytest.mark.engine

MAX_TOKENS = 24
LENGTHS = [100, 300, 600, 900, 1200, 1500, 1800, 2000]
#: Largest stock logprob gap between the top-2 tokens at which a different
#: greedy choice is accepted as a bf16 near-tie (see test docstring).
TIE_GAP = 0.1


@pytest.fixture(scope="module")
def prompt_ids(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = []
    for i, n in enumerate(LENGTHS):
        if i % 3 == 2:
            task = tasks.multikey(tok, n, num_keys=3, seed=i)
        else:
            task = tasks.passkey(tok, n, depth=(i % 4) / 4, seed=i)
        prompts.append(tok.encode(task.prompt))
    return prompts


@pytest.fixture(scope="module")
def engine_kwargs():
    from conftest import ENGINE_DEFAULTS

    return dict(ENGINE_DEFAULTS)


def _run_fresh(model_path, prompt_ids, engine_kwargs, *, plugin=False):
    """Greedy outputs (top-2 logprobs) of an engine in a fresh interpreter
    (``engine_runner.py``): stock vLLM, or with ``plugin`` kvcompress-vllm."""
    env = dict(os.environ)
    if not plugin:
        env.update(VLLM_PLUGINS="", KVCOMPRESS_VLLM_AUTOPATCH="0")
    spec = {
        "model": model_path,
        "engine": engine_kwargs,
        "prompt_token_ids": prompt_ids,
        "max_tokens": MAX_TOKENS,
        "logprobs": 2,
    }
    proc = run([sys.executable, str(Path(__file__).with_name("engine_runner.py"))],
               input=json.dumps(spec), env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_stock(model_path, prompt_ids, engine_kwargs):
    result = _run_fresh(model_path, prompt_ids, engine_kwargs)
    assert "kvcompress" not in result["scheduler_cls"] and result["scheduler_type"] == "Scheduler"
    return result


@pytest.fixture(scope="module")
def stock(model_path, prompt_ids, engine_kwargs):
    return _run_stock(model_path, prompt_ids, engine_kwargs)


@pytest.fixture(scope="module")
def stock_no_prefix_cache(model_path, prompt_ids, engine_kwargs):
    """Stock vLLM as the plugin runs it: prefix caching off (the plugin turns
    it off), so both engines schedule the same chunks and batches."""
    return _run_stock(model_path, prompt_ids, {**engine_kwargs, "enable_prefix_caching": False})


def _assert_exact(got, ref) -> None:
    """Same greedy tokens and the same top-2 log-probabilities at every step."""
    for out, expected in zip(got["outputs"], ref["outputs"], strict=True):
        assert out["token_ids"] == expected["token_ids"]
        assert _step_logprobs(out) == _step_logprobs(expected)


def test_plugin_installed_but_off_is_exact_passthrough(stock, model_path, prompt_ids, engine_kwargs):
    """Plugin loaded (entry point), no kv_compress config: stock vLLM, bit for bit."""
    got = _run_fresh(model_path, prompt_ids, engine_kwargs, plugin=True)
    assert got["scheduler_type"] == "Scheduler"
    assert all(o["kv_transfer_params"] is None for o in got["outputs"])
    _assert_exact(got, stock)


def test_rate_one_is_off_too(stock, model_path, prompt_ids, engine_kwargs):
    got = _run_fresh(model_path, prompt_ids, {**engine_kwargs, "kv_compress_rate": 1.0}, plugin=True)
    assert got["scheduler_type"] == "Scheduler"
    assert all(o["kv_transfer_params"] is None for o in got["outputs"])
    _assert_exact(got, stock)


def _step_logprobs(ref) -> list[dict[int, float]]:
    """Per step {token: logprob} of an ``engine_runner.py`` output."""
    return [{tok: lp for tok, lp in step} for step in ref["logprobs"]]


def _near_tie_or_equal(ids, stock_outputs):
    """Number of exactly equal sequences; a differing one must take stock's
    runner-up at its first difference, where stock's top-2 log-probabilities
    are within ``TIE_GAP`` (a bf16 near-tie) -- checked, not assumed."""
    exact = 0
    for got, ref in zip(ids, stock_outputs):
        if got == ref["token_ids"]:
            exact += 1
            continue
        step = next(i for i, (a, b) in enumerate(zip(got, ref["token_ids"])) if a != b)
        top = sorted(ref["logprobs"][step], key=lambda t: -t[1])
        assert len(top) >= 2 and got[step] == top[1][0], f"step {step}: {got[step]} not stock's runner-up {top}"
        assert top[0][1] - top[1][1] < TIE_GAP, f"step {step}: gap {top[0][1] - top[1][1]:.3f}"
    return exact


def test_enabled_without_eviction_matches_stock(engine_factory, stock_no_prefix_cache, prompt_ids,
                                                engine_kwargs, model_path):
    """The plugin active, nothing evicted, two kinds of requests.

    * Rate 1.0 (never compressed): their K/V stay in vLLM's own layout and
      vLLM's kernel attends them (``attention.cpu_prefill``, stock-layout
      requests), so their outputs are *bit-identical* to stock vLLM's: the
      same tokens and the same top-2 log-probabilities at every step (our
      kernel sums in another order and moves them).  Both engines run in a
      fresh interpreter started the same way (``engine_runner.py``): the
      numerics of vLLM's CPU kernels and GEMMs depend on the ISA and threads
      they run with, which an in-process engine inherits from the tests
      before it.
    * ``max_cache_tokens`` far above the prompt (compressible, never
      compressed here): per-head tables and our kernels.  Our kernel sums in
      float32 in a different order than vLLM's, so the bf16 attention outputs
      can differ in the last bit: greedy sequences must be identical except at
      a bf16 near-tie of stock's top-2 (``_near_tie_or_equal``).
    """
    from vllm import SamplingParams

    config = {"kv_compress": {"rate": 1.0, "enabled": True, "debug_checks": True}}
    plugin = _run_fresh(model_path, prompt_ids, {
        **engine_kwargs, "enable_prefix_caching": False, "additional_config": config,
    }, plugin=True)
    assert plugin["scheduler_type"] == "KVCompressScheduler"
    assert all(o["kv_transfer_params"]["kv_compress"]["pages_evicted"] == 0
               for o in plugin["outputs"])
    _assert_exact(plugin, stock_no_prefix_cache)

    engine = engine_factory(additional_config=config)
    assert type(engine.scheduler).__name__ == "KVCompressScheduler"
    own = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                         extra_args={"max_cache_tokens": 100_000})
    outs = engine.generate(prompt_ids, own)
    for out in outs:
        assert out.kv_transfer_params["kv_compress"]["pages_evicted"] == 0
    ids = [list(o.outputs[0].token_ids) for o in outs]
    assert _near_tie_or_equal(ids, stock_no_prefix_cache["outputs"]) >= len(ids) - 2


def test_rate_one_requests_are_stock_beside_compressed_ones(engine_factory, stock_no_prefix_cache,
                                                            prompt_ids):
    """Every other request at rate 1.0 in an engine that compresses the rest
    (rate 0.25, a short interval so that they are compressed while the
    rate-1.0 ones decode in the same batches): the rate-1.0 requests' greedy
    outputs are stock vLLM's, the others were compressed.  Not bit-identical
    here: vLLM's kernel splits its work by the batch it is given, which holds
    only the rate-1.0 requests, so its sums run in another order than in
    stock's all-request call; a different token is allowed only at a bf16
    near-tie of stock's top-2 (``_near_tie_or_equal``)."""
    from vllm import SamplingParams

    engine = engine_factory(additional_config={"kv_compress": {
        "rate": 0.25, "debug_checks": True, "protected_window": 16, "compress_interval": 8}})
    keep = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                          extra_args={"kv_compress_rate": 1.0})
    squeeze = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    params = [keep if i % 2 else squeeze for i in range(len(prompt_ids))]
    outs = engine.generate(prompt_ids, params)
    refs = stock_no_prefix_cache["outputs"]
    kept = [i for i in range(len(outs)) if i % 2]
    _near_tie_or_equal([list(outs[i].outputs[0].token_ids) for i in kept], [refs[i] for i in kept])
    for i, out in enumerate(outs):
        stats = out.kv_transfer_params["kv_compress"]
        if i % 2:
            assert stats["pages_evicted"] == 0
        elif len(prompt_ids[i]) > 600:
            assert stats["pages_evicted"] > 0, f"request {i} ({len(prompt_ids[i])} tokens)"
