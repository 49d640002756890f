"""Each scorer's ranking on constructed keys/metrics, the protection of the
window and the sinks under every scorer, chunked == unchunked scoring, and the
scorer registry."""

import pytest
import torch
import torch.nn.functional as F
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

from kvcompress_vllm import scorers
from kvcompress_vllm.config import SCORERS, KVCompressConfig
from kvcompress_vllm.plan import EvictionPlan, StepPlan
from kvcompress_vllm.core import PageGeometry
from kvcompress_vllm.scorers import HeadKVs
from kvcompress_vllm.worker.selection import rank_heads, select_evictions, unit_costs
from kvcompress_vllm.worker.state import HeadPool, KVCompressWorkerState


def make_kvs(keys, metrics=None, positions=None, valid=None, req_id="r", num_tokens=None,
             seed=0):
    """``HeadKVs`` over fixed tensors (``keys()`` returns a fresh copy, as the
    worker's gather does)."""
    rows, width, _ = keys.shape
    if positions is None:
        positions = torch.arange(width).repeat(rows, 1)
    return HeadKVs(
        metrics=torch.zeros(rows, width) if metrics is None else metrics,
        positions=positions,
        valid=torch.ones(rows, width, dtype=torch.bool) if valid is None else valid,
        keys=lambda: keys.clone(),
        req_id=req_id,
        num_tokens=int(positions.max()) + 1 if num_tokens is None else num_tokens,
        seed=seed,
    )


def evicted_set(scores, num_pages, block_size=1):
    """Logical indices evicted from each row, as sets."""
    ev = select_evictions(scores, num_pages, block_size)
    return [set(i for i in row if i >= 0) for row in ev.evict_idx.tolist()]


def kvpress_keydiff(keys):
    """kvpress ``KeyDiffPress.score`` on ``[rows, C, D]`` keys."""
    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=1, keepdim=True)
    return -F.cosine_similarity(keys, anchor, dim=-1)


# --- registry -----------------------------------------------------------------

def test_registry_matches_config_and_documents_papers():
    assert set(scorers.scorer_names()) == set(SCORERS)
    assert "uniform" not in SCORERS  # an allocation mode now, not a scorer
    papers = {
        "kvcompress": "2410.00161",
        "streamingllm": "2309.17453",
        "knorm": "2406.11430",
        "keydiff": "2504.15364",
        "adaptive": "2504.15364",
        "metric_keydiff": "2410.00161",
        "metric_keydiff_rank": "2410.00161",
        "metric_keydiff_union": "2410.00161",
    }
    for name in SCORERS:
        scorer = scorers.get_scorer(name)
        assert scorer.name == name
        assert type(scorer).__doc__ and papers.get(name, "control") in type(scorer).__doc__
        if name.startswith("metric_keydiff") or name == "adaptive":  # combined: both papers
            assert "2410.00161" in type(scorer).__doc__ and "2504.15364" in type(scorer).__doc__
    assert "kvpress" in type(scorers.get_scorer("keydiff")).__doc__
    with pytest.raises(KeyError, match="unknown scorer 'h2o'"):
        scorers.get_scorer("h2o")


def test_registry_refuses_a_mismatch_with_config(monkeypatch):
    monkeypatch.setattr(scorers, "SCORERS", (*SCORERS, "h2o"))
    with pytest.raises(scorers.ScorerRegistryError, match=r"only in config.SCORERS \['h2o'\]"):
        scorers._check_registry()


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(scorers.ScorerRegistryError, match="'knorm' is used by both"):
        class AnotherKnorm(scorers.Scorer):  # noqa: F841
            name = "knorm"

            def score(self, kvs):
                return kvs.metrics


# --- rankings -------------------------------------------------------------------

def test_knorm_evicts_high_norm_keys_first():
    g = torch.Generator().manual_seed(0)
    direction = F.normalize(torch.randn(2, 12, 16, generator=g), dim=-1)
    norms = torch.stack([torch.randperm(12, generator=g).float() + 1 for _ in range(2)])
    keys = (direction * norms.unsqueeze(-1)).to(torch.bfloat16)
    s = scorers.score("knorm", make_kvs(keys, num_tokens=100), 0, 0)
    for row, evicted in enumerate(evicted_set(s, 10)):
        top = set(torch.topk(norms[row], len(evicted)).indices.tolist())
        assert evicted == top  # the largest norms go, low-norm keys stay
    # Joint over heads: the 10 evicted are the 10 largest norms overall.
    assert sum(len(e) for e in evicted_set(s, 10)) == 10
    flat_top = set(torch.topk(norms.view(-1), 10).indices.tolist())
    assert {r * 12 + i for r, e in enumerate(evicted_set(s, 10)) for i in e} == flat_top


def test_keydiff_evicts_keys_closest_to_the_normalised_mean_first():
    e = torch.eye(4)
    # 3 keys along e1, 2 along e3, and one very long key along e2.  kvpress's
    # anchor (mean of normalised keys) is (3 e1 + e2 + 2 e3) / 6: the e1 keys
    # are the most similar, the e2 key the least -- with the mean of the raw
    # keys (dominated by the long e2 key) it would be the other way round.
    keys = torch.stack([e[0], e[0] * 2, e[0] * 0.5, e[2], e[2] * 3, e[1] * 100]).unsqueeze(0)
    kvs = make_kvs(keys, num_tokens=100)
    s = scorers.score("keydiff", kvs, 0, 0)
    assert torch.allclose(s, kvpress_keydiff(keys), atol=1e-6)
    assert evicted_set(s, 3) == [{0, 1, 2}]
    assert evicted_set(s, 5) == [{0, 1, 2, 3, 4}]
    raw_mean_scores = -F.cosine_similarity(keys, keys.mean(dim=1, keepdim=True), dim=-1)
    assert evicted_set(raw_mean_scores, 1) == [{5}]  # the definition we do not use


def test_keydiff_matches_kvpress_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 20, 8, generator=g)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, 12:] = False
    padded = keys.clone()
    padded[1, 12:] = 0  # the worker's gather zeroes padding keys
    s = scorers.get_scorer("keydiff").score(make_kvs(padded, valid=valid))
    assert torch.allclose(s[0], kvpress_keydiff(keys[0:1])[0], atol=1e-6)
    assert torch.allclose(s[1, :12], kvpress_keydiff(keys[1:2, :12])[0], atol=1e-6)


def rope_neox(x, positions, theta=10000.0):
    """Llama-style rotary embedding (rotate-half pairs ``j``, ``j + D/2``)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    angle = positions.double()[:, None] * freqs[None, :]
    cos, sin = angle.cos().float(), angle.sin().float()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def rotary_keys(contents, noise, generator):
    """Post-RoPE keys ``[1, C, D]`` of the content vectors ``[C, D]``."""
    c = contents + noise * torch.randn(contents.shape, generator=generator)
    return rope_neox(c, torch.arange(c.shape[0])).unsqueeze(0)


def test_repetition_sees_repeated_text_through_rope():
    from kvcompress_vllm.scorers.adaptive_scorer import repetition

    g = torch.Generator().manual_seed(9)
    period, copies, dim = 20, 10, 64
    pattern = torch.randn(period, dim, generator=g)
    repeated = rotary_keys(pattern.repeat(copies, 1), 0.01, g)
    varied = rotary_keys(torch.randn(period * copies, dim, generator=g), 0.0, g)
    # Every copy but the newest recurs within the 64-KV window.
    assert repetition(make_kvs(repeated)) == pytest.approx((copies - 1) / copies, abs=0.02)
    assert repetition(make_kvs(varied)) < 0.02
    # RoPE hides the repetition from the keys themselves: the same content
    # at another position is another key.
    units = F.normalize(repeated[0], dim=-1)
    assert float((units[:period] * units[period:2 * period]).sum(-1).mean()) < 0.9
    # Padding is not counted.
    valid = torch.ones(1, period * copies, dtype=torch.bool)
    valid[0, period * 2:] = False
    padded = repeated.clone()
    padded[~valid] = 0
    assert repetition(make_kvs(padded, valid=valid)) == pytest.approx(0.5, abs=0.03)


def test_adaptive_ranks_repetitive_requests_by_the_metric_and_others_by_keydiff():
    g = torch.Generator().manual_seed(10)
    rows, period, copies, dim = 6, 16, 8, 64
    width = period * copies
    metrics = torch.rand(rows, width, generator=g)
    repeated = torch.cat([rotary_keys(torch.randn(period, dim, generator=g).repeat(copies, 1), 0.01, g)
                          for _ in range(rows)])
    varied = torch.cat([rotary_keys(torch.randn(width, dim, generator=g), 0.0, g) for _ in range(rows)])

    def ranked(name, keys):
        kvs = make_kvs(keys, metrics=metrics)
        return rank_heads(scorers.get_scorer(name), kvs.rows, rows, width, dim, 16, 4, 2, chunk_rows=2)

    for keys, delegate in ((repeated, "kvcompress"), (varied, "keydiff")):
        got, want = ranked("adaptive", keys), ranked(delegate, keys)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), delegate
    # The two delegates really rank these requests differently.
    assert not torch.equal(ranked("kvcompress", repeated)[1], ranked("keydiff", repeated)[1])
    assert not torch.equal(ranked("kvcompress", varied)[1], ranked("keydiff", varied)[1])


def test_streamingllm_evicts_oldest_first():
    positions = torch.tensor([[0, 1, 5, 6, 9, 11, 12, 14, 20, 21, 22, 23]] * 2)
    keys = torch.randn(2, 12, 4)
    s = scorers.score("streamingllm", make_kvs(keys, positions=positions, num_tokens=24), 4, 1)
    ev = select_evictions(s, 4, 2)  # 4 pages of 2 KVs: the 8 oldest after the sink
    assert ev.pages_per_head.tolist() == [2, 2]
    assert ev.evict_idx.tolist() == [[1, 2, 3, 4]] * 2


def test_kvcompress_evicts_lowest_metric_first():
    g = torch.Generator().manual_seed(2)
    metrics = torch.rand(3, 16, generator=g)
    s = scorers.score("kvcompress", make_kvs(torch.zeros(3, 16, 2), metrics=metrics, num_tokens=100), 0, 0)
    evicted = evicted_set(s, 9, 1)
    chosen = {r * 16 + i for r, e in enumerate(evicted) for i in e}
    assert chosen == set(torch.topk(-metrics.view(-1), 9).indices.tolist())


def test_random_is_deterministic_per_prompt_and_length():
    keys = torch.zeros(4, 30, 2)

    def rand_scores(seed, num_tokens, req_id="r-1234abcd"):
        kvs = make_kvs(keys, req_id=req_id, num_tokens=num_tokens, seed=seed)
        return scorers.get_scorer("random").score(kvs)

    a = rand_scores(11, 30)
    assert torch.equal(a, rand_scores(11, 30))  # fresh generators each call
    # vLLM's request id (random per run) plays no part.
    assert torch.equal(a, rand_scores(11, 30, req_id="r-9876fedc"))
    assert not torch.equal(a, rand_scores(12, 30))
    assert not torch.equal(a, rand_scores(11, 31))
    assert not torch.equal(a[0], a[1])  # heads differ
    assert ((a >= 0) & (a < 1)).all()
    # Within a chunk of rows as in the whole.
    kvs = make_kvs(keys, num_tokens=30, seed=11)
    assert torch.equal(scorers.get_scorer("random").score(kvs.rows(2, 4)), a[2:4])


# --- combined scorers (attention metric + key diversity) -------------------------

COMBINED = ("metric_keydiff", "metric_keydiff_rank", "metric_keydiff_union")


def dense_combined(name, metrics, keys, valid):
    """Independent per-row Python reference of the combined scorers on the
    valid KVs of each row (``None`` on padding)."""
    out = []
    for row in range(metrics.shape[0]):
        idx = [j for j in range(metrics.shape[1]) if valid[row, j]]
        n = len(idx)
        m = [float(metrics[row, j]) for j in idx]
        kd = kvpress_keydiff(keys[row:row + 1, idx].float())[0].tolist()
        if name == "metric_keydiff":
            def z(xs):
                mu = sum(xs) / len(xs)
                sd = max((sum((x - mu) ** 2 for x in xs) / len(xs)) ** 0.5, 1e-6)
                return [(x - mu) / sd for x in xs]
            import math
            vals = [a + b for a, b in zip(z([math.log(max(x, 0.0) + 1e-12) for x in m]), z(kd))]
        else:
            def ranks(xs):
                r = [0] * len(xs)
                for pos, i in enumerate(sorted(range(len(xs)), key=lambda i: (xs[i], i))):
                    r[i] = pos
                return r
            rm, rk = ranks(m), ranks(kd)
            comb = [a + b if name == "metric_keydiff_rank" else max(a, b) for a, b in zip(rm, rk)]
            # KVs in (combined, metric rank) order get the row's sorted metric values.
            order = sorted(range(n), key=lambda i: (comb[i], rm[i]))
            vals = [0.0] * n
            for value, i in zip(sorted(m), order):
                vals[i] = value
        row_out = [None] * metrics.shape[1]
        for j, v in zip(idx, vals):
            row_out[j] = v
        out.append(row_out)
    return out


@pytest.mark.parametrize("name", COMBINED)
def test_combined_scorers_match_a_dense_reference(name):
    g = torch.Generator().manual_seed(6)
    rows, width = 4, 37
    keys = torch.randn(rows, width, 8, generator=g).to(torch.bfloat16).float()
    metrics = torch.rand(rows, width, generator=g) ** 6  # many decades, as squared attention
    metrics[2, 5] = 0.0  # a KV nobody attended to
    valid = torch.arange(width).view(1, -1) < torch.tensor([37, 30, 37, 21]).view(-1, 1)
    keys[~valid] = 0
    got = scorers.get_scorer(name).score(make_kvs(keys, metrics=metrics, valid=valid, num_tokens=40))
    ref = dense_combined(name, metrics, keys, valid)
    for row in range(rows):
        for j in range(width):
            if ref[row][j] is not None:
                assert got[row, j].item() == pytest.approx(ref[row][j], rel=1e-4, abs=1e-5), (row, j)


@pytest.mark.parametrize("name", ["metric_keydiff_rank", "metric_keydiff_union"])
def test_rank_combinations_keep_the_metric_allocation_over_heads(name):
    """Each head gives up exactly the pages that ``kvcompress`` takes from it
    (its scores are its own metric values, reordered)."""
    g = torch.Generator().manual_seed(7)
    rows, width = 6, 64
    keys = torch.randn(rows, width, 8, generator=g)
    scale = torch.tensor([1e-4, 1e-2, 1.0, 1e-3, 10.0, 1e-1]).view(-1, 1)  # very different heads
    kvs = make_kvs(keys, metrics=torch.rand(rows, width, generator=g) * scale, num_tokens=80)
    for pages in (5, 20, 40):
        ref = select_evictions(scorers.score("kvcompress", kvs, 4, 2), pages, 4)
        got = select_evictions(scorers.score(name, kvs, 4, 2), pages, 4)
        assert got.pages_per_head.tolist() == ref.pages_per_head.tolist()


def _two_signal_head(width=40):
    """One head where the attention metric and key diversity disagree:
    KVs 10-13 are the most attended but share the common key direction,
    KVs 25-28 are the most diverse keys but barely attended."""
    g = torch.Generator().manual_seed(8)
    common = F.normalize(torch.ones(16), dim=0)
    keys = common + 0.05 * torch.randn(width, 16, generator=g)
    for j in range(25, 29):
        keys[j] = F.normalize(torch.randn(16, generator=g), dim=0) * 2 - 1.5 * common
    metrics = 0.01 + 0.01 * torch.rand(width, generator=g)
    metrics[10:14] = 1.0
    metrics[25:29] = 0.0001
    return keys.unsqueeze(0), metrics.unsqueeze(0)


def test_union_keeps_what_each_component_keeps():
    keys, metrics = _two_signal_head()
    kvs = make_kvs(keys, metrics=metrics, num_tokens=100)
    attended, diverse = set(range(10, 14)), set(range(25, 29))

    def kept(name, evict):
        ev = evicted_set(scorers.score(name, kvs, 0, 0), evict)[0]
        return set(range(40)) - ev

    keep_8 = 32  # evict 32 of 40: 8 stay
    assert attended <= kept("kvcompress", keep_8) and not diverse & kept("kvcompress", keep_8)
    assert diverse <= kept("keydiff", keep_8) and not attended & kept("keydiff", keep_8)
    # The union by construction; the z-score sum here because each signal is
    # an outlier of its own head distribution.
    for name in ("metric_keydiff_union", "metric_keydiff"):
        assert attended | diverse == kept(name, keep_8), name
    # The mean of ranks is a compromise, not a union: a KV that is top by one
    # signal and bottom by the other ranks mid-way and can lose.
    assert not diverse <= kept("metric_keydiff_rank", keep_8)


def test_metric_keydiff_is_per_head_normalised():
    """Scaling one head's metric (or its keys) changes nothing: the z-scores
    are per head, so heads are compared on their normalised scores."""
    g = torch.Generator().manual_seed(9)
    keys = torch.randn(2, 30, 8, generator=g)
    metrics = torch.rand(2, 30, generator=g)
    a = scorers.get_scorer("metric_keydiff").score(make_kvs(keys, metrics=metrics, num_tokens=30))
    b = scorers.get_scorer("metric_keydiff").score(
        make_kvs(keys * torch.tensor([3.0, 1.0]).view(-1, 1, 1),
                 metrics=metrics * torch.tensor([1000.0, 1.0]).view(-1, 1), num_tokens=30))
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(a.mean(dim=1), torch.zeros(2), atol=1e-4)


# --- protection -----------------------------------------------------------------

def adversarial_kvs(num_tokens=50, protected=10, sinks=4, rows=3, non_finite=False):
    """KVs where the sinks and the protected window are what every scorer
    would evict first: lowest metric, largest norm, all along the dominant key
    direction (keydiff's anchor), and the sinks are the oldest.
    ``non_finite``: plus keys that overflowed (inf, -inf), a NaN key
    component and NaN / inf metrics among the unprotected KVs."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(rows, num_tokens, 8, generator=g)
    metrics = torch.rand(rows, num_tokens, generator=g) + 1
    special = torch.zeros(num_tokens, dtype=torch.bool)
    special[:sinks] = True
    special[num_tokens - protected:] = True
    keys[:, special] = 10 * torch.eye(8)[0]
    metrics[:, special] = 0
    if non_finite:
        keys[0, 20] = float("inf")
        keys[1, 21, 3] = float("nan")
        keys[2, 22] = float("-inf")
        metrics[0, 23] = float("nan")
        metrics[1, 24] = float("inf")
    return make_kvs(keys, metrics=metrics, num_tokens=num_tokens), special


@pytest.mark.parametrize("name", SCORERS)
def test_protected_window_and_sinks_are_never_evicted(name):
    kvs, special = adversarial_kvs()
    raw = scorers.get_scorer(name).score(kvs).float()
    if name != "random":  # the construction really is adversarial
        cheapest = torch.argsort(raw, dim=1, stable=True)[:, :4]
        assert special[cheapest].any(dim=1).all()
    s = scorers.score(name, kvs, protected_window=10, sink_tokens=4)
    assert torch.isinf(s[:, special]).all() and torch.isfinite(s[:, ~special]).all()
    costs, _ = unit_costs(s, 4)
    max_evictable = int(torch.isfinite(costs).sum())
    assert max_evictable == 3 * ((50 - 10 - 4) // 4)  # the scheduler's max_evictable
    for allocation in ("joint", "uniform"):
        ev = select_evictions(s, max_evictable, 4, allocation)
        evicted = ev.evict_idx[ev.evict_idx >= 0]
        assert not special[evicted.long()].any()


@pytest.mark.parametrize("name", SCORERS)
def test_non_finite_keys_and_metrics_leave_every_unprotected_kv_evictable(name):
    """Keys that overflowed, NaN keys and NaN/inf metrics give NaN or inf
    raw scores (knorm: inf, keydiff: NaN); the scheduler planned with
    every unprotected KV, so they must all stay selectable, and the
    protected ones never."""
    kvs, special = adversarial_kvs(non_finite=True)
    s = scorers.score(name, kvs, protected_window=10, sink_tokens=4)
    assert not torch.isnan(s).any()
    assert torch.isinf(s[:, special]).all() and torch.isfinite(s[:, ~special]).all()
    costs, _ = unit_costs(s, 4)
    max_evictable = int(torch.isfinite(costs).sum())
    assert max_evictable == 3 * ((50 - 10 - 4) // 4)
    ev = select_evictions(s, max_evictable, 4)
    evicted = ev.evict_idx[ev.evict_idx >= 0]
    assert not special[evicted.long()].any()


# --- chunking -------------------------------------------------------------------

@pytest.mark.parametrize("name", SCORERS)
def test_chunked_scoring_equals_scoring_all_heads_at_once(name):
    g = torch.Generator().manual_seed(4)
    rows, width = 7, 45
    keys = torch.randn(rows, width, 16, generator=g).to(torch.bfloat16)
    counts = torch.tensor([45, 40, 45, 33, 45, 41, 45])
    valid = torch.arange(width).view(1, -1) < counts.view(-1, 1)
    keys[~valid] = 0
    kvs = make_kvs(keys, metrics=torch.rand(rows, width, generator=g), valid=valid, num_tokens=45)
    scorer = scorers.get_scorer(name)
    whole = scorer.score(kvs)
    for step in (1, 2, 3):
        parts = [scorer.score(kvs.rows(a, min(a + step, rows))) for a in range(0, rows, step)]
        assert torch.equal(torch.cat(parts), whole)
    costs, order = rank_heads(scorer, kvs.rows, rows, width, 16, 4, 6, 2, chunk_rows=rows)
    ref_costs, ref_order = unit_costs(scorers.score(scorer, kvs, 6, 2), 4)
    assert torch.equal(costs, ref_costs) and torch.equal(order, ref_order.to(torch.int32))
    for step in (1, 3):
        c, o = rank_heads(scorer, kvs.rows, rows, width, 16, 4, 6, 2, chunk_rows=step)
        assert torch.equal(c, costs) and torch.equal(o, order)


def test_chunk_size_bounds_the_gathered_keys():
    # 32k tokens, head_dim 128: 16 MiB of fp32 keys per head -> 4 heads a chunk.
    assert scorers.rows_per_chunk(32768, 128, needs_keys=True) == 4
    assert scorers.rows_per_chunk(32768, 128, needs_keys=True) * 32768 * 128 * 4 <= scorers.CHUNK_BYTES
    assert scorers.rows_per_chunk(10**6, 128, needs_keys=True) == 1  # at least one head
    assert scorers.rows_per_chunk(100, 64, needs_keys=False) >= 256


# --- through the worker's gather --------------------------------------------------

L, B, H, N, D = 2, 8, 2, 4, 8


def _step(new=(), plans=(), scheduled=None):
    new_reqs = [
        NewRequestData(req_id=rid, prompt_token_ids=[0] * plen, mm_features=[], sampling_params=None,
                       pooling_params=None, block_ids=(list(blocks),), num_computed_tokens=0,
                       lora_request=None)
        for rid, blocks, plen in new
    ]
    cached = CachedRequestData(req_ids=[], resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
                               new_block_ids=[], num_computed_tokens=[], num_output_tokens=[])
    so = SchedulerOutput(
        scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached,
        num_scheduled_tokens=dict(scheduled or {}), total_num_scheduled_tokens=sum((scheduled or {}).values()),
        scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={}, finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )
    so.kv_compress = StepPlan(evictions=list(plans), prefill_ends={rid: plen for rid, _, plen in new})
    return so


@pytest.mark.parametrize("name", ["knorm", "keydiff"])
def test_worker_gathers_the_right_keys(name):
    """Keys written at each head's pages (blocks out of order) are the keys the
    scorer sees: each head keeps exactly the KVs the scorer ranks highest."""
    storage = torch.zeros(L * B * H * N * 2 * D, dtype=torch.bfloat16)
    layer_numel = B * H * N * 2 * D
    layers = [storage[i * layer_numel:(i + 1) * layer_numel].view(B, H, N, 2 * D) for i in range(L)]
    state = KVCompressWorkerState(KVCompressConfig(rate=0.5), HeadPool.from_layer_caches(layers),
                                  max_model_len=B * N, max_num_reqs=2)
    n, blocks = 22, [6, 1, 4, 0, 3, 7]
    state.begin_step(_step(new=[("r", blocks, n)], scheduled={"r": n}))
    state.end_step()
    req = state.table.requests["r"]
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(L * H, n, D, generator=g).to(torch.bfloat16)
    pool, pt = state.pool, state.table.page_table[req.slot].view(L * H, -1)
    for row in range(L * H):
        for j in range(n):
            page = int(pt[row, j // N])
            pool.kv_pages[page, 0, j % N] = keys[row, j]
            pool.kv_pages[page, 1, j % N] = -keys[row, j]  # values: must not be read
            pool.positions[page, j % N] = j
    geom = PageGeometry(N, L * H)
    num_pages, protected, sinks = 8, 4, 1
    keep_blocks = geom.blocks_needed(n, num_pages)
    plan = EvictionPlan(req_id="r", num_pages=num_pages, num_tokens=n,
                        pages_after=geom.pages_in_use(n, num_pages),
                        released_block_ids=tuple(blocks[keep_blocks:]), protected_window=protected,
                        sink_tokens=sinks, scorer=name)
    state.begin_step(_step(plans=[plan]))
    state.end_step()
    expect = scorers.score(name, make_kvs(keys, num_tokens=n), protected, sinks)
    ref = select_evictions(expect, num_pages, N)
    counts = state.table.kv_count[req.slot].view(-1)
    assert (n - counts).tolist() == (ref.pages_per_head * N).tolist()
    for row in range(L * H):
        kept = set()
        for j in range(int(counts[row])):
            page = int(pt[row, j // N])
            pos = int(pool.positions[page, j % N])
            assert torch.equal(pool.kv_pages[page, 0, j % N], keys[row, pos])
            kept.add(pos)
        evicted = {int(i) for i in ref.evict_idx[row] if i >= 0}
        assert kept == set(range(n)) - evicted


def test_worker_gives_scorers_a_seed_from_the_prompt():
    """``HeadKVs.seed`` is the hash of the request's prompt tokens: the same for
    the same prompt under another request id (vLLM adds random characters to
    ids), another for another prompt, kept across preemption."""
    from kvcompress_vllm.worker.state import request_seed

    storage = torch.zeros(L * B * H * N * 2 * D, dtype=torch.bfloat16)
    layer_numel = B * H * N * 2 * D
    layers = [storage[i * layer_numel:(i + 1) * layer_numel].view(B, H, N, 2 * D) for i in range(L)]
    state = KVCompressWorkerState(KVCompressConfig(rate=0.5), HeadPool.from_layer_caches(layers),
                                  max_model_len=B * N, max_num_reqs=3)
    step = _step(new=[("0-1111aaaa", [0, 1], 6), ("0-2222bbbb", [2, 3], 6), ("1-3333cccc", [4, 5], 6)],
                 scheduled={"0-1111aaaa": 6, "0-2222bbbb": 6, "1-3333cccc": 6})
    for new_req, prompt in zip(step.scheduled_new_reqs, ([5, 6, 7, 8, 9, 10],) * 2 + ([5, 6, 7, 8, 9, 11],)):
        new_req.prompt_token_ids = prompt
    state.begin_step(step)
    state.end_step()
    seeds = {rid: state._gather_request(req, 0, 1, 8, rid).seed
             for rid, req in state.table.requests.items()}
    assert seeds["0-1111aaaa"] == seeds["0-2222bbbb"] == request_seed("x", [5, 6, 7, 8, 9, 10])
    assert seeds["1-3333cccc"] == request_seed("y", [5, 6, 7, 8, 9, 11]) != seeds["0-1111aaaa"]
    # A prompt given as embeddings: by their bytes (not the random id), with
    # their shape and dtype; a long one by its first and last bytes.
    emb = torch.randn(7, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert request_seed("a", None, emb) == request_seed("b", None, emb.clone())
    other = emb.clone()
    other[3, 5] += 1
    assert request_seed("a", None, other) != request_seed("a", None, emb)
    assert request_seed("a", None, emb.view(14, 8)) != request_seed("a", None, emb)
    assert request_seed("a", None, emb.float()) != request_seed("a", None, emb)
    big = torch.randn(1 << 19, generator=torch.Generator().manual_seed(2))  # 2 MiB
    tail = big.clone()
    tail[-1] += 1
    assert request_seed("a", None, big) == request_seed("b", None, big.clone())
    assert request_seed("a", None, tail) != request_seed("a", None, big)
    # Token ids with placeholders where embeddings go: the embeddings count too.
    assert request_seed("a", [0, 0, 7], emb) != request_seed("a", [0, 0, 7], other)
    assert request_seed("a", [0, 0, 7], emb) != request_seed("a", [0, 0, 7])
    assert request_seed("a", None, emb.t()) == request_seed("b", None, emb.t().contiguous())
    assert request_seed("a", None) != request_seed("b", None)  # neither: by id
    # Preempted (its pages dropped), then resumed: the same seed.
    preempt = _step()
    preempt.preempted_req_ids = {"1-3333cccc"}
    state.begin_step(preempt)
    state.end_step()
    assert "1-3333cccc" not in state.table.requests
    resume = _step(scheduled={"1-3333cccc": 1})
    resume.scheduled_cached_reqs.req_ids = ["1-3333cccc"]
    resume.scheduled_cached_reqs.resumed_req_ids = {"1-3333cccc"}
    resume.scheduled_cached_reqs.new_block_ids = [([4, 5],)]
    resume.scheduled_cached_reqs.num_computed_tokens = [6]
    resume.kv_compress.prefill_ends["1-3333cccc"] = 6
    state.begin_step(resume)
    state.end_step()
    req = state.table.requests["1-3333cccc"]
    assert state._gather_request(req, 0, 1, 8, "1-3333cccc").seed == seeds["1-3333cccc"]
    # Finished: forgotten.
    done = _step()
    done.finished_req_ids = {"1-3333cccc", "0-1111aaaa", "0-2222bbbb"}
    state.begin_step(done)
    state.end_step()
    assert state._seeds == {}


def test_worker_seeds_a_prompt_given_as_embeddings_by_its_embeddings():
    """A request whose prompt comes as embeddings (no token ids): the worker
    seeds it from the embeddings, so the same prompt under two request ids
    (random per run) gets one seed."""
    from kvcompress_vllm.worker.state import request_seed

    storage = torch.zeros(L * B * H * N * 2 * D, dtype=torch.bfloat16)
    layer_numel = B * H * N * 2 * D
    layers = [storage[i * layer_numel:(i + 1) * layer_numel].view(B, H, N, 2 * D) for i in range(L)]
    state = KVCompressWorkerState(KVCompressConfig(rate=0.5), HeadPool.from_layer_caches(layers),
                                  max_model_len=B * N, max_num_reqs=2)
    emb = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))
    step = _step(new=[("0-1111aaaa", [0, 1], 6), ("0-2222bbbb", [2, 3], 6)],
                 scheduled={"0-1111aaaa": 6, "0-2222bbbb": 6})
    for new_req in step.scheduled_new_reqs:
        new_req.prompt_token_ids, new_req.prompt_embeds = None, emb.clone()
    state.begin_step(step)
    state.end_step()
    seeds = {rid: state._gather_request(req, 0, 1, 8, rid).seed
             for rid, req in state.table.requests.items()}
    assert seeds["0-1111aaaa"] == seeds["0-2222bbbb"] == request_seed("x", None, emb)
