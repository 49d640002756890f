// Run-time ISA dispatch of the kvcompress CPU kernels.
//
// The library is built for the portable baseline (KVC_CPU_ISA=avx2 by default:
// AVX2 + FMA + F16C); a few hot micro-kernels also have AVX-512 versions
// (csrc/attention_avx512.cpp, compiled with per-function target attributes),
// with or without AVX512-BF16 instructions, used only where the CPU has those
// features, detected at run time.  So one wheel runs on AVX2-only machines and
// uses the faster path where it can.
//
// The path in use: "avx512_amx", "avx512_bf16" or "avx512" (the best the CPU
// supports), else "avx2" (or "generic" in a KVC_CPU_ISA=generic build).  The environment variable
// KVCOMPRESS_CPU_ISA (read once, on first use of the kernels) = auto (default) | avx2 |
// avx512 | avx512_bf16 | avx512_amx forces a path; a path the CPU lacks is an
// error.
// torch.ops.kvcompress.set_cpu_isa(name) switches at run time (tests) and
// returns the previous name; torch.ops.kvcompress.cpu_isa() returns it.
#pragma once

#include <cstdint>
#include <string>

namespace kvc {

// kAvx512: the AVX-512 micro-kernels with the two AVX512-BF16 instructions they
// use emulated (CPUs with AVX-512 but without BF16: Intel Skylake-SP to Ice
// Lake).  kAvx512Amx: the AVX-512-BF16 micro-kernels, and AMX tiles for decode
// tiles (<= 16 rows) on head-pages in vLLM's AMX in-page layout.
enum class CpuIsa : int { kBaseline = 0, kAvx512 = 1, kAvx512Bf16 = 2, kAvx512Amx = 3 };

// The path used by the kernels now.
CpuIsa active_isa();
// Whether this CPU (and OS) supports AVX-512 F/BW/VL/DQ.
bool cpu_has_avx512();
// ... + AVX512-BF16.
bool cpu_has_avx512_bf16();
// ... + AMX-TILE + AMX-BF16, and the OS granted this process the tile state
// (requested here on first call).
bool cpu_has_amx();

std::string cpu_isa_name();
// "auto", "avx2"/"baseline"/"generic", "avx512", "avx512_bf16" or
// "avx512_amx"; returns the previous name.
std::string set_cpu_isa(const std::string& name);

namespace avx512 {

// Score tiles S[r * lds + j] = <Q[r], K[j]> (unscaled: softmax_row applies
// the scale), r < rows, j < kn (<= 128), for bf16 rows of D (D % 32 == 0)
// elements; Q rows are contiguous (stride D), K rows have stride ldk.  Entries
// j in [kn, round_up(kn, 16)) of each row are overwritten with garbage.
// Prefetches (into L2) the K/V rows of the same indices at pfk/pfv (may be
// null), row_bytes apart.
void qk_block_bf16(const uint16_t* Q, int rows, int64_t D, const uint16_t* K, int64_t ldk,
                   int kn, float* S, int lds, const char* pfk, const char* pfv,
                   int64_t row_bytes);

// One score row s[0, knp) (knp % 8 == 0) of a block, multiplied by scale;
// entries j >= valid count as -inf.  m_new is the row's reference max: m_old
// unless the block's max exceeds it by more than 8 (for m_old = -inf: is not
// -inf), then the block's max -- so m_new >= m_old and every scaled score
// minus m_new is <= 8 (lazy rescaling: most blocks leave m, l and O as they
// are, and take one pass).  A NaN score gets p = 0 but may hide the block's
// max (then m_new = m_old; the output is NaN-tainted anyway).  Writes
// p[j] = exp(scale * s[j] - m_new) (0 for the masked entries; all 0 if m_new
// is -inf) for j < knp to pb (bf16, rounded to nearest even) and, if p32 is
// not null, to p32 (fp32); returns the sum of p (fp32); s is not written.
// exp: 2^n times a degree-6 polynomial of 2^f, relative error < 4e-6 (vec.h's
// vexp, the baseline path's, is Cephes').
float softmax_row(const float* s, int knp, int valid, float scale, float m_old, float* m_new,
                  float* p32, uint16_t* pb);

// O[r] += sum_{j < kn} P[r][j] * V[j] (fp32 O rows of stride D, bf16 V rows of
// stride ldv, D % 32 == 0; bf16 P rows Pb + r * ldpb, ldpb even), products
// accumulated in fp32 (VDPBF16PS).  P[r][kn] must be 0 when kn is odd.
void pv_block_bf16(const uint16_t* Pb, int rows, int ldpb, const uint16_t* V, int64_t ldv, int kn,
                   int64_t D, float* O);

// The same two products on head-pages in vLLM's AMX in-page layout
// (packed_k_offset / packed_v_offset below): keys [s0, s0 + kn) of one page,
// s0 % 16 == 0, kn <= 128, D % 32 == 0.  Kp / Vp: the page's K / V half; N its
// slots.  QK writes S[r * lds + j] for j < round_up(kn, 16) (garbage past kn)
// with 16 keys per vector and no horizontal reduction.  PV reads P as
// pv_block_bf16 does; the partner of an odd last key is masked out, so stale
// slots past kn are never multiplied.  No software prefetch: the hardware
// prefetchers follow these line streams, and prefetching the next block (as
// the plain-row kernels do) measured slower, streaming rows included.
void qk_block_bf16_packed(const uint16_t* Q, int rows, int64_t D, const uint16_t* Kp, int s0,
                          int kn, float* S, int lds);
void pv_block_bf16_packed(const uint16_t* Pb, int rows, int ldpb, const uint16_t* Vp, int64_t N,
                          int s0, int kn, int64_t D, float* O);

// The same on AMX tiles (ISA kAvx512Amx, rows <= 16): amx_tile_config(rows)
// must have been called on this thread since any other tile user ran (once
// per call and row count: attention.cpp's AmxScope), and amx_tile_release()
// follows the thread's last product of the call (as vLLM's and oneDNN's AMX
// kernels do: the tile state goes back to its init state, so the OS need not
// save it and the core may idle deeper).
// PV does whole 32-key steps on AMX (P rows read as one A tile, ldpb * 2
// bytes apart) and the rest with pv_block_bf16_packed.
void amx_tile_config(int rows);
void amx_tile_release();
void qk_block_amx_packed(const uint16_t* Q, int rows, int64_t D, const uint16_t* Kp, int s0, int kn,
                         float* S, int lds);
void pv_block_amx_packed(const uint16_t* Pb, int rows, int ldpb, const uint16_t* Vp, int64_t N,
                         int s0, int kn, int64_t D, float* O);

// QK on a page's K half in vLLM's vec in-page layout (kPackedVec below: the K
// half transposed, [D, N]): keys [s0, s0 + kn) of one page, s0 % 16 == 0,
// N % 16 == 0, kn <= 128, D % 32 == 0.  Per dim pair, two dim rows of 32 (or
// 16) consecutive keys are interleaved into key pairs (VPUNPCK{L,H}WD) for
// VDPBF16PS against the broadcast query pair: exact bf16 products, fp32
// accumulation, no horizontal reduction.  Writes S[r * lds + j] for j <
// round_up(kn, 32) <= 128 (garbage past kn, never read past the page).  The V half
// of that layout is plain [N, D] rows: pv_block_f32p reads it.
void qk_block_bf16_kt(const uint16_t* Q, int rows, int64_t D, const uint16_t* Kt, int64_t N,
                      int s0, int kn, float* S, int lds);

// O[r] += sum_{j < kn} P[r][j] * V[j] with fp32 probabilities (P rows P + r *
// ldp) and bf16 V rows of stride ldv converted to fp32, fp32 FMAs (D % 16 ==
// 0): the PV of vLLM's vec kernel, which keeps P in fp32, so that requests on
// its layout get its rounding.
void pv_block_f32p(const float* P, int rows, int ldp, const uint16_t* V, int64_t ldv, int kn,
                   int64_t D, float* O);

}  // namespace avx512

// The same seven micro-kernels (qk_block_bf16 to pv_block_f32p, same
// contracts) for kAvx512: namespace avx512's code (attention_avx512_kernels.inc)
// with VDPBF16PS and VCVTNEPS2BF16 emulated by AVX-512F instructions.
namespace avx512f {
void qk_block_bf16(const uint16_t*, int, int64_t, const uint16_t*, int64_t, int, float*, int,
                   const char*, const char*, int64_t);
float softmax_row(const float*, int, int, float, float, float*, float*, uint16_t*);
void pv_block_bf16(const uint16_t*, int, int, const uint16_t*, int64_t, int, int64_t, float*);
void qk_block_bf16_packed(const uint16_t*, int, int64_t, const uint16_t*, int, int, float*, int);
void pv_block_bf16_packed(const uint16_t*, int, int, const uint16_t*, int64_t, int, int, int64_t,
                          float*);
void qk_block_bf16_kt(const uint16_t*, int, int64_t, const uint16_t*, int64_t, int, int, float*,
                      int);
void pv_block_f32p(const float*, int, int, const uint16_t*, int64_t, int, int64_t, float*);
}  // namespace avx512f

// The seven micro-kernels of one AVX-512 path, so that the attention kernel
// picks the path once per call.
struct Avx512Kernels {
  decltype(&avx512::qk_block_bf16) qk_block_bf16;
  decltype(&avx512::softmax_row) softmax_row;
  decltype(&avx512::pv_block_bf16) pv_block_bf16;
  decltype(&avx512::qk_block_bf16_packed) qk_block_bf16_packed;
  decltype(&avx512::pv_block_bf16_packed) pv_block_bf16_packed;
  decltype(&avx512::qk_block_bf16_kt) qk_block_bf16_kt;
  decltype(&avx512::pv_block_f32p) pv_block_f32p;
  bool emulated_bf16;  // namespace avx512f's: the BF16 instructions emulated
};

// The kernels of AVX-512 path ``isa`` (kAvx512: namespace avx512f; kAvx512Bf16
// and kAvx512Amx: namespace avx512).  Refuses kBaseline and builds without
// AVX-512 code.
const Avx512Kernels& avx512_kernels(CpuIsa isa);

// The in-page layouts of vLLM's CPU cache that the attention kernel reads
// (``ops.reference.amx_packing`` / ``ops.reference.vec_packing``, both
// checked against vLLM's writer): kPackedAmx, what ``cpu_attn_reshape_and_cache``
// writes for isa "amx"; kPackedVec, what it writes for isa "vec" and "vec16"
// (every x86 CPU without AMX, and head dims that AMX does not take).
enum class PackedLayout : int { kPackedAmx = 0, kPackedVec = 1 };

// vLLM's in-page layout of its AMX kernel (what ``cpu_attn_reshape_and_cache``
// writes for isa "amx"; ``ops.reference.amx_packing`` is the same formula and
// is checked against vLLM's writer): element (t, d) of a page's
// K half lies at packed_k_offset, of its V half at packed_v_offset (elements).
// K: per 16-key group, per dim pair, the 16 keys' two values (one 64-byte
// line for bf16); V: per 16-dim chunk, per key pair, the 16 dims' two values.
inline int64_t packed_k_offset(int64_t t, int64_t d, int64_t D) {
  return (t / 16) * 16 * D + (d / 2) * 32 + (t % 16) * 2 + d % 2;
}
inline int64_t packed_v_offset(int64_t t, int64_t d, int64_t N) {
  return (d / 16) * 16 * N + (t / 2) * 32 + (d % 16) * 2 + t % 2;
}

}  // namespace kvc
