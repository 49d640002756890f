"""Per-head compaction after eviction (contract: ``reference.compact_heads``).

The (source, destination) slot pairs of every head are computed with a few
vectorised torch ops on fixed-size ``[S, max_evict]`` tensors (no host sync,
no Python loop over heads), following ``reference.compaction_moves``:

* ``new_len = kv_len - count``; the holes are the evicted indices
  ``< new_len`` (a prefix of the ascending list, ``h`` of them);
* the sources are the ``count`` indices of the window ``[new_len, kv_len)``
  minus the evicted ones in it, i.e. exactly ``h`` survivors;
* the k-th survivor fills the k-th hole.

All destinations lie below all sources, so the moves are independent and one
launch of a copy kernel over all pairs (``BLOCK_R`` pairs x head_dim per
program) moves K, V, metric and position.  The copy works on same-width
integer views, so it is bit-exact for every dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import require, bit_view, next_pow2


@triton.jit
def _move_slots_kernel(
    kv_ptr, metrics_ptr, pos_ptr, src_ptr, dst_ptr, num_pairs, head_dim,
    stride_kvp, stride_kvkv, stride_kvn, stride_mp, stride_pp,
    PAGE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_METRICS: tl.constexpr, HAS_POS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < num_pairs
    src = tl.load(src_ptr + rows, mask=in_range, other=-1)
    dst = tl.load(dst_ptr + rows, mask=in_range, other=-1)
    valid = in_range & (src >= 0) & (dst >= 0)
    # Every access below is masked by ``valid``; the clamp only keeps the
    # unused addresses in bounds.  (``tl.where(valid, src, 0)`` here fails to
    # compile for sm_90 with Triton 3.6: RemoveLayoutConversions leaves the
    # select's condition in another layout.)
    src = tl.maximum(src, 0)
    dst = tl.maximum(dst, 0)
    sp = src // PAGE
    so = src % PAGE
    dp = dst // PAGE
    do = dst % PAGE
    offs_d = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (offs_d[None, :] < head_dim)
    src_row = (sp * stride_kvp + so * stride_kvn)[:, None] + offs_d[None, :]
    dst_row = (dp * stride_kvp + do * stride_kvn)[:, None] + offs_d[None, :]
    k = tl.load(kv_ptr + src_row, mask=mask)
    v = tl.load(kv_ptr + stride_kvkv + src_row, mask=mask)
    tl.store(kv_ptr + dst_row, k, mask=mask)
    tl.store(kv_ptr + stride_kvkv + dst_row, v, mask=mask)
    if HAS_METRICS:
        m = tl.load(metrics_ptr + sp * stride_mp + so, mask=valid)
        tl.store(metrics_ptr + dp * stride_mp + do, m, mask=valid)
    if HAS_POS:
        p = tl.load(pos_ptr + sp * stride_pp + so, mask=valid)
        tl.store(pos_ptr + dp * stride_pp + do, p, mask=valid)


def compaction_pairs(
    page_table: torch.Tensor,  # [S, max_pages] int32
    kv_lens: torch.Tensor,  # [S]
    evict_idx: torch.Tensor,  # [S, E] ascending prefix per row
    evict_counts: torch.Tensor,  # [S]
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical (src, dst) slots ``page * N + offset``, ``[S * E]`` int64 each;
    -1 marks no move.  Vectorised; the same as ``reference.compaction_moves``."""
    num_heads, max_evict = evict_idx.shape
    dev = evict_idx.device
    e = evict_idx.long()
    count = evict_counts.long()[:, None]
    new_len = kv_lens.long()[:, None] - count
    k = torch.arange(max_evict, device=dev)[None, :]
    listed = k < count
    holes = listed & (e < new_len)  # a prefix of every row
    num_holes = holes.sum(dim=1, keepdim=True)
    # Window t = 0..count-1 holds logical index new_len + t; mark the evicted.
    win_evicted = torch.zeros(num_heads, max_evict + 1, dtype=torch.bool, device=dev)
    win_pos = torch.where(listed & ~holes, e - new_len, max_evict)
    win_evicted.scatter_(1, win_pos, True)
    survivor = (k < count) & ~win_evicted[:, :max_evict]
    rank = torch.cumsum(survivor.long(), dim=1) - 1
    src_logical = torch.full((num_heads, max_evict + 1), -1, dtype=torch.long, device=dev)
    src_logical.scatter_(1, torch.where(survivor, rank, max_evict), new_len + k)
    src_logical = src_logical[:, :max_evict]
    paired = k < num_holes
    dst_logical = torch.where(paired, e, 0)
    src_logical = torch.where(paired, src_logical, 0)

    def physical(logical: torch.Tensor) -> torch.Tensor:
        page = torch.gather(page_table.long(), 1, logical // block_size)
        return page * block_size + logical % block_size

    src = torch.where(paired, physical(src_logical), -1)
    dst = torch.where(paired, physical(dst_logical), -1)
    return src.reshape(-1), dst.reshape(-1)


def check_page_ownership(
    page_table: torch.Tensor,  # [S, max_pages] int32
    kv_lens: torch.Tensor,  # [S]
    evict_idx: torch.Tensor,  # [S, E]
    evict_counts: torch.Tensor,  # [S]
    num_pages: int,
    block_size: int,
) -> None:
    """Heads are compacted in parallel: a page that a head moves KVs within
    (from its first hole to its last KV) must be listed by no other head of
    the call, nor twice by that head; pages below every first hole (a shared
    prefix) may be listed by several.  The C++ kernel's rule; checked with a
    few device ops and one device-to-host sync, before anything moves.
    Needs at least one head and one ``evict_idx`` column (``compact_heads``
    returns before calling it otherwise)."""
    if page_table.device.type == "meta":
        return  # the compile check: shapes only
    max_pages = page_table.shape[1]
    dev = page_table.device
    n = kv_lens.long().clamp(0, max_pages * block_size)
    col = torch.arange(max_pages, device=dev)[None, :]
    pages = page_table.long()
    listed = (col < ((n + block_size - 1) // block_size)[:, None]) & (pages >= 0) & (pages < num_pages)
    count = evict_counts.long()
    first = evict_idx[:, 0].long()
    moves = (count > 0) & (first < n - count)
    moved = listed & moves[:, None] & (col >= (first // block_size)[:, None])
    ids = pages[listed].sort().values
    times = (torch.searchsorted(ids, pages, right=True) - torch.searchsorted(ids, pages))
    bad = moved & (times != 1)
    if bool(bad.any()):
        s, k = (int(i) for i in bad.nonzero()[0])
        require(False, f"compact_heads: page {int(pages[s, k])} is moved within by one head but "
                       f"listed {int(times[s, k])} times in the call; each head must own the "
                       "pages from its first evicted KV on")


def compact_heads(
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    metrics: torch.Tensor,  # [P, N] float32
    positions: torch.Tensor,  # [P, N] int32
    page_table: torch.Tensor,  # [S, max_pages] int32, one row per head
    kv_lens: torch.Tensor,  # [S] int32
    evict_idx: torch.Tensor,  # [S, max_evict] int32, ascending prefix per row
    evict_counts: torch.Tensor,  # [S] int32
) -> None:
    """See ``kvcompress_vllm.ops.reference.compact_heads``."""
    num_pages, two, block_size, head_dim = kv_pages.shape
    require(two == 2 and kv_pages.stride(-1) == 1, "two == 2 and kv_pages.stride(-1) == 1")
    num_heads = page_table.shape[0]
    if num_heads == 0 or evict_idx.numel() == 0:
        return
    require(evict_idx.shape[0] == num_heads, "evict_idx.shape[0] == num_heads")
    check_page_ownership(page_table, kv_lens, evict_idx, evict_counts, num_pages, block_size)
    src, dst = compaction_pairs(page_table, kv_lens, evict_idx, evict_counts, block_size)
    num_pairs = src.numel()
    has_m = metrics is not None
    has_p = positions is not None
    block_d = next_pow2(head_dim)
    block_r = max(1, min(32, 4096 // block_d))
    kv_bits = bit_view(kv_pages)
    m_bits = bit_view(metrics) if has_m else src
    p_bits = positions if has_p else src
    grid = (triton.cdiv(num_pairs, block_r),)
    _move_slots_kernel[grid](
        kv_bits, m_bits, p_bits, src, dst, num_pairs, head_dim,
        kv_bits.stride(0), kv_bits.stride(1), kv_bits.stride(2),
        metrics.stride(0) if has_m else 0, positions.stride(0) if has_p else 0,
        PAGE=block_size, BLOCK_R=block_r, BLOCK_D=block_d,
        HAS_METRICS=has_m, HAS_POS=has_p, num_warps=4,
    )
