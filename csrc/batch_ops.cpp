// gather_batch: a step's attention inputs from the worker's head page tables
// (contract: kvcompress_vllm/ops/reference.py, gather_batch).  Host-side
// bookkeeping of every step with a request in the plugin's layout: one pass
// instead of ~20 small tensor ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "ops.h"

namespace kvc {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_batch(
    const at::Tensor& page_table, const at::Tensor& num_pages, const at::Tensor& kv_count,
    const at::Tensor& slots, const at::Tensor& query_start_loc, const at::Tensor& tokens_before,
    int64_t block_size) {
  TORCH_CHECK(page_table.dim() == 4 && page_table.scalar_type() == at::kInt && page_table.is_cpu(),
              "gather_batch: page_table must be a [S, L, H, max_pages] int32 CPU tensor");
  const int64_t S = page_table.size(0), L = page_table.size(1), H = page_table.size(2),
                P = page_table.size(3);
  for (const at::Tensor* t : {&num_pages, &kv_count}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_cpu() && t->sizes() == page_table.sizes().slice(0, 3),
                "gather_batch: num_pages and kv_count must be [S, L, H] int32 CPU tensors like page_table's");
  }
  TORCH_CHECK(block_size > 0, "gather_batch: block_size must be positive, got ", block_size);
  TORCH_CHECK(L * H > 0, "gather_batch: the tables have no heads (L = ", L, ", H = ", H, ")");
  TORCH_CHECK(slots.is_cpu() && query_start_loc.is_cpu() && tokens_before.is_cpu(),
              "gather_batch: slots, query_start_loc and tokens_before must be CPU tensors");
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  const at::Tensor qsl = query_start_loc.to(at::kLong).contiguous();
  const at::Tensor before = tokens_before.to(at::kLong).contiguous();
  const int64_t R = sl.numel();
  TORCH_CHECK(qsl.numel() == R + 1 && before.numel() == R,
              "gather_batch: query_start_loc must have R + 1 = ", R + 1, " entries and tokens_before R; got ",
              qsl.numel(), " and ", before.numel());
  const at::Tensor pt = page_table.contiguous(), np = num_pages.contiguous(), kc = kv_count.contiguous();
  const int32_t* pt_p = pt.data_ptr<int32_t>();
  const int32_t* np_p = np.data_ptr<int32_t>();
  const int32_t* kc_p = kc.data_ptr<int32_t>();
  const int64_t* s_p = sl.data_ptr<int64_t>();
  const int64_t* q_p = qsl.data_ptr<int64_t>();
  const int64_t* b_p = before.data_ptr<int64_t>();
  const int64_t LH = L * H;

  int64_t width = 0;
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(s_p[r] >= 0 && s_p[r] < S, "gather_batch: row ", r, " names table slot ", s_p[r],
                "; the table has ", S);
    TORCH_CHECK(q_p[r + 1] >= q_p[r], "gather_batch: query_start_loc decreases at row ", r);
    const int32_t* n = np_p + s_p[r] * LH;
    width = std::max<int64_t>(width, *std::max_element(n, n + LH));
  }
  const int64_t T = R ? q_p[R] - q_p[0] : 0;
  TORCH_CHECK(width <= P, "gather_batch: a head holds ", width, " pages; the table has room for ", P);

  auto int_opts = at::TensorOptions().dtype(at::kInt);
  auto long_opts = at::TensorOptions().dtype(at::kLong);
  at::Tensor pages = at::empty({L, R, H, width}, int_opts);
  at::Tensor kv_lens = at::empty({L, R, H}, int_opts);
  at::Tensor write_slots = at::empty({L, T, H}, long_opts);
  at::Tensor positions = at::empty({T}, long_opts);
  int32_t* out_pt = pages.data_ptr<int32_t>();
  int32_t* out_len = kv_lens.data_ptr<int32_t>();
  int64_t* out_ws = write_slots.data_ptr<int64_t>();
  int64_t* out_pos = positions.data_ptr<int64_t>();

  for (int64_t r = 0; r < R; ++r) {
    for (int64_t t = q_p[r]; t < q_p[r + 1]; ++t) out_pos[t - q_p[0]] = b_p[r] + (t - q_p[r]);
  }
  // First bad (layer, row, head, logical) found, for the error below.
  std::atomic<bool> bad{false};
  int64_t bad_at[4] = {0, 0, 0, 0};
  // First page found written by two (row, head) pairs of one layer, or listed
  // twice among the pages one pair writes: (layer, page, owner, owner).
  std::atomic<bool> shared{false};
  int64_t shared_at[4] = {0, 0, 0, 0};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, (T + R * width) * H));
  at::parallel_for(0, L, grain, [&](int64_t lb, int64_t le) {
    // (page, r * H + h) of every table entry a step token of the layer writes in.
    std::vector<std::pair<int64_t, int64_t>> written;
    for (int64_t l = lb; l < le; ++l) {
      written.clear();
      for (int64_t r = 0; r < R; ++r) {
        const int64_t q_len = q_p[r + 1] - q_p[r];
        for (int64_t h = 0; h < H; ++h) {
          const int64_t src = (s_p[r] * L + l) * H + h;
          const int32_t* row_pages = pt_p + src * P;
          const int64_t held = np_p[src], count = kc_p[src];
          int32_t* dst = out_pt + ((l * R + r) * H + h) * width;
          std::copy(row_pages, row_pages + width, dst);
          out_len[(l * R + r) * H + h] = static_cast<int32_t>(count);
          int64_t last_entry = -1;
          for (int64_t o = 0; o < q_len; ++o) {
            const int64_t logical = count - q_len + o;
            const int64_t p = logical / block_size;
            const int64_t page = (logical >= 0 && p < held) ? row_pages[p] : -1;
            if (page < 0) {
              if (!bad.exchange(true)) {
                bad_at[0] = l, bad_at[1] = r, bad_at[2] = h, bad_at[3] = logical;
              }
              continue;
            }
            if (p != last_entry) written.emplace_back(page, r * H + h), last_entry = p;
            out_ws[(l * T + (q_p[r] - q_p[0]) + o) * H + h] = page * block_size + logical % block_size;
          }
        }
      }
      // A page the step writes in belongs to one head: two writers of one page
      // (or one head listing it twice) would race on, or overwrite, its KVs.
      std::sort(written.begin(), written.end());
      for (size_t i = 1; i < written.size(); ++i) {
        if (written[i].first == written[i - 1].first && !shared.exchange(true)) {
          shared_at[0] = l, shared_at[1] = written[i].first;
          shared_at[2] = written[i - 1].second, shared_at[3] = written[i].second;
        }
      }
    }
  });
  TORCH_CHECK(!bad.load(), "gather_batch: a token's KV lies outside its head's pages: layer ", bad_at[0],
              ", row ", bad_at[1], ", head ", bad_at[2], ", logical index ", bad_at[3]);
  TORCH_CHECK(!shared.load(), "gather_batch: page ", shared_at[1], " of layer ", shared_at[0],
              " is written this step by row ", shared_at[2] / H, ", head ", shared_at[2] % H, " and by row ",
              shared_at[3] / H, ", head ", shared_at[3] % H,
              " (a page written in a step must belong to one head and be listed once)");
  return {pages, kv_lens, write_slots, positions};
}

}  // namespace kvc
