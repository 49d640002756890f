"""throughput_sweep.py without an engine: --rounds (engine order, the
averaging of rounds, on synthetic per-job results) and --variant parsing."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_bench", ROOT / "benchmarks" / "throughput_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def test_rounds_alternate_forward_and_reverse(sweep):
    engines = ["A", "B", "C", "D"]
    order = [e for rnd in range(4) for e in sweep.engine_order(engines, rnd)]
    assert order == list("ABCDDCBAABCDDCBA")
    # over an even number of rounds every engine's mean position is the same
    pos = {e: [i for i, x in enumerate(order) if x == e] for e in engines}
    assert len({sum(p) / len(p) for p in pos.values()}) == 1


def _raw(sweep, drift):
    """Stock and plugin engines on one shape, two rounds (ABBA), where the
    machine slows down linearly: the engine run at position t gets
    ``true speed / (1 + drift * t)``."""
    true = {("stock", "tight"): 50.0, ("stock", "ample"): 100.0, ("kvc 0.25", "tight"): 90.0}
    engines = [("stock", "tight"), ("stock", "ample"), ("kvc 0.25", "tight")]
    raw, t = [], 0
    for rnd in range(2):
        for config, budget in sweep.engine_order(engines, rnd):
            speed = true[(config, budget)] / (1 + drift * t)
            raw.append({"mode": "inproc", "shape": "mixed", "budget": budget, "config": config,
                        "round": rnd + 1, "output_tok_s": speed, "wall_s": 1000 / speed,
                        "mean_kept_fraction": 0.3 if config != "stock" else 1.0})
            if config == "stock" and budget == "ample":
                raw.append({"mode": "inproc", "shape": "mixed", "budget": budget,
                            "config": "prefill-only", "round": rnd + 1, "output_tok_s": 1.0,
                            "wall_s": 5.0 + rnd, "mean_kept_fraction": 1.0})
            t += 1
    return raw


def test_averaged_rounds_remove_a_linear_drift_that_single_rounds_show(sweep):
    shapes = [sweep.Shape("mixed", 16, 1152, 384)]
    raw = _raw(sweep, drift=0.1)
    per_round = sweep.with_ratios(raw, shapes, 6144)
    rows = sweep.with_ratios(sweep.average_rounds(raw), shapes, 6144)
    assert len(per_round) == 6 and len(rows) == 3 and all(r["rounds"] == 2 for r in rows)
    plugin = next(r for r in rows if r["config"] == "kvc 0.25")
    rounds = [r for r in per_round if r["config"] == "kvc 0.25"]
    # each round alone is off the true 90/50 = 1.8x by the drift, in opposite directions ...
    assert rounds[0]["vs_stock"] < 1.8 * 0.85 and rounds[1]["vs_stock"] > 1.8 * 1.1
    # ... the average of the rounds is exact: times grow linearly here, and rates
    # are averaged harmonically (total work / total time)
    assert plugin["vs_stock"] == pytest.approx(1.8, rel=1e-9)
    assert plugin["of_ceiling"] == pytest.approx(0.9, rel=1e-9)
    assert plugin["prefill_only_s"] == pytest.approx(5.5)  # averaged too
    assert "round" not in plugin


def test_one_round_rows_are_the_rows_of_that_round(sweep):
    shapes = [sweep.Shape("mixed", 16, 1152, 384)]
    raw = [r for r in _raw(sweep, drift=0.1) if r["round"] == 1]
    single = sweep.with_ratios(raw, shapes, 6144)
    averaged = sweep.with_ratios(sweep.average_rounds(raw), shapes, 6144)
    assert len(single) == len(averaged) == 3
    for a, b in zip(single, averaged):
        assert a["vs_stock"] == b["vs_stock"] and a["of_ceiling"] == b["of_ceiling"]


def test_fields_equal_in_every_round_keep_their_type(sweep):
    raw = [{"mode": "inproc", "shape": "mixed", "budget": "tight", "config": "stock", "round": rnd,
            "output_tokens": 128, "peak_running": 4 + rnd, "output_tok_s": 10.0 * rnd}
           for rnd in (1, 2)]
    (row,) = sweep.average_rounds(raw)
    assert row["output_tokens"] == 128 and isinstance(row["output_tokens"], int)
    assert row["peak_running"] == 5.5  # differs between rounds: averaged
    assert row["output_tok_s"] == pytest.approx(2 / (1 / 10 + 1 / 20))  # harmonic


def test_variant_parsing(sweep):
    plugin, budget, label, kwargs = sweep.parse_variant('bs32={"block_size": 32}', set())
    assert (plugin, budget, label, kwargs) == (True, "tight", "bs32", {"block_size": 32, "env": {}})
    plugin, _, label, kwargs = sweep.parse_variant('stock:b8={"num_gpu_blocks_override": 9}', {"bs32"})
    assert (plugin, label, kwargs) == (False, "b8", {"num_gpu_blocks_override": 9, "env": {}})
    *_, kwargs = sweep.parse_variant('own={"env": {"KVCOMPRESS_CPU_PREFILL": "own", "N": 3}}', set())
    assert kwargs == {"env": {"KVCOMPRESS_CPU_PREFILL": "own", "N": "3"}}
    for bad in ['x', '={"a": 1}', 'stock:={"a": 1}', 'taken={}', 'y={not json', 'y=[1]', 'y={"env": 1}']:
        with pytest.raises(ValueError, match="--variant"):
            sweep.parse_variant(bad, {"taken"})


def test_wall_timers_count_nested_calls_of_one_name_once():
    """``benchmarks/wall_timers.py``: a subclass method that calls its wrapped
    base (the plugin's attention ``forward`` / builder calling vLLM's) is
    timed once under a shared name; other names nest normally."""
    spec = importlib.util.spec_from_file_location("wall_timers", ROOT / "benchmarks" / "wall_timers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    clock = [0.0]

    class FakeTime:  # the module's ``time``: a clock the methods below advance
        @staticmethod
        def perf_counter():
            return clock[0]

    mod.time = FakeTime

    class Base:
        def run(self):
            clock[0] += 2.0

    class Sub(Base):
        def run(self):
            super().run()
            clock[0] += 3.0

        def outer(self):
            clock[0] += 1.0
            self.run()

    timers = mod.Timers()
    timers.wrap(Base, "run", "attention")
    timers.wrap(Sub, "run", "attention")
    timers.wrap(Sub, "outer", "step")
    Sub().outer()
    Base().run()
    assert timers.total == {"attention": 7.0, "step": 6.0}  # not 2 + 5 + 2 = 9
