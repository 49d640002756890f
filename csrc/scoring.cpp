// Scorer kernels that read keys where they lie in the cache (no gather).
//
// keydiff_scores: KeyDiff (arXiv 2504.15364, kvpress's KeyDiffPress) over
// head-pages, one row per (layer, KV head):
//   anchor_i = mean_j k_ij / |k_ij|          over the row's counts[i] KVs
//   score_ij = -(k_ij . anchor_i) / |k_ij| / |anchor_i|      (0 past counts[i])
// with |k| clamped below at 1e-12 and |anchor| at 1e-8, as
// kvcompress_vllm/scorers/keydiff_scorer.py.  Contract: ops/reference.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace kvc {
namespace {

// Dot product of two fp32 rows in kLanes independent partial sums, so that
// the loop vectorises without reassociating (no -ffast-math needed).
constexpr int64_t kLanes = 16;
inline float dot(const float* a, const float* b, int64_t D) {
  float lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  float s = 0.f;
  for (; d < D; ++d) s += a[d] * b[d];
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

template <typename T>
void run_keydiff(const T* kv, const int32_t* rows, int64_t np, const int32_t* counts, int64_t R,
                 int64_t width, int64_t N, int64_t D, const int32_t* pk, float* out) {
  at::parallel_for(0, R, 1, [&](int64_t b, int64_t e) {
    std::vector<float> keys, inv, acc(D);
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = counts[i];
      float* o = out + i * width;
      keys.resize(static_cast<size_t>(n * D));
      inv.resize(static_cast<size_t>(n));
      std::fill(acc.begin(), acc.end(), 0.f);
      // Keys of the row in logical order (fp32 [n, D]), their inverse norms,
      // and the sum of the normalised keys.
      for (int64_t j = 0; j < n; ++j) {
        const T* page = kv + static_cast<int64_t>(rows[i * np + j / N]) * 2 * N * D;  // K half
        const int64_t s = j % N;
        float* kj = keys.data() + j * D;
        if (pk) {
          const int32_t* off = pk + s * D;
          for (int64_t d = 0; d < D; ++d) kj[d] = static_cast<float>(page[off[d]]);
        } else {
          const T* src = page + s * D;
          for (int64_t d = 0; d < D; ++d) kj[d] = static_cast<float>(src[d]);
        }
        const float r = 1.f / std::max(std::sqrt(dot(kj, kj, D)), 1e-12f);
        inv[j] = r;
        for (int64_t d = 0; d < D; ++d) acc[d] += kj[d] * r;
      }
      const float cnt = static_cast<float>(std::max<int64_t>(n, 1));
      for (int64_t d = 0; d < D; ++d) acc[d] /= cnt;  // the anchor
      const float anorm = std::max(std::sqrt(dot(acc.data(), acc.data(), D)), 1e-8f);
      for (int64_t j = 0; j < n; ++j)
        o[j] = -(dot(keys.data() + j * D, acc.data(), D) * inv[j]) / anorm;
      std::fill(o + n, o + width, 0.f);
    }
  });
}

}  // namespace

at::Tensor keydiff_scores(const at::Tensor& kv_pages, const at::Tensor& page_rows,
                          const at::Tensor& counts, int64_t width,
                          const std::optional<at::Tensor>& packing) {
  TORCH_CHECK(kv_pages.device().is_cpu(), "keydiff_scores: CPU tensors expected");
  TORCH_CHECK(kv_pages.dim() == 4 && kv_pages.size(1) == 2 && kv_pages.is_contiguous(),
              "keydiff_scores: kv_pages must be a contiguous [P, 2, N, D] tensor");
  TORCH_CHECK(page_rows.dim() == 2 && page_rows.scalar_type() == at::kInt,
              "keydiff_scores: page_rows must be an int32 [r, pages] tensor");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == page_rows.size(0) &&
                  counts.scalar_type() == at::kInt,
              "keydiff_scores: counts must be an int32 [r] tensor with r = page_rows.size(0)");
  TORCH_CHECK(width >= 0, "keydiff_scores: width must be >= 0, got ", width);
  const int64_t P = kv_pages.size(0), N = kv_pages.size(2), D = kv_pages.size(3);
  const int64_t R = page_rows.size(0), np = page_rows.size(1);
  at::Tensor pk;
  const int32_t* pk_p = packing_offsets(packing, N, D, "keydiff_scores", pk, true);
  const at::Tensor rows = page_rows.contiguous();
  const at::Tensor cnt = counts.contiguous();
  const int32_t* r_p = rows.data_ptr<int32_t>();
  const int32_t* c_p = cnt.data_ptr<int32_t>();
  for (int64_t i = 0; i < R; ++i) {
    TORCH_CHECK(c_p[i] >= 0 && c_p[i] <= width && c_p[i] <= np * N, "keydiff_scores: counts[", i,
                "] = ", c_p[i], " outside [0, min(width ", width, ", ", np, " pages x ", N, ")]");
    for (int64_t p = 0; p < (c_p[i] + N - 1) / N; ++p)
      TORCH_CHECK(r_p[i * np + p] >= 0 && r_p[i * np + p] < P, "keydiff_scores: page_rows[", i,
                  ", ", p, "] = ", r_p[i * np + p], " out of range (", P, " pages)");
  }
  at::Tensor out = at::empty({R, width}, kv_pages.options().dtype(at::kFloat));
  if (R == 0 || width == 0) return out;
  float* o = out.data_ptr<float>();
  switch (kv_pages.scalar_type()) {
    case at::kFloat:
      run_keydiff(kv_pages.data_ptr<float>(), r_p, np, c_p, R, width, N, D, pk_p, o);
      break;
    case at::kBFloat16:
      run_keydiff(kv_pages.data_ptr<c10::BFloat16>(), r_p, np, c_p, R, width, N, D, pk_p, o);
      break;
    case at::kHalf:
      run_keydiff(kv_pages.data_ptr<c10::Half>(), r_p, np, c_p, R, width, N, D, pk_p, o);
      break;
    default:
      TORCH_CHECK(false, "keydiff_scores: unsupported cache dtype ", kv_pages.scalar_type());
  }
  return out;
}

}  // namespace kvc
