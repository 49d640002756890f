"""benchmarks/engine_process.py: the runner every side-by-side benchmark uses
for its engine processes (no engine here: small child scripts)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("engine_process", ROOT / "benchmarks" / "engine_process.py")
engine_process = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_process)

CHILD = f"""
import json, os, sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from engine_process import emit
mode = sys.argv[1]
print("engine log line before the result")
if mode == "fail":
    print("the engine broke", file=sys.stderr)
    sys.exit(3)
if mode != "silent":
    emit({{"plugins": os.environ.get("VLLM_PLUGINS"), "autopatch": os.environ.get("KVCOMPRESS_VLLM_AUTOPATCH"),
           "extra": os.environ.get("KVC_TEST_EXTRA"), "args": sys.argv[2:]}})
    print("a line an engine process printed after it")
"""


@pytest.fixture()
def child(tmp_path):
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


def test_stock_children_load_nothing_of_the_plugin_and_plugin_children_keep_the_environment(child, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "kvcompress")
    monkeypatch.delenv("KVCOMPRESS_VLLM_AUTOPATCH", raising=False)
    stock = engine_process.run_child([child, "ok", 1], name="stock", stock=True)
    assert stock == {"plugins": "", "autopatch": "0", "extra": None, "args": ["1"]}
    plugin = engine_process.run_child([child, "ok"], name="kvc", stock=False, env={"KVC_TEST_EXTRA": "x"})
    assert plugin == {"plugins": "kvcompress", "autopatch": None, "extra": "x", "args": []}


@pytest.mark.parametrize("mode, why", [("fail", "exited with 3"), ("silent", "emitted no result")])
def test_a_failed_child_raises_naming_it_with_its_stderr(child, mode, why):
    with pytest.raises(RuntimeError, match=f"engine process kvc 0.25 {why}") as err:
        engine_process.run_child([child, mode], name="kvc 0.25", stock=False)
    if mode == "fail":
        assert "the engine broke" in str(err.value)


def test_prefix_runs_the_child_behind_a_wrapper(child):
    # e.g. ``perf record ... --``; here ``env`` as the wrapper
    out = engine_process.run_child([child, "ok"], name="wrapped", stock=False,
                                   prefix=["env", "KVC_TEST_EXTRA=wrapped"])
    assert out["extra"] == "wrapped"
