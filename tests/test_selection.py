"""Joint page selection vs brute force, plus the scorers' protection rules."""

import itertools

import pytest
import torch

from kvcompress_vllm.worker import scorers
from kvcompress_vllm.worker.selection import choose_pages, select_evictions, unit_costs


def brute_force_min_cost(costs: torch.Tensor, num_pages: int) -> float:
    """Cheapest total cost over every per-head page allocation (prefixes)."""
    rows, units = costs.shape
    best = float("inf")
    for alloc in itertools.product(range(units + 1), repeat=rows):
        if sum(alloc) != num_pages:
            continue
        total = sum(float(costs[r, :k].sum()) for r, k in enumerate(alloc))
        best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_joint_selection_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(2, 5, (1,), generator=g))
    block = int(torch.randint(1, 4, (1,), generator=g))
    length = block * int(torch.randint(1, 4, (1,), generator=g)) + int(torch.randint(0, block, (1,), generator=g))
    scores = torch.rand(rows, length, generator=g).round(decimals=1)  # many ties
    # Protect a random suffix of some heads.
    for r in range(rows):
        cut = int(torch.randint(0, length + 1, (1,), generator=g))
        scores[r, cut:] = float("inf")
    costs, _ = unit_costs(scores, block)
    finite = int(torch.isfinite(costs).sum())
    for num_pages in range(finite + 1):
        pages = choose_pages(costs, num_pages)
        assert int(pages.sum()) == num_pages
        chosen_cost = sum(float(costs[r, :k].sum()) for r, k in enumerate(pages.tolist()))
        assert chosen_cost == pytest.approx(brute_force_min_cost(costs, num_pages))
    with pytest.raises(RuntimeError, match="evictable"):
        choose_pages(costs, finite + 1)


def test_selection_evicts_lowest_scored_kvs_per_head():
    block = 2
    scores = torch.tensor(
        [[5.0, 0.1, 0.2, 9.0, float("inf"), 0.3],
         [0.4, 0.5, 8.0, 7.0, 6.0, float("inf")]]
    )
    ev = select_evictions(scores, num_pages=3, block_size=block)
    # Units: head0 -> costs [0.2 (kvs 1,2), 5.0 (kvs 5? no: 0.3,5.0)], head1 -> [0.5, 7.0]
    assert ev.pages_per_head.tolist() == [2, 1]
    assert ev.evict_idx[0, :4].tolist() == [0, 1, 2, 5]
    assert ev.evict_idx[1, :2].tolist() == [0, 1]
    assert ev.evict_counts.tolist() == [4, 2]


def test_ties_are_deterministic():
    scores = torch.zeros(4, 8)
    a = select_evictions(scores, 5, 2)
    b = select_evictions(scores.clone(), 5, 2)
    assert torch.equal(a.evict_idx, b.evict_idx)
    # Equal costs: lower head index first, then lower unit index.
    assert a.pages_per_head.tolist() == [4, 1, 0, 0]


def test_uniform_spreads_pages_evenly():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 40, generator=g)
    scores[0] *= 0.01  # one very unimportant head
    joint = select_evictions(scores, 9, 4)
    uniform = select_evictions(scores, 9, 4, uniform=True)
    assert int(joint.pages_per_head[0]) > 2  # the cheap head gives more
    assert sorted(uniform.pages_per_head.tolist()) == [1, 1, 1, 2, 2, 2]


def _kvs(num_tokens, rows=2):
    positions = torch.arange(num_tokens).repeat(rows, 1)
    g = torch.Generator().manual_seed(1)
    return scorers.HeadKVs(
        metrics=torch.rand(rows, num_tokens, generator=g),
        positions=positions,
        valid=torch.ones(rows, num_tokens, dtype=torch.bool),
        keys=lambda: torch.randn(rows, num_tokens, 8, generator=g),
        req_id="r",
        num_tokens=num_tokens,
    )


@pytest.mark.parametrize("name", ["kvcompress", "uniform", "random", "streamingllm", "knorm", "keydiff"])
def test_scorers_protect_window_and_sinks(name):
    kvs = _kvs(50)
    s = scorers.score(name, kvs, protected_window=10, sink_tokens=4)
    assert torch.isinf(s[:, :4]).all() and torch.isinf(s[:, 40:]).all()
    assert torch.isfinite(s[:, 4:40]).all()


def test_streamingllm_evicts_oldest_first():
    kvs = _kvs(40)
    s = scorers.score("streamingllm", kvs, protected_window=8, sink_tokens=2)
    ev = select_evictions(s, 4, 4)
    for r in range(2):
        assert ev.evict_idx[r, :8].tolist() == list(range(2, 10))
