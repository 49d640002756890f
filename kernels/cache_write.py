"""Scatter new K/V into head-pages (contract: ``reference.write_kv``).

One program stores ``BLOCK_R`` (token, KV head) rows x head_dim: key row to
``kv_pages[page, 0, off]``, value row to ``kv_pages[page, 1, off]``, and resets
``metrics[page, off] = 0`` / sets ``positions[page, off]``.  Rows with a
negative slot are skipped.  K/V are copied as same-width integers, so the
store is bit-exact; if the new K/V have another dtype than the cache they are
first converted with ``Tensor.to`` (round-to-nearest-even, as the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import require, bit_view, next_pow2


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, kv_ptr, slots_ptr, metrics_ptr, pos_ptr, tok_pos_ptr,
    num_rows, num_heads, head_dim,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_st, stride_sh,
    stride_kvp, stride_kvkv, stride_kvn, stride_mp, stride_pp, stride_tp,
    PAGE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_METRICS: tl.constexpr, HAS_POS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < num_rows
    t = rows // num_heads
    h = rows % num_heads
    slot = tl.load(slots_ptr + t * stride_st + h * stride_sh, mask=in_range, other=-1).to(tl.int64)
    valid = in_range & (slot >= 0)
    slot = tl.where(valid, slot, 0)
    page = slot // PAGE
    off = slot % PAGE
    offs_d = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (offs_d[None, :] < head_dim)
    k = tl.load(key_ptr + (t * stride_kt + h * stride_kh)[:, None] + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + (t * stride_vt + h * stride_vh)[:, None] + offs_d[None, :], mask=mask)
    dst = (page * stride_kvp + off * stride_kvn)[:, None] + offs_d[None, :]
    tl.store(kv_ptr + dst, k, mask=mask)
    tl.store(kv_ptr + stride_kvkv + dst, v, mask=mask)
    if HAS_METRICS:
        tl.store(metrics_ptr + page * stride_mp + off,
                 tl.zeros([BLOCK_R], tl.float32), mask=valid)
    if HAS_POS:
        p = tl.load(tok_pos_ptr + t * stride_tp, mask=valid, other=0)
        tl.store(pos_ptr + page * stride_pp + off, p.to(pos_ptr.dtype.element_ty), mask=valid)


def write_kv(
    key: torch.Tensor,  # [T, H, D]
    value: torch.Tensor,  # [T, H, D]
    kv_pages: torch.Tensor,  # [P, 2, N, D], written
    slots: torch.Tensor,  # [T, H] int64: page * N + offset; < 0 skips
    metrics: torch.Tensor | None,  # [P, N] float32, reset to 0 at written slots
    positions: torch.Tensor | None,  # [P, N] int32, set at written slots
    token_positions: torch.Tensor,  # [T] int64/int32 position of each token
) -> None:
    """See ``kvcompress_vllm.ops.reference.write_kv``."""
    num_tokens, num_heads, head_dim = key.shape
    _, two, block_size, d_kv = kv_pages.shape
    require(two == 2 and d_kv == head_dim and value.shape == key.shape, "two == 2 and d_kv == head_dim and value.shape == key.shape")
    require(slots.shape == (num_tokens, num_heads), "slots.shape == (num_tokens, num_heads)")
    require(kv_pages.stride(-1) == 1, "kv_pages.stride(-1) == 1")
    if num_tokens == 0 or num_heads == 0:
        return
    if key.dtype != kv_pages.dtype:
        key = key.to(kv_pages.dtype)
    if value.dtype != kv_pages.dtype:
        value = value.to(kv_pages.dtype)
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    kv_bits, k_bits, v_bits = bit_view(kv_pages), bit_view(key), bit_view(value)
    has_m = metrics is not None
    has_p = positions is not None
    if has_m:
        require(metrics.dtype == torch.float32, "metrics.dtype == torch.float32")
    num_rows = num_tokens * num_heads
    block_d = next_pow2(head_dim)
    block_r = max(1, min(32, 4096 // block_d))
    grid = (triton.cdiv(num_rows, block_r),)
    _write_kv_kernel[grid](
        k_bits, v_bits, kv_bits, slots,
        metrics if has_m else slots, positions if has_p else slots, token_positions,
        num_rows, num_heads, head_dim,
        k_bits.stride(0), k_bits.stride(1), v_bits.stride(0), v_bits.stride(1),
        slots.stride(0), slots.stride(1),
        kv_bits.stride(0), kv_bits.stride(1), kv_bits.stride(2),
        metrics.stride(0) if has_m else 0, positions.stride(0) if has_p else 0,
        token_positions.stride(0),
        PAGE=block_size, BLOCK_R=block_r, BLOCK_D=block_d,
        HAS_METRICS=has_m, HAS_POS=has_p, num_warps=4,
    )
