"""The real scheduler and the real worker state together, without a model.

``KVCompressScheduler`` (``tests/sched_harness.py``: vLLM's scheduler over a
small pool of 3 layers x 2 KV heads, block size 16) hands every step's
``SchedulerOutput`` to a real ``KVCompressWorkerState`` over a float32 or
bfloat16 pool of the same blocks, as the CPU worker does: ``begin_step`` (evictions,
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
protected windows / ``max_cache_tokens``, priorities, aborts, ids of ended
requests used again, pools small enough that vLLM preempts, and the page
layouts of the CPU worker (``LAYOUTS``: with vLLM's prefill path, requests
in vLLM's in-page layout -- never-compressed ones written by vLLM's writer
-- next to, or instead of, requests in our plain rows).  CI runs ``CASES``
cases; ``KVC_FUZZ_CASES=N`` runs N (seeds 0 .. N-1, the first ``CASES`` of them CI's).
"""

import os
import random

import pytest
import torch

from request_options import random_options
from sched_harness import (
    BS, HEAD_SIZE, HEADS, LAYERS, add_tokens, block_hasher, engine_config, make_scheduler, run_step,
)

MOD = 16_777_213  # hashes below 2**24: three bytes
CASES = 4
NUM_CASES = int(os.environ.get("KVC_FUZZ_CASES", CASES))
MAX_STEPS = 4000


def _prefix_hashes(tokens) -> torch.Tensor:
    """[len(tokens)] float32: hash of ``tokens[: p + 1]`` at ``p``."""
    out, h = [], 0
    for t in tokens:
        h = (h * 1_000_003 + int(t) + 1) % MOD
        out.append(h)
    return torch.tensor(out, dtype=torch.int64)


def _encode(code, pos, layer, head) -> torch.Tensor:
    """The key of the KV at ``pos`` of a request whose tokens up to it hash to
    ``code``, in ``layer`` and ``head`` (int64 tensors, broadcast together):
    ``[..., HEAD_SIZE]`` float32 of values below 256, exact in bf16 as well
    (its value is the negation).  Dims: hash bytes 0, 4, 5; position bytes
    1, 6; layer 2; head 3; 1 in 7."""
    code, pos, layer, head = torch.broadcast_tensors(code, pos, layer, head)
    parts = [code % 256, pos % 256, layer, head, code // 256 % 256, code // 65536, pos // 256,
             torch.ones_like(code)]
    return torch.stack(parts, dim=-1).float()


#: The CPU worker's page layouts a case runs (``_case``): ``plain`` -- every
#: request in our plain ``[N, D]`` rows (``KVCOMPRESS_CPU_PREFILL=own``);
#: ``vec`` -- vLLM's prefill path on a CPU without AMX: vLLM's vec in-page layout
#: (``ops.reference.vec_packing``) for never-compressed requests (written by
#: vLLM's writer: no positions, no metric) and for compressible ones that
#: record no metric (all of them with ``metric_packed``), our plain rows for the
#: rest; ``shuffled`` -- the same with a random in-page permutation, as
#: ``PagePacking.learn`` would find for a layout nobody wrote down.
LAYOUTS = ("plain", "vec", "shuffled")


def _packing(layout, dtype, gen):
    """The pool's ``PagePacking`` for ``layout`` (None: ``plain``)."""
    from kvcompress_vllm.attention.cpu_packed import PagePacking
    from kvcompress_vllm.ops.reference import vec_packing

    if layout == "plain":
        return None
    if layout == "vec":
        offsets = vec_packing(BS, HEAD_SIZE)
    else:
        offsets = torch.stack([torch.randperm(BS * HEAD_SIZE, generator=gen) for _ in range(2)])
        offsets = offsets.view(2, BS, HEAD_SIZE).to(torch.int32)
    return PagePacking(isa=layout, dtype=dtype, block_size=BS, head_dim=HEAD_SIZE,
                       offsets=offsets)


class FakeWorker:
    """A ``KVCompressWorkerState`` over a ``dtype`` pool of ``num_blocks``
    blocks in ``layout`` (``LAYOUTS``), run by ``forward(scheduler_output)``
    as the CPU worker runs it."""

    def __init__(self, sched, num_blocks, rng, layout="plain", metric_packed=False,
                 dtype=torch.float32):
        from kvcompress_vllm.worker.state import HeadPool, KVCompressWorkerState

        per_layer = num_blocks * HEADS * BS * 2 * HEAD_SIZE
        storage = torch.zeros(LAYERS * per_layer, dtype=dtype)
        #: vLLM's per-layer caches [B, H, N, 2D]; vLLM's writer views each
        #: (block, head) as a K half and a V half of N * D elements.
        self.layers = [storage[i * per_layer:(i + 1) * per_layer].view(
            num_blocks, HEADS, BS, 2 * HEAD_SIZE) for i in range(LAYERS)]
        self.pool = HeadPool.from_layer_caches(self.layers)
        self.state = KVCompressWorkerState(sched.kvc_config, self.pool, max_model_len=2048,
                                           max_num_reqs=sched.max_num_running_reqs)
        self.sched, self.rng = sched, rng
        self.gen = torch.Generator().manual_seed(rng.randrange(2**31))
        packing = _packing(layout, dtype, torch.Generator().manual_seed(num_blocks))
        self.pool.packing, self.pool.metric_packed = packing, packing is not None and metric_packed
        self.offsets = None if packing is None else packing.offsets.to(torch.int64)  # [2, N, D]
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

    def _vllm_layout(self, req) -> bool:
        """Never compressed, with vLLM's prefill path: vLLM's writer and kernel."""
        return req.stock_layout and self.offsets is not None

    def _vllm_blocks(self, rid, pos):
        """vLLM's slot mapping: the scheduler's block (position order) of each
        of ``pos [t]``, the positions of request ``rid``."""
        return torch.tensor(self.sched.kv_cache_manager.get_block_ids(rid)[0])[pos // BS]

    def _write_vllm(self, layer, blocks, k, pos):
        """vLLM's ``cpu_attn_reshape_and_cache`` for rows ``k [t, H, D]`` at
        positions ``pos [t]`` in ``blocks [t]`` (``_vllm_blocks``): in the
        pool's in-page layout, K and V only."""
        flat = self.layers[layer].view(self.layers[layer].shape[0], HEADS, 2, BS * HEAD_SIZE)
        heads = torch.arange(HEADS).view(1, -1, 1)
        for half, x in enumerate((k, -k)):
            at = self.offsets[half][pos % BS].unsqueeze(1)  # [t, 1, D]
            flat[blocks.view(-1, 1, 1), heads, half, at] = x

    def forward(self, out):
        from kvcompress_vllm import ops

        state = self.state
        restarted = [r.req_id for r in out.scheduled_new_reqs]
        for rid in restarted:  # an id may come back for another request
            self.hashes.pop(rid, None)
        for rid in restarted + list(out.scheduled_cached_reqs.resumed_req_ids):
            self.compressed_at.pop(rid, None)
        for plan in out.kv_compress.evictions:
            self.compressed_at[plan.req_id] = plan.num_tokens
        state.begin_step(out)
        rids = list(out.num_scheduled_tokens)
        self.rng.shuffle(rids)  # the runner's batch order is its own
        if rids:
            reqs = [state.table.requests[r] for r in rids]
            lens = [req.step_tokens for req in reqs]
            qsl = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
            batch = state.build_batch(rids, qsl)
            pos = batch.token_positions.to(torch.int64)  # [T]
            code = torch.cat([self._hashes(r)[pos[qsl[i]:qsl[i + 1]]] for i, r in enumerate(rids)])
            # Token rows by writer: ours in plain rows, ours in the packing, vLLM's.
            kind = torch.cat([torch.full((n,), 2 if self._vllm_layout(req) else int(req.packed))
                              for req, n in zip(reqs, lens)])
            ours = [(t, packed) for packed in (0, 1)
                    if (t := torch.nonzero(kind == packed).view(-1)).numel()]
            vllm_rows = torch.nonzero(kind == 2).view(-1)  # in batch order, as these blocks
            vllm_blocks = [self._vllm_blocks(rid, pos[qsl[i]:qsl[i + 1]])
                           for i, (rid, req) in enumerate(zip(rids, reqs)) if self._vllm_layout(req)]
            vllm_blocks = torch.cat(vllm_blocks) if vllm_blocks else None
            for layer in range(LAYERS):
                k = _encode(code.view(-1, 1), pos.view(-1, 1), torch.tensor(layer),
                            torch.arange(HEADS)).to(self.pool.kv_pages.dtype)  # [T, H, D]
                for t, packed in ours:
                    ops.write_kv(k[t], -k[t], self.pool.kv_pages, batch.write_slots[layer][t],
                                 self.pool.metrics, self.pool.positions, batch.token_positions[t],
                                 packing=self.pool.packing.offsets if packed else None)
                if vllm_blocks is not None:
                    self._write_vllm(layer, vllm_blocks, k[vllm_rows], pos[vllm_rows])
                self.pool.metrics.add_(torch.rand(self.pool.metrics.shape, generator=self.gen))
                if batch.pool_rows:
                    state.pool_prompt_metrics(batch, layer)
        stats = state.end_step()
        self.check()
        return stats

    def _read(self, req, pages, slots):
        """K and V ``[rows, width, D]`` at ``pages``/``slots`` ``[rows, width]``,
        through the request's layout."""
        if self.offsets is None or not (req.packed or req.stock_layout):
            return self.pool.kv_pages[pages, 0, slots], self.pool.kv_pages[pages, 1, slots]
        halves = self.pool.kv_pages.view(self.pool.kv_pages.shape[0], 2, -1)  # [P, 2, N*D]
        return tuple(torch.gather(halves[pages, half], 2, self.offsets[half][slots])
                     for half in (0, 1))

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
            if self._vllm_layout(req):  # vLLM's writer keeps no positions: in order
                pos = cols.expand_as(pages)
            else:
                pos = self.pool.positions[pages, slots].to(torch.int64)
            key, value = self._read(req, pages, slots)  # [L*H, width, D]
            where = f"request {rid} ({now} tokens, {manager.evicted_pages.get(rid, 0)} pages evicted)"
            inside = (pos >= 0) & (pos < now)
            assert bool(inside[valid].all()), f"{where}: positions outside [0, {now})"
            head_row = torch.arange(rows.shape[0]).view(-1, 1)
            expect = _encode(self._hashes(rid)[pos.clamp(0, now - 1)], pos, head_row // HEADS,
                             head_row % HEADS).to(key.dtype)
            wrong = ((key != expect).any(-1) | (value != -expect).any(-1)) & valid
            if bool(wrong.any()):
                r, c = (int(x) for x in torch.nonzero(wrong)[0])
                raise AssertionError(
                    f"{where}: head row {r} column {c} holds KV {key[r, c].tolist()} at position "
                    f"{int(pos[r, c])}, expected {expect[r, c].tolist()} (``_encode``)")
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
    """(prefix caching, priority scheduling, ranks, layout, pool dtype) of a
    case: CI's 4 cover each pair of the first two once, two of them on two
    ranks, each layout (``LAYOUTS``) at least once, with prefix caching
    ``vec`` and ``shuffled``, and float32 and bfloat16 twice each."""
    return (bool(seed & 1), bool(seed & 2), 2 if seed % 3 == 0 else 1, LAYOUTS[(seed + 1) % 3],
            torch.bfloat16 if seed & 2 else torch.float32)


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

    prefix_caching, priority, ranks, layout, dtype = _case(seed)
    rng = random.Random(f"fuzz/{seed}")
    # Draws added after the first cases were found, from their own stream so
    # that those cases (``FOUND``) schedule as they did.
    more = random.Random(f"fuzz/{seed}/more")
    # With prefix caching every request's pages must be in one layout (a
    # cached block is read by others; ``PageLayouts.check_prefix_caching``).
    metric_packed = prefix_caching or more.random() < 0.5
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
    workers = [FakeWorker(sched, num_blocks, rng, layout, metric_packed, dtype)
               for _ in range(ranks)]

    def forward(out):
        stats = [w.forward(out) for w in workers]
        _same_on_every_rank(workers, step)
        return stats[0]  # the scheduler hears from rank 0, as in vLLM
    hasher = block_hasher() if prefix_caching else None
    prefixes = [[rng.randrange(100, 20000) for _ in range(rng.randint(5, 200))] for _ in range(3)]
    num_requests = 40
    capacity = (num_blocks - 1) * BS  # tokens: block 0 is vLLM's null block
    added, reused, ids = 0, 0, set()
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
                # Sometimes the id of a request that has ended (finished or
                # aborted, possibly in the step just run: the next step then
                # tells the worker of both).
                # (sorted: a set's order varies from run to run)
                ended = sorted(r for r in ids if r not in sched.requests)
                rid = more.choice(ended) if ended and more.random() < 0.15 else f"q{added}"
                reused += rid in ids
                ids.add(rid)
                add_tokens(sched, rid, prompt, hasher, max_tokens=max_tokens,
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
          f"{layout} layout{', metric packed' if metric_packed and layout != 'plain' else ''}, "
          f"{str(dtype)[6:]}, {num_blocks} blocks, {reused} ids reused): "
          f"{step + 1} steps, {totals.compressions} compressions, {totals.preemptions} preemptions, "
          f"{totals.blocks_released} blocks released, {workers[0].checked} request checks")
