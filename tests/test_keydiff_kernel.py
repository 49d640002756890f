"""``ops.keydiff_scores``: KeyDiff read in place from head-pages (plain and in
vLLM's in-page layout) -- the C++ kernel against the plain-PyTorch reference
on random shapes, the reference against kvpress's definition over densely
gathered keys, the worker's scoring with and without the paged path, and the
errors on bad input."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kvcompress_vllm import ops, scorers
from kvcompress_vllm.attention.cpu_packed import PagePacking
from kvcompress_vllm.config import KVCompressConfig
from kvcompress_vllm.ops import reference
from kvcompress_vllm.testing import scheduler_output
from kvcompress_vllm.worker.selection import rank_heads
from kvcompress_vllm.worker.state import HeadPool, KVCompressWorkerState


@pytest.fixture(autouse=True)
def cpp_kernels(monkeypatch):
    """The C++ kernel, whatever KVCOMPRESS_VLLM_KERNELS says (the tests
    compare it with the reference)."""
    monkeypatch.setattr(ops, "KERNELS", "auto")


def kvpress_keydiff(keys):
    """kvpress ``KeyDiffPress.score`` on one head's ``[C, D]`` keys."""
    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=0, keepdim=True)
    return -F.cosine_similarity(keys, anchor, dim=-1)


def random_case(seed, dtype, block, dim, packed):
    """Pages ``[P, 2, N, D]`` (packed: written in vLLM's AMX layout), page rows
    ``[r, np]`` (-1 past a row's pages), counts (0, 1, a full page, partial
    pages, every page) and the plain keys each row holds ``[r][count, D]``."""
    g = torch.Generator().manual_seed(seed)
    num_pages, rows, max_pages = 48, 6, 5
    plain = torch.randn(num_pages, 2, block, dim, generator=g).to(dtype)
    counts = torch.tensor([0, 1, block, 2 * block + 3, max_pages * block,
                           int(torch.randint(1, max_pages * block, (1,), generator=g))],
                          dtype=torch.int32)
    page_rows = torch.randperm(num_pages, generator=g)[: rows * max_pages].view(rows, max_pages)
    page_rows = page_rows.to(torch.int32)
    for i, c in enumerate(counts.tolist()):
        page_rows[i, -(-c // block):] = -1
    packing = reference.amx_packing(block, dim) if packed else None
    pages = plain
    if packed:  # element (slot, d) of half h at offset packing[h, slot, d]
        pages = torch.empty_like(plain)
        flat = pages.view(num_pages, 2, -1)
        for h in range(2):
            flat[:, h, packing[h].view(-1).long()] = plain[:, h].reshape(num_pages, -1)
    keys = [
        torch.cat([plain[p, 0] for p in page_rows[i, : -(-c // block)].tolist()] or
                  [torch.empty(0, dim, dtype=dtype)])[:c]
        for i, c in enumerate(counts.tolist())
    ]
    return pages, page_rows, counts, packing, keys


CASES = [(seed, dtype, block, dim, packed)
         for seed, (dtype, block, dim) in enumerate([(torch.bfloat16, 128, 64), (torch.float32, 16, 32),
                                                     (torch.float16, 32, 128), (torch.bfloat16, 16, 96)])
         for packed in (False, True) if not packed or (block % 16 == 0 and dim % 32 == 0)]


@pytest.mark.parametrize("seed,dtype,block,dim,packed", CASES)
def test_kernel_matches_reference_and_kvpress(seed, dtype, block, dim, packed):
    pages, page_rows, counts, packing, keys = random_case(seed, dtype, block, dim, packed)
    width = int(counts.max()) + 7  # columns past every row's count: zeros
    got = ops.keydiff_scores(pages, page_rows, counts, width, packing)
    want = reference.keydiff_scores(pages, page_rows, counts, width, packing)
    assert got.shape == (len(keys), width) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for i, k in enumerate(keys):
        c = k.shape[0]
        if c:  # the independent definition, on the densely gathered keys
            torch.testing.assert_close(want[i, :c], kvpress_keydiff(k.float()), atol=1e-6, rtol=1e-5)
        assert not want[i, c:].any() and not got[i, c:].any()


def test_kernel_threads_agree():
    pages, page_rows, counts, packing, _ = random_case(7, torch.bfloat16, 128, 64, True)
    width = int(counts.max())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.keydiff_scores(pages, page_rows, counts, width, packing)
        torch.set_num_threads(max(2, before))
        many = ops.keydiff_scores(pages, page_rows, counts, width, packing)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)  # rows are independent: no order effects


@pytest.mark.parametrize("bad,match", [
    (dict(counts=torch.tensor([3, 9], dtype=torch.int32)), "counts\\[1\\] = 9"),
    (dict(width=4), "counts\\[1\\] = 5 outside \\[0, min\\(width 4"),
    (dict(page_rows=torch.tensor([[0, -1], [99, -1]], dtype=torch.int32)), "page_rows\\[1, 0\\] = 99"),
    (dict(page_rows=torch.tensor([[0, -1], [1, -1]], dtype=torch.int32)), "page_rows\\[1, 1\\] = -1"),
    (dict(counts=torch.tensor([-1, 5], dtype=torch.int32)), "counts\\[0\\] = -1"),
    (dict(counts=torch.tensor([3, 5], dtype=torch.int64)), "counts must be an int32"),
    (dict(page_rows=torch.tensor([[0, -1], [1, 2]], dtype=torch.int64)), "page_rows must be an int32"),
    (dict(packing=torch.zeros(2, 4, 8, dtype=torch.int64)), "packing must be an int32"),
    (dict(packing=torch.full((2, 4, 8), 32, dtype=torch.int32)), "packing offset 32 outside"),
])
def test_kernel_rejects_bad_input(bad, match):
    args = dict(kv_pages=torch.randn(4, 2, 4, 8), page_rows=torch.tensor([[0, -1], [1, 2]], dtype=torch.int32),
                counts=torch.tensor([3, 5], dtype=torch.int32), width=6, packing=None)
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        ops.keydiff_scores(**args)


@pytest.mark.parametrize("packed", [False, True])
def test_worker_scores_in_place_as_its_gathered_keys(packed):
    """The worker's ``HeadKVs`` carry ``paged_keys``; KeyDiff through them (the
    kernel) equals KeyDiff over ``keys()`` (the gather), for whole requests and
    chunk by chunk, on heads of different lengths."""
    L, H, N, D = 3, 2, 16, 64
    num_blocks, ctx = 12, 5 * 16 + 3
    g = torch.Generator().manual_seed(int(packed))
    storage = torch.randn(L * num_blocks * H * N * 2 * D, generator=g).to(torch.bfloat16)
    per_layer = num_blocks * H * N * 2 * D
    layers = [storage[l * per_layer:(l + 1) * per_layer].view(num_blocks, H, N, 2 * D) for l in range(L)]
    pool = HeadPool.from_layer_caches(layers)
    if packed:  # vLLM's AMX in-page layout, as PagePacking.learn finds it
        pool.packing = PagePacking(isa="amx", dtype=torch.bfloat16, block_size=N, head_dim=D,
                                   offsets=reference.amx_packing(N, D))
    state = KVCompressWorkerState(KVCompressConfig(), pool, max_model_len=num_blocks * N, max_num_reqs=2)
    blocks = torch.randperm(num_blocks, generator=g)[:7].tolist()
    state.begin_step(scheduler_output(new=[("r", blocks, ctx)], scheduled={"r": ctx},
                                      prefill_ends={"r": ctx}))
    state.end_step()
    req = state.table.requests["r"]
    req.packed = packed
    counts = state.table.kv_count[req.slot].view(-1)
    counts -= torch.randint(0, 3, counts.shape, generator=g, dtype=torch.int32) * N  # uneven heads
    width = int(counts.max())
    rows = L * H
    kvs = state._gather_request(req, 0, rows, width, "r")
    assert kvs.paged_keys is not None and (kvs.paged_keys.packing is not None) == packed
    keydiff = scorers.get_scorer("keydiff")
    in_place = keydiff.score(kvs)
    gathered = keydiff.score(dataclasses.replace(kvs, paged_keys=None))
    torch.testing.assert_close(in_place.masked_fill(~kvs.valid, 0), gathered.masked_fill(~kvs.valid, 0),
                               atol=1e-6, rtol=1e-5)
    sub = kvs.rows(2, 5)
    torch.testing.assert_close(keydiff.score(sub), in_place[2:5])
    ranked = [rank_heads(keydiff, lambda a, b: state._gather_request(req, a, b, width, "r"), rows, width,
                         D, N, 4, 2, chunk_rows=c) for c in (rows, 4)]
    torch.testing.assert_close(ranked[0][0], ranked[1][0])
    assert torch.equal(ranked[0][1], ranked[1][1])
