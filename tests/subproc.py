"""``run``: ``subprocess.run`` for commands that start vLLM engines.

vLLM's engine core and workers are grandchildren of the command, and
``subprocess.run(timeout=...)`` kills only the child: on a timeout they stay
alive and hold their KV cache and weights, so every engine test after it
fails vLLM's memory check.  ``run`` starts the command in a session of its
own and kills that whole process group when the command times out or the
test is interrupted, then raises as ``subprocess.run`` would.
"""

import os
import signal
import subprocess


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(cmd: list[str], *, timeout: float, input: str | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion with text stdout / stderr captured.

    On a timeout the process group is killed and ``TimeoutExpired`` carries
    the output so far; the group's other processes are killed in any case
    once the command has exited (an engine core it left behind)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    _kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
