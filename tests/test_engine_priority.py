"""``--scheduling-policy priority``: vLLM preempts the lowest-priority running
request when another cannot grow, and that victim may be one it has already
scheduled in the same step (its tokens and new blocks are taken back).  The
FCFS policy never does that (its victim is the last running request, not yet
scheduled), so the plugin's scheduler and worker meet the case only here.

The engine runs with ``debug_checks`` (the scheduler compares every
request's page count with the worker's after every step).  A low-priority
request runs first, a high-priority one beside it, and the pool fills up
until the second cannot grow: vLLM preempts the first after scheduling it in
that step.  Checked: that path was taken, a third request (at rate 0.5)
compresses in the same run, every request finishes with its full output,
the preempted one counts its preemption, and no block leaks.  (Its tokens are
not compared with a run alone: vLLM's CPU kernels are not batch-invariant,
and this batch alone changes greedy tokens of random-token prompts.)  The
randomized form is the ``priority`` soak (``tests/test_engine_soak.py``).
"""

import pytest

pytestmark = pytest.mark.engine

NUM_BLOCKS = 12


def _prompt(seed, length):
    return [(seed * 7919 + i * 131) % 20000 + 100 for i in range(length)]


@pytest.fixture(scope="module")
def engine(model_path):
    from conftest import Engine

    from kvcompress_vllm.model import kv_budget_bytes

    eng = Engine(
        model_path,
        max_model_len=NUM_BLOCKS * 128,
        max_num_seqs=8,
        kv_cache_memory_bytes=kv_budget_bytes(model_path, 1, NUM_BLOCKS * 128, max_num_seqs=8,
                                              max_model_len=NUM_BLOCKS * 128),
        scheduling_policy="priority",
        additional_config={"kv_compress": {"rate": 0.5, "debug_checks": True}},
    )
    yield eng
    eng.shutdown()


def _watch_preemptions(sched):
    """Wraps ``sched``: the ids of requests vLLM preempted after their
    ``allocate_slots`` succeeded in the same ``schedule`` call."""
    manager = sched.kv_cache_manager
    allocated: set[str] = set()
    after_scheduling: list[str] = []
    schedule, allocate, preempt = sched.schedule, manager.allocate_slots, sched._preempt_request

    def schedule_(*args, **kwargs):
        allocated.clear()
        return schedule(*args, **kwargs)

    def allocate_(request, *args, **kwargs):
        blocks = allocate(request, *args, **kwargs)
        if blocks is not None:
            allocated.add(request.request_id)
        return blocks

    def preempt_(request, *args, **kwargs):
        if request.request_id in allocated:
            after_scheduling.append(request.request_id)
        return preempt(request, *args, **kwargs)

    sched.schedule, manager.allocate_slots, sched._preempt_request = schedule_, allocate_, preempt_

    def restore():
        sched.schedule, manager.allocate_slots, sched._preempt_request = schedule, allocate, preempt

    return after_scheduling, restore


def test_a_request_preempted_after_vllm_scheduled_it(engine):
    from vllm import SamplingParams

    core, sched = engine.engine, engine.scheduler
    free0 = engine.free_blocks()
    off = {"kv_compress_rate": 1.0}  # hold every block: compression cannot make room
    greedy = dict(temperature=0.0, ignore_eos=True)
    # Low priority (3) first, so it runs ahead of the high-priority one (0):
    # when the high-priority request cannot grow, the victim is the request
    # vLLM scheduled earlier in the same step.  The second prompt is nearer
    # its block end, so it needs a new block first.
    low = _prompt(1, 5 * 128 - 100)
    high = _prompt(2, 5 * 128 - 10)
    squeezed = _prompt(3, 900)
    after_scheduling, restore = _watch_preemptions(sched)
    try:
        core.add_request("low", {"prompt_token_ids": low},
                         SamplingParams(max_tokens=300, extra_args=off, **greedy), priority=3)
        core.step()
        core.add_request("high", {"prompt_token_ids": high},
                         SamplingParams(max_tokens=300, extra_args=off, **greedy), priority=0)
        core.add_request("squeezed", {"prompt_token_ids": squeezed},
                         SamplingParams(max_tokens=200, **greedy), priority=1)
        outputs = engine.run_until_done()
    finally:
        restore()
    # (vLLM's internal ids: the external id and a suffix)
    assert any(rid.startswith("low-") for rid in after_scheduling), (after_scheduling,
                                                                    sched.kvc_totals)
    assert {rid: len(o.outputs[0].token_ids) for rid, o in outputs.items()} == {
        "low": 300, "high": 300, "squeezed": 200}
    assert outputs["low"].kv_transfer_params["kv_compress"]["preemptions"] >= 1
    assert sched.kvc_totals.compressions > 0
    assert engine.free_blocks() == free0
    assert not sched.kvc_manager.evicted_pages and not sched.kvc_requests
