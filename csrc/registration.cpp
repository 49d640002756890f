// Operator registration: torch.ops.kvcompress.<name> (CPU implementations).
#include <torch/library.h>

#include "cpu_isa.h"
#include "ops.h"

// The operator namespace (torch.ops.<ns>); overridable only so that differently
// tuned builds can be loaded side by side in one process for benchmarking.
#ifndef KVC_OP_NAMESPACE
#define KVC_OP_NAMESPACE kvcompress
#endif

TORCH_LIBRARY(KVC_OP_NAMESPACE, m) {
  m.def(
      "paged_head_attention(Tensor query, Tensor kv_pages, Tensor page_table, "
      "Tensor kv_lens, Tensor query_start_loc, float scale, Tensor(b!)? metrics, "
      "Tensor metric_q_start, Tensor(c!) output, Tensor? packed=None, "
      "int packed_layout=0, Tensor? metric_k_start=None) -> ()");
  m.def(
      "write_kv(Tensor key, Tensor value, Tensor(a!) kv_pages, Tensor slots, "
      "Tensor(b!)? metrics, Tensor(c!)? positions, Tensor token_positions, "
      "Tensor? packing=None) -> ()");
  m.def(
      "compact_heads(Tensor(a!) kv_pages, Tensor(b!) metrics, Tensor(c!) positions, "
      "Tensor page_table, Tensor kv_lens, Tensor evict_idx, Tensor evict_counts, "
      "Tensor? packing=None) -> ()");
  m.def("unpack_pages(Tensor kv_pages, Tensor page_rows, Tensor packing, int half) -> Tensor");
  m.def(
      "keydiff_scores(Tensor kv_pages, Tensor page_rows, Tensor counts, int width, "
      "Tensor? packing=None) -> Tensor");
  m.def(
      "gather_batch(Tensor page_table, Tensor num_pages, Tensor kv_count, Tensor slots, "
      "Tensor query_start_loc, Tensor tokens_before, int block_size) -> (Tensor, Tensor, Tensor, Tensor)");
  // Run-time ISA of the kernels (csrc/cpu_isa.h): the path in use, and a switch
  // (auto | avx2 | avx512 | avx512_bf16 | avx512_amx) that returns the previous
  // path; whether the path in use runs the AVX-512 micro-kernels with the
  // BF16 instructions emulated (the avx512 path).
  m.def("cpu_isa() -> str", [] { return kvc::cpu_isa_name(); });
  m.def("cpu_isa_emulates_bf16() -> bool", [] {
    const kvc::CpuIsa isa = kvc::active_isa();
    return isa != kvc::CpuIsa::kBaseline && kvc::avx512_kernels(isa).emulated_bf16;
  });
  m.def("set_cpu_isa(str isa) -> str", [](std::string isa) { return kvc::set_cpu_isa(isa); });
}

TORCH_LIBRARY_IMPL(KVC_OP_NAMESPACE, CPU, m) {
  m.impl("paged_head_attention", &kvc::paged_head_attention);
  m.impl("write_kv", &kvc::write_kv);
  m.impl("compact_heads", &kvc::compact_heads);
  m.impl("unpack_pages", &kvc::unpack_pages);
  m.impl("keydiff_scores", &kvc::keydiff_scores);
  m.impl("gather_batch", &kvc::gather_batch);
}
