"""Prefix caching together with compression (``--enable-prefix-caching``,
CPU engine, in-process core; ``debug_checks`` on).

Requests that share a prompt prefix share its blocks; a compression keeps
the blocks another request holds intact (their tokens protected like sinks)
and takes its other blocks out of the prefix cache, so a later request with
the same prefix hits blocks that still hold exactly its tokens.  A prefix a
compression took out of the cache is kept by the next request that computes
it (its second use).
"""

import pytest
import torch

from kvcompress_vllm import tasks

pytestmark = pytest.mark.engine

BLOCK = 128
PREFIX_BLOCKS = 5


@pytest.fixture(scope="module")
def engine(engine_factory):
    from conftest import skip_where_prefix_caching_is_refused

    try:
        return engine_factory(
            enable_prefix_caching=True,
            additional_config={"kv_compress": {"rate": 0.25, "debug_checks": True}},
        )
    except Exception as err:  # a CPU where requests would use two page layouts
        skip_where_prefix_caching_is_refused(err)
        raise


def _assert_intact(engine, watch, block_ids, before, free0):
    """The prefix blocks hold the bytes and positions they held ``before``
    (``_prefix_pages``), no block leaked, nothing cached was changed."""
    ((kv, pos),) = engine.llm.collective_rpc(_prefix_pages, args=(block_ids,))
    assert kv.equal(before[0]) and pos.equal(before[1])
    assert engine.free_blocks() == free0
    assert not watch.stale()


def _prefix_pages(worker, blocks):
    """The worker's head-pages (K/V and positions) of ``blocks``, all layers and heads."""
    from kvcompress_vllm.worker.state import get_state

    state = get_state()
    pages = state.table.block_page_ids(blocks).view(-1)
    return state.pool.kv_pages[pages].clone(), state.pool.positions[pages].clone()


def test_shared_prefix_stays_cached_and_intact_through_compression(engine):
    from vllm import SamplingParams

    import random

    tok = engine.tokenizer
    prefix = tok.encode(tasks.prose(tok, PREFIX_BLOCKS * BLOCK + 40, random.Random(11)))
    prefix = prefix[:PREFIX_BLOCKS * BLOCK]
    # Tails that differ from their first token: the shared blocks are the prefix's.
    prompts = {name: prefix + tok.encode(f" {name.upper()}: " + tasks.prose(tok, 200, random.Random(s)),
                                         add_special_tokens=False)
               for name, s in zip("abc", (21, 22, 23))}
    assert len({p[PREFIX_BLOCKS * BLOCK] for p in prompts.values()}) == 3
    from block_watch import BlockWatch

    manager = engine.scheduler.kvc_manager
    watch = BlockWatch(engine.scheduler)
    keeps = watch.keeps
    params = SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True)
    free0 = engine.free_blocks()
    try:
        # a and b in one step (a's whole prompt fits the step's budget): b
        # hits a's prefix blocks, cached when a's were allocated.
        rid = {n: engine.engine.add_request(n, {"prompt_token_ids": prompts[n]}, params)
               for n in "ab"}
        engine.engine.step()
        blocks = list(manager.req_to_blocks[rid["a"]][:PREFIX_BLOCKS])
        assert manager.req_to_blocks[rid["b"]][:PREFIX_BLOCKS] == blocks
        assert all(b.ref_cnt == 2 for b in blocks)
        block_ids = [b.block_id for b in blocks]
        ((kv, pos),) = engine.llm.collective_rpc(_prefix_pages, args=(block_ids,))
        outs = {}
        for _ in range(400):  # both compressed, repeatedly, while decoding
            for out in engine.engine.step():
                if out.finished:
                    outs[out.request_id] = out
            if len(outs) == 2:
                break
        assert {r for r, _ in keeps} >= {rid["a"], rid["b"]}
        assert all(k == PREFIX_BLOCKS for r, k in keeps if r in (rid["a"], rid["b"])), (keeps, rid)
        for name in "ab":  # outputs carry the ids the requests were added with
            out = outs[name]
            assert len(out.outputs[0].token_ids) == 160
            assert out.kv_transfer_params["kv_compress"]["compressions"] >= 2
        assert outs["b"].num_cached_tokens == PREFIX_BLOCKS * BLOCK
        # Both finished: the prefix blocks are still cached, with a's bytes.
        assert all(b.block_hash is not None and b.ref_cnt == 0 for b in blocks)
        # c, later, hits them and is compressed around them too.
        rid["c"] = engine.engine.add_request("c", {"prompt_token_ids": prompts["c"]}, params)
        out = engine.run_until_done()["c"]
        assert out.num_cached_tokens == PREFIX_BLOCKS * BLOCK
        assert (rid["c"], PREFIX_BLOCKS) in keeps
        _assert_intact(engine, watch, block_ids, (kv, pos), free0)  # cached blocks are free
    finally:
        watch.restore()


def test_prefix_written_by_vllms_writer_is_protected_for_a_hitter(engine):
    """A never-compressed request (rate 1.0: vLLM's writer and kernel, no
    positions written) computes the prefix; a compressed request hits it in
    the same step and is compressed around it several times: the prefix
    blocks keep their bytes, and hold the positions the hitter's eviction
    protects by."""
    import random

    from vllm import SamplingParams

    tok = engine.tokenizer
    prefix = tok.encode(tasks.prose(tok, PREFIX_BLOCKS * BLOCK + 40, random.Random(31)))
    prefix = prefix[:PREFIX_BLOCKS * BLOCK]
    tails = [tok.encode(f" {c}: " + tasks.prose(tok, 200, random.Random(s)),
                        add_special_tokens=False) for c, s in (("S", 41), ("Q", 42))]
    from block_watch import BlockWatch

    manager = engine.scheduler.kvc_manager
    watch = BlockWatch(engine.scheduler)
    keeps = watch.keeps
    free0 = engine.free_blocks()
    try:
        stock = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                               extra_args={"kv_compress_rate": 1.0})
        params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
        rid_s = engine.engine.add_request("s", {"prompt_token_ids": prefix + tails[0]}, stock)
        rid_q = engine.engine.add_request("q", {"prompt_token_ids": prefix + tails[1]}, params)
        engine.engine.step()
        blocks = manager.req_to_blocks[rid_s][:PREFIX_BLOCKS]
        assert manager.req_to_blocks[rid_q][:PREFIX_BLOCKS] == blocks
        block_ids = [b.block_id for b in blocks]
        ((kv, pos),) = engine.llm.collective_rpc(_prefix_pages, args=(block_ids,))
        want = torch.arange(PREFIX_BLOCKS * BLOCK).view(PREFIX_BLOCKS, 1, BLOCK)
        assert pos.view(PREFIX_BLOCKS, -1, BLOCK).eq(want).all()  # written for the hitter
        outs = engine.run_until_done()
        assert outs["q"].num_cached_tokens == PREFIX_BLOCKS * BLOCK
        assert outs["q"].kv_transfer_params["kv_compress"]["compressions"] >= 3
        kept = [k for r, k in keeps if r == rid_q]
        assert kept and set(kept) == {PREFIX_BLOCKS}
        _assert_intact(engine, watch, block_ids, (kv, pos), free0)
    finally:
        watch.restore()


def test_a_prefix_computed_again_after_its_compression_stays_cached(engine):
    """Three requests with one prefix, one after another (each after the
    previous one finished).  The first is compressed with its prefix, which
    leaves the cache; the second recomputes the prefix and, since a
    compression took those hashes out of the cache before, keeps its blocks
    intact and cached through its compressions; the third hits them."""
    import random

    from vllm import SamplingParams

    from block_watch import BlockWatch

    tok = engine.tokenizer
    prefix = tok.encode(tasks.prose(tok, PREFIX_BLOCKS * BLOCK + 40, random.Random(51)))
    prefix = prefix[:PREFIX_BLOCKS * BLOCK]
    manager = engine.scheduler.kvc_manager
    watch = BlockWatch(engine.scheduler)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    free0 = engine.free_blocks()
    outs, blocks, names = {}, {}, {}
    try:
        for name, seed in zip("xyz", (52, 53, 54)):
            tail = tok.encode(f" {name.upper()}: " + tasks.prose(tok, 200, random.Random(seed)),
                              add_special_tokens=False)
            rid = engine.engine.add_request(name, {"prompt_token_ids": prefix + tail}, params)
            names[rid] = name
            engine.engine.step()
            blocks[name] = list(manager.req_to_blocks[rid][:PREFIX_BLOCKS])
            if name == "y":  # the prefix written (y's first step), before any compression of y
                assert not [k for r, k in watch.keeps if r == rid]
                block_ids = [b.block_id for b in blocks["y"]]
                ((kv, pos),) = engine.llm.collective_rpc(_prefix_pages, args=(block_ids,))
            if name == "z":
                assert blocks["z"] == blocks["y"]
            outs[name] = engine.run_until_done()[name]
            assert outs[name].kv_transfer_params["kv_compress"]["compressions"] >= 1
        keeps = {names[r]: {k for q, k in watch.keeps if q == r} for r, _ in watch.keeps}
        assert keeps == {"x": {0}, "y": {PREFIX_BLOCKS}, "z": {PREFIX_BLOCKS}}, watch.keeps
        assert [outs[n].num_cached_tokens for n in "xyz"] == [0, 0, PREFIX_BLOCKS * BLOCK]
        _assert_intact(engine, watch, block_ids, (kv, pos), free0)
    finally:
        watch.restore()


def test_layout_check_refuses_mixed_layouts():
    """Layouts where metric-recording requests would use our plain layout next
    to vLLM's for the others refuse prefix caching, naming the flag and the
    settings that give one layout; without prefix caching, or with one layout
    (all vLLM's, or all ours), they pass."""
    from types import SimpleNamespace

    from kvcompress_vllm.attention.cpu_prefill import PageLayouts

    vec = SimpleNamespace(isa="vec")
    vllms = PageLayouts(packing=vec, metric_packed=True, decode_ours=True)
    ours = PageLayouts(packing=None, metric_packed=False, decode_ours=False)
    mixed = PageLayouts(packing=vec, metric_packed=False, decode_ours=False)
    for layouts in (vllms, ours):
        assert layouts.single and layouts.two_layouts() is None
        layouts.check_prefix_caching(True)
    assert not mixed.single
    mixed.check_prefix_caching(False)
    with pytest.raises(RuntimeError, match="--enable-prefix-caching needs every request") as e:
        mixed.check_prefix_caching(True)
    assert "vLLM's vec layout" in str(e.value) and "KVCOMPRESS_METRIC_PAGES=packed" in str(e.value)
