"""Wall-clock time spent in wrapped callables, for the engine benchmarks
(``throughput_sweep.py``, ``rate1_ab.py``, ``env_ab.py``)."""

from __future__ import annotations

import functools
import time


class Timers:
    """Seconds spent in wrapped callables, by name: ``total[name]`` (0 from
    the wrapping on; after ``total.clear()``, absent until one runs again)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def wrap(self, obj, attr: str, name: str) -> None:
        """Replace ``obj.attr`` (a class's method or an instance's) by a timed
        wrapper; ``functools.wraps`` keeps the signature, which the plugin's
        start-up check of vLLM's internals reads."""
        original = getattr(obj, attr)
        totals = self.total
        totals.setdefault(name, 0.0)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)

    def snapshot(self) -> dict[str, float]:
        return dict(self.total)
