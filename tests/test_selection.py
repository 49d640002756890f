"""Page selection against brute-force definitions: joint (cheapest units over
all heads) and uniform (water-filling over a request's whole life)."""

import itertools
import random

import pytest
import torch

from kvcompress_vllm.worker.selection import (
    choose_pages,
    evict_indices,
    select_evictions,
    unit_costs,
)


def prefix_sums(costs: torch.Tensor) -> list[list[float]]:
    """Per head: total cost of evicting its first x units, x = 0..finite."""
    out = []
    for row in costs.tolist():
        sums = [0.0]
        for c in row:
            if c == float("inf"):
                break
            sums.append(sums[-1] + c)
        out.append(sums)
    return out


def brute_force_min_cost(costs: torch.Tensor, num_pages: int) -> float:
    """Cheapest total cost over every per-head page allocation (prefixes)."""
    sums = prefix_sums(costs)
    best = float("inf")
    for alloc in itertools.product(*(range(len(s)) for s in sums)):
        if sum(alloc) == num_pages:
            best = min(best, sum(s[x] for s, x in zip(sums, alloc)))
    return best


def brute_force_uniform(costs: torch.Tensor, evicted: list[int], num_pages: int):
    """The uniform definition: over every feasible increment ``x`` (a prefix of
    finite units per head, ``sum(x) == num_pages``) minimise the descending-
    sorted final levels ``evicted + x`` lexicographically, then the cost."""
    sums = prefix_sums(costs)
    best = None
    for x in itertools.product(*(range(len(s)) for s in sums)):
        if sum(x) != num_pages:
            continue
        levels = sorted((k + xi for k, xi in zip(evicted, x)), reverse=True)
        cost = sum(s[xi] for s, xi in zip(sums, x))
        if best is None or levels < best[0] or (levels == best[0] and cost < best[1] - 1e-9):
            best = (levels, cost)
    return best


def chosen_cost(costs: torch.Tensor, pages: torch.Tensor) -> float:
    sums = prefix_sums(costs)
    return sum(s[x] for s, x in zip(sums, pages.tolist()))


def random_scores(rng: random.Random, rows: int, length: int, inf_rate: float) -> torch.Tensor:
    """Scores with many ties; some rows get a protected (+inf) suffix."""
    scores = torch.tensor([[round(rng.random(), 1) for _ in range(length)] for _ in range(rows)])
    for r in range(rows):
        if rng.random() < inf_rate:
            scores[r, rng.randrange(length + 1):] = float("inf")
    return scores


@pytest.mark.parametrize("seed", range(25))
def test_joint_selection_matches_brute_force(seed):
    rng = random.Random(seed)
    rows, block = rng.randint(2, 4), rng.randint(1, 3)
    length = block * rng.randint(1, 3) + rng.randrange(block)
    costs, _ = unit_costs(random_scores(rng, rows, length, inf_rate=1.0), block)
    finite = int(torch.isfinite(costs).sum())
    for num_pages in range(finite + 1):
        pages = choose_pages(costs, num_pages)
        assert int(pages.sum()) == num_pages
        assert chosen_cost(costs, pages) == pytest.approx(brute_force_min_cost(costs, num_pages))
    with pytest.raises(RuntimeError, match="evictable"):
        choose_pages(costs, finite + 1)


def test_uniform_matches_brute_force_over_random_compression_sequences():
    """100 random sequences of compressions: every step equals the brute-force
    definition, never raises up to the number of finite units (the scheduler's
    ``max_evictable``), and the lifetime counts stay within one page of each
    other except for heads that ran out of evictable units."""
    rng = random.Random(1234)
    steps = 0
    for _ in range(100):
        rows = rng.randint(2, 5)
        block = rng.randint(1, 3)
        units = rng.randint(1, 4 if rows <= 4 else 3)
        evicted = [0] * rows
        ever_exhausted = False
        for _ in range(rng.randint(1, 6)):
            length = block * units + rng.randrange(block)
            scores = random_scores(rng, rows, length, inf_rate=0.3)
            costs, _ = unit_costs(scores, block)
            finite = torch.isfinite(costs).sum(dim=1).tolist()
            num_pages = rng.randint(0, sum(finite))
            pages = choose_pages(costs, num_pages, "uniform", torch.tensor(evicted))
            x = pages.tolist()
            assert sum(x) == num_pages and all(0 <= xi <= f for xi, f in zip(x, finite))
            levels, cost = brute_force_uniform(costs, evicted, num_pages)
            final = [k + xi for k, xi in zip(evicted, x)]
            assert sorted(final, reverse=True) == levels, (evicted, costs, num_pages, x)
            assert chosen_cost(costs, pages) == pytest.approx(cost)
            # Water-filling: a head that gave pages now ends at most one page
            # above any head that still has an evictable unit.
            for a in range(rows):
                for b in range(rows):
                    if x[a] > 0 and x[b] < finite[b]:
                        assert final[a] <= final[b] + 1, (evicted, x, finite)
            ever_exhausted |= any(xi == f for xi, f in zip(x, finite))
            evicted = final
            if not ever_exhausted:
                assert max(evicted) - min(evicted) <= 1, evicted
            steps += 1
    assert steps > 250


def test_uniform_is_uniform_over_repeated_small_compressions():
    """Regression: 6 compressions of 3 pages over 8 heads used to take the
    same cheapest heads every time (lifetime counts [6,0,6,0,6,0,0,0])."""
    block, heads = 4, 8
    g = torch.Generator().manual_seed(0)
    evicted = torch.zeros(heads, dtype=torch.int64)
    joint_evicted = torch.zeros(heads, dtype=torch.int64)
    for _ in range(6):
        scores = torch.rand(heads, 40, generator=g) + 1.0
        scores[0::2] *= 0.01  # heads 0, 2, 4, 6 are always the cheapest
        costs, _ = unit_costs(scores, block)
        evicted += choose_pages(costs, 3, "uniform", evicted)
        joint_evicted += choose_pages(costs, 3, "joint")
    assert int(evicted.sum()) == 18
    assert int(evicted.max() - evicted.min()) <= 1, evicted.tolist()
    assert int(joint_evicted[1::2].sum()) == 0  # joint keeps taking the cheap heads


def test_uniform_up_to_max_evictable_never_raises():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(6, 50, generator=g)
    scores[:, 40:] = float("inf")  # protected window
    scores[2, 10:] = float("inf")  # a head with little to give
    costs, _ = unit_costs(scores, 4)
    finite = int(torch.isfinite(costs).sum())
    evicted = torch.tensor([0, 3, 0, 1, 5, 0])
    for num_pages in range(finite + 1):
        pages = choose_pages(costs, num_pages, "uniform", evicted)
        assert int(pages.sum()) == num_pages
    with pytest.raises(RuntimeError, match="evictable"):
        choose_pages(costs, finite + 1, "uniform", evicted)


def test_unknown_allocation_is_rejected():
    with pytest.raises(ValueError, match="joint, uniform"):
        choose_pages(torch.zeros(2, 2), 1, "even")


def test_selection_evicts_lowest_scored_kvs_per_head():
    block = 2
    inf = float("inf")
    scores = torch.tensor(
        [[5.0, 0.1, 0.2, 9.0, inf, 0.3],
         [0.4, 0.5, 8.0, 7.0, 6.0, inf]]
    )
    ev = select_evictions(scores, num_pages=3, block_size=block)
    # head 0 units: {0.1, 0.2} cost 0.2, {0.3, 5.0} cost 5.0; head 1: {0.4, 0.5} cost 0.5, ...
    assert ev.pages_per_head.tolist() == [2, 1]
    assert ev.evict_idx.tolist() == [[0, 1, 2, 5], [0, 1, -1, -1]]
    assert ev.evict_counts.tolist() == [4, 2]


def test_ties_are_broken_by_head_then_unit_then_logical_index():
    scores = torch.zeros(4, 8)
    ev = select_evictions(scores, 5, 2)
    # Equal costs: lower head index first, then lower unit index; within a
    # head the lowest logical indices.
    assert ev.pages_per_head.tolist() == [4, 1, 0, 0]
    assert ev.evict_idx.tolist() == [
        list(range(8)),
        [0, 1] + [-1] * 6,
        [-1] * 8,
        [-1] * 8,
    ]
    uniform = select_evictions(scores, 5, 2, "uniform")
    assert uniform.pages_per_head.tolist() == [2, 1, 1, 1]


def test_uniform_spreads_pages_evenly_and_joint_does_not():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 40, generator=g)
    scores[0] *= 0.01  # one very unimportant head
    joint = select_evictions(scores, 9, 4)
    uniform = select_evictions(scores, 9, 4, "uniform")
    assert int(joint.pages_per_head[0]) > 2  # the cheap head gives more
    assert sorted(uniform.pages_per_head.tolist()) == [1, 1, 1, 2, 2, 2]
    # Within a level the cheapest heads go first: head 0 is one of the three.
    assert int(uniform.pages_per_head[0]) == 2


def test_evict_indices_sorts_and_pads():
    order = torch.tensor([[5, 1, 3, 0, 2, 4], [2, 3, 0, 1, 4, 5], [0, 1, 2, 3, 4, 5]], dtype=torch.int32)
    idx = evict_indices(order, torch.tensor([2, 1, 0]), block_size=2)
    assert idx.dtype == torch.int32
    assert idx.tolist() == [[0, 1, 3, 5], [2, 3, -1, -1], [-1, -1, -1, -1]]
    assert evict_indices(order, torch.zeros(3, dtype=torch.int64), 2).tolist() == [[-1]] * 3
