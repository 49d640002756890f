"""Prompts whose prefill chunks end one token short of the prompt (issue: a
chunk ending at ``prompt_len - 1`` looked like a decoding request and was
compressed before its last observation query ran).

With ``max_num_batched_tokens = M`` a prompt of ``M + 1`` tokens is prefilled
as ``M`` + 1 when alone; next to a decoding request each step has ``M - 1``
tokens left, so ``2M - 1`` ends a chunk at ``2M - 2 = prompt_len - 1``.
Every compression must happen with the whole prompt in the cache, every
request must finish, scheduler and worker must agree on every page
(``debug_checks``) and no block may leak.
"""

import pytest

pytestmark = pytest.mark.engine

M = 256  # max_num_batched_tokens of this module's engine


@pytest.fixture(scope="module")
def engine(engine_factory):
    eng = engine_factory(
        max_num_batched_tokens=M,
        additional_config={"kv_compress": {"rate": 0.25, "debug_checks": True}},
    )
    # Record, for every compression, the tokens in the cache and the length of
    # the prefill the request (re)started with.
    compressions = []
    manager = eng.scheduler.kvc_manager
    original = manager.apply_eviction

    def apply_eviction(request_id, num_pages, num_tokens, **kwargs):
        request = eng.scheduler.requests[request_id]
        compressions.append((request_id, num_tokens, request.num_prompt_tokens))
        return original(request_id, num_pages, num_tokens, **kwargs)

    manager.apply_eviction = apply_eviction
    eng.compressions = compressions
    return eng


def _params(**kw):
    from vllm import SamplingParams

    return SamplingParams(**{"temperature": 0.0, "max_tokens": 6, "ignore_eos": True, **kw})


def _prompt(length, seed):
    return [(seed * 7919 + i * 104729) % 20000 + 100 for i in range(length)]


@pytest.mark.parametrize("neighbour", [False, True], ids=["alone", "neighbour"])
@pytest.mark.parametrize("length", [M + 1, 2 * M - 1, 2 * M + 1])
@pytest.mark.parametrize("scorer", ["kvcompress", "streamingllm"])
def test_prompt_at_chunk_boundary(engine, scorer, length, neighbour):
    core = engine.engine
    free0 = engine.free_blocks()
    engine.compressions.clear()
    extra = {"kv_compress_scorer": scorer}
    ids = []
    if neighbour:
        # A longer request that is decoding (one token per step) while the
        # short prompt is prefilled in chunks of M - 1.
        ids.append(f"long-{scorer}-{length}")
        nid = core.add_request(
            ids[-1],
            {"prompt_token_ids": _prompt(3 * M + 40, seed=length)},
            _params(max_tokens=40, extra_args=extra),
        )
        request = engine.scheduler.requests[nid]
        while request.num_computed_tokens < request.num_prompt_tokens:
            core.step()
    ids.append(f"short-{scorer}-{length}-{neighbour}")
    rid = core.add_request(
        ids[-1],
        {"prompt_token_ids": _prompt(length, seed=length + 1)},
        _params(extra_args=extra),
    )
    chunk_ends = []
    request = engine.scheduler.requests[rid]
    finished = {}
    for _ in range(200):
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            if out.finished:
                finished[out.request_id] = out
        if request.num_computed_tokens <= length:
            chunk_ends.append(request.num_computed_tokens)
    assert set(finished) == set(ids)
    for out in finished.values():
        assert len(out.outputs[0].token_ids) > 0
        assert out.kv_transfer_params["kv_compress"]["compressions"] >= 1
    if neighbour and length == 2 * M - 1:
        assert length - 1 in chunk_ends, chunk_ends  # the case under test happened
    if not neighbour and length == M + 1:
        assert M in chunk_ends, chunk_ends
    for req_id, num_tokens, prompt_len in engine.compressions:
        assert num_tokens >= prompt_len, (req_id, num_tokens, prompt_len)
    assert engine.free_blocks() == free0
    assert not engine.scheduler.kvc_requests
