// Entry points of the kvcompress CPU kernels (registered in registration.cpp).
// Contracts: kvcompress_vllm/ops/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace kvc {

// Causal attention over per-(request, KV head) paged KVs, optionally adding
// sum_g p^2 of every metric query to the metric of each KV it attends to.
void paged_head_attention(const at::Tensor& query, const at::Tensor& kv_pages,
                          const at::Tensor& page_table, const at::Tensor& kv_lens,
                          const at::Tensor& query_start_loc, double scale,
                          const std::optional<at::Tensor>& metrics,
                          const at::Tensor& metric_q_start, const at::Tensor& output);

// Store the step's K/V of every (token, KV head) at its head slot; reset the
// metric and set the position of every written slot.
void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_pages,
              const at::Tensor& slots, const std::optional<at::Tensor>& metrics,
              const std::optional<at::Tensor>& positions, const at::Tensor& token_positions);

// Remove the listed KVs of every head and close the holes (K, V, metric,
// position move together), exactly like reference.compaction_moves.
void compact_heads(const at::Tensor& kv_pages, const at::Tensor& metrics,
                   const at::Tensor& positions, const at::Tensor& page_table,
                   const at::Tensor& kv_lens, const at::Tensor& evict_idx,
                   const at::Tensor& evict_counts);

}  // namespace kvc
