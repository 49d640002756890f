"""``run``: ``subprocess.run`` for commands that start vLLM engines.

vLLM's engine core and workers are grandchildren of the command, and
``subprocess.run(timeout=...)`` kills only the child: on a timeout they stay
alive and hold their KV cache and weights, so every engine test after it
fails vLLM's memory check.  ``run`` starts the command in a session of its
own and kills that whole process group when the command times out or the
test is interrupted, then raises as ``subprocess.run`` would.

``Background``: a command that starts early (when the session's tests are
collected: ``conftest.py``, mark ``background``) at the lowest CPU priority,
so that it uses only the CPU time the tests before its own leave idle, and
that its test then waits for like ``run``.
"""

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path


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


def _lowest_priority() -> None:
    """In the child, after its ``setsid``: the ``SCHED_IDLE`` policy and nice
    19, for the process and for its session's autogroup.  With
    ``sched_autogroup`` on (the Linux default) the scheduler first shares the
    CPU fairly between sessions and applies a process's nice only within its
    own, so the process's nice alone still gave the job an equal share against
    another session's engine (``test_bench_cli`` took 2.9x as long beside the
    jobs).  Beside two jobs the sweep's quick form took 1.07x its time alone
    with the autogroup's nice, 1.01x with ``SCHED_IDLE`` added (a waking test
    preempts the job at once)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux
        pass
    os.nice(19)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("19")
    except OSError:  # no autogroups in this kernel
        pass


class Background:
    """``cmd`` started now in a session of its own at the lowest priority
    (``_lowest_priority``), stdout and
    stderr to files (nobody reads a pipe while it runs).  ``dir`` is a
    directory of its own for files it writes (``--out`` paths): pass
    ``make_cmd(dir) -> (cmd, env)``."""

    def __init__(self, make_cmd) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kvc-background-"))
        try:
            self.cmd, env = make_cmd(self.dir)
        except BaseException:  # pytest.skip among them
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self._out = open(self.dir / "stdout", "w+")
        self._err = open(self.dir / "stderr", "w+")
        self.proc = subprocess.Popen(self.cmd, stdout=self._out, stderr=self._err, text=True,
                                     env=env, start_new_session=True,
                                     preexec_fn=_lowest_priority)

    def _output(self) -> tuple[str, str]:
        self._out.seek(0)
        self._err.seek(0)
        return self._out.read(), self._err.read()

    def result(self, *, timeout: float) -> subprocess.CompletedProcess:
        """Wait up to ``timeout`` s from now (it may have had little CPU so
        far); as ``run``: on a timeout the group is killed and
        ``TimeoutExpired`` carries the output, and processes it left behind
        are killed once it has exited."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            stdout, stderr = self._output()
            raise subprocess.TimeoutExpired(self.cmd, timeout, output=stdout, stderr=stderr) from None
        except BaseException:
            self.kill()
            raise
        _kill_group(self.proc)
        stdout, stderr = self._output()
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, stdout, stderr)

    def kill(self) -> None:
        """Kill the whole group (if still there) and wait for the command."""
        _kill_group(self.proc)
        self.proc.wait()

    def remove(self) -> None:
        """``kill``, then delete ``dir`` (its output included)."""
        self.kill()
        self._out.close()
        self._err.close()
        shutil.rmtree(self.dir, ignore_errors=True)
