"""``subproc.run`` kills a command's whole process group (vLLM's engine core
and workers are grandchildren of a benchmark script); ``subproc.Background``
runs a command at the lowest priority, its autogroup's included, and hands
back its output and files."""

import os
import subprocess
import time

import pytest
from subproc import Background, run


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


def _nice_of(pid: int) -> tuple[int, str]:
    """(the process's nice, its autogroup line) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        nice = int(f.read().split(")")[-1].split()[16])
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            group = f.read().strip()
    except OSError:  # a kernel without autogroups
        group = ""
    return nice, group


def test_background_job_runs_at_the_lowest_priority_and_hands_back_its_output():
    job = Background(lambda d: (["bash", "-c", f"echo out; echo err >&2; sleep 300 & echo $! > {d}/pid; wait"],
                                None))
    try:
        deadline = time.monotonic() + 10
        while not (job.dir / "pid").exists() or not (job.dir / "pid").read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for pid in (job.proc.pid, int((job.dir / "pid").read_text())):
            nice, group = _nice_of(pid)
            # its own session's autogroup at nice 19 too: otherwise the
            # scheduler shares the CPU equally with the tests' sessions
            assert nice == 19 and (group == "" or group.endswith("nice 19")), (nice, group)
            # and a waking test preempts it at once
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        with pytest.raises(subprocess.TimeoutExpired) as exc:
            job.result(timeout=1)
        assert exc.value.output == "out\n" and exc.value.stderr == "err\n"
        assert _gone(int((job.dir / "pid").read_text()))  # the whole group was killed
    finally:
        job.remove()
    assert not job.dir.exists()


def test_background_job_result_and_a_skip_in_make_cmd():
    job = Background(lambda d: (["bash", "-c", f"echo done > {d}/file; echo done; exit 3"], None))
    proc = job.result(timeout=60)
    assert (proc.returncode, proc.stdout) == (3, "done\n")
    assert (job.dir / "file").read_text() == "done\n"  # files it wrote stay until remove()
    job.remove()
    assert not job.dir.exists()
    made = []

    def skips(d):
        made.append(d)
        pytest.skip("no tool")

    with pytest.raises(pytest.skip.Exception):
        Background(skips)
    assert made and not made[0].exists()  # its directory does not stay behind
