"""The real scheduler and the real worker state together, without a model.

``KVCompressScheduler`` (``tests/sched_harness.py``: vLLM's scheduler over a
small pool of 3 layers x 2 KV heads, block size 16) hands every step's
``SchedulerOutput`` to a real ``KVCompressWorkerState`` over a float32 pool of
the same blocks, as the CPU worker does: ``begin_step`` (evictions,
compaction, migration out of released blocks, prefix-cache hits),
``build_batch``, a K/V write of every scheduled token through the batch's
write slots (the C++ kernels, as on the CPU worker), the metric (random increments standing in for attention),
prompt pooling, ``end_step``; its stats go back with the model output, and
``debug_checks`` makes the scheduler compare every request's page count with
the worker's after every step.  Some cases run two such workers, as the ranks
of a tensor-parallel worker: the same plans, each evicting by its own random
metric, and after every step the same requests, page counts and blocks.

Every K and V written encodes what it is the KV of: a hash of the request's
tokens up to its position (so requests that share a prefix write the same
KVs, as with prefix caching), the position, the layer and the head.  After
every step each head of each request must hold, at distinct positions below
its token count, exactly those KVs: none overwritten by another request,
lost or moved to the wrong head by a compaction or a migration, or read from
a block that was handed out again; every head holds the sinks, the newest
``protected_window`` tokens of the last compression and every token since; a
request never compressed holds all of its tokens.

Random prompts (shared prefixes with prefix caching; twins, as ``n = 2``), step budgets,
long-prefill thresholds, per-request rates / scorers / allocations /
protected windows / ``max_cache_tokens``, priorities, aborts, and pools small
enough that vLLM preempts.  CI runs ``CASES`` cases; ``KVC_FUZZ_CASES=N``
runs N (seeds 0 .. N-1, the first ``CASES`` of them CI's).
"""

import os
import random

import pytest
import torch

from request_options import random_options
from sched_harness import (
    BS, HEAD_SIZE, HEADS, LAYERS, add_tokens, block_hasher, engine_config, make_scheduler, run_step,
)

MOD = 16_777_213  # hashes stay exact in float32 (< 2**24)
CASES = 4
NUM_CASES = int(os.environ.get("KVC_FUZZ_CASES", CASES))
MAX_STEPS = 4000


def _prefix_hashes(tokens) -> torch.Tensor:
    """[len(tokens)] float32: hash of ``tokens[: p + 1]`` at ``p``."""
    out, h = [], 0
    for t in tokens:
        h = (h * 1_000_003 + int(t) + 1) % MOD
        out.append(h)
    return torch.tensor(out, dtype=torch.float32)


class FakeWorker:
    """A ``KVCompressWorkerState`` over a float32 pool of ``num_blocks``
    blocks, run by ``forward(scheduler_output)`` as the CPU worker runs it."""

    def __init__(self, sched, num_blocks, rng):
        from kvcompress_vllm.worker.state import HeadPool, KVCompressWorkerState

        per_layer = num_blocks * HEADS * BS * 2 * HEAD_SIZE
        storage = torch.zeros(LAYERS * per_layer, dtype=torch.float32)
        layers = [storage[i * per_layer:(i + 1) * per_layer].view(num_blocks, HEADS, BS, 2 * HEAD_SIZE)
                  for i in range(LAYERS)]
        self.pool = HeadPool.from_layer_caches(layers)
        self.state = KVCompressWorkerState(sched.kvc_config, self.pool, max_model_len=2048,
                                           max_num_reqs=sched.max_num_running_reqs)
        self.sched, self.rng = sched, rng
        self.gen = torch.Generator().manual_seed(rng.randrange(2**31))
        self.hashes: dict[str, torch.Tensor] = {}
        #: request -> its tokens at its last compression (since it (re)started)
        self.compressed_at: dict[str, int] = {}
        self.checked = 0

    def _hashes(self, rid):
        tokens = self.sched.requests[rid].all_token_ids
        h = self.hashes.get(rid)
        if h is None or h.numel() < len(tokens):
            h = self.hashes[rid] = _prefix_hashes(tokens)
        return h

    def forward(self, out):
        from kvcompress_vllm import ops

        state = self.state
        restarted = [r.req_id for r in out.scheduled_new_reqs]
        for rid in restarted + list(out.scheduled_cached_reqs.resumed_req_ids):
            self.compressed_at.pop(rid, None)
        for plan in out.kv_compress.evictions:
            self.compressed_at[plan.req_id] = plan.num_tokens
        state.begin_step(out)
        rids = list(out.num_scheduled_tokens)
        self.rng.shuffle(rids)  # the runner's batch order is its own
        if rids:
            lens = [state.table.requests[r].step_tokens for r in rids]
            qsl = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
            batch = state.build_batch(rids, qsl)
            pos = batch.token_positions.to(torch.int64)  # [T]
            code = torch.cat([self._hashes(r)[pos[qsl[i]:qsl[i + 1]]] for i, r in enumerate(rids)])
            for layer in range(LAYERS):
                k = torch.zeros(pos.numel(), HEADS, HEAD_SIZE)
                k[:, :, 0] = code.view(-1, 1)
                k[:, :, 1] = pos.view(-1, 1).float()
                k[:, :, 2] = layer
                k[:, :, 3] = torch.arange(HEADS).float()
                ops.write_kv(k, -k, self.pool.kv_pages, batch.write_slots[layer],
                                   self.pool.metrics, self.pool.positions, batch.token_positions)
                self.pool.metrics.add_(torch.rand(self.pool.metrics.shape, generator=self.gen))
                if batch.pool_rows:
                    state.pool_prompt_metrics(batch, layer)
        stats = state.end_step()
        self.check()
        return stats

    def check(self):
        """Every head of every request holds exactly its own KVs (module docstring)."""
        manager = self.sched.kvc_manager
        j = torch.arange(2048)
        for rid, req in self.state.table.requests.items():
            now = req.num_tokens
            if now == 0:
                continue
            assert now == self.sched.requests[rid].num_computed_tokens, (rid, now)
            rows, counts = self.state.table.head_rows(req)  # [L*H, max_pages], [L*H]
            width = int(counts.max())
            cols = j[:width]
            valid = cols.view(1, -1) < counts.view(-1, 1)  # [L*H, width]
            pages = rows[:, cols // BS].to(torch.int64).clamp(min=0)
            slots = (cols % BS).expand_as(pages)
            pos = self.pool.positions[pages, slots].to(torch.int64)
            key = self.pool.kv_pages[pages, 0, slots]  # [L*H, width, D]
            value = self.pool.kv_pages[pages, 1, slots]
            where = f"request {rid} ({now} tokens, {manager.evicted_pages.get(rid, 0)} pages evicted)"
            inside = (pos >= 0) & (pos < now)
            assert bool(inside[valid].all()), f"{where}: positions outside [0, {now})"
            expect = torch.zeros_like(key)
            expect[..., 0] = self._hashes(rid)[pos.clamp(0, now - 1)]
            expect[..., 1] = pos.float()
            head_row = torch.arange(rows.shape[0]).view(-1, 1)
            expect[..., 2] = (head_row // HEADS).float()
            expect[..., 3] = (head_row % HEADS).float()
            wrong = ((key != expect).any(-1) | (value != -expect).any(-1)) & valid
            if bool(wrong.any()):
                r, c = (int(x) for x in torch.nonzero(wrong)[0])
                raise AssertionError(
                    f"{where}: head row {r} column {c} holds KV {key[r, c, :4].tolist()} at position "
                    f"{int(pos[r, c])}, expected {expect[r, c, :4].tolist()}")
            held = torch.zeros(rows.shape[0], now, dtype=torch.int64)
            held.scatter_add_(1, torch.where(valid, pos, 0), valid.to(torch.int64))
            assert int(held.max()) <= 1, f"{where}: a head holds one position twice"
            policy = self.sched.kvc_requests[rid].policy
            # Kept: the sinks, the newest protected_window tokens of the last
            # compression and every token since; all, if never compressed.
            must = torch.zeros(now, dtype=torch.bool)
            last = self.compressed_at.get(rid)
            must[max(0, (now if last is None else last) - policy.protected_window):] = True
            must[: policy.sink_tokens] = True
            if not manager.evicted_pages.get(rid, 0):
                must[:] = True
            missing = must.view(1, -1) & (held == 0)
            if bool(missing.any()):
                r = int(torch.nonzero(missing)[0, 0])
                gone = torch.nonzero(missing[r]).view(-1)[:8].tolist()
                raise AssertionError(f"{where}: head row {r} lost protected positions {gone}")
            self.checked += 1


def _options(rng):
    return random_options(rng, window=8, windows=[0, 3, 40], window_p=0.2, cache_extra=[0, 20, 100])


def _case(seed):
    """(prefix caching, priority scheduling, ranks) of a case: CI's 4 cover
    each pair of the first two once, two of them on two ranks."""
    return bool(seed & 1), bool(seed & 2), 2 if seed % 3 == 0 else 1


def _same_on_every_rank(workers, step):
    """Tensor parallelism: every rank holds the same requests, each with the
    same pages in use (chosen from its own heads' metrics) and blocks."""
    tables = [{rid: (w.state.table.pages_in_use(req), list(req.blocks))
               for rid, req in w.state.table.requests.items()} for w in workers]
    for rank, table in enumerate(tables[1:], 1):
        differ = sorted(r for r in table.keys() | tables[0].keys() if table.get(r) != tables[0].get(r))
        assert not differ, f"step {step}: rank {rank} differs from rank 0 for {differ[:8]}"


#: Cases that found a bug, run in CI too, each with the counter that shows the
#: scheduler met it again: 111 -- vLLM preempts a request it already scheduled
#: in the step, after putting the blocks for the step's tokens in the prefix
#: cache; they must leave the cache (``KVCompressScheduler._preempt_request``).
FOUND = {111: "unwritten_uncached"}


@pytest.mark.parametrize("seed", sorted(set(range(NUM_CASES)) | set(FOUND)))
def test_scheduler_and_worker_keep_every_request_s_kvs(model_path, monkeypatch, seed):
    from vllm.v1.request import RequestStatus

    prefix_caching, priority, ranks = _case(seed)
    rng = random.Random(f"fuzz/{seed}")
    extra = {"enable_prefix_caching": True} if prefix_caching else {}
    if priority:
        extra["scheduling_policy"] = "priority"
    cfg = engine_config(model_path, **extra)
    monkeypatch.setattr(cfg.scheduler_config, "long_prefill_token_threshold",
                        rng.choice([0, 0, 16, 40]))
    num_blocks = rng.choice([24, 32, 48, 80])
    sched = make_scheduler(cfg, num_blocks=num_blocks, budget=rng.choice([16, 32, 48, 64]),
                           debug_checks=True)
    # Ranks of a tensor-parallel worker: the same plans, their own metrics.
    workers = [FakeWorker(sched, num_blocks, rng) for _ in range(ranks)]

    def forward(out):
        stats = [w.forward(out) for w in workers]
        _same_on_every_rank(workers, step)
        return stats[0]  # the scheduler hears from rank 0, as in vLLM
    hasher = block_hasher() if prefix_caching else None
    prefixes = [[rng.randrange(100, 20000) for _ in range(rng.randint(5, 200))] for _ in range(3)]
    num_requests = 40
    capacity = (num_blocks - 1) * BS  # tokens: block 0 is vLLM's null block
    added = 0
    for step in range(MAX_STEPS):
        if added < num_requests and (rng.random() < 0.3 or not sched.requests):
            max_tokens = rng.choice([1, 2, 16, 60, 150])
            length = rng.choice([rng.randint(1, 40), rng.randint(1, 380)])
            prompt = [rng.randrange(100, 20000) for _ in range(length)]
            if prefix_caching and rng.random() < 0.6:
                prompt = rng.choice(prefixes) + prompt
            # One request alone fits uncompressed (vLLM checks max_model_len
            # against the pool at start-up).
            prompt = prompt[: max(1, min(400, capacity - max_tokens))]
            options, prio = _options(rng), rng.randint(0, 3) if priority else 0
            # Sometimes twins, as vLLM's frontend splits n = 2: the same prompt
            # added in the same step (with prefix caching the second hits
            # blocks the first is given in that step).
            for _ in range(2 if rng.random() < 0.15 else 1):
                add_tokens(sched, f"q{added}", prompt, hasher, max_tokens=max_tokens,
                           priority=prio, **options)
                added += 1
        if sched.running and rng.random() < 0.02:
            victim = rng.choice(sched.running).request_id
            sched.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
        run_step(sched, forward)
        if added >= num_requests and not sched.requests:
            break
    assert not sched.requests, f"{len(sched.requests)} requests left after {MAX_STEPS} steps"
    run_step(sched, forward)  # the workers hear of the last finished requests
    assert not any(w.state.table.requests for w in workers)
    totals = sched.kvc_totals
    assert totals.compressions > 0 and all(w.checked > 0 for w in workers)
    if seed in FOUND:
        assert getattr(totals, FOUND[seed]) > 0, f"case {seed} no longer meets its bug"
    print(f"case {seed} (prefix caching {prefix_caching}, priority {priority}, {ranks} rank(s), "
          f"{num_blocks} blocks): "
          f"{step + 1} steps, {totals.compressions} compressions, {totals.preemptions} preemptions, "
          f"{totals.blocks_released} blocks released, {workers[0].checked} request checks")
