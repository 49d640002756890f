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



#: A job of the session below: it logs when it starts and ends.
_JOB = """
import sys, time
name, log = sys.argv[1:]
open(log, "a").write(f"start {name} {time.time()}\\n")
time.sleep(1.0)
open(log, "a").write(f"end {name} {time.time()}\\n")
"""

#: The session's test module (``HERE`` filled in): plain tests around tests
#: marked background, one of whose ``make_cmd`` skips.
_QUEUE_TESTS = """
import sys
import time

import conftest
import pytest

HERE = "@HERE@"


def job(name):
    def make_cmd(_dir):
        if name == "skipped":
            pytest.skip("no tool")
        return [sys.executable, HERE + "/job.py", name, HERE + "/log"], None
    return make_cmd


def test_first():
    time.sleep(1.5)


@pytest.mark.background.with_args(job("b0"))
def test_b0(background):
    assert background.result(timeout=60).returncode == 0


@pytest.mark.background.with_args(job("skipped"))
def test_skipped(background):
    pass


def test_between():
    time.sleep(1.5)
"""


def test_background_jobs_run_last_and_a_few_at_a_time(tmp_path):
    """conftest.py's queue, in a pytest session of its own: tests marked
    background run after the others; their jobs start after collection, at
    most ``BACKGROUND_AT_ONCE`` at a time, the next when one has ended; a job
    whose ``make_cmd`` skips takes no slot; every job runs."""
    import shutil
    import sys

    import conftest

    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("conftest.py", "subproc.py"):
        shutil.copy(os.path.join(here, name), tmp_path / name)
    (tmp_path / "job.py").write_text(_JOB)
    more = "".join(f"""

@pytest.mark.background.with_args(job("b{i}"))
def test_b{i}(background):
    assert background.result(timeout=60).returncode == 0
""" for i in range(1, 5))
    last = "\n\ndef test_last():\n    time.sleep(1.5)\n"
    (tmp_path / "test_queue.py").write_text(_QUEUE_TESTS.replace("@HERE@", str(tmp_path)) + more + last)
    proc = run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-W", "ignore",
                "--rootdir", str(tmp_path), str(tmp_path / "test_queue.py")], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    order = [ln.split("::")[1].split()[0] for ln in proc.stdout.splitlines() if "::test_" in ln]
    assert order == ["test_first", "test_between", "test_last", "test_b0", "test_skipped",
                     "test_b1", "test_b2", "test_b3", "test_b4"], order
    events = sorted((float(t), kind, name) for kind, name, t in
                    (ln.split() for ln in (tmp_path / "log").read_text().splitlines()))
    assert {name for _, kind, name in events if kind == "end"} == {f"b{i}" for i in range(5)}
    running = peak = 0
    for _, kind, _name in events:  # an end sorts before a start at the same time
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == conftest.BACKGROUND_AT_ONCE, events
