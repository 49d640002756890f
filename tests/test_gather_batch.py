"""``ops.gather_batch`` (C++) against ``reference.gather_batch`` and a dense
per-token loop written here, on random head page tables."""

import random

import pytest
import torch

from kvcompress_vllm import ops
from kvcompress_vllm.ops import reference


def random_tables(rng: random.Random, S, L, H, P, N, full=False):
    """Tables of S requests: every head holds 1..P pages (``full``: P; unique
    ids, -1 after them) and between (pages - 1) * N + 1 and pages * N KVs."""
    page_table = torch.full((S, L, H, P), -1, dtype=torch.int32)
    num_pages = torch.zeros((S, L, H), dtype=torch.int32)
    kv_count = torch.zeros((S, L, H), dtype=torch.int32)
    ids = rng.sample(range(10 * S * L * H * P), S * L * H * P)
    for s in range(S):
        for l in range(L):
            for h in range(H):
                n = P if full else rng.randint(1, P)
                num_pages[s, l, h] = n
                kv_count[s, l, h] = rng.randint((n - 1) * N + 1, n * N)
                page_table[s, l, h, :n] = torch.tensor([ids.pop() for _ in range(n)])
    return page_table, num_pages, kv_count


def dense(page_table, kv_count, slots, q_lens, before, N):
    """Token by token: the KV that token o of request r writes in (l, h)."""
    L, H = page_table.shape[1:3]
    slots_out, positions = [], []
    for r, s in enumerate(slots):
        for o in range(q_lens[r]):
            positions.append(before[r] + o)
            row = []
            for l in range(L):
                row.append([])
                for h in range(H):
                    j = int(kv_count[s, l, h]) - q_lens[r] + o
                    row[-1].append(int(page_table[s, l, h, j // N]) * N + j % N)
            slots_out.append(row)
    ws = torch.tensor(slots_out, dtype=torch.int64).view(-1, L, H).permute(1, 0, 2)
    return ws, torch.tensor(positions, dtype=torch.int64)


@pytest.mark.parametrize("seed", range(16))
def test_matches_reference_and_dense_loop(seed):
    rng = random.Random(seed)
    S, L, H, P = rng.randint(1, 6), rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 5)
    N = rng.choice([1, 4, 8, 16])
    full = seed >= 12  # prefill-sized steps over many layers: the kernel splits layers over threads
    if full:
        S, L, H, P, N = 6, rng.randint(8, 24), 8, 8, 16
    page_table, num_pages, kv_count = random_tables(rng, S, L, H, P, N, full)
    R = rng.randint(0 if seed == 0 else 1, S)  # seed 0: an empty batch
    slots = rng.sample(range(S), R)  # any order, as the runner's batch
    # a request's step tokens are the newest KVs of every head: at most its smallest count
    q_lens = [rng.choice([0, 1, rng.randint(1, int(kv_count[s].min()))]) for s in slots]
    if full:
        q_lens = [int(kv_count[s].min()) for s in slots]
    before = [rng.randint(0, 5000) for _ in slots]
    base = rng.choice([0, 0, 3])  # vLLM's start at 0; the contract allows any
    qsl = torch.tensor([base + sum(q_lens[:i]) for i in range(R + 1)],
                       dtype=rng.choice([torch.int32, torch.int64]))
    args = (page_table, num_pages, kv_count,
            torch.tensor(slots, dtype=rng.choice([torch.int32, torch.int64])), qsl,
            torch.tensor(before, dtype=torch.int64), N)
    got = ops.gather_batch(*args)
    want = reference.gather_batch(*args)
    for g, w, name in zip(got, want, ("page_table", "kv_lens", "write_slots", "token_positions")):
        assert g.dtype == w.dtype and torch.equal(g, w), name
    pages, kv_lens, write_slots, positions = got
    width = int(num_pages[slots].max()) if slots else 0
    if R == 0:
        assert pages.shape == (L, 0, H, 0) and write_slots.shape == (L, 0, H)
        return
    assert pages.shape == (L, R, H, width)
    assert torch.equal(pages, page_table[slots][..., :width].permute(1, 0, 2, 3))
    assert torch.equal(kv_lens, kv_count[slots].permute(1, 0, 2))
    ws, pos = dense(page_table, kv_count, slots, q_lens, before, N)
    assert torch.equal(write_slots, ws) and torch.equal(positions, pos)


@pytest.mark.parametrize("impl", [ops.gather_batch, reference.gather_batch])
@pytest.mark.parametrize("fault", ["count_past_pages", "count_below_step"])
def test_a_token_outside_its_heads_pages_is_refused(impl, fault):
    rng = random.Random(0)
    N = 4
    page_table, num_pages, kv_count = random_tables(rng, 3, 2, 2, 3, N)
    if fault == "count_past_pages":  # the step's KV would land past the head's pages
        kv_count[1, 1, 0] = int(num_pages[1, 1, 0]) * N + 1
        q_lens = [1, 1]
    else:  # more step tokens than the head holds
        kv_count[1, 1, 0] = 1
        q_lens = [1, 2]
    qsl = torch.tensor([0, *q_lens]).cumsum(0)
    with pytest.raises(RuntimeError, match="outside its head's pages") as err:
        impl(page_table, num_pages, kv_count, torch.tensor([2, 1]), qsl, torch.tensor([7, 9]), N)
    if impl is ops.gather_batch:
        assert "layer 1, row 1, head 0" in str(err.value)


def _shared_page_case(fault):
    """Two requests (slots 2 and 1) of 2 layers x 2 heads, N = 4, with one page
    of layer 1 planted so that the step writes it twice (``fault``), or
    shared where nobody writes (``read_only``: a prefix-cache page)."""
    rng = random.Random(1)
    N = 4
    page_table, num_pages, kv_count = random_tables(rng, 3, 2, 2, 3, N, full=True)
    kv_count[:] = 3 * N  # every head full: the step writes in its last page
    q_lens = [1, 1]
    victim = int(page_table[2, 1, 0, 2])  # row 0, head 0 writes here
    if fault == "two_requests":
        page_table[1, 1, 1, 2] = victim  # row 1, head 1 writes it too
    elif fault == "two_heads":
        page_table[2, 1, 1, 2] = victim  # row 0, head 1
    elif fault == "listed_twice":  # one head writes 2 entries, both the same page
        q_lens = [N + 1, 1]
        page_table[2, 1, 0, 1] = victim
    else:  # read_only: both requests hold the page, neither writes it
        page_table[2, 1, 0, 0] = page_table[1, 1, 0, 0]
    qsl = torch.tensor([0, *q_lens]).cumsum(0)
    return (page_table, num_pages, kv_count, torch.tensor([2, 1]), qsl,
            torch.tensor([7, 9]), N), victim


@pytest.mark.parametrize("impl", [ops.gather_batch, reference.gather_batch])
@pytest.mark.parametrize("fault, writers", [
    ("two_requests", "by row 0, head 0 and by row 1, head 1"),
    ("two_heads", "by row 0, head 0 and by row 0, head 1"),
    ("listed_twice", "by row 0, head 0 and by row 0, head 0"),
])
def test_a_page_written_twice_in_a_step_is_refused(impl, fault, writers):
    """``write_kv`` writes a step's slots in parallel: two writers of one page
    (or a head listing it twice) would race or overwrite KVs someone holds."""
    args, victim = _shared_page_case(fault)
    with pytest.raises(RuntimeError) as err:
        impl(*args)
    assert f"page {victim} of layer 1 is written this step {writers}" in str(err.value)


@pytest.mark.parametrize("impl", [ops.gather_batch, reference.gather_batch])
def test_a_page_shared_where_nobody_writes_is_allowed(impl):
    args, _ = _shared_page_case("read_only")
    got = impl(*args)
    _, _, write_slots, _ = got
    assert write_slots.unique().numel() == write_slots.numel()


def test_bad_arguments_name_themselves():
    page_table = torch.zeros((2, 1, 1, 2), dtype=torch.int32)
    counts = torch.ones((2, 1, 1), dtype=torch.int32)
    with pytest.raises(RuntimeError, match="names table slot 5"):
        ops.gather_batch(page_table, counts, counts, torch.tensor([5]), torch.tensor([0, 1]),
                         torch.tensor([0]), 4)
    with pytest.raises(RuntimeError, match="query_start_loc must have R \\+ 1"):
        ops.gather_batch(page_table, counts, counts, torch.tensor([0]), torch.tensor([0]),
                         torch.tensor([0]), 4)
    with pytest.raises(RuntimeError, match="int32 CPU tensors"):
        ops.gather_batch(page_table, counts.long(), counts, torch.tensor([0]), torch.tensor([0, 1]),
                         torch.tensor([0]), 4)
