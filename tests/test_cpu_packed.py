"""Compressible requests kept in vLLM's in-page layout and attended per KV
head by vLLM's kernel (``attention/cpu_packed.py``).

* ``PagePacking.learn`` against vLLM's own writer: our ``write_kv`` (C++ and
  reference) with the learned packing writes the same bytes as
  ``cpu_attn_reshape_and_cache``, for every ISA this CPU runs, and
  ``unpack_keys`` reads the keys back.
* ``compact_heads`` on packed pages (C++ and reference) against the plain
  compaction of the same heads.
* A batch mixing requests in our layout (metric rows, our kernel, gathered
  prefill rows) and packed requests (prefill chunks and decode rows, heads
  with different KV counts) through ``write_kv_split`` / ``run_split``,
  against the reference kernel over plain pages; refusals of broken inputs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_cases import make_attention_case

from kvcompress_vllm import ops
from kvcompress_vllm.attention import cpu_packed, cpu_prefill
from kvcompress_vllm.ops import reference


@pytest.fixture(scope="module")
def vllm_ready():
    import vllm  # noqa: F401  (before vllm._custom_ops)
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()  # what vLLM's CPU worker does at start-up
    return True


def _isa_cases():
    """(isa, dtype, block_size, head_dim) vLLM's CPU kernels accept here."""
    cases = [("vec", torch.bfloat16, 32, 64), ("vec", torch.float32, 128, 128),
             ("vec16", torch.bfloat16, 16, 80)]
    if torch.cpu._is_amx_tile_supported():
        cases += [("amx", torch.bfloat16, 128, 64), ("amx", torch.bfloat16, 32, 128)]
    return cases


def _unpack(pages: torch.Tensor, packing: cpu_packed.PagePacking) -> torch.Tensor:
    """Packed ``[P, 2, N, D]`` -> the same KVs in plain order (both halves)."""
    p, _, n, d = pages.shape
    halves = pages.reshape(p, 2, n * d)
    out = torch.stack([halves[:, h, packing.offsets[h].view(-1).long()] for h in range(2)], 1)
    return out.view(p, 2, n, d)


def _pack(plain: torch.Tensor, packing: cpu_packed.PagePacking) -> torch.Tensor:
    """Plain ``[P, 2, N, D]`` -> packed, with our writer (checked against vLLM's below)."""
    p, _, n, d = plain.shape
    out = torch.zeros_like(plain)
    slots = torch.arange(p * n).view(-1, 1)
    ops.write_kv(plain[:, 0].reshape(-1, 1, d), plain[:, 1].reshape(-1, 1, d), out, slots, None,
                 None, torch.zeros(p * n, dtype=torch.int64), packing=packing.offsets)
    return out


@pytest.mark.parametrize("isa,dtype,block,dim", _isa_cases())
def test_learned_packing_is_vllms_writer(vllm_ready, isa, dtype, block, dim):
    from vllm import _custom_ops as vops

    packing = cpu_packed.PagePacking.learn(dtype, block, dim, isa)
    g = torch.Generator().manual_seed(block + dim)
    num_pages, tokens = 6, 3 * block + 5
    slots = torch.randperm(num_pages * block, generator=g)[:tokens]
    key = torch.randn(tokens, 1, dim, generator=g).to(dtype)
    value = torch.randn(tokens, 1, dim, generator=g).to(dtype)
    theirs = torch.zeros(num_pages, 2, block, dim, dtype=dtype)
    vops.cpu_attn_reshape_and_cache(key, value, theirs[:, 0:1], theirs[:, 1:2], slots, isa)
    positions = torch.randint(0, 9999, (tokens,), generator=g)
    for writer in (ops.write_kv, reference.write_kv):
        ours = torch.zeros_like(theirs)
        pos = torch.zeros(num_pages, block, dtype=torch.int32)
        writer(key, value, ours, slots.view(-1, 1), None, pos, positions, packing=packing.offsets)
        assert torch.equal(ours, theirs)  # the same bytes as vLLM's writer
        assert torch.equal(pos.view(-1)[slots], positions.int())
    plain = _unpack(theirs, packing)
    assert torch.equal(plain[:, 0].reshape(-1, dim)[slots], key[:, 0])
    assert torch.equal(plain[:, 1].reshape(-1, dim)[slots], value[:, 0])
    # unpack_keys: whole pages per head row, padding (-1) as zeros; unpack_pages
    # (C++ and reference) for both halves.
    rows = torch.tensor([[3, 1, -1], [0, 5, 2]], dtype=torch.int32)
    got = packing.unpack_keys(theirs, rows)
    assert got.shape == (2, 3 * block, dim)
    assert torch.equal(got[1], plain[[0, 5, 2], 0].reshape(-1, dim))
    assert torch.equal(got[0, : 2 * block], plain[[3, 1], 0].reshape(-1, dim))
    assert not bool(got[0, 2 * block:].any())
    for half in (0, 1):
        want = plain[rows.clamp(min=0).long(), half] * (rows >= 0).view(2, 3, 1, 1)
        for unpack in (ops.unpack_pages, reference.unpack_pages):
            assert torch.equal(unpack(theirs, rows, packing.offsets, half), want)
    # The layouts our attention kernel reads are formulas (ops.reference); they
    # must be what vLLM's writer does for its ISA.
    formula = {"amx": reference.amx_packing, "vec": reference.vec_packing,
               "vec16": reference.vec_packing}[isa]
    assert torch.equal(packing.offsets, formula(block, dim))
    assert ops.packing_layout(packing.offsets) == (
        None if block % 16 or dim % 32 else {"vec16": "vec"}.get(isa, isa))


@pytest.mark.parametrize("seed", range(4))
def test_packed_compaction_moves_what_plain_compaction_moves(vllm_ready, seed):
    isa, dtype, block, dim = _isa_cases()[-1 if seed % 2 else 0]
    packing = cpu_packed.PagePacking.learn(dtype, block, dim, isa)
    g = torch.Generator().manual_seed(seed)
    heads = 5
    lens = torch.randint(1, 4 * block, (heads,), generator=g, dtype=torch.int32)
    npages = (lens + block - 1) // block
    total = int(npages.sum()) + 2
    perm = torch.randperm(total, generator=g).int()
    table = torch.full((heads, int(npages.max())), -1, dtype=torch.int32)
    evict = torch.zeros(heads, int(lens.max()), dtype=torch.int32)
    counts = torch.zeros(heads, dtype=torch.int32)
    at = 0
    for h in range(heads):
        table[h, : int(npages[h])] = perm[at: at + int(npages[h])]
        at += int(npages[h])
        k = int(torch.randint(0, int(lens[h]) + 1, (1,), generator=g))
        chosen = torch.sort(torch.randperm(int(lens[h]), generator=g)[:k]).values
        evict[h, :k], counts[h] = chosen.int(), k
    plain = torch.randn(total, 2, block, dim, generator=g).to(dtype)
    metrics = torch.rand(total, block, generator=g)
    positions = torch.randint(0, 9999, (total, block), generator=g, dtype=torch.int32)
    want = [plain.clone(), metrics.clone(), positions.clone()]
    ops.compact_heads(*want, table, lens, evict, counts)
    for compact in (ops.compact_heads, reference.compact_heads):
        got = [_pack(plain, packing), metrics.clone(), positions.clone()]
        compact(*got, table, lens, evict, counts, packing=packing.offsets)
        assert torch.equal(_unpack(got[0], packing), want[0])
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def _write_slots(case, rows_of):
    """[T, H] slot (page * N + offset) of every step token of every head."""
    n = case.kv_pages.shape[2]
    out = []
    for r, rows in enumerate(rows_of):
        logical = case.kv_lens[r].long().view(1, -1) - len(rows) + torch.arange(len(rows)).view(-1, 1)
        page = torch.gather(case.page_table[r].long(), 1, (logical // n).T).T
        out.append(page * n + logical % n)
    return torch.cat(out)


@pytest.mark.parametrize("decode_ours", [False, True])
@pytest.mark.parametrize("metric_packed", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_packed_requests_run_on_vllm_kernel_per_head(vllm_ready, seed, metric_packed, decode_ours):
    """Packed requests (compressed: heads hold different KV counts; decode rows
    and prefill chunks) beside requests in our layout that record the metric:
    outputs and metrics against the reference over plain pages; the step's
    K/V written by ``write_kv_split`` land packed or plain per request.
    ``metric_packed``: the packed requests record the metric too
    (``HeadPool.metric_packed``): their rows before ``metric_q_start`` go to
    vLLM's kernel per head, the rest to ours on the same packed pages.
    ``decode_ours`` (``HeadPool.decode_ours``): decode rows of packed requests
    go to our kernel too, metric or not."""
    g = torch.Generator().manual_seed(3000 + seed)
    heads, group, dim = [(1, 3, 64), (3, 3, 64), (2, 4, 128)][seed % 3]
    block = 128 if torch.cpu._is_amx_tile_supported() else 32
    dtype = torch.bfloat16
    num_reqs = int(torch.randint(2, 7, (1,), generator=g))
    case = make_attention_case(num_reqs=num_reqs, num_kv_heads=heads, group=group, head_dim=dim,
                               block_size=block, dtype=dtype, max_kv=700, max_q=300, seed=seed)
    packed = torch.rand(num_reqs, generator=g) < 0.5
    packed[seed % num_reqs] = True
    if seed != 4:  # seed 4: every request packed
        packed[(seed + 1) % num_reqs] = False
    else:
        packed[:] = True
    if decode_ours and not packed[0]:  # request 0 decodes (kernel_cases): packed,
        packed[0], packed[1] = True, False  # request 1 (a prefill chunk) stays plain
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block, dim)
    packing = cpu_packed.PagePacking.learn(dtype, block, dim, isa)
    if (metric_packed or decode_ours) and not ops.kernel_reads_packing(packing.offsets):
        pytest.skip(f"vLLM's {isa} layout is not one our kernel reads")
    kernel = cpu_prefill.StockKernel(num_heads=heads * group, num_kv_heads=heads, head_dim=dim,
                                     dtype=dtype, isa=isa)
    qsl = case.query_start_loc
    q_len = (qsl[1:] - qsl[:-1]).long()
    mqs = case.metric_q_start if metric_packed else torch.where(
        packed, q_len, case.metric_q_start.long()).int()  # packed: no metric rows
    want, want_m = torch.zeros_like(case.query), torch.zeros_like(case.metrics)
    reference.paged_head_attention(case.query, case.kv_pages, case.page_table, case.kv_lens, qsl,
                                   case.scale, want_m, mqs, want)
    # The cache as the worker holds it: packed requests' pages in vLLM's layout.
    pages = case.kv_pages.clone()
    packed_pages = case.page_table[packed][case.page_table[packed] >= 0].long()
    pages[packed_pages] = _pack(case.kv_pages, packing)[packed_pages]
    expected = pages.clone()
    # This step's K/V: taken from the case, their slots scrambled, rewritten by write_kv_split.
    rows_of = [range(int(qsl[r]), int(qsl[r + 1])) for r in range(num_reqs)]
    slots = _write_slots(case, rows_of)
    key = torch.stack([case.kv_pages[s // block, 0, s % block] for s in slots.view(-1)]).view(-1, heads, dim)
    value = torch.stack([case.kv_pages[s // block, 1, s % block] for s in slots.view(-1)]).view(-1, heads, dim)
    ph = cpu_packed.plan_packed(packed, case.page_table[None], case.kv_lens[None], qsl, kernel,
                                pages, metric_q_start=mqs, decode_ours=decode_ours)
    plan = cpu_prefill.plan_stock_prefill(case.page_table[None], case.kv_lens[None], qsl, mqs,
                                          True, block, kernel, min_rows=8, packed=ph)
    assert plan is not None and plan.packed is ph
    packed_rows = {i for r in range(num_reqs) if packed[r] for i in rows_of[r]}
    # Packed rows: vLLM's kernel before metric_q_start, ours from it on.
    packed_metric_rows = {i for r in range(num_reqs) if packed[r]
                          for i in rows_of[r][int(mqs[r]):]}
    # ... and with decode_ours, ours for every decode row (one query).
    packed_decode_rows = {i for r in range(num_reqs) if packed[r] and q_len[r] == 1
                          for i in rows_of[r]} if decode_ours else set()
    packed_own_rows = packed_metric_rows | packed_decode_rows
    assert not decode_ours or packed_decode_rows  # the case has some
    assert not packed_rows & set(plan.rows_stock.tolist())
    own_rows = (set(range(case.query.shape[0])) if plan.rows_own is None
                else set(plan.rows_own.tolist()))
    assert packed_rows & own_rows == packed_own_rows
    assert metric_packed or not packed_metric_rows
    if ph.rows is None:  # every row of the step to vLLM's kernel
        assert not packed_own_rows and len(packed_rows) == case.query.shape[0]
    else:
        assert set(ph.rows.tolist()) == packed_rows - packed_own_rows
    metrics = torch.zeros_like(case.metrics)
    positions = torch.zeros(pages.shape[0], block, dtype=torch.int32)
    token_pos = torch.arange(slots.shape[0])
    for k, v in ((torch.randn(key.shape, generator=g).to(dtype),) * 2, (key, value)):
        cpu_prefill.write_kv_split(plan, k, v, None, pages, slots, metrics, positions,
                                   token_pos, packing=packing)
        assert torch.equal(pages, expected) == (k is key)  # garbage first, then the step's K/V
    assert torch.equal(positions.view(-1)[slots], token_pos.view(-1, 1).expand_as(slots).int())
    metrics.zero_()
    out = torch.zeros_like(case.query)
    cpu_prefill.run_split(plan, 0, case.query, pages, case.page_table, case.kv_lens, case.scale,
                          metrics, out, packing=packing.offsets)
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(metrics, want_m, rtol=2e-2, atol=1e-6)

    # Several layers: one schedule per run of layers whose heads hold the same
    # counts; each layer attends over its own counts.
    fewer = torch.maximum(case.kv_lens - 5, q_len.view(-1, 1).int())
    layers = cpu_packed.plan_packed(packed, case.page_table[None].expand(3, -1, -1, -1),
                                    torch.stack([case.kv_lens, case.kv_lens, fewer]), qsl, kernel,
                                    pages)
    sched = [entry[2] for entry in layers.layers]
    assert sched[1] is sched[0] and sched[2] is not sched[1]
    out, want = torch.zeros_like(case.query), torch.zeros_like(case.query)
    cpu_packed.attend_packed(layers, 2, case.query, out, case.scale)
    reference.paged_head_attention(case.query, case.kv_pages, case.page_table, fewer, qsl,
                                   case.scale, None, q_len.int(), want)
    rows = sorted(packed_rows)
    torch.testing.assert_close(out[rows].float(), want[rows].float(), atol=3e-2, rtol=0)

    # Refusals: a head holding fewer KVs than the step's tokens, a missing page.
    r = int(torch.nonzero(packed)[0])
    short = case.kv_lens.clone()
    short[r, 0] = int(q_len[r]) - 1
    with pytest.raises(RuntimeError, match=r"request batch row \d+ .* layer 0 head 0 holds"):
        cpu_packed.plan_packed(packed, case.page_table[None], short[None], qsl, kernel, pages)
    hole = case.page_table.clone()
    hole[r, heads - 1, 0] = -1
    with pytest.raises(RuntimeError, match=f"head {heads - 1} holds"):
        cpu_packed.plan_packed(packed, hole[None], case.kv_lens[None], qsl, kernel, pages)


@pytest.mark.parametrize("seed", range(12))
def test_plan_packed_row_split_matches_the_rule(vllm_ready, seed):
    """Which rows of a packed request vLLM's kernel attends, written per
    request here: its rows before ``metric_q_start`` (clamped to
    ``[0, q_len]``; all of them without metric rows), none of a decode row
    under ``decode_ours``, none of a request not packed.  Random masks,
    chunks and metric starts, so both the early return (nothing for vLLM's
    kernel: no per-layer inputs) and the per-head plan are reached; the
    write rows are every row of the packed requests (None: every row)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    g = torch.Generator().manual_seed(7000 + seed)
    heads, group, dim, block = 2, 3, 64, 32
    dtype = torch.bfloat16
    isa = _get_attn_isa(dtype, block, dim)
    kernel = cpu_prefill.StockKernel(num_heads=heads * group, num_kv_heads=heads, head_dim=dim,
                                     dtype=dtype, isa=isa)
    num_reqs = int(torch.randint(1, 8, (1,), generator=g))
    case = make_attention_case(num_reqs=num_reqs, num_kv_heads=heads, group=group, head_dim=dim,
                               block_size=block, dtype=dtype, max_kv=300,
                               max_q=1 if seed % 3 == 0 else 40, seed=seed)
    qsl = case.query_start_loc
    q_len = (qsl[1:] - qsl[:-1]).tolist()
    mask = torch.rand(num_reqs, generator=g) < (0.5 if seed % 2 else 1.0)
    mqs = torch.tensor([int(torch.randint(-2, n + 2, (1,), generator=g)) for n in q_len],
                       dtype=torch.int32)
    for decode_ours in (False, True):
        for metric_q_start in (mqs, None):
            ph = cpu_packed.plan_packed(mask, case.page_table[None], case.kv_lens[None], qsl,
                                        kernel, case.kv_pages, metric_q_start=metric_q_start,
                                        decode_ours=decode_ours)
            want = []
            for r, n in enumerate(q_len):
                if not mask[r] or (decode_ours and n == 1):
                    want.append(0)
                elif metric_q_start is None:
                    want.append(n)
                else:
                    want.append(min(max(int(mqs[r]), 0), n))
            assert ph.vllm_rows.tolist() == want, (decode_ours, metric_q_start)
            assert torch.equal(ph.mask, mask)
            rows_of = [list(range(int(qsl[r]), int(qsl[r + 1]))) for r in range(num_reqs)]
            written = [i for r in range(num_reqs) if mask[r] for i in rows_of[r]]
            every_row = written == list(range(int(qsl[-1])))
            assert (ph.write_rows is None) == every_row  # no row copies then
            if not every_row:
                assert ph.write_rows.tolist() == written
            attended = [i for r in range(num_reqs) for i in rows_of[r][:want[r]]]
            if not any(want):
                assert ph.layers == [] and ph.rows.numel() == 0
            else:
                assert len(ph.layers) == 1
                got = list(range(int(qsl[-1]))) if ph.rows is None else ph.rows.tolist()
                assert got == attended


@pytest.mark.parametrize("choice,env,on,off", [
    ("metric_pages_packed", "METRIC_PAGES_ENV", "packed", "plain"),
    ("packed_decode_ours", "PACKED_DECODE_ENV", "ours", "vllm"),
])
def test_our_kernel_on_packed_pages_choice(vllm_ready, monkeypatch, choice, env, on, off):
    """Requests that record the metric keep vLLM's layout
    (``KVCOMPRESS_METRIC_PAGES``), and metric-free decode rows go to our kernel
    (``KVCOMPRESS_PACKED_DECODE``), where our kernel reads that layout fast:
    ``auto`` takes it for bf16 pages in vLLM's AMX or vec layout on an
    AVX-512 path (with or without BF16 instructions), and (decode rows only) for its vec layout on our avx2 path
    where vLLM runs its AVX2 build;
    ``on`` insists (an error naming the setting and the layout where our
    kernel cannot read it), ``off`` never; a bad value is refused naming the
    variable."""
    chosen = getattr(cpu_packed, choice)
    env = getattr(cpu_packed, env)
    amx = cpu_packed.PagePacking(isa="amx", dtype=torch.bfloat16, block_size=128, head_dim=64,
                                 offsets=reference.amx_packing(128, 64))
    vec = cpu_packed.PagePacking(isa="vec", dtype=torch.bfloat16, block_size=32, head_dim=64,
                                 offsets=reference.vec_packing(32, 64))
    other = cpu_packed.PagePacking(
        isa="other", dtype=torch.bfloat16, block_size=32, head_dim=64,
        offsets=torch.arange(32 * 64, dtype=torch.int32).view(1, 32, 64).repeat(2, 1, 1))
    fast = ops.cpu_isa() in ops.AVX512_PATHS
    # On a CPU without AVX-512 (vLLM's AVX2 build), decode rows of vec pages too.
    vec_fast = fast or (choice == "packed_decode_ours" and ops.cpu_isa() == "avx2"
                        and cpu_packed.vllm_kernel_build() == "_C_AVX2")
    monkeypatch.delenv(env, raising=False)  # auto
    assert chosen(amx) == fast
    assert chosen(vec) == vec_fast
    assert not chosen(other)
    assert not chosen(None)
    assert not chosen(dataclasses.replace(amx, dtype=torch.float32))
    before = torch.ops.kvcompress.set_cpu_isa("avx2")
    try:  # the baseline path: slower than vLLM's AVX-512 kernels on small calls
        for build in ("_C", "_C_AVX512"):
            monkeypatch.setattr(cpu_packed, "vllm_kernel_build", lambda build=build: build)
            assert not chosen(amx)
            assert not chosen(vec)
        # vLLM's AVX2 build (a CPU without AVX-512): our AVX2 code is faster
        # there for decode rows of vec pages; metric pages stay plain.
        monkeypatch.setattr(cpu_packed, "vllm_kernel_build", lambda: "_C_AVX2")
        assert chosen(vec) == (choice == "packed_decode_ours")
        assert not chosen(amx)
        assert not chosen(dataclasses.replace(vec, dtype=torch.float32))
        assert not chosen(other)
        monkeypatch.setenv(env, off)
        assert not chosen(vec)
        monkeypatch.setenv(env, on)
        assert chosen(amx)
    finally:
        torch.ops.kvcompress.set_cpu_isa(before)
    try:  # the AVX-512 path without BF16 instructions, where the library has it
        before = torch.ops.kvcompress.set_cpu_isa("avx512")
    except RuntimeError:
        before = None
    if before is not None:
        monkeypatch.delenv(env)
        try:
            assert chosen(amx) and chosen(vec)
            assert not chosen(dataclasses.replace(vec, dtype=torch.float32))
        finally:
            torch.ops.kvcompress.set_cpu_isa(before)
        monkeypatch.setenv(env, on)
    with pytest.raises(ValueError, match=rf"{env}={on}: .*\(other\)"):
        chosen(other)
    monkeypatch.setenv(env, off)
    assert not chosen(amx)
    monkeypatch.setenv(env, "fast")
    with pytest.raises(ValueError, match=f"{env}='fast': expected one of auto, {on}, {off}"):
        chosen(amx)


def test_vllm_kernel_build_is_the_one_vllm_loaded(vllm_ready):
    """The build of vLLM's kernel library read from this process's mappings
    is the one vLLM's ``import_kernels`` picks by torch's CPU probes."""
    from kvcompress_vllm.attention import vllm_cpu

    if not torch.cpu._is_avx512_supported():
        want = "_C_AVX2"
    elif not torch.cpu._is_avx512_bf16_supported():
        want = "_C_AVX512"
    else:
        want = "_C"
    assert vllm_cpu.vllm_kernel_build() == want


@pytest.mark.parametrize("records", [True, False])
def test_packed_decode_step_runs_our_kernel_on_every_row(vllm_ready, records):
    """A decode step whose requests are all packed and all record the metric
    (the steady state of ``kvcompress`` / ``adaptive`` requests), or (not
    ``records``) none does and ``decode_ours`` sends their decode rows to our
    kernel (the default scorer's steady state): nothing for vLLM's kernel --
    no scheduler metadata --, our kernel takes every row on the packed pages
    without splitting or copying rows; outputs and metrics against the
    reference."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    block, dim, heads, group = 128, 64, 3, 3
    dtype = torch.bfloat16
    isa = _get_attn_isa(dtype, block, dim)
    packing = cpu_packed.PagePacking.learn(dtype, block, dim, isa)
    if not ops.kernel_reads_packing(packing.offsets):
        pytest.skip(f"vLLM's {isa} layout is not one our kernel reads")
    case = make_attention_case(num_reqs=5, num_kv_heads=heads, group=group, head_dim=dim,
                               block_size=block, dtype=dtype, max_kv=600, max_q=1, seed=11)
    mask = torch.ones(5, dtype=torch.bool)
    # Decode rows of recording requests always record; the others never.
    mqs = torch.full((5,), 0 if records else 1, dtype=torch.int32)
    kernel = cpu_prefill.StockKernel(num_heads=heads * group, num_kv_heads=heads, head_dim=dim,
                                     dtype=dtype, isa=isa)
    want, want_m = torch.zeros_like(case.query), torch.zeros_like(case.metrics)
    reference.paged_head_attention(case.query, case.kv_pages, case.page_table, case.kv_lens,
                                   case.query_start_loc, case.scale, want_m, mqs, want)
    pages = _pack(case.kv_pages, packing)
    ph = cpu_packed.plan_packed(mask, case.page_table[None], case.kv_lens[None],
                                case.query_start_loc, kernel, pages, metric_q_start=mqs,
                                decode_ours=not records)
    plan = cpu_prefill.plan_stock_prefill(case.page_table[None], case.kv_lens[None],
                                          case.query_start_loc, mqs, records, block, kernel,
                                          packed=ph)
    assert ph.layers == [] and plan.rows_own is None and plan.write_rows_own.numel() == 0
    assert torch.equal(plan.own_packed, mask) and torch.equal(plan.own_mqs, mqs)
    out, metrics = torch.zeros_like(case.query), torch.zeros_like(case.metrics)
    cpu_prefill.run_split(plan, 0, case.query, pages, case.page_table, case.kv_lens, case.scale,
                          metrics if records else None, out, packing=packing.offsets)
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=0)
    torch.testing.assert_close(metrics, want_m if records else torch.zeros_like(want_m),
                               rtol=2e-2, atol=1e-6)
    # Without decode_ours (or with a prefill row in the step) metric-free
    # decode rows go to vLLM's kernel per head.
    if not records:
        ph = cpu_packed.plan_packed(mask, case.page_table[None], case.kv_lens[None],
                                    case.query_start_loc, kernel, pages, metric_q_start=mqs)
        assert ph.rows is None and len(ph.layers) == 1
