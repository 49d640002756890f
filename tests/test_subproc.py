"""``subproc.run`` kills a command's whole process group (vLLM's engine core
and workers are grandchildren of a benchmark script)."""

import os
import subprocess
import time

import pytest
from subproc import run


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a killed child of the exited shell is reaped by init; until then a zombie
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_timeout_kills_the_grandchildren():
    with pytest.raises(subprocess.TimeoutExpired) as exc:
        run(["bash", "-c", "sleep 300 & echo $!; wait"], timeout=2)
    grandchild = int(exc.value.output.split()[0])  # the output so far comes with the error
    assert _gone(grandchild)


def test_processes_left_behind_are_killed_when_the_command_exits():
    proc = run(["bash", "-c", "sleep 300 >/dev/null 2>&1 & echo $!; echo done >&2"], timeout=30)
    assert proc.returncode == 0 and proc.stderr == "done\n"
    assert _gone(int(proc.stdout.split()[0]))


def test_input_and_exit_status_pass_through():
    proc = run(["bash", "-c", "read x; echo got $x; exit 3"], input="abc\n", timeout=30)
    assert (proc.returncode, proc.stdout) == (3, "got abc\n")
