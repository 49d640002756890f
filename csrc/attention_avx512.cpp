// AVX-512 micro-kernels of paged_head_attention (bf16 caches, head_dim % 32 ==
// 0) and the run-time ISA selection (cpu_isa.h).  The micro-kernels
// (attention_avx512_kernels.inc) are compiled twice: in namespace avx512 with
// AVX512-BF16 instructions, in namespace avx512f with the two they use emulated
// (CPUs with AVX-512 but not BF16); the AMX kernels below only once.
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

bool cpu_has_avx512() {
#if KVC_HAVE_AVX512_CODE
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#if KVC_HAVE_AVX512_CODE
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
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

// Who lacks a path that was asked for: the CPU (``cpu_lacks``), or this build,
// which has no AVX-512 code at all (KVC_AVX512=OFF, or not x86-64 GCC/Clang).
const char* lacking(const char* cpu_lacks = "this CPU lacks") {
#if KVC_HAVE_AVX512_CODE
  return cpu_lacks;
#else
  (void)cpu_lacks;
  return "this build of kvcompress has no AVX-512 code (KVC_AVX512=OFF, or not x86-64 GCC/Clang), "
         "so it lacks";
#endif
}

CpuIsa parse_isa(const std::string& name) {
  if (name.empty() || name == "auto")
    return cpu_has_amx()           ? CpuIsa::kAvx512Amx
           : cpu_has_avx512_bf16() ? CpuIsa::kAvx512Bf16
           : cpu_has_avx512()      ? CpuIsa::kAvx512
                                   : CpuIsa::kBaseline;
  if (name == "avx2" || name == "baseline" || name == "generic") return CpuIsa::kBaseline;
  if (name == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "kvcompress: CPU ISA '", name,
                "' requested but ", lacking(), " AVX-512 F/BW/VL/DQ");
    return CpuIsa::kAvx512;
  }
  if (name == "avx512_bf16") {
    TORCH_CHECK(cpu_has_avx512_bf16(), "kvcompress: CPU ISA '", name,
                "' requested but ", lacking(), " AVX-512 F/BW/VL/DQ + AVX512-BF16");
    return CpuIsa::kAvx512Bf16;
  }
  if (name == "avx512_amx" || name == "amx") {
    TORCH_CHECK(cpu_has_amx(), "kvcompress: CPU ISA '", name,
                "' requested but ", lacking("this CPU (or the OS) lacks"),
                " AMX-TILE + AMX-BF16");
    return CpuIsa::kAvx512Amx;
  }
  TORCH_CHECK(false, "kvcompress: unknown CPU ISA '", name,
              "' (expected auto, avx2, avx512, avx512_bf16 or avx512_amx)");
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
         : isa == CpuIsa::kAvx512     ? "avx512"
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
#define KVC_DPBF16(acc, a, b) _mm512_dpbf16_ps(acc, a, b)
#define KVC_CVTNEPS_PBH(x) _mm512_cvtneps_pbh(x)
#include "attention_avx512_kernels.inc"
#undef KVC_DPBF16
#undef KVC_CVTNEPS_PBH

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

#else  // no AVX-512 code in this build (never selected: cpu_has_avx512() is false)

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

// ------------------------------------------ AVX-512 without AVX512-BF16

#if KVC_HAVE_AVX512_CODE

namespace avx512f {

#undef KVC_AVX512_TARGET
#define KVC_AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace {

// A bf16 is the high half of an fp32: the odd (high) element of a pair becomes
// its fp32 by clearing the low half, the even (low) one by a 16-bit left shift.
// As VDPBF16PS does: the odd product first, then the even one, each exact in
// fp32 and rounded once when added -- the instruction's results, but for
// denormal inputs and outputs (it flushes them to zero; these FMAs follow
// MXCSR) and NaN payloads.
KVC_AVX512_TARGET inline __m512 dpbf16(__m512 acc, __m512bh a, __m512bh b) {
  const __m512i x = (__m512i)a, y = (__m512i)b;
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(x, high)),
                        _mm512_castsi512_ps(_mm512_and_si512(y, high)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
                         _mm512_castsi512_ps(_mm512_slli_epi32(y, 16)), acc);
}

// fp32 -> bf16, round to nearest even; denormal inputs become a zero of their
// sign, as in VCVTNEPS2BF16 (exp16 returns them for scores about 87 below the
// reference max).  Inputs are finite probabilities: a NaN is not kept NaN.
KVC_AVX512_TARGET inline __m256bh cvtneps_pbh(__m512 v) {
  const __m512i in = _mm512_castps_si512(v);
  const __mmask16 normal = _mm512_test_epi32_mask(in, _mm512_set1_epi32(0x7F800000));
  const __m512i x = _mm512_mask_mov_epi32(
      _mm512_and_si512(in, _mm512_set1_epi32(static_cast<int>(0x80000000u))), normal, in);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return (__m256bh)_mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

}  // namespace

#define KVC_DPBF16(acc, a, b) dpbf16(acc, a, b)
#define KVC_CVTNEPS_PBH(x) cvtneps_pbh(x)
#include "attention_avx512_kernels.inc"
#undef KVC_DPBF16
#undef KVC_CVTNEPS_PBH

}  // namespace avx512f

#endif

const Avx512Kernels& avx512_kernels(CpuIsa isa) {
#if KVC_HAVE_AVX512_CODE
  static const Avx512Kernels bf16{
      avx512::qk_block_bf16,        avx512::softmax_row,      avx512::pv_block_bf16,
      avx512::qk_block_bf16_packed, avx512::pv_block_bf16_packed, avx512::qk_block_bf16_kt,
      avx512::pv_block_f32p,        false};
  static const Avx512Kernels emulated{
      avx512f::qk_block_bf16,        avx512f::softmax_row,      avx512f::pv_block_bf16,
      avx512f::qk_block_bf16_packed, avx512f::pv_block_bf16_packed, avx512f::qk_block_bf16_kt,
      avx512f::pv_block_f32p,        true};
  TORCH_CHECK(isa != CpuIsa::kBaseline, "kvcompress: the baseline path has no AVX-512 kernels");
  return isa == CpuIsa::kAvx512 ? emulated : bf16;
#else
  (void)isa;
  TORCH_CHECK(false, "kvcompress: no AVX-512 kernels in this build");
#endif
}

}  // namespace kvc
