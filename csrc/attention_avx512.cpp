// AVX-512 + AVX512-BF16 micro-kernels of paged_head_attention (bf16 caches,
// head_dim % 32 == 0) and the run-time ISA selection (cpu_isa.h).
//
// Only the functions below carry the AVX-512 target attribute: the rest of the
// library stays on the baseline ISA, and these run only after the CPU check
// (so the library loads and runs on AVX2-only machines).
//
//  * QK: VDPBF16PS of raw bf16 query and key rows (products of bf16 values are
//    exact in fp32; accumulation in fp32), 16 dot products per horizontal
//    reduction tree; the scale is applied by the softmax.
//  * Softmax: one pass per row and block (scale, mask, exp against the row's
//    reference max, sum, bf16 probabilities for PV, fp32 ones for the metric)
//    unless the block moves the reference (lazy rescaling), then two.
//  * PV: the bf16 probabilities are paired over two consecutive keys; the two
//    V rows are interleaved (VPUNPCK{L,H}WD) and VDPBF16PS accumulates both
//    keys' products into fp32 O.  The interleaving permutes the head dims
//    inside a 32-dim chunk; O is permuted on load and back on store.
// The metric (sum of squared probabilities) is computed by the caller from the
// fp32 probabilities, so it is not affected by the bf16 rounding of P here.
#include "cpu_isa.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(KVC_NO_AVX512)
#define KVC_HAVE_AVX512_CODE 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define KVC_HAVE_AVX512_CODE 0
#endif

#include <c10/util/Exception.h>

namespace kvc {

// ------------------------------------------------------------- ISA selection

bool cpu_has_avx512_bf16() {
#if KVC_HAVE_AVX512_CODE
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_amx() {
#if KVC_HAVE_AVX512_CODE
  static const bool has = [] {
    unsigned a, b, c, d;
    if (!cpu_has_avx512_bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1) || !((d >> 22) & 1)) return false;  // AMX-TILE, AMX-BF16
    // Linux hands out the tile state on request only (what torch.cpu._init_amx
    // does for vLLM's worker): ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return has;
#else
  return false;
#endif
}

namespace {

const char* baseline_name() {
#if defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

CpuIsa parse_isa(const std::string& name) {
  if (name.empty() || name == "auto")
    return cpu_has_amx() ? CpuIsa::kAvx512Amx
                         : cpu_has_avx512_bf16() ? CpuIsa::kAvx512Bf16 : CpuIsa::kBaseline;
  if (name == "avx2" || name == "baseline" || name == "generic") return CpuIsa::kBaseline;
  if (name == "avx512_bf16" || name == "avx512") {
    TORCH_CHECK(cpu_has_avx512_bf16(), "kvcompress: CPU ISA '", name,
                "' requested but this CPU lacks AVX-512 F/BW/VL/DQ + AVX512-BF16");
    return CpuIsa::kAvx512Bf16;
  }
  if (name == "avx512_amx" || name == "amx") {
    TORCH_CHECK(cpu_has_amx(), "kvcompress: CPU ISA '", name,
                "' requested but this CPU (or the OS) lacks AMX-TILE + AMX-BF16");
    return CpuIsa::kAvx512Amx;
  }
  TORCH_CHECK(false, "kvcompress: unknown CPU ISA '", name,
              "' (expected auto, avx2, avx512_bf16 or avx512_amx)");
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{[] {
    const char* env = std::getenv("KVCOMPRESS_CPU_ISA");
    return static_cast<int>(parse_isa(env ? env : "auto"));
  }()};
  return slot;
}

std::string name_of(CpuIsa isa) {
  return isa == CpuIsa::kAvx512Amx    ? "avx512_amx"
         : isa == CpuIsa::kAvx512Bf16 ? "avx512_bf16"
                                      : baseline_name();
}

}  // namespace

CpuIsa active_isa() { return static_cast<CpuIsa>(isa_slot().load(std::memory_order_relaxed)); }

std::string cpu_isa_name() { return name_of(active_isa()); }

std::string set_cpu_isa(const std::string& name) {
  const CpuIsa isa = parse_isa(name);
  return name_of(static_cast<CpuIsa>(isa_slot().exchange(static_cast<int>(isa))));
}

// ------------------------------------------------------------- micro-kernels

namespace avx512 {

#if KVC_HAVE_AVX512_CODE

#define KVC_AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace {

// Lane L of the result = sum of the lanes of a[L] (L < 16).
KVC_AVX512_TARGET inline __m512 reduce16(const __m512* a) {
  __m512 t[8], u[4], v[2];
  for (int i = 0; i < 8; ++i)  // 512 -> 256: [a_i partial (8) | a_{i+8} partial (8)]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44),
                         _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lanes: [a_i, a_{i+8}, a_{i+4}, a_{i+12}] (4 each)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 4], 0x88),
                         _mm512_shuffle_f32x4(t[i], t[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)  // per lane [x', y', x'', y''] of u_i, u_{i+2}
    v[i] = _mm512_add_ps(_mm512_unpacklo_ps(u[i], u[i + 2]), _mm512_unpackhi_ps(u[i], u[i + 2]));
  const __m512 w = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(v[0]), _mm512_castps_pd(v[1]))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(v[0]), _mm512_castps_pd(v[1]))));
  // Lane 4k + p of w holds a[f(4k + p)], f = [0,8,4,12][k] + [0,2,1,3][p] (an
  // involution), so this permutation restores the natural order.
  const __m512i idx = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(idx, w);
}

// R rows x KJ keys (R * KJ == 16) of S; keys past kn re-read row kn - 1.
template <int R, int KJ>
KVC_AVX512_TARGET inline void qk_rows(const uint16_t* Q, int64_t D, const uint16_t* K,
                                      int64_t ldk, int kn, float* S, int lds,
                                      const char* pfk, const char* pfv, int64_t row_bytes) {
  static_assert(R * KJ == 16, "16 accumulators");
  for (int j = 0; j < kn; j += KJ) {
    const uint16_t* k[KJ];
    for (int x = 0; x < KJ; ++x) k[x] = K + (j + x < kn ? j + x : kn - 1) * ldk;
    if (pfk) {
      for (int64_t off = j * row_bytes; off < (j + KJ) * row_bytes; off += 64) {
        _mm_prefetch(pfk + off, _MM_HINT_T1);
        _mm_prefetch(pfv + off, _MM_HINT_T1);
      }
    }
    __m512 acc[16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      __m512bh q[R];
      for (int r = 0; r < R; ++r) q[r] = (__m512bh)_mm512_loadu_si512(Q + r * D + d);
      for (int x = 0; x < KJ; ++x) {
        const __m512bh kv = (__m512bh)_mm512_loadu_si512(k[x] + d);
        for (int r = 0; r < R; ++r) acc[r * KJ + x] = _mm512_dpbf16_ps(acc[r * KJ + x], q[r], kv);
      }
    }
    const __m512 s = reduce16(acc);
    if constexpr (R == 1) {
      _mm512_storeu_ps(S + j, s);
    } else if constexpr (R == 2) {
      _mm256_storeu_ps(S + j, _mm512_castps512_ps256(s));
      _mm256_storeu_ps(S + lds + j, _mm512_extractf32x8_ps(s, 1));
    } else {
      _mm_storeu_ps(S + j, _mm512_castps512_ps128(s));
      _mm_storeu_ps(S + lds + j, _mm512_extractf32x4_ps(s, 1));
      _mm_storeu_ps(S + 2 * lds + j, _mm512_extractf32x4_ps(s, 2));
      _mm_storeu_ps(S + 3 * lds + j, _mm512_extractf32x4_ps(s, 3));
    }
  }
}

// Natural <-> pair-interleaved order of a 32-dim chunk of O (see the header).
KVC_AVX512_TARGET inline void to_pair_order(const float* o, __m512& lo, __m512& hi) {
  const __m512 a = _mm512_loadu_ps(o), b = _mm512_loadu_ps(o + 16);
  lo = _mm512_permutex2var_ps(
      a, _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27), b);
  hi = _mm512_permutex2var_ps(
      a, _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31), b);
}

KVC_AVX512_TARGET inline void from_pair_order(__m512 lo, __m512 hi, float* o) {
  _mm512_storeu_ps(o, _mm512_permutex2var_ps(
                          lo, _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23), hi));
  _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(
                               lo, _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31), hi));
}

// R rows (<= 4) of O, one 32-dim chunk at offset d.
template <int R>
KVC_AVX512_TARGET inline void pv_rows(const uint32_t* Pw, int ldw, const uint16_t* V, int64_t ldv,
                                      int kn, int64_t D, float* O) {
  for (int64_t d = 0; d < D; d += 32) {
    __m512 lo[R], hi[R];
    for (int r = 0; r < R; ++r) to_pair_order(O + r * D + d, lo[r], hi[r]);
    int j = 0;
    for (; j + 2 <= kn; j += 2) {
      const __m512i v0 = _mm512_loadu_si512(V + j * ldv + d);
      const __m512i v1 = _mm512_loadu_si512(V + (j + 1) * ldv + d);
      const __m512bh a = (__m512bh)_mm512_unpacklo_epi16(v0, v1);
      const __m512bh b = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
      for (int r = 0; r < R; ++r) {
        const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(Pw[r * ldw + j / 2]));
        lo[r] = _mm512_dpbf16_ps(lo[r], a, p);
        hi[r] = _mm512_dpbf16_ps(hi[r], b, p);
      }
    }
    if (j < kn) {  // odd kn: pair the last key with a zero row (its P pair is (p, 0))
      const __m512i v0 = _mm512_loadu_si512(V + j * ldv + d);
      const __m512i z = _mm512_setzero_si512();
      const __m512bh a = (__m512bh)_mm512_unpacklo_epi16(v0, z);
      const __m512bh b = (__m512bh)_mm512_unpackhi_epi16(v0, z);
      for (int r = 0; r < R; ++r) {
        const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(Pw[r * ldw + j / 2]));
        lo[r] = _mm512_dpbf16_ps(lo[r], a, p);
        hi[r] = _mm512_dpbf16_ps(hi[r], b, p);
      }
    }
    for (int r = 0; r < R; ++r) from_pair_order(lo[r], hi[r], O + r * D + d);
  }
}

// exp(x) for x <= 88 as 2^n * 2^f (n = round(x log2 e), |f| <= 1/2; 2^f by
// its degree-6 Taylor polynomial; relative error < 4e-6, < 7e-7 for |x| <= 8
// (every softmax input), mostly the rounding of x log2 e; VSCALEFPS applies
// 2^n); exactly 0 for x < -87.3 and NaN (masked scores are -inf).
KVC_AVX512_TARGET inline __m512 exp16(__m512 a) {
  const __m512 lo = _mm512_set1_ps(-87.3365447505531f);
  const __mmask16 keep = _mm512_cmp_ps_mask(a, lo, _CMP_GE_OQ);
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(a, lo), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_set1_ps(1.5403530393381606e-4f);        // ln2^6 / 6!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 5!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 4!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 3!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, y, n);
}

}  // namespace

constexpr float kLazyRescale = 8.f;

namespace {

// Scaled scores s[j, j + 16) * scale of a row, -inf at j >= valid; lanes past
// knp are not read.
KVC_AVX512_TARGET inline __m512 scaled_scores(const float* s, int j, int knp, int valid,
                                              __m512 scale, __mmask16& in) {
  in = static_cast<__mmask16>(knp - j >= 16 ? 0xFFFF : (1u << (knp - j)) - 1);
  const int v = valid - j;
  const __mmask16 ok = static_cast<__mmask16>(v <= 0 ? 0 : v >= 16 ? 0xFFFF : (1u << v) - 1);
  return _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), ok & in, _mm512_maskz_loadu_ps(in, s + j),
                            scale);
}

// p = exp(x - m) of the row into pb (bf16) and p32 (fp32, may be null); returns
// the sum of p and takes the max of x into mv.
KVC_AVX512_TARGET inline float exp_pass(const float* s, int knp, int valid, __m512 scale, float m,
                                        float* p32, uint16_t* pb, __m512& mv) {
  const __m512 mb = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < knp; j += 16) {
    __mmask16 in;
    const __m512 x = scaled_scores(s, j, knp, valid, scale, in);
    mv = _mm512_max_ps(mv, x);
    const __m512 p = exp16(_mm512_sub_ps(x, mb));
    if (p32) _mm512_mask_storeu_ps(p32 + j, in, p);
    _mm256_mask_storeu_epi16(pb + j, in, (__m256i)_mm512_cvtneps_pbh(p));
    sum = _mm512_add_ps(sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}

}  // namespace

KVC_AVX512_TARGET float softmax_row(const float* s, int knp, int valid, float scale, float m_old,
                                    float* m_new, float* p32, uint16_t* pb) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mv = _mm512_set1_ps(-INFINITY);
  float blk_max;
  if (m_old != -INFINITY) {
    // One pass against the current reference; kept unless the block's max
    // moves it (then the pass is redone, as if the reference were -inf).
    const float sum = exp_pass(s, knp, valid, sc, m_old, p32, pb, mv);
    blk_max = _mm512_reduce_max_ps(mv);
    if (!(blk_max > m_old + kLazyRescale)) {  // (a NaN block max keeps m_old)
      *m_new = m_old;
      return sum;
    }
  } else {
    for (int j = 0; j < knp; j += 16) {
      __mmask16 in;
      mv = _mm512_max_ps(mv, scaled_scores(s, j, knp, valid, sc, in));
    }
    blk_max = _mm512_reduce_max_ps(mv);
  }
  // Lazy rescaling (as vLLM's CPU kernel does, in natural-log units): the
  // reference max moves only when the block's max exceeds it by more than
  // kLazyRescale, so most blocks cost no rescale of O and l (p <= e^8 here).
  // (m_old = -inf: any finite block max; a NaN block max keeps m_old.)
  const float m = blk_max > m_old + kLazyRescale ? blk_max : m_old;
  *m_new = m;
  if (m == -INFINITY) {
    if (p32) std::fill(p32, p32 + knp, 0.f);
    std::fill(pb, pb + knp, uint16_t{0});
    return 0.f;
  }
  return exp_pass(s, knp, valid, sc, m, p32, pb, mv);
}

KVC_AVX512_TARGET void qk_block_bf16(const uint16_t* Q, int rows, int64_t D, const uint16_t* K,
                                     int64_t ldk, int kn, float* S, int lds, const char* pfk,
                                     const char* pfv, int64_t row_bytes) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    qk_rows<4, 4>(Q + r * D, D, K, ldk, kn, S + r * lds, lds, pfk, pfv, row_bytes);
    pfk = pfv = nullptr;  // prefetch once
  }
  if (rows - r >= 2) {
    qk_rows<2, 8>(Q + r * D, D, K, ldk, kn, S + r * lds, lds, pfk, pfv, row_bytes);
    pfk = pfv = nullptr;
    r += 2;
  }
  if (rows - r == 1) qk_rows<1, 16>(Q + r * D, D, K, ldk, kn, S + r * lds, lds, pfk, pfv, row_bytes);
}

KVC_AVX512_TARGET void pv_block_bf16(const uint16_t* Pb, int rows, int ldpb, const uint16_t* V,
                                     int64_t ldv, int kn, int64_t D, float* O) {
  const uint32_t* Pw = reinterpret_cast<const uint32_t*>(Pb);  // key pairs
  const int ldw = ldpb / 2;
  int r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<4>(Pw + r * ldw, ldw, V, ldv, kn, D, O + r * D);
  switch (rows - r) {
    case 3: pv_rows<3>(Pw + r * ldw, ldw, V, ldv, kn, D, O + r * D); break;
    case 2: pv_rows<2>(Pw + r * ldw, ldw, V, ldv, kn, D, O + r * D); break;
    case 1: pv_rows<1>(Pw + r * ldw, ldw, V, ldv, kn, D, O + r * D); break;
    default: break;
  }
}

// ------------------------------------------------- vLLM's AMX in-page layout

namespace {

// S rows [R] x KG 16-key groups starting at group g of the page: per dim pair
// p, the group's line (16 keys x 2 dims) against the broadcast query pair.
template <int R, int KG>
KVC_AVX512_TARGET inline void qk_groups_packed(const uint32_t* q32, int64_t D, const uint32_t* k32,
                                               int g, float* S, int lds, int j0) {
  __m512 acc[R][KG];
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < KG; ++x) acc[r][x] = _mm512_setzero_ps();
  const uint32_t* kg = k32 + static_cast<int64_t>(g) * (D / 2) * 16;
  for (int64_t p = 0; p < D / 2; ++p) {
    __m512bh qb[R];
    for (int r = 0; r < R; ++r) qb[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(q32[r * (D / 2) + p]));
    for (int x = 0; x < KG; ++x) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(kg + (x * (D / 2) + p) * 16);
      for (int r = 0; r < R; ++r) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], k, qb[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int x = 0; x < KG; ++x)
      _mm512_storeu_ps(S + r * lds + j0 + 16 * x, acc[r][x]);
}

template <int R>
KVC_AVX512_TARGET inline void qk_rows_packed(const uint32_t* q32, int64_t D, const uint32_t* k32,
                                             int g0, int ng, float* S, int lds) {
  int x = 0;
  for (; x + 4 <= ng; x += 4) qk_groups_packed<R, 4>(q32, D, k32, g0 + x, S, lds, 16 * x);
  for (; x < ng; ++x) qk_groups_packed<R, 1>(q32, D, k32, g0 + x, S, lds, 16 * x);
}

// O rows [R] (fp32, natural order), 16-dim chunks [c0, c0 + CH): per key pair,
// the pair's line of each chunk against the broadcast P pair.
template <int R, int CH>
KVC_AVX512_TARGET inline void pv_chunks_packed(const uint32_t* Pw, int ldw, const uint32_t* v32,
                                               int64_t N, int jp0, int kn, int64_t D, int c0,
                                               float* O) {
  __m512 acc[R][CH];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CH; ++c) acc[r][c] = _mm512_loadu_ps(O + r * D + (c0 + c) * 16);
  // Key pairs; an odd kn's last pair drops its stale partner key (P is 0
  // there, but the slot may hold anything, NaN included).
  const int npairs = (kn + 1) / 2;
  for (int j = 0; j < npairs; ++j) {
    const __mmask32 keep = 2 * j + 1 < kn ? 0xFFFFFFFFu : 0x55555555u;
    __m512bh pb[R];
    for (int r = 0; r < R; ++r)
      pb[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(Pw[r * ldw + j]));
    for (int c = 0; c < CH; ++c) {
      const __m512i v =
          _mm512_maskz_loadu_epi16(keep, v32 + ((c0 + c) * (N / 2) + jp0 + j) * 16);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)v, pb[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CH; ++c) _mm512_storeu_ps(O + r * D + (c0 + c) * 16, acc[r][c]);
}

template <int R>
KVC_AVX512_TARGET inline void pv_rows_packed(const uint32_t* Pw, int ldw, const uint32_t* v32,
                                             int64_t N, int jp0, int kn, int64_t D, float* O) {
  // R x CH accumulators <= 16 (+ R broadcasts + the line in flight).
  constexpr int CH = R <= 2 ? 8 : 4;
  const int C = static_cast<int>(D / 16);
  int c0 = 0;
  for (; c0 + CH <= C; c0 += CH) pv_chunks_packed<R, CH>(Pw, ldw, v32, N, jp0, kn, D, c0, O);
  for (; c0 + 2 <= C; c0 += 2) pv_chunks_packed<R, 2>(Pw, ldw, v32, N, jp0, kn, D, c0, O);
}

}  // namespace

KVC_AVX512_TARGET void qk_block_bf16_packed(const uint16_t* Q, int rows, int64_t D,
                                            const uint16_t* Kp, int s0, int kn, float* S, int lds) {
  const uint32_t* q32 = reinterpret_cast<const uint32_t*>(Q);
  const uint32_t* k32 = reinterpret_cast<const uint32_t*>(Kp);
  const int g0 = s0 / 16, ng = (kn + 15) / 16;
  int r = 0;
  for (; r + 4 <= rows; r += 4) qk_rows_packed<4>(q32 + r * (D / 2), D, k32, g0, ng, S + r * lds, lds);
  switch (rows - r) {
    case 3: qk_rows_packed<3>(q32 + r * (D / 2), D, k32, g0, ng, S + r * lds, lds); break;
    case 2: qk_rows_packed<2>(q32 + r * (D / 2), D, k32, g0, ng, S + r * lds, lds); break;
    case 1: qk_rows_packed<1>(q32 + r * (D / 2), D, k32, g0, ng, S + r * lds, lds); break;
    default: break;
  }
}

KVC_AVX512_TARGET void pv_block_bf16_packed(const uint16_t* Pb, int rows, int ldpb,
                                            const uint16_t* Vp, int64_t N, int s0, int kn,
                                            int64_t D, float* O) {
  const uint32_t* Pw = reinterpret_cast<const uint32_t*>(Pb);  // key pairs
  const int ldw = ldpb / 2;
  const uint32_t* v32 = reinterpret_cast<const uint32_t*>(Vp);
  const int jp0 = s0 / 2;
  int r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows_packed<4>(Pw + r * ldw, ldw, v32, N, jp0, kn, D, O + r * D);
  switch (rows - r) {
    case 3: pv_rows_packed<3>(Pw + r * ldw, ldw, v32, N, jp0, kn, D, O + r * D); break;
    case 2: pv_rows_packed<2>(Pw + r * ldw, ldw, v32, N, jp0, kn, D, O + r * D); break;
    case 1: pv_rows_packed<1>(Pw + r * ldw, ldw, v32, N, jp0, kn, D, O + r * D); break;
    default: break;
  }
}

// ------------------------------------------------- vLLM's vec in-page layout
//
// The K half is transposed ([D, N]): dim d of keys [j, j + 32) is one 64-byte
// run.  Two dim rows (2p, 2p + 1) interleaved word by word (VPUNPCK{L,H}WD,
// per 128-bit lane) give each 32-bit lane one key's dim pair -- the B operand
// of VDPBF16PS against the broadcast query pair.  The lanes come out in the
// order pv_rows' pair interleave produces (lo: keys 8l + 0..3, hi: 8l + 4..7
// of lane l), so from_pair_order stores them in key order.

namespace {

// S rows [R] x 32 * KG keys starting at key k of the page (k + 32 * KG <= N):
// each dim row is read KG * 64 contiguous bytes at a time.
template <int R, int KG>
KVC_AVX512_TARGET inline void qk_kt_32(const uint32_t* q32, int64_t D, const uint16_t* Kt,
                                       int64_t N, int64_t k, float* S, int lds, int j) {
  __m512 lo[R][KG], hi[R][KG];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < KG; ++g) lo[r][g] = hi[r][g] = _mm512_setzero_ps();
  for (int64_t p = 0; p < D / 2; ++p) {
    __m512bh q[R];
    for (int r = 0; r < R; ++r)
      q[r] = (__m512bh)_mm512_set1_epi32(static_cast<int>(q32[r * (D / 2) + p]));
    for (int g = 0; g < KG; ++g) {
      const __m512i a = _mm512_loadu_si512(Kt + 2 * p * N + k + 32 * g);
      const __m512i b = _mm512_loadu_si512(Kt + (2 * p + 1) * N + k + 32 * g);
      const __m512bh x = (__m512bh)_mm512_unpacklo_epi16(a, b);
      const __m512bh y = (__m512bh)_mm512_unpackhi_epi16(a, b);
      for (int r = 0; r < R; ++r) {
        lo[r][g] = _mm512_dpbf16_ps(lo[r][g], x, q[r]);
        hi[r][g] = _mm512_dpbf16_ps(hi[r][g], y, q[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < KG; ++g) from_pair_order(lo[r][g], hi[r][g], S + r * lds + j + 32 * g);
}

// S rows [R] x 16 keys starting at key k of the page (k + 16 <= N): the two
// dim rows widened to 32-bit lanes, the second shifted into the high word.
template <int R>
KVC_AVX512_TARGET inline void qk_kt_16(const uint32_t* q32, int64_t D, const uint16_t* Kt,
                                       int64_t N, int64_t k, float* S, int lds, int j) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < D / 2; ++p) {
    const __m512i a = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Kt + 2 * p * N + k)));
    const __m512i b = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Kt + (2 * p + 1) * N + k)));
    const __m512bh x = (__m512bh)_mm512_or_si512(a, _mm512_slli_epi32(b, 16));
    for (int r = 0; r < R; ++r) {
      const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int>(q32[r * (D / 2) + p]));
      acc[r] = _mm512_dpbf16_ps(acc[r], x, q);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(S + r * lds + j, acc[r]);
}

template <int R>
KVC_AVX512_TARGET inline void qk_rows_kt(const uint32_t* q32, int64_t D, const uint16_t* Kt,
                                         int64_t N, int s0, int kn, float* S, int lds) {
  int j = 0;
  // 64 keys a step (4R accumulators) while they fit the block and the page.
  for (; j + 32 < kn && s0 + j + 64 <= N; j += 64) qk_kt_32<R, 2>(q32, D, Kt, N, s0 + j, S, lds, j);
  for (; j < kn && s0 + j + 32 <= N; j += 32) qk_kt_32<R, 1>(q32, D, Kt, N, s0 + j, S, lds, j);
  for (; j < kn; j += 16) qk_kt_16<R>(q32, D, Kt, N, s0 + j, S, lds, j);
}

}  // namespace

KVC_AVX512_TARGET void qk_block_bf16_kt(const uint16_t* Q, int rows, int64_t D, const uint16_t* Kt,
                                        int64_t N, int s0, int kn, float* S, int lds) {
  const uint32_t* q32 = reinterpret_cast<const uint32_t*>(Q);
  int r = 0;
  for (; r + 4 <= rows; r += 4) qk_rows_kt<4>(q32 + r * (D / 2), D, Kt, N, s0, kn, S + r * lds, lds);
  switch (rows - r) {
    case 3: qk_rows_kt<3>(q32 + r * (D / 2), D, Kt, N, s0, kn, S + r * lds, lds); break;
    case 2: qk_rows_kt<2>(q32 + r * (D / 2), D, Kt, N, s0, kn, S + r * lds, lds); break;
    case 1: qk_rows_kt<1>(q32 + r * (D / 2), D, Kt, N, s0, kn, S + r * lds, lds); break;
    default: break;
  }
}

namespace {

// R rows (<= 4) of O, the 16 * C dims from d (R * C accumulators).
template <int R, int C>
KVC_AVX512_TARGET inline void pv_rows_f32p(const float* P, int ldp, const uint16_t* V,
                                           int64_t ldv, int kn, int64_t d, int64_t D, float* O) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_loadu_ps(O + r * D + d + 16 * c);
  for (int j = 0; j < kn; ++j) {
    __m512 v[C];
    for (int c = 0; c < C; ++c)
      v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(V + j * ldv + d + 16 * c))), 16));
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(P[r * ldp + j]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(p, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(O + r * D + d + 16 * c, acc[r][c]);
}

template <int R>
KVC_AVX512_TARGET inline void pv_f32p(const float* P, int ldp, const uint16_t* V, int64_t ldv,
                                      int kn, int64_t D, float* O) {
  constexpr int C = R <= 2 ? 4 : 3;  // R * C accumulators + C V vectors + a broadcast
  int64_t d = 0;
  for (; d + 16 * C <= D; d += 16 * C) pv_rows_f32p<R, C>(P, ldp, V, ldv, kn, d, D, O);
  for (; d < D; d += 16) pv_rows_f32p<R, 1>(P, ldp, V, ldv, kn, d, D, O);
}

}  // namespace

KVC_AVX512_TARGET void pv_block_f32p(const float* P, int rows, int ldp, const uint16_t* V,
                                     int64_t ldv, int kn, int64_t D, float* O) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) pv_f32p<4>(P + r * ldp, ldp, V, ldv, kn, D, O + r * D);
  switch (rows - r) {
    case 3: pv_f32p<3>(P + r * ldp, ldp, V, ldv, kn, D, O + r * D); break;
    case 2: pv_f32p<2>(P + r * ldp, ldp, V, ldv, kn, D, O + r * D); break;
    case 1: pv_f32p<1>(P + r * ldp, ldp, V, ldv, kn, D, O + r * D); break;
    default: break;
  }
}

// ------------------------------------------------ AMX on the in-page layout
//
// The page lies as AMX wants its B tiles: a K group's 16 dim-pair lines of
// one 32-dim chunk are the B tile of S = Q K^T (16 keys), a V chunk's 16
// key-pair lines the B tile of O = P V (16 dims).  Tiles: 0-3 C (rows x 16
// fp32), 4 A (rows x 32 bf16), 5 B (16 x 64 bytes).  The B tiles are loaded
// with the non-temporal hint (TILELOADDT1, as vLLM's kernel does): each KV
// line is read once per tile of queries (decode: once per call).  Measured:
// no row slower, perhaps 2-5% faster on some on two threads (within this
// VM's noise on most; docs/performance.md section 2).

#define KVC_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// One 32-dim chunk c of up to 4 groups (x < cnt) into C tiles 0-3.
#define KVC_QK_GROUP(X)                                               \
  if (X < cnt) {                                                      \
    _tile_stream_loadd(5, k32 + ((g + X) * (D / 2) + c * 16) * 16, 64); \
    _tile_dpbf16ps(X, 4, 5);                                          \
  }

KVC_AMX_TARGET inline void qk_chunk_amx(const uint32_t* k32, int64_t D, int g, int cnt, int64_t c) {
  KVC_QK_GROUP(0) KVC_QK_GROUP(1) KVC_QK_GROUP(2) KVC_QK_GROUP(3)
}
#undef KVC_QK_GROUP

// Key pair jp of up to 4 16-dim chunks (x < cnt) into C tiles 0-3.
#define KVC_PV_CHUNK(X)                                                 \
  if (X < cnt) {                                                        \
    _tile_stream_loadd(5, v32 + ((c0 + X) * (N / 2) + jp) * 16, 64);    \
    _tile_dpbf16ps(X, 4, 5);                                            \
  }

KVC_AMX_TARGET inline void pv_step_amx(const uint32_t* v32, int64_t N, int64_t c0, int cnt,
                                       int64_t jp) {
  KVC_PV_CHUNK(0) KVC_PV_CHUNK(1) KVC_PV_CHUNK(2) KVC_PV_CHUNK(3)
}
#undef KVC_PV_CHUNK

#define KVC_C_TILES(OP, PTR, STRIDE) \
  OP(0, PTR, STRIDE) if (cnt > 1) OP(1, PTR + 16, STRIDE) if (cnt > 2) OP(2, PTR + 32, STRIDE) if (cnt > 3) OP(3, PTR + 48, STRIDE)
#define KVC_LOAD(X, P, S) _tile_loadd(X, P, S);
#define KVC_STORE(X, P, S) _tile_stored(X, P, S);

}  // namespace

KVC_AMX_TARGET void amx_tile_config(int rows) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 5; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows);
    cfg.colsb[t] = 64;
  }
  cfg.rows[5] = 16;
  cfg.colsb[5] = 64;
  asm volatile("" : : "r"(&cfg) : "memory");  // keep the stores (GCC 12 drops them otherwise)
  _tile_loadconfig(&cfg);
}

KVC_AMX_TARGET void amx_tile_release() { _tile_release(); }

KVC_AMX_TARGET void qk_block_amx_packed(const uint16_t* Q, int rows, int64_t D, const uint16_t* Kp,
                                        int s0, int kn, float* S, int lds) {
  const uint32_t* k32 = reinterpret_cast<const uint32_t*>(Kp);
  const int g0 = s0 / 16, ng = (kn + 15) / 16;
  for (int g = g0; g < g0 + ng; g += 4) {
    const int cnt = std::min(4, g0 + ng - g);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < D / 32; ++c) {
      _tile_loadd(4, Q + c * 32, static_cast<int>(D * 2));
      qk_chunk_amx(k32, D, g, cnt, c);
    }
    float* out = S + (g - g0) * 16;
    KVC_C_TILES(KVC_STORE, out, lds * 4)
  }
}

KVC_AMX_TARGET void pv_block_amx_packed(const uint16_t* Pb, int rows, int ldpb, const uint16_t* Vp,
                                        int64_t N, int s0, int kn, int64_t D, float* O) {
  const int k32n = kn / 32 * 32;  // keys in whole 32-key steps (AMX); the rest by AVX-512
  if (k32n > 0) {
    const uint32_t* v32 = reinterpret_cast<const uint32_t*>(Vp);
    for (int64_t c0 = 0; c0 < D / 16; c0 += 4) {
      const int cnt = static_cast<int>(std::min<int64_t>(4, D / 16 - c0));
      float* o = O + c0 * 16;
      KVC_C_TILES(KVC_LOAD, o, static_cast<int>(D * 4))
      for (int j = 0; j < k32n; j += 32) {
        _tile_loadd(4, Pb + j, ldpb * 2);
        pv_step_amx(v32, N, c0, cnt, (s0 + j) / 2);
      }
      KVC_C_TILES(KVC_STORE, o, static_cast<int>(D * 4))
    }
  }
  if (k32n < kn) pv_block_bf16_packed(Pb + k32n, rows, ldpb, Vp, N, s0 + k32n, kn - k32n, D, O);
}

#undef KVC_C_TILES
#undef KVC_LOAD
#undef KVC_STORE

#else  // no AVX-512 code in this build (never selected: cpu_has_avx512_bf16() is false)

void qk_block_bf16(const uint16_t*, int, int64_t, const uint16_t*, int64_t, int, float*, int,
                   const char*, const char*, int64_t) {
  TORCH_CHECK(false, "kvcompress: no AVX-512 kernels in this build");
}
void pv_block_bf16(const uint16_t*, int, int, const uint16_t*, int64_t, int, int64_t, float*) {
  TORCH_CHECK(false, "kvcompress: no AVX-512 kernels in this build");
}
float softmax_row(const float*, int, int, float, float, float*, float*, uint16_t*) {
  TORCH_CHECK(false, "kvcompress: no AVX-512 kernels in this build");
}
void qk_block_bf16_packed(const uint16_t*, int, int64_t, const uint16_t*, int, int, float*, int) {
  TORCH_CHECK(false, "kvcompress: no AVX-512 kernels in this build");
}
void pv_block_bf16_packed(const uint16_t*, int, int, const uint16_t*, int64_t, int, int, int64_t,
                          float*) {
  TORCH_CHECK(false, "kvcompress: no AVX-512 kernels in this build");
}
void qk_block_bf16_kt(const uint16_t*, int, int64_t, const uint16_t*, int64_t, int, int, float*,
                      int) {
  TORCH_CHECK(false, "kvcompress: no AVX-512 kernels in this build");
}
void pv_block_f32p(const float*, int, int, const uint16_t*, int64_t, int, int64_t, float*) {
  TORCH_CHECK(false, "kvcompress: no AVX-512 kernels in this build");
}
void amx_tile_config(int) { TORCH_CHECK(false, "kvcompress: no AMX kernels in this build"); }
void amx_tile_release() { TORCH_CHECK(false, "kvcompress: no AMX kernels in this build"); }
void qk_block_amx_packed(const uint16_t*, int, int64_t, const uint16_t*, int, int, float*, int) {
  TORCH_CHECK(false, "kvcompress: no AMX kernels in this build");
}
void pv_block_amx_packed(const uint16_t*, int, int, const uint16_t*, int64_t, int, int, int64_t,
                         float*) {
  TORCH_CHECK(false, "kvcompress: no AMX kernels in this build");
}

#endif

}  // namespace avx512
}  // namespace kvc
