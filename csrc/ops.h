// Entry points of the kvcompress CPU kernels (registered in registration.cpp).
// Contracts: kvcompress_vllm/ops/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace kvc {

// Causal attention over per-(request, KV head) paged KVs, optionally adding
// sum_g p^2 of every metric query to the metric of each KV it attends to
// (with `metric_k_start`, only to the KVs at logical index >= metric_k_start[r]).
// Requests flagged in `packed` have their pages in vLLM's in-page layout
// `packed_layout` (cpu_isa.h PackedLayout: 0 AMX, 1 vec).
void paged_head_attention(const at::Tensor& query, const at::Tensor& kv_pages,
                          const at::Tensor& page_table, const at::Tensor& kv_lens,
                          const at::Tensor& query_start_loc, double scale,
                          const std::optional<at::Tensor>& metrics,
                          const at::Tensor& metric_q_start, const at::Tensor& output,
                          const std::optional<at::Tensor>& packed, int64_t packed_layout,
                          const std::optional<at::Tensor>& metric_k_start);

// Store the step's K/V of every (token, KV head) at its head slot; reset the
// metric and set the position of every written slot.
void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_pages,
              const at::Tensor& slots, const std::optional<at::Tensor>& metrics,
              const std::optional<at::Tensor>& positions, const at::Tensor& token_positions,
              const std::optional<at::Tensor>& packing);

// Remove the listed KVs of every head and close the holes (K, V, metric,
// position move together), exactly like reference.compaction_moves.  With
// `packing` ([2, N, D] int32) a page's K and V halves are in vLLM's in-page
// layout: element (slot, d) of half h lies at offset packing[h, slot, d].
void compact_heads(const at::Tensor& kv_pages, const at::Tensor& metrics,
                   const at::Tensor& positions, const at::Tensor& page_table,
                   const at::Tensor& kv_lens, const at::Tensor& evict_idx,
                   const at::Tensor& evict_counts, const std::optional<at::Tensor>& packing);

// The K (half 0) or V (half 1) of whole head-pages in vLLM's in-page layout,
// in plain order: page_rows [...] int page ids (< 0: zeros) -> [..., N, D].
at::Tensor unpack_pages(const at::Tensor& kv_pages, const at::Tensor& page_rows,
                        const at::Tensor& packing, int64_t half);

// Shared by the kernels that take `packing`: its [2, N, D] int32 offsets
// (nullptr when absent), validated (an error names `op`); `keep` holds the
// contiguous tensor they point into.  With `check_all` every offset is
// range-checked; otherwise the caller checks the ones it uses.
const int32_t* packing_offsets(const std::optional<at::Tensor>& packing, int64_t N, int64_t D,
                               const char* op, at::Tensor& keep, bool check_all);

// KeyDiff score (-cos(k, mean normalised key)) of every key of every row of
// head-pages: page_rows [r, np] int page ids, counts [r] -> [r, width] fp32,
// 0 past counts[i].  With `packing` the pages are in vLLM's in-page layout.
at::Tensor keydiff_scores(const at::Tensor& kv_pages, const at::Tensor& page_rows,
                          const at::Tensor& counts, int64_t width,
                          const std::optional<at::Tensor>& packing);

// A step's attention inputs from the worker's head page tables: page rows
// [L, R, H, W], KV counts [L, R, H], write slots [L, T, H] and token
// positions [T] of the table rows `slots` (contract: reference.gather_batch).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_batch(
    const at::Tensor& page_table, const at::Tensor& num_pages, const at::Tensor& kv_count,
    const at::Tensor& slots, const at::Tensor& query_start_loc, const at::Tensor& tokens_before,
    int64_t block_size);

}  // namespace kvc
