"""Plain-PyTorch reference implementations of the kernel contracts.

These are the single source of truth that the C++ (``csrc/``) and Triton
(``kernels/``) kernels are tested against.  They are written for clarity, not
speed: Python loops over (request, KV head), dense float32 math.

Shared layout (see ``docs/design.md``):

* ``kv_pages``  ``[P, 2, N, D]``   head-pages; ``[p, 0]`` holds N keys and
  ``[p, 1]`` N values of ONE (layer, KV head).  ``N`` is the block size.
* ``metrics``   ``[P, N]`` float32  eviction metric of the KV in each slot.
* ``positions`` ``[P, N]`` int32    token position of the KV in each slot.
* A head's *logical index* ``j`` lives in page ``page_table[..., j // N]`` at
  slot ``j % N``.  A head with ``kv_len`` KVs uses logical indices
  ``[0, kv_len)``.
"""

from __future__ import annotations

import torch


def _gather_head(
    kv_pages: torch.Tensor, pages: torch.Tensor, n: int, packing: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values, page ids and slots of the first ``n`` logical KVs (with
    ``packing``: pages in that in-page layout, see ``write_kv``)."""
    block = kv_pages.shape[2]
    idx = torch.arange(n)
    page = pages[idx // block].long()
    slot = idx % block
    if packing is None:
        keys = kv_pages[page, 0, slot].float()
        values = kv_pages[page, 1, slot].float()
    else:
        halves = kv_pages.view(kv_pages.shape[0], 2, -1)  # [P, 2, N*D]
        keys = halves[page.view(-1, 1), 0, packing[0].long()[slot]].float()
        values = halves[page.view(-1, 1), 1, packing[1].long()[slot]].float()
    return keys, values, page, slot


def amx_packing(block_size: int, head_dim: int) -> torch.Tensor:
    """``[2, N, D]`` int32 in-page offsets of vLLM's AMX CPU layout (what its
    ``cpu_attn_reshape_and_cache`` writes for isa ``amx``; N % 16 == 0, D % 32
    == 0), one of the two layouts the C++ attention kernel reads packed pages in.
    K: per 16-key group, per dim pair, the 16 keys' two values; V: per 16-dim
    chunk, per key pair, the 16 dims' two values."""
    n, d = block_size, head_dim
    t = torch.arange(n).view(-1, 1)
    c = torch.arange(d).view(1, -1)
    k = (t // 16) * 16 * d + (c // 2) * 32 + (t % 16) * 2 + c % 2
    v = (c // 16) * 16 * n + (t // 2) * 32 + (c % 16) * 2 + t % 2
    return torch.stack([k, v]).to(torch.int32)


def vec_packing(block_size: int, head_dim: int) -> torch.Tensor:
    """``[2, N, D]`` int32 in-page offsets of vLLM's vec CPU layout (what its
    ``cpu_attn_reshape_and_cache`` writes for isa ``vec`` and ``vec16``: every
    x86 CPU without AMX), the other layout the C++ attention kernel reads.
    K: transposed, dim ``d`` of the page's ``N`` keys in one run; V: plain
    ``[N, D]`` rows."""
    n, d = block_size, head_dim
    t = torch.arange(n).view(-1, 1)
    c = torch.arange(d).view(1, -1)
    return torch.stack([c * n + t, t * d + c]).to(torch.int32)


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
    packing: torch.Tensor | None = None,  # [2, N, D] int32 in-page element offsets
    packed: torch.Tensor | None = None,  # [R] bool: request's pages in ``packing``
    metric_k_start: torch.Tensor | None = None,  # [R] int32
) -> None:
    """Causal attention over per-(request, KV head) paged KVs.

    Request ``r`` owns query rows ``[qsl[r], qsl[r+1])``.  Its ``q_len``
    queries are the newest tokens, i.e. the last ``q_len`` logical KVs of every
    head, so query ``i`` of head ``h`` attends to logical KVs
    ``[0, kv_lens[r, h] - q_len + i]``.  Query head ``hq`` reads KV head
    ``hq // G`` with ``G = Hq // H`` (GQA without repeating KVs).

    If ``metrics`` is given, every query ``i >= metric_q_start[r]`` adds, for
    each KV it attends to, the squared attention probability summed over the
    ``G`` query heads of the group: ``metrics[page, slot] += sum_g p**2``.
    With ``metric_k_start``, only the KVs at logical index ``>=
    metric_k_start[r]`` get it: a prefix-cache hitter's queries leave the
    metric of its hits (the writer's KVs) alone.

    Requests with ``packed[r]`` hold their head-pages in the in-page layout
    ``packing`` (see ``write_kv``), the others in plain ``[N, D]`` rows.
    """
    if (packing is None) != (packed is None):
        raise ValueError("paged_head_attention: packing and packed go together")
    num_reqs, num_kv_heads, _ = page_table.shape
    num_q_heads = query.shape[1]
    group = num_q_heads // num_kv_heads
    for r in range(num_reqs):
        q0, q1 = int(query_start_loc[r]), int(query_start_loc[r + 1])
        q_len = q1 - q0
        if q_len == 0:
            continue
        for h in range(num_kv_heads):
            n = int(kv_lens[r, h])
            if n < q_len:
                raise ValueError(
                    f"kv_lens[{r}, {h}] = {n} < {q_len} queries: kv_lens must include "
                    "the new tokens"
                )
            layout = packing if packed is not None and bool(packed[r]) else None
            keys, values, page, slot = _gather_head(kv_pages, page_table[r, h], n, layout)
            q = query[q0:q1, h * group : (h + 1) * group].float()  # [q, G, D]
            scores = torch.einsum("qgd,kd->qgk", q, keys) * scale
            q_idx = torch.arange(q_len)[:, None, None]
            k_idx = torch.arange(n)[None, None, :]
            scores = scores.masked_fill(k_idx > n - q_len + q_idx, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out = torch.einsum("qgk,kd->qgd", probs, values)
            output[q0:q1, h * group : (h + 1) * group] = out.to(output.dtype)
            if metrics is not None:
                first = max(0, min(q_len, int(metric_q_start[r])))
                contrib = probs[first:].square().sum(dim=(0, 1))  # [n]
                if metric_k_start is not None:
                    contrib[: max(0, int(metric_k_start[r]))] = 0.0
                metrics.index_put_((page, slot), contrib, accumulate=True)


def write_kv(
    key: torch.Tensor,  # [T, H, D]
    value: torch.Tensor,  # [T, H, D]
    kv_pages: torch.Tensor,  # [P, 2, N, D], written
    slots: torch.Tensor,  # [T, H] int64: page * N + offset; < 0 skips
    metrics: torch.Tensor | None,  # [P, N] float32, reset to 0 at written slots
    positions: torch.Tensor | None,  # [P, N] int32, set at written slots
    token_positions: torch.Tensor,  # [T] int64/int32 position of each token
    packing: torch.Tensor | None = None,  # [2, N, D] int32 in-page element offsets
) -> None:
    """Store new keys/values of every (token, KV head) at its head slot (with
    ``packing``: element ``(slot, d)`` of each half at ``packing[half, slot, d]``,
    see ``compact_heads``).  Slots must be distinct: ``gather_batch``, which
    makes the worker's, refuses a step in which two of them could meet."""
    block = kv_pages.shape[2]
    valid = slots >= 0
    t_idx, h_idx = valid.nonzero(as_tuple=True)
    flat = slots[t_idx, h_idx]
    page, off = flat // block, flat % block
    if packing is None:
        kv_pages[page, 0, off] = key[t_idx, h_idx].to(kv_pages.dtype)
        kv_pages[page, 1, off] = value[t_idx, h_idx].to(kv_pages.dtype)
    else:
        halves = kv_pages.view(kv_pages.shape[0], 2, -1)  # [P, 2, N*D]
        for h, src in enumerate((key, value)):
            elems = packing[h].long()[off]  # [K, D]
            halves[page.view(-1, 1), h, elems] = src[t_idx, h_idx].to(kv_pages.dtype)
    if metrics is not None:
        metrics[page, off] = 0.0
    if positions is not None:
        positions[page, off] = token_positions[t_idx].to(positions.dtype)


def unpack_pages(
    kv_pages: torch.Tensor,  # [P, 2, N, D] in vLLM's in-page layout
    page_rows: torch.Tensor,  # [...] int page ids; < 0: zeros
    packing: torch.Tensor,  # [2, N, D] int32 in-page element offsets
    half: int,  # 0: keys, 1: values
) -> torch.Tensor:
    """The K or V half of whole head-pages in plain order: ``[..., N, D]``."""
    num_pages, _, block, dim = kv_pages.shape
    rows = page_rows.to(torch.int64)
    halves = kv_pages.reshape(num_pages, 2, block * dim)[:, half]  # [P, N*D]
    out = halves[rows.clamp(min=0)][..., packing[half].view(-1).long()]
    out[rows < 0] = 0
    return out.view(*page_rows.shape, block, dim)


def keydiff_scores(
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    page_rows: torch.Tensor,  # [r, np] int page ids of each row's logical pages (< 0: none)
    counts: torch.Tensor,  # [r] int KVs of each row (<= width, <= np * N)
    width: int,
    packing: torch.Tensor | None = None,  # [2, N, D] int32: vLLM's in-page layout
) -> torch.Tensor:
    """KeyDiff score of every key, read from the head-pages: ``[r, width]``
    float32, ``-cos(k, a)`` with ``a`` the mean of the row's L2-normalised
    keys (``|k|`` clamped at 1e-12, ``|a|`` at 1e-8), 0 past ``counts``."""
    num_rows = page_rows.shape[0]
    block, dim = kv_pages.shape[2], kv_pages.shape[3]
    device = kv_pages.device
    if num_rows == 0 or width == 0:
        return torch.zeros(num_rows, width, dtype=torch.float32, device=device)
    j = torch.arange(width, device=device)
    valid = j.view(1, -1) < counts.to(device).view(-1, 1)  # [r, width]
    rows = page_rows.to(device=device, dtype=torch.int64)[:, : -(-width // block)]
    if rows.shape[1] == 0:  # no pages: every count is 0
        rows = torch.full((num_rows, 1), -1, dtype=torch.int64, device=device)
    pages = rows.index_select(1, (j // block).clamp(max=rows.shape[1] - 1)).clamp(min=0)
    if packing is None:
        keys = kv_pages[pages, 0, j % block]  # [r, width, D]
    else:
        plain = unpack_pages(kv_pages, rows, packing, 0).view(num_rows, -1, dim)  # [r, np*N, D]
        keys = plain[:, j.clamp(max=plain.shape[1] - 1)]  # columns past np*N are masked
    k = keys.float().mul_(valid.unsqueeze(-1))  # [r, width, D], padding zero
    inv = torch.linalg.vector_norm(k, dim=-1).clamp_min(1e-12).reciprocal()  # [r, width]
    weights = valid.float() * inv
    anchor = torch.bmm(weights.unsqueeze(1), k).squeeze(1)  # [r, D]
    anchor = anchor / valid.sum(1, keepdim=True).clamp_min(1)
    cos = torch.bmm(k, anchor.unsqueeze(-1)).squeeze(-1) * inv
    cos = cos / torch.linalg.vector_norm(anchor, dim=-1, keepdim=True).clamp_min(1e-8)
    return (-cos).masked_fill(~valid, 0.0)


def compaction_moves(
    kv_len: int, evicted: list[int]
) -> list[tuple[int, int]]:
    """(source, destination) logical moves that compact one head.

    ``evicted`` is ascending.  After removing ``e`` KVs the head keeps
    ``kv_len - e``; every evicted index below that new length is a hole, and
    the surviving KVs at or above it fill the holes, both taken in ascending
    order (the k-th survivor fills the k-th hole).  Every destination is below
    every source, so the moves are independent.
    """
    new_len = kv_len - len(evicted)
    evicted_set = set(evicted)
    holes = [j for j in evicted if j < new_len]
    sources = [j for j in range(new_len, kv_len) if j not in evicted_set]
    if len(holes) != len(sources):  # cannot happen for ascending, unique input
        raise ValueError(f"evicted indices {evicted} are not unique and < {kv_len}")
    return list(zip(sources, holes))


def compact_heads(
    kv_pages: torch.Tensor,  # [P, 2, N, D]
    metrics: torch.Tensor,  # [P, N] float32
    positions: torch.Tensor,  # [P, N] int32
    page_table: torch.Tensor,  # [S, max_pages] int32, one row per head
    kv_lens: torch.Tensor,  # [S] int32
    evict_idx: torch.Tensor,  # [S, max_evict] int32, ascending prefix per row
    evict_counts: torch.Tensor,  # [S] int32
    packing: torch.Tensor | None = None,  # [2, N, D] int32 in-page element offsets
) -> None:
    """Remove the listed KVs from each head and close the holes in place.

    Moves K, V, metric and position together (see ``compaction_moves``).
    The caller sets the new length ``kv_lens - evict_counts``.  With
    ``packing`` the K and V halves of a page hold element ``(slot, d)`` at
    offset ``packing[half, slot, d]`` (vLLM's CPU in-page layout,
    ``attention.cpu_packed``) instead of ``slot * D + d``.
    """
    block = kv_pages.shape[2]
    halves = kv_pages.view(kv_pages.shape[0], 2, -1)  # [P, 2, N*D]
    for s in range(page_table.shape[0]):
        count = int(evict_counts[s])
        if count == 0:
            continue
        evicted = [int(j) for j in evict_idx[s, :count]]
        for src, dst in compaction_moves(int(kv_lens[s]), evicted):
            sp, so = int(page_table[s, src // block]), src % block
            dp, do = int(page_table[s, dst // block]), dst % block
            if packing is None:
                kv_pages[dp, :, do] = kv_pages[sp, :, so]
            else:
                for h in range(2):
                    halves[dp, h, packing[h, do].long()] = halves[sp, h, packing[h, so].long()]
            metrics[dp, do] = metrics[sp, so]
            positions[dp, do] = positions[sp, so]


def gather_batch(
    page_table: torch.Tensor,  # [S, L, H, max_pages] int32 (-1: no page)
    num_pages: torch.Tensor,  # [S, L, H] int32
    kv_count: torch.Tensor,  # [S, L, H] int32, this step's tokens included
    slots: torch.Tensor,  # [R] int64: the table rows of the step's requests
    query_start_loc: torch.Tensor,  # [R + 1] int: the step's tokens of each request
    tokens_before: torch.Tensor,  # [R] int64: each request's tokens before this step
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's attention inputs from the head page tables, in batch order:

    * ``page_table`` ``[L, R, H, W]`` int32, ``W`` = the most pages any head of
      the step holds;
    * ``kv_lens`` ``[L, R, H]`` int32;
    * ``write_slots`` ``[L, T, H]`` int64: ``page * N + slot`` of the KV that
      token ``t`` (the ``o``-th of request ``r``) writes in each head: logical
      index ``kv_lens - q_len + o``;
    * ``token_positions`` ``[T]`` int64: ``tokens_before[r] + o``.

    Every written logical index must lie in an assigned page of its head, and
    a page written in the step must belong to one (request, head) and be
    listed once among the pages it writes, so no two of the step's KVs share a
    slot (``write_kv``'s contract); both kernels raise otherwise, naming the
    layer, the batch rows and the heads."""
    slots = slots.to(torch.int64)
    qsl = query_start_loc.to(torch.int64)
    q_lens = qsl[1:] - qsl[:-1]
    width = int(num_pages.index_select(0, slots).max()) if slots.numel() else 0
    pages = page_table[..., :width].index_select(0, slots).permute(1, 0, 2, 3).contiguous()
    kv_lens = kv_count.index_select(0, slots).permute(1, 0, 2).contiguous()  # [L, R, H]
    num_layers, num_reqs, num_heads = kv_lens.shape
    row = torch.repeat_interleave(torch.arange(num_reqs), q_lens)
    offset = torch.arange(int(qsl[0]), int(qsl[-1])) - qsl[row]  # token's index in its request
    logical = (kv_lens.to(torch.int64) - q_lens.view(1, -1, 1))[:, row, :] + offset.view(1, -1, 1)
    layer = torch.arange(num_layers).view(-1, 1, 1)
    head = torch.arange(num_heads).view(1, 1, -1)
    flat = ((layer * num_reqs + row.view(1, -1, 1)) * num_heads + head) * width + logical // block_size
    held = num_pages.index_select(0, slots).permute(1, 0, 2)[:, row, :].to(torch.int64)  # [L, T, H]
    if bool(((logical < 0) | (logical >= held * block_size)).any()):
        raise RuntimeError("gather_batch: a token's KV lies outside its head's pages")
    page = pages.view(-1).index_select(0, flat.view(-1)).view(flat.shape).to(torch.int64)
    if bool((page < 0).any()):
        raise RuntimeError("gather_batch: a token's KV lies outside its head's pages (no page)")
    # A page written in a step belongs to one head and is listed once among
    # the pages that head writes: distinct (layer, page, writer, entry) rows
    # must not repeat a (layer, page).
    writer = (row.view(1, -1, 1) * num_heads + head).expand_as(page)
    written = torch.stack(
        [layer.expand_as(page), page, writer, logical // block_size], dim=-1
    ).view(-1, 4).unique(dim=0)
    pairs, counts = written[:, :2].unique(dim=0, return_counts=True)
    if bool((counts > 1).any()):
        l, p = pairs[int(torch.argmax((counts > 1).to(torch.int8)))].tolist()
        who = written[(written[:, 0] == l) & (written[:, 1] == p), 2].tolist()
        raise RuntimeError(
            f"gather_batch: page {p} of layer {l} is written this step by row "
            f"{who[0] // num_heads}, head {who[0] % num_heads} and by row {who[1] // num_heads}, "
            f"head {who[1] % num_heads} (a page written in a step must belong to one head and "
            "be listed once)"
        )
    write_slots = page * block_size + logical % block_size
    token_positions = tokens_before.to(torch.int64)[row] + offset
    return pages, kv_lens, write_slots, token_positions
