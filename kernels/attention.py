"""Paged per-(request, KV head) causal attention with fused KV-Compress metrics.

Contract: ``kvcompress_vllm.ops.reference.paged_head_attention``.

Organisation
------------
* **Rows.**  One program owns one *query tile* of one (request, KV head): up to
  ``BLOCK_Q`` consecutive queries of the request times the ``G = Hq / H``
  query heads of the group, flattened into ``BLOCK_M >= BLOCK_Q * G`` rows
  (row ``m`` is query ``m // G``, group head ``m % G``).  Every K/V tile is
  loaded once and used by all rows (GQA without repeating KVs).
* **Grid.**  ``(num_q_blocks, H, num_splits)``.  ``num_q_blocks`` is the
  sync-free upper bound ``T // BLOCK_Q + R``: request ``r`` owns the blocks
  ``[qsl[r] // BLOCK_Q + r, qsl[r+1] // BLOCK_Q + r + 1)`` and a program finds
  its request by binary search over ``query_start_loc`` (no host sync, so the
  launch is CUDA-graph friendly); blocks past a request's queries exit.
* **KV tiles.**  ``BLOCK_N`` logical KVs per step, gathered row by row through
  the head's page table (works for BLOCK_N smaller or larger than the page).
  Scores are masked causally per row (query ``i`` sees KVs
  ``<= kv_len - q_len + i``).  Online softmax in fp32 (exp2 domain).
* **Metrics.**  ``sum_g p**2`` needs the *final* row max/sum, so after the
  softmax pass the program re-reads the K tiles (V is not needed) for its
  metric rows only (queries ``>= metric_q_start``), recomputes
  ``p = exp2(s - lse)``, reduces ``p**2`` over its rows and adds the column
  sums into ``metrics[page, slot]`` with one fp32 ``atomic_add`` per KV and
  program.  A (request, head) can span several query tiles (and KV splits),
  and requests can share pages (prefix-cache hits), so atomics are what keep
  those programs race-free; where only one program touches a KV (decode on
  unshared pages) the result is deterministic.  In decode batches the softmax
  pass stores the metric rows' scores (fp32 scratch ``[R, H, G, max_kv]``, up
  to ``DECODE_SCORES_BYTES``) and the metric pass reads them back, 4 bytes
  per row and KV instead of K again.  With ``metric_k_start`` a
  request adds only to its KVs ``>= metric_k_start[r]`` (a prefix-cache
  hitter leaves its hits' metric to their writer).
* **Precision.**  16-bit K/V/Q feed the tensor cores directly (P is rounded
  to the V dtype for P@V, as in flash attention); fp32 caches use 3xTF32
  dots.  On CPU tensors (Triton interpreter) every dot is done in fp32.
* **Split-KV (flash-decoding).**  When few programs exist (decode with a small
  batch) the KV range of each tile is split over ``num_splits`` programs:
  (1) partial ``(m, l, acc)`` to fp32 scratch, (2) a combine kernel writes the
  output and the row ``lse``, (3) a metric kernel (same split grid) adds
  ``p**2`` using that final ``lse``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import DECODE_SCORES_BYTES
from ._common import (device_index, is_hopper, require, interpreted, next_pow2, sm_count,
                      tl_dtype)

_LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima (no inf - inf)


# --------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------
@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """fp32 operands: 3xTF32 tensor-core dots (about fp32 accuracy, unlike
    plain TF32); 16-bit operands: the default MMA with fp32 accumulation."""
    if F32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _find_request(qsl_ptr, block_idx, num_reqs, BLOCK_Q: tl.constexpr):
    """Largest r with qsl[r] // BLOCK_Q + r <= block_idx (strictly increasing)."""
    lo = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        val = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if val <= block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tile_info(
    qsl_ptr, kv_lens_ptr, stride_klr, stride_klh, pid_qb, h, num_reqs,
    BLOCK_Q: tl.constexpr,
):
    r = _find_request(qsl_ptr, pid_qb, num_reqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + r)
    q_len = tl.load(qsl_ptr + r + 1) - q_start
    qb = pid_qb - (q_start // BLOCK_Q + r)
    kv_len = tl.load(kv_lens_ptr + r * stride_klr + h * stride_klh)
    return r, q_start, q_len, qb, kv_len


@triton.jit
def _split_range(kv_hi, split, num_splits, BLOCK_N: tl.constexpr):
    """KV range [lo, hi) of one split and the number of non-empty splits."""
    tiles = tl.cdiv(kv_hi, BLOCK_N)
    per_split = tl.cdiv(tiles, num_splits)
    lo = split * per_split * BLOCK_N
    hi = tl.minimum(kv_hi, lo + per_split * BLOCK_N)
    used = tl.cdiv(tiles, per_split)
    return lo, hi, used


@triton.jit
def _rows(qb, q_len, kv_len, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, G: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    q_local = offs_m // G
    g = offs_m % G
    q_idx = qb * BLOCK_Q + q_local
    row_valid = (q_local < BLOCK_Q) & (q_idx < q_len)
    # Inclusive causal limit of every row (query i sees KVs <= ctx + i).
    limit = kv_len - q_len + q_idx
    # Exclusive KV bound of the whole tile: limit of its last query + 1.
    kv_hi = kv_len - q_len + tl.minimum((qb + 1) * BLOCK_Q, q_len)
    return offs_m, q_idx, g, row_valid, limit, kv_hi


@triton.jit
def _load_q(
    q_ptr, q_start, q_idx, g, h, row_valid, stride_qt, stride_qh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (q_start + q_idx).to(tl.int64) * stride_qt + (h * G + g) * stride_qh
    q = tl.load(q_ptr + rows[:, None] + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    return q.to(DOT_DTYPE)


@triton.jit
def _kv_rows(pt_row_ptr, stride_ptp, start, hi, stride_kvp, stride_kvn,
             PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Logical KV indices of a tile, their validity, page ids and row offsets."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi
    page = tl.load(pt_row_ptr + (offs_n // PAGE) * stride_ptp, mask=n_mask, other=0).to(tl.int64)
    slot = offs_n % PAGE
    row = page * stride_kvp + slot * stride_kvn
    return offs_n, n_mask, page, slot, row


@triton.jit
def _softmax_pass(
    q, kv_ptr, pt_row_ptr, stride_ptp, lo, hi, limit, qk_scale,
    stride_kvp, stride_kvkv, stride_kvn, sc_ptr, sc_row, sc_keep,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr,
    F32_DOT: tl.constexpr, STORE_S: tl.constexpr,
):
    """Online softmax over KVs [lo, hi): running max m (log2 units), sum l,
    unnormalised accumulator acc.  ``STORE_S``: also writes the (masked,
    log2-scaled) scores of the rows ``sc_keep`` to ``sc_ptr + sc_row + kv``."""
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n, n_mask, page, slot, row = _kv_rows(
            pt_row_ptr, stride_ptp, start, hi, stride_kvp, stride_kvn, PAGE, BLOCK_N)
        k = tl.load(kv_ptr + row[None, :] + offs_d[:, None], mask=n_mask[None, :], other=0.0)
        s = _dot(q, k.to(DOT_DTYPE), F32_DOT) * qk_scale
        visible = (offs_n[None, :] <= limit[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        if STORE_S:
            tl.store(sc_ptr + sc_row[:, None] + offs_n[None, :], s,
                     mask=sc_keep[:, None] & n_mask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(kv_ptr + stride_kvkv + row[:, None] + offs_d[None, :],
                    mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(
            p.to(PV_DTYPE).to(DOT_DTYPE), v.to(DOT_DTYPE), F32_DOT)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _metric_pass(
    q, lse, metric_row, kv_ptr, pt_row_ptr, stride_ptp, metrics_ptr, stride_mp,
    lo, hi, kmin, limit, qk_scale, stride_kvp, stride_kvn,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_DTYPE: tl.constexpr, F32_DOT: tl.constexpr,
):
    """metrics[page, slot] += sum over metric rows of p**2, p = exp2(s - lse),
    for the KVs >= kmin of [lo, hi) (lo a multiple of BLOCK_N)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(tl.maximum(lo, kmin // BLOCK_N * BLOCK_N), hi, BLOCK_N):
        offs_n, n_mask, page, slot, row = _kv_rows(
            pt_row_ptr, stride_ptp, start, hi, stride_kvp, stride_kvn, PAGE, BLOCK_N)
        k = tl.load(kv_ptr + row[None, :] + offs_d[:, None], mask=n_mask[None, :], other=0.0)
        s = _dot(q, k.to(DOT_DTYPE), F32_DOT) * qk_scale
        keep = metric_row[:, None] & (offs_n[None, :] <= limit[:, None]) & n_mask[None, :]
        p = tl.exp2(tl.where(keep, s, float("-inf")) - lse[:, None])
        contrib = tl.sum(p * p, 0)
        tl.atomic_add(metrics_ptr + page * stride_mp + slot, contrib,
                      mask=n_mask & (offs_n >= kmin), sem="relaxed")


@triton.jit
def _metric_pass_stored(
    lse, metric_row, sc_ptr, sc_row, pt_row_ptr, stride_ptp, metrics_ptr, stride_mp,
    lo, hi, kmin, limit, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``_metric_pass`` on the scores the softmax pass stored (decode):
    reads 4 bytes per (row, KV) instead of every K again."""
    for start in range(tl.maximum(lo, kmin // BLOCK_N * BLOCK_N), hi, BLOCK_N):
        # Only the metric slots are addressed: no KV row offsets (strides 0).
        offs_n, n_mask, page, slot, _ = _kv_rows(pt_row_ptr, stride_ptp, start, hi, 0, 0,
                                                 PAGE, BLOCK_N)
        keep = metric_row[:, None] & (offs_n[None, :] <= limit[:, None]) & n_mask[None, :]
        s = tl.load(sc_ptr + sc_row[:, None] + offs_n[None, :], mask=keep, other=float("-inf"))
        p = tl.exp2(s - lse[:, None])
        contrib = tl.sum(p * p, 0)
        tl.atomic_add(metrics_ptr + page * stride_mp + slot, contrib,
                      mask=n_mask & (offs_n >= kmin), sem="relaxed")


@triton.jit
def _score_offsets(r, h, nh, g, stride_sc, G: tl.constexpr):
    """Decode: each row's offset in the score scratch ``[R, H, G, stride_sc]``
    (one query per request, so (request, KV head, group head) names a row)."""
    return ((r.to(tl.int64) * nh + h) * G + g) * stride_sc


@triton.jit
def _metric_rows(mqs_ptr, r, q_len, q_idx, row_valid, qb, BLOCK_Q: tl.constexpr):
    """Rows that record metrics, and whether the tile has any."""
    first = tl.minimum(tl.maximum(tl.load(mqs_ptr + r), 0), q_len)
    metric_row = row_valid & (q_idx >= first)
    any_rows = tl.minimum((qb + 1) * BLOCK_Q, q_len) > first
    return metric_row, any_rows


@triton.jit
def _metric_kmin(mks_ptr, r, KMIN: tl.constexpr):
    """The request's first KV that gets metric (``metric_k_start``; 0 without)."""
    if KMIN:
        kmin = tl.maximum(tl.load(mks_ptr + r), 0)
    else:
        kmin = 0
    return kmin


# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    q_ptr, kv_ptr, pt_ptr, kv_lens_ptr, qsl_ptr, metrics_ptr, mqs_ptr, mks_ptr, out_ptr,
    part_acc_ptr, part_ml_ptr, sc_ptr,
    qk_scale, num_reqs, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kvp, stride_kvkv, stride_kvn,
    stride_ptr, stride_pth, stride_ptp,
    stride_klr, stride_klh, stride_mp, stride_sc,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, METRICS: tl.constexpr, KMIN: tl.constexpr, SCORES: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid_qb = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    r, q_start, q_len, qb, kv_len = _tile_info(
        qsl_ptr, kv_lens_ptr, stride_klr, stride_klh, pid_qb, h, num_reqs, BLOCK_Q)
    if qb * BLOCK_Q >= q_len:
        return
    offs_m, q_idx, g, row_valid, limit, kv_hi = _rows(qb, q_len, kv_len, BLOCK_M, BLOCK_Q, G)
    if SPLIT:
        lo, hi, used = _split_range(kv_hi, split, num_splits, BLOCK_N)
        if split >= used:
            return
    else:
        lo = 0
        hi = kv_hi
    pt_row_ptr = pt_ptr + r.to(tl.int64) * stride_ptr + h * stride_pth
    q = _load_q(q_ptr, q_start, q_idx, g, h, row_valid, stride_qt, stride_qh,
                G, HEAD_DIM, DOT_DTYPE)
    if SCORES:
        sc_keep, _ = _metric_rows(mqs_ptr, r, q_len, q_idx, row_valid, qb, BLOCK_Q)
        sc_row = _score_offsets(r, h, tl.num_programs(1), g, stride_sc, G)
    else:
        sc_keep = row_valid
        sc_row = offs_m.to(tl.int64)
    m_i, l_i, acc = _softmax_pass(
        q, kv_ptr, pt_row_ptr, stride_ptp, lo, hi, limit, qk_scale,
        stride_kvp, stride_kvkv, stride_kvn, sc_ptr, sc_row, sc_keep,
        PAGE, BLOCK_M, BLOCK_N, HEAD_DIM, DOT_DTYPE, PV_DTYPE, F32_DOT, SCORES)
    offs_d = tl.arange(0, HEAD_DIM)
    if SPLIT:
        nh = tl.num_programs(1)
        base = ((pid_qb.to(tl.int64) * nh + h) * num_splits + split)
        tl.store(part_acc_ptr + base * BLOCK_M * HEAD_DIM
                 + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc)
        tl.store(part_ml_ptr + base * 2 * BLOCK_M + offs_m, m_i)
        tl.store(part_ml_ptr + base * 2 * BLOCK_M + BLOCK_M + offs_m, l_i)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        rows = (q_start + q_idx).to(tl.int64) * stride_ot + (h * G + g) * stride_oh
        tl.store(out_ptr + rows[:, None] + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
        if METRICS:
            metric_row, any_rows = _metric_rows(mqs_ptr, r, q_len, q_idx, row_valid, qb, BLOCK_Q)
            if any_rows:
                lse = m_i + tl.log2(l_safe)
                if SCORES:
                    _metric_pass_stored(lse, metric_row, sc_ptr, sc_row, pt_row_ptr, stride_ptp,
                                        metrics_ptr, stride_mp, 0, kv_hi,
                                        _metric_kmin(mks_ptr, r, KMIN), limit, PAGE, BLOCK_N)
                else:
                    _metric_pass(q, lse, metric_row, kv_ptr, pt_row_ptr, stride_ptp,
                                 metrics_ptr, stride_mp, 0, kv_hi, _metric_kmin(mks_ptr, r, KMIN),
                                 limit, qk_scale,
                                 stride_kvp, stride_kvn, PAGE, BLOCK_N, HEAD_DIM,
                                 DOT_DTYPE, F32_DOT)


@triton.jit
def _attn_combine_kernel(
    qsl_ptr, kv_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr, lse_ptr,
    num_reqs, num_splits,
    stride_ot, stride_oh, stride_klr, stride_klh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_qb = tl.program_id(0)
    h = tl.program_id(1)
    nh = tl.num_programs(1)
    r, q_start, q_len, qb, kv_len = _tile_info(
        qsl_ptr, kv_lens_ptr, stride_klr, stride_klh, pid_qb, h, num_reqs, BLOCK_Q)
    if qb * BLOCK_Q >= q_len:
        return
    offs_m, q_idx, g, row_valid, limit, kv_hi = _rows(qb, q_len, kv_len, BLOCK_M, BLOCK_Q, G)
    lo, hi, used = _split_range(kv_hi, 0, num_splits, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_tot = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_tot = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    base0 = (pid_qb.to(tl.int64) * nh + h) * num_splits
    for s in range(0, used):
        base = base0 + s
        m_s = tl.load(part_ml_ptr + base * 2 * BLOCK_M + offs_m)
        l_s = tl.load(part_ml_ptr + base * 2 * BLOCK_M + BLOCK_M + offs_m)
        acc_s = tl.load(part_acc_ptr + base * BLOCK_M * HEAD_DIM
                        + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
        m_new = tl.maximum(m_tot, m_s)
        a = tl.exp2(m_tot - m_new)
        b = tl.exp2(m_s - m_new)
        l_tot = l_tot * a + l_s * b
        acc = acc * a[:, None] + acc_s * b[:, None]
        m_tot = m_new
    l_safe = tl.where(l_tot > 0.0, l_tot, 1.0)
    out = acc / l_safe[:, None]
    rows = (q_start + q_idx).to(tl.int64) * stride_ot + (h * G + g) * stride_oh
    tl.store(out_ptr + rows[:, None] + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    tl.store(lse_ptr + (pid_qb.to(tl.int64) * nh + h) * BLOCK_M + offs_m,
             m_tot + tl.log2(l_safe))


@triton.jit
def _attn_metric_kernel(
    q_ptr, kv_ptr, pt_ptr, kv_lens_ptr, qsl_ptr, metrics_ptr, mqs_ptr, mks_ptr, lse_ptr, sc_ptr,
    qk_scale, num_reqs, num_splits,
    stride_qt, stride_qh,
    stride_kvp, stride_kvn,
    stride_ptr, stride_pth, stride_ptp,
    stride_klr, stride_klh, stride_mp, stride_sc,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    KMIN: tl.constexpr, SCORES: tl.constexpr, DOT_DTYPE: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid_qb = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    nh = tl.num_programs(1)
    r, q_start, q_len, qb, kv_len = _tile_info(
        qsl_ptr, kv_lens_ptr, stride_klr, stride_klh, pid_qb, h, num_reqs, BLOCK_Q)
    if qb * BLOCK_Q >= q_len:
        return
    offs_m, q_idx, g, row_valid, limit, kv_hi = _rows(qb, q_len, kv_len, BLOCK_M, BLOCK_Q, G)
    metric_row, any_rows = _metric_rows(mqs_ptr, r, q_len, q_idx, row_valid, qb, BLOCK_Q)
    if not any_rows:
        return
    lo, hi, used = _split_range(kv_hi, split, num_splits, BLOCK_N)
    if split >= used:
        return
    pt_row_ptr = pt_ptr + r.to(tl.int64) * stride_ptr + h * stride_pth
    lse = tl.load(lse_ptr + (pid_qb.to(tl.int64) * nh + h) * BLOCK_M + offs_m)
    if SCORES:
        sc_row = _score_offsets(r, h, nh, g, stride_sc, G)
        _metric_pass_stored(lse, metric_row, sc_ptr, sc_row, pt_row_ptr, stride_ptp,
                            metrics_ptr, stride_mp, lo, hi, _metric_kmin(mks_ptr, r, KMIN),
                            limit, PAGE, BLOCK_N)
    else:
        q = _load_q(q_ptr, q_start, q_idx, g, h, row_valid, stride_qt, stride_qh,
                    G, HEAD_DIM, DOT_DTYPE)
        _metric_pass(q, lse, metric_row, kv_ptr, pt_row_ptr, stride_ptp,
                     metrics_ptr, stride_mp, lo, hi, _metric_kmin(mks_ptr, r, KMIN), limit,
                     qk_scale, stride_kvp, stride_kvn, PAGE, BLOCK_N, HEAD_DIM,
                     DOT_DTYPE, F32_DOT)


# --------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------
def _choose_splits(num_programs: int, max_kv: int, block_n: int, device: torch.device) -> int:
    """KV splits for ``num_programs`` working (q block, head) programs: as
    many as keep all programs in one wave of 4 per SM, each split keeping >= 4
    KV tiles.  From the H200 sweeps (docs/gpu_kernels_sweep.md, Llama-3-8B
    decode, 132 SMs): 512 programs (batch 64) run fastest unsplit; 256 (batch
    32) run 1.3x faster with 2 or 4 splits than with 1, but not with 3 (768
    programs: a second, partial wave); 64 (batch 8) best with 8."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device_index(device))
    tiles = triton.cdiv(max_kv, block_n)
    return max(1, min(4 * sms // max(1, num_programs), tiles // 4, 32))


def _stored_scores(scores: bool | None, metrics_on: bool, decode: bool, rows_x_kvs: int) -> bool:
    """Whether the softmax pass stores the metric rows' scores (fp32
    ``[R, H, G, max_kv]``, ``rows_x_kvs`` entries) for the metric pass to read
    instead of K: decode with metrics, by default while the scratch fits in
    ``DECODE_SCORES_BYTES`` (what the GPU worker keeps out of the KV budget)."""
    if scores is None:
        return metrics_on and decode and 4 * rows_x_kvs <= DECODE_SCORES_BYTES
    require(not scores or (metrics_on and decode),
            "stored scores are for decode batches (<= 1 query per request) with metrics")
    return scores


def _launch(
    query, kv_pages, page_table, kv_lens, query_start_loc, scale, metrics,
    metric_q_start, output, metric_k_start=None, *, block_m: int | None = None,
    block_n: int | None = None, num_splits: int | None = None, scores: bool | None = None,
) -> None:
    """``paged_head_attention`` with explicit tiling knobs (tests use these to
    cover the split-KV path and odd tile sizes on small shapes).  ``scores``:
    store the scores for the metric pass (decode with metrics only; default:
    when the scratch fits in ``DECODE_SCORES_BYTES``)."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_pages, two, page_size, d_kv = kv_pages.shape
    num_reqs, num_kv_heads, max_pages = page_table.shape
    require(two == 2 and d_kv == head_dim, "kv_pages must be [P, 2, N, D] with D = head_dim")
    require(head_dim >= 16 and head_dim & (head_dim - 1) == 0,
            f"head_dim must be a power of two >= 16, got {head_dim}")
    require(page_size & (page_size - 1) == 0, f"block size must be a power of two, got {page_size}")
    require(num_q_heads % num_kv_heads == 0, f"{num_q_heads} query heads not a multiple of {num_kv_heads} KV heads")
    require(query.stride(-1) == 1 and output.stride(-1) == 1 and kv_pages.stride(-1) == 1, "query.stride(-1) == 1 and output.stride(-1) == 1 and kv_pages.stride(-1) == 1")
    require(output.shape == query.shape, "output.shape == query.shape")
    require(kv_lens.shape == (num_reqs, num_kv_heads), f"kv_lens shape {tuple(kv_lens.shape)} != {(num_reqs, num_kv_heads)}")
    require(query_start_loc.numel() == num_reqs + 1, f"query_start_loc has {query_start_loc.numel()} entries for {num_reqs} requests")
    if num_tokens == 0 or num_reqs == 0:
        return
    group = num_q_heads // num_kv_heads

    wide = kv_pages.element_size() >= 4 or query.dtype != kv_pages.dtype
    decode = num_tokens <= num_reqs  # at most one query per request
    # Prefill tiles of 128 x 128 on Hopper at head dim 128: 1.3-1.9x faster
    # than 64 x 64 on the H200 sweep (docs/gpu_kernels.md).  Other GPUs and
    # head dims keep 64 x 64 (unmeasured; 128 x 128 needs more shared memory
    # than sm_86/sm_89 have, and spills at head dim 32).
    big = not decode and not wide and head_dim == 128 and is_hopper(query.device)
    if block_m is None:
        # Decode batches need few rows; fp32 tiles (3xTF32 dots) spill beyond
        # 16 rows at head_dim 128.
        block_m = 16 if decode or wide else 128 if big else 64
    block_m = max(block_m, 16, next_pow2(group))
    block_q = block_m // group
    if block_n is None:
        block_n = 32 if wide else 128 if big else 64
    require(block_n >= 16 and block_n & (block_n - 1) == 0, "block_n >= 16 and block_n & (block_n - 1) == 0")

    num_q_blocks = num_tokens // block_q + num_reqs
    if num_splits is None:
        working = num_reqs if decode else num_q_blocks  # the grid's upper bound otherwise
        num_splits = _choose_splits(working * num_kv_heads, max_pages * page_size,
                                    block_n, query.device)
    num_splits = max(1, int(num_splits))

    cpu = interpreted(query)
    kv_dt = tl_dtype(kv_pages.dtype)
    if cpu or query.dtype != kv_pages.dtype:
        dot_dt = tl.float32  # the interpreter cannot do bf16 math
    else:
        dot_dt = kv_dt
    pv_dt = tl.float32 if cpu else dot_dt
    f32_dot = dot_dt == tl.float32  # fp32 dots at ~fp32 accuracy (3xTF32)

    qk_scale = float(scale) * _LOG2E
    metrics_on = metrics is not None
    if metrics_on:
        require(metrics.dtype == torch.float32 and metrics.stride(-1) == 1, "metrics.dtype == torch.float32 and metrics.stride(-1) == 1")
        require(metrics.shape == (num_pages, page_size), "metrics.shape == (num_pages, page_size)")
    metrics_arg = metrics if metrics_on else output  # dummy, never touched
    mqs = metric_q_start
    kmin_on = metrics_on and metric_k_start is not None
    if kmin_on:
        require(metric_k_start.numel() == num_reqs,
                f"metric_k_start has {metric_k_start.numel()} entries for {num_reqs} requests")
    mks = metric_k_start if kmin_on else mqs  # dummy, never read
    max_kv = max_pages * page_size
    score_entries = num_reqs * num_kv_heads * group * max_kv  # [R, H, G, max_kv]
    scores = _stored_scores(scores, metrics_on, decode, score_entries)
    sc = (torch.empty(score_entries, dtype=torch.float32, device=query.device)
          if scores else output)  # dummy when off, never touched

    common = dict(G=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n)
    num_warps = 8 if block_m * head_dim * (2 if wide else 1) >= 64 * 128 else 4
    if num_splits == 1:
        grid = (num_q_blocks, num_kv_heads, 1)
        _attn_fwd_kernel[grid](
            query, kv_pages, page_table, kv_lens, query_start_loc, metrics_arg, mqs, mks, output,
            output, output, sc,
            qk_scale, num_reqs, 1,
            query.stride(0), query.stride(1), output.stride(0), output.stride(1),
            kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2),
            page_table.stride(0), page_table.stride(1), page_table.stride(2),
            kv_lens.stride(0), kv_lens.stride(1),
            metrics.stride(0) if metrics_on else 0, max_kv,
            PAGE=page_size, SPLIT=False, METRICS=metrics_on, KMIN=kmin_on, SCORES=scores,
            DOT_DTYPE=dot_dt, PV_DTYPE=pv_dt, F32_DOT=f32_dot,
            num_warps=num_warps, num_stages=2, **common,
        )
        return

    dev = query.device
    part_acc = torch.empty(num_q_blocks, num_kv_heads, num_splits, block_m, head_dim,
                           dtype=torch.float32, device=dev)
    part_ml = torch.empty(num_q_blocks, num_kv_heads, num_splits, 2, block_m,
                          dtype=torch.float32, device=dev)
    lse = torch.empty(num_q_blocks, num_kv_heads, block_m, dtype=torch.float32, device=dev)
    grid = (num_q_blocks, num_kv_heads, num_splits)
    _attn_fwd_kernel[grid](
        query, kv_pages, page_table, kv_lens, query_start_loc, metrics_arg, mqs, mks, output,
        part_acc, part_ml, sc,
        qk_scale, num_reqs, num_splits,
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2),
        page_table.stride(0), page_table.stride(1), page_table.stride(2),
        kv_lens.stride(0), kv_lens.stride(1), 0, max_kv,
        PAGE=page_size, SPLIT=True, METRICS=False, KMIN=False, SCORES=scores,
        DOT_DTYPE=dot_dt, PV_DTYPE=pv_dt, F32_DOT=f32_dot,
        num_warps=num_warps, num_stages=2, **common,
    )
    _attn_combine_kernel[(num_q_blocks, num_kv_heads)](
        query_start_loc, kv_lens, output, part_acc, part_ml, lse,
        num_reqs, num_splits,
        output.stride(0), output.stride(1), kv_lens.stride(0), kv_lens.stride(1),
        num_warps=4, **common,
    )
    if metrics_on:
        _attn_metric_kernel[grid](
            query, kv_pages, page_table, kv_lens, query_start_loc, metrics, mqs, mks, lse, sc,
            qk_scale, num_reqs, num_splits,
            query.stride(0), query.stride(1),
            kv_pages.stride(0), kv_pages.stride(2),
            page_table.stride(0), page_table.stride(1), page_table.stride(2),
            kv_lens.stride(0), kv_lens.stride(1), metrics.stride(0), max_kv,
            PAGE=page_size, KMIN=kmin_on, SCORES=scores, DOT_DTYPE=dot_dt, F32_DOT=f32_dot,
            num_warps=num_warps, num_stages=2, **common,
        )


def paged_head_attention(
    query: torch.Tensor,  # [T, Hq, D]
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    page_table: torch.Tensor,  # [R, H, max_pages] int32
    kv_lens: torch.Tensor,  # [R, H] int32, includes this step's new KVs
    query_start_loc: torch.Tensor,  # [R + 1] int32
    scale: float,
    metrics: torch.Tensor | None,  # [P, N] float32, accumulated in place
    metric_q_start: torch.Tensor,  # [R] int32
    output: torch.Tensor,  # [T, Hq, D], written
    metric_k_start: torch.Tensor | None = None,  # [R] int32
) -> None:
    """See ``kvcompress_vllm.ops.reference.paged_head_attention``."""
    _launch(query, kv_pages, page_table, kv_lens, query_start_loc, scale, metrics,
            metric_q_start, output, metric_k_start)
