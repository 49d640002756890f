// write_kv and compact_heads: the cache-maintenance kernels of KV-Compress.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace kvc {
namespace {

// dst[0:D] = src[0:D] converted to the cache dtype.
template <typename Dst, typename Src>
inline void copy_row(Dst* dst, const Src* src, int64_t D, float* tmp) {
  if constexpr (std::is_same_v<Dst, Src>) {
    std::memcpy(dst, src, D * sizeof(Dst));
  } else {
    to_f32(src, tmp, D);
    from_f32_scaled(tmp, dst, D, 1.f);
  }
}

template <typename Dst, typename Src>
void run_write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_pages,
                  const int64_t* slots, float* metrics, int32_t* positions,
                  const at::Tensor& token_positions, const int32_t* packing) {
  const int64_t T = key.size(0), H = key.size(1), D = key.size(2);
  const int64_t N = kv_pages.size(2);
  const Src* k = reinterpret_cast<const Src*>(key.data_ptr());
  const Src* v = reinterpret_cast<const Src*>(value.data_ptr());
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1);
  Dst* kv = reinterpret_cast<Dst*>(kv_pages.data_ptr());
  const bool tp64 = token_positions.scalar_type() == at::kLong;
  const int64_t* tp_l = tp64 ? token_positions.data_ptr<int64_t>() : nullptr;
  const int32_t* tp_i = tp64 ? nullptr : token_positions.data_ptr<int32_t>();
  // ~16 KiB of K/V per chunk before it is worth waking another thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / (2 * D * static_cast<int64_t>(sizeof(Dst))));
  std::atomic<bool> bad_offset{false};
  at::parallel_for(0, T * H, grain, [&](int64_t b, int64_t e) {
    std::vector<float> tmp(std::is_same_v<Dst, Src> ? 0 : D);
    std::vector<Dst> row(packing ? D : 0);
    for (int64_t i = b; i < e; ++i) {
      const int64_t slot = slots[i];
      if (slot < 0) continue;
      const int64_t t = i / H, h = i % H;
      const int64_t page = slot / N, off = slot % N;
      if (packing) {  // vLLM's in-page layout: (off, d) of each half at packing[half, off, d]
        const Src* src[2] = {k + t * ks0 + h * ks1, v + t * vs0 + h * vs1};
        for (int64_t half = 0; half < 2; ++half) {
          copy_row(row.data(), src[half], D, tmp.data());
          Dst* hb = kv + (page * 2 + half) * N * D;
          const int32_t* o = packing + (half * N + off) * D;
          for (int64_t d = 0; d < D; ++d) {
            if (static_cast<uint32_t>(o[d]) >= static_cast<uint32_t>(N * D)) {
              bad_offset.store(true);
              break;
            }
            hb[o[d]] = row[d];
          }
        }
      } else {
        Dst* kd = kv + (page * 2 * N + off) * D;
        copy_row(kd, k + t * ks0 + h * ks1, D, tmp.data());
        copy_row(kd + N * D, v + t * vs0 + h * vs1, D, tmp.data());
      }
      if (metrics) metrics[slot] = 0.f;
      if (positions) positions[slot] = static_cast<int32_t>(tp64 ? tp_l[t] : tp_i[t]);
    }
  });
  TORCH_CHECK(!bad_offset.load(), "write_kv: a packing offset lies outside its half-page of ", N * D, " elements");
}

template <typename Dst>
void dispatch_write_kv_src(const at::Tensor& key, const at::Tensor& value,
                           const at::Tensor& kv_pages, const int64_t* slots, float* metrics,
                           int32_t* positions, const at::Tensor& token_positions,
                           const int32_t* packing) {
  switch (key.scalar_type()) {
    case at::kFloat:
      return run_write_kv<Dst, float>(key, value, kv_pages, slots, metrics, positions,
                                      token_positions, packing);
    case at::kBFloat16:
      return run_write_kv<Dst, c10::BFloat16>(key, value, kv_pages, slots, metrics, positions,
                                              token_positions, packing);
    case at::kHalf:
      return run_write_kv<Dst, c10::Half>(key, value, kv_pages, slots, metrics, positions,
                                          token_positions, packing);
    default:
      TORCH_CHECK(false, "write_kv: unsupported key/value dtype ", key.scalar_type());
  }
}

// Moves (K, V, metric, position) of every head; see reference.compaction_moves.
// `packing` (nullptr: plain [N, D] rows) is the [2, N, D] element offset of
// (slot, dim) inside the K and the V half of a page (vLLM's in-page layout).
template <typename E>
void run_compact(E* kv, float* metrics, int32_t* positions, int64_t N, int64_t D,
                 const int32_t* pt, int64_t max_pages, const int32_t* kv_lens,
                 const int32_t* evict, int64_t max_evict, const int32_t* counts, int64_t S,
                 const int32_t* packing) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(E));
  at::parallel_for(0, S, 4, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      const int64_t count = counts[s];
      if (count == 0) continue;
      const int64_t n = kv_lens[s];
      const int64_t new_len = n - count;
      const int32_t* ev = evict + s * max_evict;
      const int32_t* pages = pt + s * max_pages;
      // holes: ev[0:h) (< new_len); survivors >= new_len fill them in order.
      int64_t h = 0;
      while (h < count && ev[h] < new_len) ++h;
      int64_t src = new_len;
      int64_t next_ev = h;  // next evicted index >= new_len
      for (int64_t k = 0; k < h; ++k) {
        while (next_ev < count && ev[next_ev] == src) {
          ++src;
          ++next_ev;
        }
        const int64_t dst = ev[k];
        const int64_t sp = pages[src / N], so = src % N;
        const int64_t dp = pages[dst / N], d_o = dst % N;
        if (packing) {
          E* sk = kv + sp * 2 * N * D;
          E* dk = kv + dp * 2 * N * D;
          for (int64_t half = 0; half < 2; ++half) {
            const int32_t* so_off = packing + (half * N + so) * D;
            const int32_t* do_off = packing + (half * N + d_o) * D;
            E* sh = sk + half * N * D;
            E* dh = dk + half * N * D;
            for (int64_t d = 0; d < D; ++d) dh[do_off[d]] = sh[so_off[d]];
          }
        } else {
          E* sk = kv + (sp * 2 * N + so) * D;
          E* dk = kv + (dp * 2 * N + d_o) * D;
          std::memcpy(dk, sk, row_bytes);
          std::memcpy(dk + N * D, sk + N * D, row_bytes);
        }
        metrics[dp * N + d_o] = metrics[sp * N + so];
        positions[dp * N + d_o] = positions[sp * N + so];
        ++src;
      }
    }
  });
}

}  // namespace

// See ops.h.
const int32_t* packing_offsets(const std::optional<at::Tensor>& packing, int64_t N, int64_t D,
                               const char* op, at::Tensor& keep, bool check_all) {
  if (!packing.has_value()) return nullptr;
  TORCH_CHECK(packing->device().is_cpu() && packing->scalar_type() == at::kInt &&
                  packing->dim() == 3 && packing->size(0) == 2 && packing->size(1) == N &&
                  packing->size(2) == D,
              op, ": packing must be an int32 CPU [2, N, D] tensor");
  keep = packing->contiguous();
  const int32_t* p = keep.data_ptr<int32_t>();
  if (check_all)
    for (int64_t i = 0; i < 2 * N * D; ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < N * D, op, ": packing offset ", p[i],
                  " outside a half-page of ", N * D, " elements");
  return p;
}

void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_pages,
              const at::Tensor& slots, const std::optional<at::Tensor>& metrics,
              const std::optional<at::Tensor>& positions, const at::Tensor& token_positions,
              const std::optional<at::Tensor>& packing) {
  TORCH_CHECK(kv_pages.device().is_cpu(), "write_kv: CPU tensors expected");
  TORCH_CHECK(kv_pages.dim() == 4 && kv_pages.size(1) == 2 && kv_pages.is_contiguous(),
              "write_kv: kv_pages must be a contiguous [P, 2, N, D] tensor");
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(),
              "write_kv: key and value must be [T, H, D] of the same shape");
  TORCH_CHECK(key.size(2) == kv_pages.size(3), "write_kv: head_dim mismatch");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "write_kv: key/value dtype mismatch");
  const int64_t T = key.size(0), H = key.size(1);
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == T && slots.size(1) == H,
              "write_kv: slots must be [T, H]");
  TORCH_CHECK(token_positions.numel() >= T || !positions.has_value(),
              "write_kv: token_positions must be [T]");
  const int64_t P = kv_pages.size(0), N = kv_pages.size(2);
  // Last dim must be contiguous; copy otherwise (never the case in vLLM).
  const at::Tensor k = key.stride(2) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(2) == 1 ? value : value.contiguous();
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  at::Tensor tp = token_positions;
  if (tp.scalar_type() != at::kLong && tp.scalar_type() != at::kInt) tp = tp.to(at::kLong);
  tp = tp.contiguous();
  float* mptr = nullptr;
  int32_t* pptr = nullptr;
  if (metrics.has_value()) {
    TORCH_CHECK(metrics->scalar_type() == at::kFloat && metrics->is_contiguous() &&
                    metrics->numel() == P * N,
                "write_kv: metrics must be a contiguous float32 [P, N] tensor");
    mptr = metrics->data_ptr<float>();
  }
  if (positions.has_value()) {
    TORCH_CHECK(positions->scalar_type() == at::kInt && positions->is_contiguous() &&
                    positions->numel() == P * N,
                "write_kv: positions must be a contiguous int32 [P, N] tensor");
    pptr = positions->data_ptr<int32_t>();
  }
  at::Tensor pk;
  const int32_t* pk_p = packing_offsets(packing, N, kv_pages.size(3), "write_kv", pk, false);
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * H; ++i)
    TORCH_CHECK(sp[i] < P * N, "write_kv: slot ", sp[i], " out of range (", P * N, " slots)");
  if (T * H == 0) return;
  switch (kv_pages.scalar_type()) {
    case at::kFloat:
      return dispatch_write_kv_src<float>(k, v, kv_pages, sp, mptr, pptr, tp, pk_p);
    case at::kBFloat16:
      return dispatch_write_kv_src<c10::BFloat16>(k, v, kv_pages, sp, mptr, pptr, tp, pk_p);
    case at::kHalf:
      return dispatch_write_kv_src<c10::Half>(k, v, kv_pages, sp, mptr, pptr, tp, pk_p);
    default:
      TORCH_CHECK(false, "write_kv: unsupported cache dtype ", kv_pages.scalar_type());
  }
}

void compact_heads(const at::Tensor& kv_pages, const at::Tensor& metrics,
                   const at::Tensor& positions, const at::Tensor& page_table,
                   const at::Tensor& kv_lens, const at::Tensor& evict_idx,
                   const at::Tensor& evict_counts, const std::optional<at::Tensor>& packing) {
  TORCH_CHECK(kv_pages.device().is_cpu(), "compact_heads: CPU tensors expected");
  TORCH_CHECK(kv_pages.dim() == 4 && kv_pages.size(1) == 2 && kv_pages.is_contiguous(),
              "compact_heads: kv_pages must be a contiguous [P, 2, N, D] tensor");
  const int64_t P = kv_pages.size(0), N = kv_pages.size(2), D = kv_pages.size(3);
  TORCH_CHECK(metrics.scalar_type() == at::kFloat && metrics.is_contiguous() &&
                  metrics.numel() == P * N,
              "compact_heads: metrics must be a contiguous float32 [P, N] tensor");
  TORCH_CHECK(positions.scalar_type() == at::kInt && positions.is_contiguous() &&
                  positions.numel() == P * N,
              "compact_heads: positions must be a contiguous int32 [P, N] tensor");
  TORCH_CHECK(page_table.dim() == 2, "compact_heads: page_table must be [S, max_pages]");
  const int64_t S = page_table.size(0), max_pages = page_table.size(1);
  TORCH_CHECK(kv_lens.numel() == S && evict_counts.numel() == S,
              "compact_heads: kv_lens and evict_counts must be [S]");
  TORCH_CHECK(evict_idx.dim() == 2 && evict_idx.size(0) == S,
              "compact_heads: evict_idx must be [S, max_evict]");
  const at::Tensor pt = page_table.to(at::kInt).contiguous();
  const at::Tensor kvl = kv_lens.to(at::kInt).contiguous();
  const at::Tensor ev = evict_idx.to(at::kInt).contiguous();
  const at::Tensor cnt = evict_counts.to(at::kInt).contiguous();
  const int64_t max_evict = ev.size(1);
  const int32_t* pt_p = pt.data_ptr<int32_t>();
  const int32_t* kvl_p = kvl.data_ptr<int32_t>();
  const int32_t* ev_p = ev.data_ptr<int32_t>();
  const int32_t* cnt_p = cnt.data_ptr<int32_t>();

  // Validate everything before moving anything.
  for (int64_t s = 0; s < S; ++s) {
    const int64_t count = cnt_p[s], n = kvl_p[s];
    if (count == 0) continue;
    TORCH_CHECK(count > 0 && count <= max_evict && count <= n && n <= max_pages * N,
                "compact_heads: bad evict_counts/kv_lens for head ", s);
    const int32_t* e = ev_p + s * max_evict;
    for (int64_t k = 0; k < count; ++k)
      TORCH_CHECK(e[k] >= 0 && e[k] < n && (k == 0 || e[k] > e[k - 1]), "compact_heads: evict_idx[",
                  s, "] must be strictly ascending indices < kv_len");
    for (int64_t p = 0; p < (n + N - 1) / N; ++p)
      TORCH_CHECK(pt_p[s * max_pages + p] >= 0 && pt_p[s * max_pages + p] < P,
                  "compact_heads: page_table[", s, ", ", p, "] out of range");
  }
  // Heads move KVs in parallel: a page a head moves KVs within (from its
  // first hole to its last KV) must be listed by no other head of the call,
  // nor twice by that head.  Pages below every first hole (a shared prefix)
  // may be listed by several heads: nothing moves there.
  // (Heads without evictions are not validated above: only their pages in
  // range count here.)
  std::vector<int32_t> listed, moved;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t count = cnt_p[s];
    const int64_t n = std::clamp<int64_t>(kvl_p[s], 0, max_pages * N);
    const int64_t first =
        count > 0 && ev_p[s * max_evict] < n - count ? ev_p[s * max_evict] / N : -1;
    for (int64_t p = 0; p < (n + N - 1) / N; ++p) {
      const int32_t page = pt_p[s * max_pages + p];
      if (page < 0 || page >= P) continue;
      listed.push_back(page);
      if (first >= 0 && p >= first) moved.push_back(page);
    }
  }
  std::sort(listed.begin(), listed.end());
  for (const int32_t page : moved) {
    const auto range = std::equal_range(listed.begin(), listed.end(), page);
    TORCH_CHECK(range.second - range.first == 1, "compact_heads: page ", page,
                " is moved within by one head but listed ", range.second - range.first,
                " times in the call; each head must own the pages from its first evicted KV on");
  }

  at::Tensor pk;
  const int32_t* pk_p = packing_offsets(packing, N, D, "compact_heads", pk, true);
  float* m = metrics.data_ptr<float>();
  int32_t* pos = positions.data_ptr<int32_t>();
  const size_t esize = kv_pages.element_size();
  if (esize == 4) {
    run_compact(reinterpret_cast<int32_t*>(kv_pages.data_ptr()), m, pos, N, D, pt_p, max_pages,
                kvl_p, ev_p, max_evict, cnt_p, S, pk_p);
  } else if (esize == 2) {
    run_compact(reinterpret_cast<int16_t*>(kv_pages.data_ptr()), m, pos, N, D, pt_p, max_pages,
                kvl_p, ev_p, max_evict, cnt_p, S, pk_p);
  } else if (esize == 1) {
    run_compact(reinterpret_cast<int8_t*>(kv_pages.data_ptr()), m, pos, N, D, pt_p, max_pages,
                kvl_p, ev_p, max_evict, cnt_p, S, pk_p);
  } else {
    TORCH_CHECK(false, "compact_heads: unsupported element size ", esize);
  }
}

}  // namespace kvc

namespace kvc {
namespace {

template <typename E>
void run_unpack(const E* kv, E* out, const int32_t* rows, int64_t count, int64_t N, int64_t D,
                int64_t half, const int32_t* packing) {
  const int32_t* off = packing + half * N * D;
  at::parallel_for(0, count, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      E* dst = out + i * N * D;
      const int64_t page = rows[i];
      if (page < 0) {
        std::memset(dst, 0, N * D * sizeof(E));
        continue;
      }
      const E* src = kv + (page * 2 + half) * N * D;
      for (int64_t j = 0; j < N * D; ++j) dst[j] = src[off[j]];
    }
  });
}

}  // namespace

at::Tensor unpack_pages(const at::Tensor& kv_pages, const at::Tensor& page_rows,
                        const at::Tensor& packing, int64_t half) {
  TORCH_CHECK(kv_pages.device().is_cpu(), "unpack_pages: CPU tensors expected");
  TORCH_CHECK(kv_pages.dim() == 4 && kv_pages.size(1) == 2 && kv_pages.is_contiguous(),
              "unpack_pages: kv_pages must be a contiguous [P, 2, N, D] tensor");
  TORCH_CHECK(half == 0 || half == 1, "unpack_pages: half must be 0 (K) or 1 (V), got ", half);
  const int64_t P = kv_pages.size(0), N = kv_pages.size(2), D = kv_pages.size(3);
  at::Tensor pk;
  const int32_t* pk_p =
      packing_offsets(std::optional<at::Tensor>(packing), N, D, "unpack_pages", pk, true);
  const at::Tensor rows = page_rows.to(at::kInt).contiguous();
  const int32_t* r = rows.data_ptr<int32_t>();
  const int64_t count = rows.numel();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(r[i] < P, "unpack_pages: page ", r[i], " out of range (", P, " pages)");
  std::vector<int64_t> shape(page_rows.sizes().begin(), page_rows.sizes().end());
  shape.push_back(N);
  shape.push_back(D);
  at::Tensor out = at::empty(shape, kv_pages.options());
  const size_t esize = kv_pages.element_size();
  if (esize == 4) {
    run_unpack(reinterpret_cast<const int32_t*>(kv_pages.data_ptr()),
               reinterpret_cast<int32_t*>(out.data_ptr()), r, count, N, D, half, pk_p);
  } else if (esize == 2) {
    run_unpack(reinterpret_cast<const int16_t*>(kv_pages.data_ptr()),
               reinterpret_cast<int16_t*>(out.data_ptr()), r, count, N, D, half, pk_p);
  } else if (esize == 1) {
    run_unpack(reinterpret_cast<const int8_t*>(kv_pages.data_ptr()),
               reinterpret_cast<int8_t*>(out.data_ptr()), r, count, N, D, half, pk_p);
  } else {
    TORCH_CHECK(false, "unpack_pages: unsupported element size ", esize);
  }
  return out;
}

}  // namespace kvc
