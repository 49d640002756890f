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
        self._open: dict[str, int] = {}  # wrapped calls of each name in progress

    def wrap(self, obj, attr: str, name: str) -> None:
        """Replace ``obj.attr`` (a class's method or an instance's) by a timed
        wrapper; ``functools.wraps`` keeps the signature, which the plugin's
        start-up check of vLLM's internals reads.  A call made inside another
        wrapped call of the same name is not counted again (e.g. the plugin's
        attention ``forward`` calling vLLM's, both wrapped as "attention")."""
        original = getattr(obj, attr)
        totals, open_calls = self.total, self._open
        totals.setdefault(name, 0.0)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if open_calls.get(name, 0):
                return original(*args, **kwargs)
            open_calls[name] = 1
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                open_calls[name] = 0
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)

    def snapshot(self) -> dict[str, float]:
        return dict(self.total)
