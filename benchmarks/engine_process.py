"""One engine configuration in a fresh process (shared by the benchmarks).

Every side-by-side benchmark runs each configuration in a new Python process,
so that engines do not share memory, compiled state or the plugin's import:
the parent calls ``run_child`` with the script's own arguments, the child
measures and ``emit``\\ s one JSON result on a tagged stdout line (vLLM's
engine processes may print to the same stdout, before or after it).

``stock=True`` runs vLLM with nothing of the plugin loaded (``STOCK_ENV``:
no vLLM plugins, no auto-patch), the baseline every benchmark compares with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Sequence

RESULT_TAG = "KVC_RESULT "
#: Environment of a stock-vLLM process in the same venv.
STOCK_ENV = {"VLLM_PLUGINS": "", "KVCOMPRESS_VLLM_AUTOPATCH": "0"}


def emit(result: Any) -> None:
    """The child's side: its result as one tagged JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(
    args: Sequence[str],
    *,
    name: str,
    stock: bool,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    verbose: bool = False,
) -> Any:
    """Run ``python ARGS`` (behind ``prefix``, e.g. ``perf record ... --``) and
    return what it ``emit``\\ ted.

    ``env`` is added to this process's environment (after ``STOCK_ENV`` when
    ``stock``); vLLM logs at WARNING unless the caller's environment says
    otherwise.  ``verbose`` lets the child's stderr through.  Raises naming
    ``name`` with the tail of stderr when the child fails or emits nothing."""
    full_env = dict(os.environ)
    full_env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if stock:
        full_env.update(STOCK_ENV)
    full_env.update(env or {})
    proc = subprocess.run(
        [*prefix, sys.executable, *map(str, args)],
        stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
        text=True, env=full_env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        why = f"exited with {proc.returncode}" if proc.returncode else "emitted no result"
        raise RuntimeError(
            f"engine process {name} {why}:\n{(proc.stderr or '')[-4000:]}{proc.stdout[-1000:]}"
        )
    return json.loads(lines[-1][len(RESULT_TAG):])
