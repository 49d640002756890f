// Small 8-lane float SIMD layer for the kvcompress CPU kernels.
//
// With AVX2 + FMA + F16C (the default `KVC_CPU_ISA=avx2` build) every helper
// maps onto a handful of AVX2 intrinsics; otherwise (`KVC_CPU_ISA=generic`, or
// a non-x86 `native` build) a portable scalar emulation with the same
// semantics is used, so the kernels are written once against this layer.
//
// Storage types: float, c10::BFloat16 (fp32 -> bf16 rounds to nearest-even,
// like torch's `.to(torch.bfloat16)`), c10::Half (F16C, round to nearest-even).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KVC_AVX2 1
#include <immintrin.h>
#else
#define KVC_AVX2 0
#endif

namespace kvc {

constexpr int kLanes = 8;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#if KVC_AVX2

struct Vec {
  __m256 v;
};

inline Vec vzero() { return {_mm256_setzero_ps()}; }
inline Vec vset1(float x) { return {_mm256_set1_ps(x)}; }
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
inline void vstore_lo4(float* p, Vec a) { _mm_storeu_ps(p, _mm256_castps256_ps128(a.v)); }
inline void vstore_hi4(float* p, Vec a) { _mm_storeu_ps(p, _mm256_extractf128_ps(a.v, 1)); }
// Stores lanes (2 * I, 2 * I + 1) to p[0], p[1].
template <int I>
inline void vstore_pair(float* p, Vec a) {
  const __m128 h = I < 2 ? _mm256_castps256_ps128(a.v) : _mm256_extractf128_ps(a.v, 1);
  if constexpr (I % 2 == 0)
    _mm_storel_pi(reinterpret_cast<__m64*>(p), h);
  else
    _mm_storeh_pi(reinterpret_cast<__m64*>(p), h);
}
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
// Forces a value into a register (stops the compiler from re-loading it as a
// memory operand of every instruction that uses it).
inline void vkeep(Vec& a) { asm volatile("" : "+x"(a.v)); }
inline Vec vbroadcast(const float* p) { return {_mm256_broadcast_ss(p)}; }
inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }

inline float hsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(Vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// r[i] = sum of all lanes of a[i], i = 0..7.
inline Vec hsum8(const Vec* a) {
  __m256 t0 = _mm256_hadd_ps(a[0].v, a[1].v);
  __m256 t1 = _mm256_hadd_ps(a[2].v, a[3].v);
  __m256 t2 = _mm256_hadd_ps(a[4].v, a[5].v);
  __m256 t3 = _mm256_hadd_ps(a[6].v, a[7].v);
  __m256 u0 = _mm256_hadd_ps(t0, t1);
  __m256 u1 = _mm256_hadd_ps(t2, t3);
  __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20);
  __m256 hi = _mm256_permute2f128_ps(u0, u1, 0x31);
  return {_mm256_add_ps(lo, hi)};
}

// exp(x) (Cephes polynomial, ~1 ulp); exactly 0 for x < -87.3 (incl. -inf).
inline Vec vexp(Vec a) {
  __m256 x = _mm256_min_ps(a.v, _mm256_set1_ps(88.3762626647949f));
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3365447505531f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365447505531f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  const __m256 x2 = _mm256_mul_ps(x, x);
  y = _mm256_fmadd_ps(y, x2, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_cvttps_epi32(fx);
  e = _mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return {_mm256_and_ps(y, keep)};
}

// Lanes whose index is >= n are set to -inf (n in [0, 8]).
inline Vec vmask_tail_neginf(Vec a, int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
  return {_mm256_blendv_ps(_mm256_set1_ps(-INFINITY), a.v, m)};
}

// ---- storage conversions (8 elements) ----
inline Vec load8(const float* p) { return vload(p); }
inline Vec load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
inline Vec load8(const c10::Half* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}

inline void store8(float* p, Vec a) { vstore(p, a); }
inline void store8(c10::BFloat16* p, Vec a) {
  __m256i x = _mm256_castps_si256(a.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256 nan = _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void store8(c10::Half* p, Vec a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#else  // ---------------------------------------------------- portable fallback

struct Vec {
  float v[8];
};

inline Vec vzero() { return Vec{{0, 0, 0, 0, 0, 0, 0, 0}}; }
inline Vec vset1(float x) { return Vec{{x, x, x, x, x, x, x, x}}; }
inline Vec vload(const float* p) {
  Vec r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
inline void vstore(float* p, Vec a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline void vstore_lo4(float* p, Vec a) { std::memcpy(p, a.v, 4 * sizeof(float)); }
inline void vstore_hi4(float* p, Vec a) { std::memcpy(p, a.v + 4, 4 * sizeof(float)); }
template <int I>
inline void vstore_pair(float* p, Vec a) { std::memcpy(p, a.v + 2 * I, 2 * sizeof(float)); }
inline void vkeep(Vec&) {}
inline void prefetch_l2(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 2);
#else
  (void)p;
#endif
}
inline Vec vbroadcast(const float* p) { return vset1(*p); }
#define KVC_VEC_BINOP(OP)                                    \
  inline Vec operator OP(Vec a, Vec b) {                     \
    Vec r;                                                   \
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] OP b.v[i];   \
    return r;                                                \
  }
KVC_VEC_BINOP(+)
KVC_VEC_BINOP(-)
KVC_VEC_BINOP(*)
#undef KVC_VEC_BINOP
inline Vec vfma(Vec a, Vec b, Vec c) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return r;
}
inline Vec vmax(Vec a, Vec b) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
  return r;
}
inline float hsum(Vec a) {
  float s = 0;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}
inline float hmax(Vec a) {
  float s = a.v[0];
  for (int i = 1; i < 8; ++i) s = a.v[i] > s ? a.v[i] : s;
  return s;
}
inline Vec hsum8(const Vec* a) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = hsum(a[i]);
  return r;
}
inline Vec vexp(Vec a) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] < -87.3365447505531f ? 0.f : std::exp(a.v[i]);
  return r;
}
inline Vec vmask_tail_neginf(Vec a, int n) {
  for (int i = n; i < 8; ++i) a.v[i] = -INFINITY;
  return a;
}
template <typename T>
inline Vec load8(const T* p) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
template <typename T>
inline void store8(T* p, Vec a) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<T>(a.v[i]);
}

#endif  // KVC_AVX2

// ---- n-element conversions (vector body, scalar tail) ----
template <typename T>
inline void to_f32(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vstore(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst = scale * src
template <typename T>
inline void to_f32_scaled(const T* src, float* dst, int64_t n, float scale) {
  const Vec s = vset1(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vstore(dst + i, load8(src + i) * s);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
}

// dst = scale * src, converted to T
template <typename T>
inline void from_f32_scaled(const float* src, T* dst, int64_t n, float scale) {
  const Vec s = vset1(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dst + i, vload(src + i) * s);
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i] * scale);
}

}  // namespace kvc
