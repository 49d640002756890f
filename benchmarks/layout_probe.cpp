// Layout probe (benchmarks/layout_probe.py builds this with torch's cpp_extension).
//
// The decode inner loop of one KV head -- per block of N = 128 keys: S = Q K^T,
// the block softmax, O += P V -- on two page layouts:
//
//  * plain  (today's pages): K and V as [N, D] rows; the production AVX-512-BF16
//           micro-kernels, compiled from csrc/attention_avx512.cpp itself.
//  * packed: K as [N/16][D/2][16][2] (per 16-key group, for each pair of dims,
//           the 16 keys' two values: one 64-byte line per dim pair for bf16),
//           V as [N/2][D][2] (per pair of keys, both keys' value of each dim).
//           Two kernels read it without any repacking or horizontal reduction:
//    - packed_avx512: VDPBF16PS with the 16 keys of a group in the 16 lanes
//      (QK) and with a key pair's two P values against the V pair lines (PV);
//    - packed_amx: the K groups are AMX B tiles of S = Q K^T and the V pairs B
//      tiles of O = P V as they lie in memory (rows G, 64-byte lines).
//
// Only the layout and the micro-kernels differ: the same softmax_row, the same
// bf16 data, one thread.  The output O (unnormalised, no running-max rescale:
// this is a timing probe, not the attention kernel) is returned so that the
// variants can be checked against each other.  Shapes: G in {1, 2, 3, 4} query
// rows, D in {64, 128}; ctx a multiple of 128.
#include <torch/extension.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>

#include "../csrc/attention_avx512.cpp"

namespace probe {

constexpr int kN = 128;

#define PROBE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define PROBE_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// ----------------------------------------------------------- packed, AVX-512
template <int G, int D>
PROBE_AVX512 void qk_packed(const uint16_t* Q, const uint16_t* Kp, float* S, int lds) {
  constexpr int KG = 4;  // 16-key groups per pass: G * KG independent accumulators
  const int32_t* q32 = reinterpret_cast<const int32_t*>(Q);
  const uint32_t* k32 = reinterpret_cast<const uint32_t*>(Kp);
  for (int g0 = 0; g0 < kN; g0 += 16 * KG) {
    __m512 acc[G][KG];
    for (int r = 0; r < G; ++r)
      for (int x = 0; x < KG; ++x) acc[r][x] = _mm512_setzero_ps();
    const uint32_t* kg = k32 + (g0 / 16) * (D / 2) * 16;
    for (int p = 0; p < D / 2; ++p) {
      __m512bh qb[G];
      for (int r = 0; r < G; ++r) qb[r] = (__m512bh)_mm512_set1_epi32(q32[r * (D / 2) + p]);
      for (int x = 0; x < KG; ++x) {
        const __m512bh k = (__m512bh)_mm512_loadu_si512(kg + (x * (D / 2) + p) * 16);
        for (int r = 0; r < G; ++r) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], k, qb[r]);
      }
    }
    for (int r = 0; r < G; ++r)
      for (int x = 0; x < KG; ++x)
        _mm512_storeu_ps(S + r * lds + g0 + 16 * x, acc[r][x]);
  }
}

template <int G, int D>
PROBE_AVX512 void pv_packed(const uint16_t* Pb, int ldb, const uint16_t* Vp, float* O) {
  constexpr int C = D / 16;                       // 16-dim chunks of O
  constexpr int CH = (G * C > 24) ? C / 2 : C;    // chunks per pass (register budget)
  const uint32_t* v32 = reinterpret_cast<const uint32_t*>(Vp);
  for (int c0 = 0; c0 < C; c0 += CH) {
    __m512 acc[G][CH];
    for (int r = 0; r < G; ++r)
      for (int c = 0; c < CH; ++c) acc[r][c] = _mm512_loadu_ps(O + r * D + (c0 + c) * 16);
    for (int j = 0; j < kN / 2; ++j) {
      __m512bh pb[G];
      for (int r = 0; r < G; ++r)
        pb[r] = (__m512bh)_mm512_set1_epi32(reinterpret_cast<const int32_t*>(Pb + r * ldb)[j]);
      for (int c = 0; c < CH; ++c) {
        const __m512bh v = (__m512bh)_mm512_loadu_si512(v32 + j * D + (c0 + c) * 16);
        for (int r = 0; r < G; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], v, pb[r]);
      }
    }
    for (int r = 0; r < G; ++r)
      for (int c = 0; c < CH; ++c) _mm512_storeu_ps(O + r * D + (c0 + c) * 16, acc[r][c]);
  }
}

// --------------------------------------------------------------- packed, AMX
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0-3: C (4 key groups of S, or 4 x 16 dims of O), G rows; tmm4: A (G rows); tmm5: B.
PROBE_AMX void amx_config(int G) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 5; ++t) {
    cfg.rows[t] = G;
    cfg.colsb[t] = 64;
  }
  cfg.rows[5] = 16;
  cfg.colsb[5] = 64;
  asm volatile("" : : "r"(&cfg) : "memory");  // GCC 12 drops the stores otherwise
  _tile_loadconfig(&cfg);
}

// C tiles 0-3 from / to p, p + 16, p + 32, p + 48 (floats), rows `stride` bytes apart.
PROBE_AMX inline void load_c4(const float* p, int stride) {
  _tile_loadd(0, p, stride);
  _tile_loadd(1, p + 16, stride);
  _tile_loadd(2, p + 32, stride);
  _tile_loadd(3, p + 48, stride);
}

PROBE_AMX inline void store_c4(float* p, int stride) {
  _tile_stored(0, p, stride);
  _tile_stored(1, p + 16, stride);
  _tile_stored(2, p + 32, stride);
  _tile_stored(3, p + 48, stride);
}

template <int D>
PROBE_AMX void qk_amx(const uint16_t* Q, const uint16_t* Kp, float* S, int lds) {
  const uint32_t* k32 = reinterpret_cast<const uint32_t*>(Kp);
  for (int g0 = 0; g0 < kN; g0 += 64) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int c = 0; c < D / 32; ++c) {
      _tile_loadd(4, Q + c * 32, D * 2);
#define PROBE_QK(X)                                                          \
  _tile_loadd(5, k32 + ((g0 / 16 + X) * (D / 2) + c * 16) * 16, 64); \
  _tile_dpbf16ps(X, 4, 5);
      PROBE_QK(0) PROBE_QK(1) PROBE_QK(2) PROBE_QK(3)
#undef PROBE_QK
    }
    store_c4(S + g0, lds * 4);
  }
}

template <int D>
PROBE_AMX void pv_amx(const uint16_t* Pb, int ldb, const uint16_t* Vp, float* O) {
  for (int d0 = 0; d0 < D; d0 += 64) {
    load_c4(O + d0, D * 4);
    for (int j = 0; j < kN; j += 32) {
      _tile_loadd(4, Pb + j, ldb * 2);
#define PROBE_PV(X)                                              \
  _tile_loadd(5, Vp + ((j / 2) * D + d0 + 16 * X) * 2, D * 4); \
  _tile_dpbf16ps(X, 4, 5);
      PROBE_PV(0) PROBE_PV(1) PROBE_PV(2) PROBE_PV(3)
#undef PROBE_PV
    }
    store_c4(O + d0, D * 4);
  }
}

PROBE_AMX void amx_release() { _tile_release(); }

// ------------------------------------------------------------------- driver
enum Variant { kPlain = 0, kPackedAvx512 = 1, kPackedAmx = 2 };

template <int G, int D>
void run_passes(const uint16_t* Q, const uint16_t* K, const uint16_t* V, int blocks, int variant,
                int64_t passes, float* O) {
  constexpr int lds = kN + 16, ldb = kN + 32;
  alignas(64) float S[G * lds];
  alignas(64) uint16_t Pb[G * ldb * 2];
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  if (variant == kPackedAmx) amx_config(G);
  for (int64_t it = 0; it < passes; ++it) {
    std::fill(O, O + G * D, 0.f);
    for (int b = 0; b < blocks; ++b) {
      const uint16_t* kb = K + static_cast<int64_t>(b) * kN * D;
      const uint16_t* vb = V + static_cast<int64_t>(b) * kN * D;
      // Unscaled scores; softmax_row scales them and writes bf16 P rows.
      if (variant == kPlain)
        kvc::avx512::qk_block_bf16(Q, G, D, kb, D, kN, S, lds, nullptr, nullptr, 0);
      else if (variant == kPackedAvx512)
        qk_packed<G, D>(Q, kb, S, lds);
      else
        qk_amx<D>(Q, kb, S, lds);
      for (int r = 0; r < G; ++r) {
        float m_new;
        kvc::avx512::softmax_row(S + r * lds, kN, kN, scale, 0.f, &m_new, nullptr, Pb + r * ldb);
      }
      if (variant == kPlain) {
        kvc::avx512::pv_block_bf16(Pb, G, ldb, vb, D, kN, D, O);
      } else {
        if (variant == kPackedAvx512)
          pv_packed<G, D>(Pb, ldb, vb, O);
        else
          pv_amx<D>(Pb, ldb, vb, O);
      }
    }
  }
  if (variant == kPackedAmx) amx_release();
}

// q [G, D], k / v [ctx, D] (plain) or the packed layouts (same numel), bf16;
// out [G, D] float32.  Returns the wall time of `passes` passes in ns.
double time_passes(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                   int64_t variant, int64_t passes, torch::Tensor& out) {
  TORCH_CHECK(q.dtype() == torch::kBFloat16 && k.dtype() == torch::kBFloat16 &&
                  v.dtype() == torch::kBFloat16 && out.dtype() == torch::kFloat32,
              "layout probe: bf16 q/k/v, float32 out");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(kvc::cpu_has_avx512_bf16(), "layout probe: needs AVX-512 + AVX512-BF16");
  TORCH_CHECK(variant >= 0 && variant <= 2, "layout probe: variant 0, 1 or 2");
  const int G = static_cast<int>(q.size(0)), D = static_cast<int>(q.size(1));
  TORCH_CHECK(k.numel() % (kN * D) == 0 && k.numel() == v.numel(), "layout probe: ctx % 128");
  const int blocks = static_cast<int>(k.numel() / (kN * D));
  auto* Q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  auto* K = reinterpret_cast<const uint16_t*>(k.data_ptr());
  auto* V = reinterpret_cast<const uint16_t*>(v.data_ptr());
  float* O = out.data_ptr<float>();
  const auto t0 = std::chrono::steady_clock::now();
#define PROBE_CASE(g, d) \
  if (G == g && D == d) { run_passes<g, d>(Q, K, V, blocks, static_cast<int>(variant), passes, O); } else
  PROBE_CASE(1, 64) PROBE_CASE(2, 64) PROBE_CASE(3, 64) PROBE_CASE(4, 64)
  PROBE_CASE(1, 128) PROBE_CASE(2, 128) PROBE_CASE(3, 128) PROBE_CASE(4, 128)
  { TORCH_CHECK(false, "layout probe: G in 1..4, D in {64, 128}, got G=", G, " D=", D); }
#undef PROBE_CASE
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace probe

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("time_passes", &probe::time_passes, "time passes of one layout variant (ns)");
}
