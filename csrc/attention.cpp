// paged_head_attention: causal attention over per-(request, KV head) paged KVs
// with GQA (the G query heads of a group read their KV head's pages once) and
// the KV-Compress metric (sum over the group of squared softmax probabilities,
// added to every attended KV by the queries i >= metric_q_start[r]; with
// metric_k_start, only to the KVs at logical index >= metric_k_start[r]).
//
// Work decomposition
// ------------------
// A *task* is one (request, KV head) with q_len > 0.  Its queries are cut into
// tiles of QT queries; a tile holds QT*G "rows" (the query vector of one query
// head) that share every K/V load.  A tile walks the head's KVs in blocks of up
// to kKB logical keys (never crossing a page), reading K/V rows in place
// (bf16/fp16 -> fp32 in registers) and computing
//   S = Q K^T  ->  online softmax (running max m, sum l)  ->  O += P V,
// while prefetching the next block into L2 (plain rows; on packed pages the
// hardware prefetchers do better).  On the AVX-512 paths m is a reference
// max that moves only when a block's max exceeds it by more than 8 (lazy
// rescaling, softmax_row in cpu_isa.h), so most blocks skip the rescale of O and l.
// For metric rows the unnormalised probabilities P of every block (and the
// max they were taken against) are kept, so the exact final
// p = P * exp(m_blk - m) / l is known at the end without a second pass over K:
// metrics[kv] += sum_rows p^2.
//
// ISA paths (csrc/cpu_isa.h): the code below is built for the baseline ISA
// (AVX2 by default, csrc/vec.h).  For bf16 caches with head_dim % 32 == 0, where
// the CPU has AVX-512 + AVX512-BF16 (checked at run time), the QK product, the
// softmax of a block and the PV product run the micro-kernels of
// csrc/attention_avx512.cpp instead (VDPBF16PS on the raw bf16 rows; P rounded
// to bf16 for PV only, the metric still uses the fp32 probabilities).
//
// Page layouts: a request's head-pages hold plain [N, D] K and V rows, or,
// with packed[r], one of vLLM's in-page layouts (the call's `layout`, cpu_isa.h
// PackedLayout): its AMX layout, or its vec layout (K transposed, V plain).
// Packed blocks are read as they lie by the AVX-512 micro-kernels (16 keys /
// 16 dims per vector on the AMX layout; up to 64 keys per dim-pair step on the
// vec layout's K, and its V as plain rows against fp32 probabilities, as
// vLLM's vec kernel computes it) or, on the avx512_amx path and the AMX
// layout, by AMX tiles for tiles of <= 16 rows.  On the baseline path (and for
// fp32 / fp16 pages) the vec layout is read in place too (vertical fp32 QK on
// the transposed K, 16 keys per step), and AMX-layout blocks are unpacked into
// the fp32 staging rows first.
//
// Scheduling (torch's intra-op thread pool via at::parallel_for; the thread
// count follows torch.set_num_threads): work units are dealt out to the threads
// as contiguous ranges of about equal cost (so a thread keeps the same heads,
// and their pages stay in its caches, from one call to the next), with work
// stealing from the back of other ranges once a thread's own range is done.
//  * each tile of a prefill chunk without metric rows is a unit;
//  * all metric tiles of one task form one unit (they add to the same metrics
//    entries, so one thread handles them in sequence; tasks of different
//    requests that share pages may add to the same entries at once, which a
//    striped lock per page makes safe, see add_metrics);
//  * single-tile tasks (decode rows, short chunks) are one unit each, unless
//    there are too few of them for the threads: then (flash-decoding) their KV
//    ranges are laid end to end and cut into units of equal cost, splitting
//    tasks into partitions.  A partition writes its partial (m, l, O) and its
//    P blocks to shared buffers; the thread that finishes the last partition
//    of a task merges them, writes the output and adds the metrics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "ops.h"
#include "vec.h"

namespace kvc {
namespace {

// Tunables (macros only so that benchmarks can build variants).
#ifndef KVC_KB
#define KVC_KB 128  // keys per block (multiple of 8)
#endif
#ifndef KVC_PREFETCH_DIST
#define KVC_PREFETCH_DIST 1  // prefetch the block this many blocks ahead
#endif
#ifndef KVC_SPLIT_FACTOR
#define KVC_SPLIT_FACTOR 4  // split single-tile tasks if < this many units per thread
#endif
#ifndef KVC_MIN_PART
#define KVC_MIN_PART 256  // ... into units of at least this many keys (x G rows)
#endif
constexpr int kKB = KVC_KB;
constexpr int kRowsPerTile = 32;  // target rows (queries x G) per prefill tile
constexpr int kSplitFactor = KVC_SPLIT_FACTOR;
constexpr int kMinPartKeys = KVC_MIN_PART;
static_assert(kKB % 16 == 0, "kKB must be a multiple of 16");

struct Task {
  int32_t r, h;
  int32_t tok0;          // first token row of the request
  int32_t q_len;
  int32_t n;             // KVs of this head (incl. this step's)
  int32_t first_metric;  // queries >= first_metric record metrics (q_len: none)
  int32_t metric_k0;     // ... on the KVs >= metric_k0 only (a hitter's own KVs)
  const int32_t* pages;
  bool packed;           // head-pages in vLLM's in-page layout (Ctx::layout)
};

struct Item {
  int32_t task;
  int32_t i0, i1;   // queries [i0, i1) of the task (tiles of QT)
  int32_t k0, k1;   // KV range (split items); k1 < 0: whole causal range
  int32_t split;    // index into the partial buffers, -1: not split
  int32_t part, nparts;
  int64_t pm_off;   // split items with metric rows: offset in the shared P buffer
  double cost;
};

struct Scratch {
  std::vector<float> q, o, s, kf, vf, m, l, contrib, pm, mref, qb, pb, pf;
  static float* get(std::vector<float>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

template <typename T>
struct Ctx {
  const T* kv;
  int64_t N, D, Dp, G, QT;
  const T* q;
  int64_t qs0, qs1;
  T* out;
  int64_t os0, os1;
  float* metrics;
  float scale;
  bool bf16_avx512;  // bf16 cache, D % 32 == 0, an AVX-512 path selected
  const Avx512Kernels* k;  // that path's micro-kernels (null: the baseline's)
  bool amx;          // ... and AMX for packed pages (decode tiles of <= 16 rows)
  PackedLayout layout;  // vLLM's in-page layout of the packed requests' pages
  const Task* tasks;
  // split partials
  float* part_m;
  float* part_l;
  float* part_o;
  float* pm_shared;
  float* mref_shared;
};

// ---------------------------------------------------------------- micro-kernels
//
// K/V rows are read straight from the cache (type TE = the cache dtype,
// converted to fp32 in registers, row stride ld) or, when head_dim % 8 != 0,
// from an fp32 staging copy padded to Dp (TE = float).

// S[r * lds + j] = <Q[r], K[j]> for R rows and keys j < kn (keys are taken in
// groups of KJ, R * KJ <= 8 accumulators; the last group re-reads row kn - 1,
// so up to KJ - 1 entries past kn are written).  While at it, prefetches the
// K/V rows with the same indices of a later block (pfk/pfv, may be null).
template <int R, int KJ, typename TE>
inline void qk_rows(const float* Q, int64_t Dp, const TE* K, int64_t ldk, int kn, float* S,
                    int lds, const char* pfk, const char* pfv, int64_t row_bytes) {
  static_assert(R * KJ <= 8, "too many accumulators");
  for (int j = 0; j < kn; j += KJ) {
    const TE* k[KJ];
    for (int x = 0; x < KJ; ++x) k[x] = K + std::min(j + x, kn - 1) * ldk;
    if (pfk) {
      for (int64_t off = j * row_bytes; off < (j + KJ) * row_bytes; off += 64) {
        prefetch_l2(pfk + off);
        prefetch_l2(pfv + off);
      }
    }
    Vec acc[8];
    for (auto& v : acc) v = vzero();
    for (int64_t d = 0; d < Dp; d += 8) {
      Vec kv[KJ];
      for (int x = 0; x < KJ; ++x) kv[x] = load8(k[x] + d);
      for (int r = 0; r < R; ++r) {
        Vec q = vload(Q + r * Dp + d);
        if (KJ > 1) vkeep(q);
        for (int x = 0; x < KJ; ++x) acc[r * KJ + x] = vfma(q, kv[x], acc[r * KJ + x]);
      }
    }
    const Vec s = hsum8(acc);
    if constexpr (KJ == 8) {
      vstore(S + j, s);
    } else if constexpr (KJ == 4) {
      vstore_lo4(S + j, s);
      if (R > 1) vstore_hi4(S + lds + j, s);
    } else {
      static_assert(KJ == 2, "KJ must be 2, 4 or 8");
      vstore_pair<0>(S + j, s);
      if (R > 1) vstore_pair<1>(S + lds + j, s);
      if (R > 2) vstore_pair<2>(S + 2 * lds + j, s);
      if (R > 3) vstore_pair<3>(S + 3 * lds + j, s);
    }
  }
}

template <typename TE>
inline void qk_block(const float* Q, int rows, int64_t Dp, const TE* K, int64_t ldk, int kn,
                     float* S, int lds, const char* pfk, const char* pfv, int64_t row_bytes) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    qk_rows<4, 2>(Q + r * Dp, Dp, K, ldk, kn, S + r * lds, lds, pfk, pfv, row_bytes);
    pfk = pfv = nullptr;  // prefetch once
  }
  switch (rows - r) {
    case 3: qk_rows<3, 2>(Q + r * Dp, Dp, K, ldk, kn, S + r * lds, lds, pfk, pfv, row_bytes); break;
    case 2: qk_rows<2, 4>(Q + r * Dp, Dp, K, ldk, kn, S + r * lds, lds, pfk, pfv, row_bytes); break;
    case 1: qk_rows<1, 8>(Q + r * Dp, Dp, K, ldk, kn, S + r * lds, lds, pfk, pfv, row_bytes); break;
    default: break;
  }
}

// The same on a page whose K half is transposed (vLLM's vec layout: key t's
// dim d at Kt[d * N + t]), keys [s0, s0 + kn): 16 keys per step (two vectors
// of 8), vertical multiply-adds, no reduction tree -- the QK of vLLM's vec
// kernel.  Writes S entries up to round_up(kn, 16) (<= 128), reading the
// page's stale slots past kn (s0 % 16 == 0 and N % 16 == 0 keep every read
// inside the page); Q rows are fp32 of stride Dp, only their first D dims read.
template <int R, typename TE>
inline void qk_rows_kt(const float* Q, int64_t Dp, int64_t D, const TE* Kt, int64_t N, int s0,
                       int kn, float* S, int lds) {
  for (int j = 0; j < kn; j += 16) {
    Vec acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vzero();
    const TE* k = Kt + s0 + j;
    for (int64_t d = 0; d < D; ++d, k += N) {
      const Vec k0 = load8(k), k1 = load8(k + 8);
      for (int r = 0; r < R; ++r) {
        const Vec q = vbroadcast(Q + r * Dp + d);
        acc[r][0] = vfma(q, k0, acc[r][0]);
        acc[r][1] = vfma(q, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      vstore(S + r * lds + j, acc[r][0]);
      vstore(S + r * lds + j + 8, acc[r][1]);
    }
  }
}

template <typename TE>
inline void qk_block_kt(const float* Q, int rows, int64_t Dp, int64_t D, const TE* Kt, int64_t N,
                        int s0, int kn, float* S, int lds) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) qk_rows_kt<4>(Q + r * Dp, Dp, D, Kt, N, s0, kn, S + r * lds, lds);
  switch (rows - r) {
    case 3: qk_rows_kt<3>(Q + r * Dp, Dp, D, Kt, N, s0, kn, S + r * lds, lds); break;
    case 2: qk_rows_kt<2>(Q + r * Dp, Dp, D, Kt, N, s0, kn, S + r * lds, lds); break;
    case 1: qk_rows_kt<1>(Q + r * Dp, Dp, D, Kt, N, s0, kn, S + r * lds, lds); break;
    default: break;
  }
}

// O[r] += sum_j P[r * ldp + j] * V[j] for R rows, j < kn.
template <int R, typename TE>
inline void pv_rows(const float* P, int ldp, const TE* V, int64_t ldv, int kn, int64_t Dp,
                    float* O) {
  int64_t d = 0;
  for (; d + 16 <= Dp; d += 16) {
    Vec acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = vload(O + r * Dp + d);
      acc[r][1] = vload(O + r * Dp + d + 8);
    }
    for (int j = 0; j < kn; ++j) {
      const Vec v0 = load8(V + j * ldv + d), v1 = load8(V + j * ldv + d + 8);
      for (int r = 0; r < R; ++r) {
        const Vec p = vbroadcast(P + r * ldp + j);
        acc[r][0] = vfma(p, v0, acc[r][0]);
        acc[r][1] = vfma(p, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      vstore(O + r * Dp + d, acc[r][0]);
      vstore(O + r * Dp + d + 8, acc[r][1]);
    }
  }
  if (d < Dp) {  // Dp % 16 == 8
    Vec acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vload(O + r * Dp + d);
    for (int j = 0; j < kn; ++j) {
      const Vec v0 = load8(V + j * ldv + d);
      for (int r = 0; r < R; ++r) acc[r] = vfma(vbroadcast(P + r * ldp + j), v0, acc[r]);
    }
    for (int r = 0; r < R; ++r) vstore(O + r * Dp + d, acc[r]);
  }
}

template <typename TE>
inline void pv_block(const float* P, int rows, int ldp, const TE* V, int64_t ldv, int kn,
                     int64_t Dp, float* O) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<4>(P + r * ldp, ldp, V, ldv, kn, Dp, O + r * Dp);
  switch (rows - r) {
    case 3: pv_rows<3>(P + r * ldp, ldp, V, ldv, kn, Dp, O + r * Dp); break;
    case 2: pv_rows<2>(P + r * ldp, ldp, V, ldv, kn, Dp, O + r * Dp); break;
    case 1: pv_rows<1>(P + r * ldp, ldp, V, ldv, kn, Dp, O + r * Dp); break;
    default: break;
  }
}

inline void scale_row(float* x, int64_t n, float a) {
  const Vec s = vset1(a);
  for (int64_t d = 0; d < n; d += 8) vstore(x + d, vload(x + d) * s);
}

// Blocks never cross a page: a block is at most kKB keys of one page.
inline int block_len(int64_t kb0, int64_t kend, int64_t N) {
  return static_cast<int>(std::min<int64_t>({kKB, N - kb0 % N, kend - kb0}));
}

inline int64_t count_blocks(int64_t k0, int64_t kend, int64_t N) {
  int64_t nb = 0;
  for (int64_t kb0 = k0; kb0 < kend; kb0 += block_len(kb0, kend, N)) ++nb;
  return nb;
}

// Requests that share pages (prefix-cache hitters and their writer, the n > 1
// children of one prompt) add to the same metric slots in one call, from
// tasks that may run on different threads.  Each block's read-modify-write
// therefore holds the spin lock of its page's stripe: uncontended that is one
// exchange per block of up to kKB keys.  (Without it, concurrent adds lost
// whole contributions of shared slots in a few percent of calls.)  The order
// of the adds to a shared slot still follows the threads' timing, so its sum
// may differ in the last bits from one run to the next, as with the Triton
// kernel's atomics.
struct alignas(64) MetricLock {
  std::atomic<bool> busy{false};
};
constexpr int64_t kMetricLocks = 512;  // power of two
MetricLock g_metric_locks[kMetricLocks];

// metrics[page(j), slot(j)] += contrib[j - kb0] for logical j in [kb0, kb0 + kn)
// (one page).
inline void add_metrics(float* metrics, const int32_t* pages, int64_t N, int64_t kb0, int kn,
                        const float* contrib) {
  const int64_t page = pages[kb0 / N];
  std::atomic<bool>& busy = g_metric_locks[page & (kMetricLocks - 1)].busy;
  for (int spins = 0; busy.exchange(true, std::memory_order_acquire);) {
    while (busy.load(std::memory_order_relaxed)) {
      if (++spins < 256) {
        _mm_pause();
      } else {
        std::this_thread::yield();  // the holder may be descheduled
      }
    }
  }
  float* m = metrics + page * N + kb0 % N;
  int x = 0;
  for (; x + 8 <= kn; x += 8) vstore(m + x, vload(m + x) + vload(contrib + x));
  for (; x < kn; ++x) m[x] += contrib[x];
  busy.store(false, std::memory_order_release);
}

// Adds sum_r (c[r] * P[blk][r][j])^2 of every block of a KV range to metrics.
// P blocks are [mrows][kKB] (zero past the block length, up to a multiple of 8);
// c[blk * mrows + r] is the per-(block, row) factor.
// KVs below kmin get nothing (their blocks are still counted in P).
inline void metric_pass(float* metrics, const int32_t* pages, int64_t N, int64_t k0, int64_t k1,
                        int64_t kmin, int mrows, const float* P, const float* c, float* contrib) {
  int64_t blk = 0;
  for (int64_t kb0 = k0; kb0 < k1; ++blk) {
    const int kn = block_len(kb0, k1, N);
    if (kb0 + kn <= kmin) {
      kb0 += kn;
      continue;
    }
    const float* Pb = P + blk * mrows * kKB;
    const float* cb = c + blk * mrows;
    for (int j = 0; j < kn; j += 8) {
      Vec acc = vzero();
      for (int r = 0; r < mrows; ++r) {
        const Vec p = vload(Pb + r * kKB + j) * vset1(cb[r]);
        acc = vfma(p, p, acc);
      }
      vstore(contrib + j, acc);
    }
    const int lo = static_cast<int>(std::max<int64_t>(0, kmin - kb0));
    add_metrics(metrics, pages, N, kb0 + lo, kn - lo, contrib + lo);
    kb0 += kn;
  }
}

// ---------------------------------------------------------------- one tile

// Rows of the AMX tile configuration this thread has loaded in this call (-1:
// none).  A tile configuration depends only on the rows, so the tiles of one
// call that share it load it once.  AmxScope (one per thread's share of a
// call, i.e. per at::parallel_for chunk) starts from none and releases the
// tile state when that share ends (as vLLM's and oneDNN's AMX kernels do: the
// state goes back to its init state, so the OS need not save it, and other
// tile users on the thread configure their own).
thread_local int t_amx_rows = -1;

struct AmxScope {
  AmxScope() { t_amx_rows = -1; }
  ~AmxScope() {
    if (t_amx_rows >= 0) avx512::amx_tile_release();
    t_amx_rows = -1;
  }
  AmxScope(const AmxScope&) = delete;
  AmxScope& operator=(const AmxScope&) = delete;
};

constexpr int kLdS = kKB + 8;    // row stride of the score tile
constexpr int kLdPb = kKB + 32;  // ... of the bf16 probabilities (AVX-512 path)

// Attention of queries [qa, qb) of a task over its KVs [k0, k1) (k1 clipped to
// the causal range).  Non-split: writes the output and adds metrics.  Split:
// writes partial (m, l, O) and the P blocks of metric rows to the shared buffers.
template <typename T>
void attend_tile(const Ctx<T>& c, const Task& t, int qa, int qb, int64_t k0, int64_t k1,
                 const Item* split_item) {
  Scratch& sc = scratch();
  const int64_t G = c.G, D = c.D, Dp = c.Dp, N = c.N;
  const int rows = (qb - qa) * static_cast<int>(G);
  const int64_t kend = std::min<int64_t>(k1, t.n - t.q_len + qb);
  // AVX-512 paths: raw bf16 query rows (the softmax scales the dot products),
  // bf16 probabilities for PV (in Pb).
  const bool fast = c.bf16_avx512;
  // Read K/V in place (plain rows, packed pages by the AVX-512 micro-kernels,
  // vLLM's vec layout on every path); otherwise each block is staged as fp32
  // rows in Kf / Vf.
  const bool vec_layout = c.layout == PackedLayout::kPackedVec;
  const bool direct = Dp == D && (fast || !t.packed || vec_layout);

  float* Q = Scratch::get(sc.q, rows * Dp);
  float* O = Scratch::get(sc.o, rows * Dp);
  float* S = Scratch::get(sc.s, static_cast<size_t>(rows) * kLdS);
  float* Kf = direct ? nullptr : Scratch::get(sc.kf, kKB * Dp);
  float* Vf = direct ? nullptr : Scratch::get(sc.vf, kKB * Dp);
  float* m = Scratch::get(sc.m, rows);
  float* l = Scratch::get(sc.l, rows);

  uint16_t* Qb = nullptr;
  uint16_t* Pb = nullptr;
  // AMX tiles for packed pages: at most 16 rows (decode tiles; prefill tiles
  // with more rows take the AVX-512 micro-kernels).
  const bool amx = c.amx && t.packed && !vec_layout && rows <= 16;
  if (amx && t_amx_rows != rows) {
    avx512::amx_tile_config(rows);
    t_amx_rows = rows;
  }
  // vLLM's vec layout: fp32 probabilities for PV, as its vec kernel has them.
  float* Pf = fast && t.packed && vec_layout ? Scratch::get(sc.pf, rows * kLdS) : nullptr;
  if (fast) {
    Qb = reinterpret_cast<uint16_t*>(Scratch::get(sc.qb, (rows * D + 1) / 2));
    Pb = reinterpret_cast<uint16_t*>(Scratch::get(sc.pb, rows * kLdPb / 2));
    for (int i = qa; i < qb; ++i)
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(Qb + ((i - qa) * G + g) * D, c.q + (t.tok0 + i) * c.qs0 + (t.h * G + g) * c.qs1,
                    D * sizeof(uint16_t));
  } else {
    for (int i = qa; i < qb; ++i) {
      for (int64_t g = 0; g < G; ++g) {
        float* dst = Q + ((i - qa) * G + g) * Dp;
        to_f32_scaled(c.q + (t.tok0 + i) * c.qs0 + (t.h * G + g) * c.qs1, dst, D, c.scale);
        std::fill(dst + D, dst + Dp, 0.f);
      }
    }
  }
  std::fill(O, O + rows * Dp, 0.f);
  std::fill(m, m + rows, -INFINITY);
  std::fill(l, l + rows, 0.f);

  // Metric rows: queries >= first_metric, i.e. rows [mr0, rows).
  const int mr0 = c.metrics ? std::clamp(t.first_metric - qa, 0, qb - qa) * static_cast<int>(G)
                            : rows;
  const int mrows = rows - mr0;
  float* Pm = nullptr;
  float* mref = nullptr;
  int64_t nblk = 0;
  if (mrows > 0) {
    if (split_item) {
      Pm = c.pm_shared + split_item->pm_off;
      mref = c.mref_shared + split_item->pm_off / kKB;
    } else {
      nblk = count_blocks(k0, kend, N);
      Pm = Scratch::get(sc.pm, nblk * mrows * kKB);
      mref = Scratch::get(sc.mref, nblk * mrows);
    }
  }

  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  const int64_t row_limit0 = t.n - t.q_len + qa + 1;  // keys visible to query qa
  int64_t blk = 0;
  for (int64_t kb0 = k0; kb0 < kend; ++blk) {
    const int kn = block_len(kb0, kend, N);
    const T* page = c.kv + static_cast<int64_t>(t.pages[kb0 / N]) * 2 * N * D;  // K half
    const int s0 = static_cast<int>(kb0 % N);
    const T* kp = page + s0 * D;  // plain rows
    const T* vp = kp + N * D;
    if (direct && t.packed && vec_layout) {  // transposed K read as it lies
      if (fast)
        c.k->qk_block_bf16_kt(Qb, rows, D, reinterpret_cast<const uint16_t*>(page), N, s0, kn,
                                 S, kLdS);
      else
        qk_block_kt(Q, rows, Dp, D, page, N, s0, kn, S, kLdS);
    } else if (direct && t.packed) {  // fast: in-page layout read as it lies
      (amx ? avx512::qk_block_amx_packed : c.k->qk_block_bf16_packed)(
          Qb, rows, D, reinterpret_cast<const uint16_t*>(page), s0, kn, S, kLdS);
    } else if (direct) {
      const char* pfk = nullptr;
      const char* pfv = nullptr;
      const int64_t pf = kb0 + KVC_PREFETCH_DIST * kKB;
      if (pf < kend) {
        pfk = reinterpret_cast<const char*>(c.kv + (static_cast<int64_t>(t.pages[pf / N]) * 2 * N + pf % N) * D);
        pfv = pfk + N * row_bytes;
      }
      if (fast)
        c.k->qk_block_bf16(Qb, rows, D, reinterpret_cast<const uint16_t*>(kp), D, kn, S, kLdS,
                              pfk, pfv, row_bytes);
      else
        qk_block(Q, rows, Dp, kp, D, kn, S, kLdS, pfk, pfv, row_bytes);
    } else if (t.packed) {  // baseline ISA, AMX layout (vec is always direct): unpack
      for (int x = 0; x < kn; ++x) {
        for (int64_t d = 0; d < D; ++d) {
          Kf[x * Dp + d] = static_cast<float>(page[packed_k_offset(s0 + x, d, D)]);
          Vf[x * Dp + d] = static_cast<float>(page[N * D + packed_v_offset(s0 + x, d, N)]);
        }
        std::fill(Kf + x * Dp + D, Kf + (x + 1) * Dp, 0.f);
        std::fill(Vf + x * Dp + D, Vf + (x + 1) * Dp, 0.f);
      }
      qk_block(Q, rows, Dp, Kf, Dp, kn, S, kLdS, nullptr, nullptr, 0);
    } else {
      for (int x = 0; x < kn; ++x) {
        to_f32(kp + x * D, Kf + x * Dp, D);
        to_f32(vp + x * D, Vf + x * Dp, D);
        std::fill(Kf + x * Dp + D, Kf + (x + 1) * Dp, 0.f);
        std::fill(Vf + x * Dp + D, Vf + (x + 1) * Dp, 0.f);
      }
      qk_block(Q, rows, Dp, Kf, Dp, kn, S, kLdS, nullptr, nullptr, 0);
    }
    const int knp = static_cast<int>(round_up(kn, 8));
    for (int r = 0; r < rows; ++r) {
      const int64_t limit = row_limit0 + r / G;  // exclusive
      const int valid = static_cast<int>(std::clamp<int64_t>(limit - kb0, 0, kn));
      float* s = S + r * kLdS;
      if (fast) {  // as below, 16 lanes, with lazy rescaling (m is a reference max)
        const float m_old = m[r];
        float m_new;
        float* p32 = r >= mr0 ? Pm + (blk * mrows + r - mr0) * kKB : nullptr;
        const float sum = c.k->softmax_row(s, knp, valid, c.scale, m_old, &m_new,
                                              Pf ? Pf + r * kLdS : p32, Pb + r * kLdPb);
        if (Pf && p32) std::copy(Pf + r * kLdS, Pf + r * kLdS + knp, p32);
        if (m_new == m_old) {  // includes a row that sees nothing yet (-inf)
          l[r] += sum;
        } else {  // m_new > m_old + 8: alpha < e^-8 (0 when m_old is -inf)
          const float alpha = std::exp(m_old - m_new);
          l[r] = l[r] * alpha + sum;
          if (m_old != -INFINITY) scale_row(O + r * Dp, Dp, alpha);
          m[r] = m_new;
        }
        if (p32) mref[blk * mrows + r - mr0] = m_new;
        continue;
      }
      Vec mv = vset1(-INFINITY);
      for (int j = 0; j < knp; j += 8) {
        Vec x = vload(s + j);
        if (j + 8 > valid) {
          x = vmask_tail_neginf(x, std::clamp(valid - j, 0, 8));
          vstore(s + j, x);
        }
        mv = vmax(mv, x);
      }
      const float m_old = m[r];
      const float m_new = std::max(m_old, hmax(mv));
      if (m_new == -INFINITY) {  // nothing visible to this row yet
        std::fill(s, s + knp, 0.f);
      } else {
        const Vec mb = vset1(m_new);
        Vec sum = vzero();
        for (int j = 0; j < knp; j += 8) {
          const Vec p = vexp(vload(s + j) - mb);
          vstore(s + j, p);
          sum = sum + p;
        }
        const float alpha = std::exp(m_old - m_new);  // 0 when m_old == -inf
        l[r] = l[r] * alpha + hsum(sum);
        if (m_old != -INFINITY && alpha != 1.f) scale_row(O + r * Dp, Dp, alpha);
        m[r] = m_new;
      }
      if (r >= mr0) {
        const int mr = r - mr0;
        float* dst = Pm + (blk * mrows + mr) * kKB;
        std::copy(s, s + knp, dst);
        mref[blk * mrows + mr] = m_new;
      }
    }
    if (Pf)  // vLLM's vec layout: V half in plain rows, fp32 P
      c.k->pv_block_f32p(Pf, rows, kLdS, reinterpret_cast<const uint16_t*>(vp), D, kn, D, O);
    else if (fast && t.packed)
      (amx ? avx512::pv_block_amx_packed : c.k->pv_block_bf16_packed)(
          Pb, rows, kLdPb, reinterpret_cast<const uint16_t*>(page + N * D), N, s0, kn, D, O);
    else if (fast)
      c.k->pv_block_bf16(Pb, rows, kLdPb, reinterpret_cast<const uint16_t*>(vp), D, kn, D, O);
    else if (direct)
      pv_block(S, rows, kLdS, vp, D, kn, Dp, O);
    else
      pv_block(S, rows, kLdS, Vf, Dp, kn, Dp, O);
    kb0 += kn;
  }
  nblk = blk;

  if (split_item) {
    const int64_t base = static_cast<int64_t>(split_item->split) * c.QT * G;
    std::copy(m, m + rows, c.part_m + base);
    std::copy(l, l + rows, c.part_l + base);
    std::copy(O, O + rows * Dp, c.part_o + base * Dp);
    return;
  }

  for (int r = 0; r < rows; ++r) {
    const int i = qa + r / static_cast<int>(G);
    const int64_t g = r % G;
    const float inv_l = l[r] > 0.f ? 1.f / l[r] : 0.f;
    from_f32_scaled(O + r * Dp, c.out + (t.tok0 + i) * c.os0 + (t.h * G + g) * c.os1, D, inv_l);
    l[r] = inv_l;
  }
  if (mrows > 0) {
    // c = exp(m_blk - m) / l, in place of mref
    for (int64_t b = 0; b < nblk; ++b)
      for (int mr = 0; mr < mrows; ++mr) {
        float& x = mref[b * mrows + mr];
        x = x == -INFINITY ? 0.f : std::exp(x - m[mr0 + mr]) * l[mr0 + mr];
      }
    float* contrib = Scratch::get(sc.contrib, kKB);
    metric_pass(c.metrics, t.pages, N, k0, kend, t.metric_k0, mrows, Pm, mref, contrib);
  }
}

// Merges the partials of a split task (run by the thread that finishes its
// last partition): row max M and sum L over partitions, output, and the metric
// contributions of every partition (their P blocks are in the shared buffer).
template <typename T>
void finish_split(const Ctx<T>& c, const Task& t, const Item* parts, int nparts) {
  Scratch& sc = scratch();
  const int64_t G = c.G, D = c.D, Dp = c.Dp;
  const Item& it0 = parts[0];
  const int rows = (it0.i1 - it0.i0) * static_cast<int>(G);
  const int64_t stride = c.QT * G;
  const int64_t base0 = static_cast<int64_t>(it0.split) * stride;
  float* M = Scratch::get(sc.m, rows);
  float* invL = Scratch::get(sc.l, rows);
  float* O = Scratch::get(sc.o, Dp);
  for (int r = 0; r < rows; ++r) {
    float mx = -INFINITY;
    for (int p = 0; p < nparts; ++p) mx = std::max(mx, c.part_m[base0 + p * stride + r]);
    float L = 0.f;
    std::fill(O, O + Dp, 0.f);
    for (int p = 0; p < nparts; ++p) {
      const float mp = c.part_m[base0 + p * stride + r];
      if (mp == -INFINITY) continue;
      const float w = std::exp(mp - mx);
      L += c.part_l[base0 + p * stride + r] * w;
      const Vec wv = vset1(w);
      const float* src = c.part_o + (base0 + p * stride + r) * Dp;
      for (int64_t d = 0; d < Dp; d += 8) vstore(O + d, vfma(wv, vload(src + d), vload(O + d)));
    }
    M[r] = mx;
    invL[r] = L > 0.f ? 1.f / L : 0.f;
    const int i = it0.i0 + r / static_cast<int>(G);
    const int64_t g = r % G;
    from_f32_scaled(O, c.out + (t.tok0 + i) * c.os0 + (t.h * G + g) * c.os1, D, invL[r]);
  }
  if (!c.metrics) return;
  const int mr0 = std::clamp(t.first_metric - it0.i0, 0, it0.i1 - it0.i0) * static_cast<int>(G);
  const int mrows = rows - mr0;
  if (mrows <= 0) return;
  float* contrib = Scratch::get(sc.contrib, kKB);
  for (int p = 0; p < nparts; ++p) {
    const Item& it = parts[p];
    const int64_t kend = std::min<int64_t>(it.k1, t.n - t.q_len + it.i1);
    if (kend <= it.k0) continue;
    const int64_t nblk = count_blocks(it.k0, kend, c.N);
    const float* Pm = c.pm_shared + it.pm_off;
    const float* mref = c.mref_shared + it.pm_off / kKB;
    float* cf = Scratch::get(sc.mref, nblk * mrows);
    for (int64_t b = 0; b < nblk; ++b)
      for (int mr = 0; mr < mrows; ++mr) {
        const float x = mref[b * mrows + mr];
        cf[b * mrows + mr] = x == -INFINITY ? 0.f : std::exp(x - M[mr0 + mr]) * invL[mr0 + mr];
      }
    metric_pass(c.metrics, t.pages, c.N, it.k0, kend, t.metric_k0, mrows, Pm, cf, contrib);
  }
}

// Runs fn(u) for every unit u in [0, n) on torch's thread pool.  Units are
// dealt out as contiguous ranges of about equal cost (cost[u]), so that from
// one call to the next (one layer to the next) a thread works on the same
// heads and finds their pages in its own caches; a thread that runs out of
// work steals units from the back of the other ranges.
template <typename F>
void run_units(int64_t n, const std::vector<double>& cost, const F& fn) {
  if (n == 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1) {
    AmxScope amx;
    for (int64_t u = 0; u < n; ++u) fn(u);
    return;
  }
  // Range w = units [front, back), packed into one word so that the owner
  // (taking the front) and thieves (taking the back) agree through one CAS.
  struct alignas(64) Range {
    std::atomic<uint64_t> fb;
  };
  std::unique_ptr<Range[]> ranges(new Range[workers]);
  double total = 0;
  for (int64_t u = 0; u < n; ++u) total += cost[u];
  int64_t u = 0;
  double acc = 0;
  for (int64_t w = 0; w < workers; ++w) {
    const int64_t begin = u;
    const double until = total * (w + 1) / workers;
    // Take units while the range's cost stays closer to its share.
    while (u < n && (w == workers - 1 || acc + 0.5 * cost[u] <= until || u == begin)) {
      acc += cost[u];
      ++u;
    }
    ranges[w].fb.store(static_cast<uint64_t>(begin) | static_cast<uint64_t>(u) << 32,
                       std::memory_order_relaxed);
  }
  auto take = [&](int64_t w, bool front) -> int64_t {
    uint64_t v = ranges[w].fb.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t f = static_cast<uint32_t>(v), b = static_cast<uint32_t>(v >> 32);
      if (f >= b) return -1;
      const uint64_t next = front ? (v + 1) : (static_cast<uint64_t>(f) |
                                               static_cast<uint64_t>(b - 1) << 32);
      if (ranges[w].fb.compare_exchange_weak(v, next, std::memory_order_relaxed))
        return front ? f : b - 1;
    }
  };
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    AmxScope amx;
    for (int64_t w = wb; w < we; ++w)
      for (int64_t x = take(w, true); x >= 0; x = take(w, true)) fn(x);
    for (int64_t k = 1; k < workers; ++k) {  // steal, nearest neighbour first
      const int64_t w = (wb + k) % workers;
      for (int64_t x = take(w, false); x >= 0; x = take(w, false)) fn(x);
    }
  });
}

template <typename T>
void run_attention(const at::Tensor& query, const at::Tensor& kv_pages, const at::Tensor& pt,
                   const at::Tensor& kv_lens, const at::Tensor& qsl, double scale,
                   float* metrics, const at::Tensor& mqs, const int32_t* mks_p,
                   const at::Tensor& output,
                   const uint8_t* packed, PackedLayout layout) {
  const int64_t R = pt.size(0), H = pt.size(1), max_pages = pt.size(2);
  const int64_t P = kv_pages.size(0), N = kv_pages.size(2), D = kv_pages.size(3);
  const int64_t Hq = query.size(1);
  const int64_t G = Hq / H;
  const int64_t QT = std::max<int64_t>(1, kRowsPerTile / G);

  const int32_t* pt_p = pt.data_ptr<int32_t>();
  const int32_t* kvl = kv_lens.data_ptr<int32_t>();
  const int32_t* qsl_p = qsl.data_ptr<int32_t>();
  const int32_t* mqs_p = mqs.data_ptr<int32_t>();

  // ---- tasks (validated)
  std::vector<Task> tasks;
  tasks.reserve(R * H);
  for (int64_t r = 0; r < R; ++r) {
    const int32_t tok0 = qsl_p[r];
    const int32_t q_len = qsl_p[r + 1] - tok0;
    TORCH_CHECK(q_len >= 0 && tok0 >= 0 && tok0 + q_len <= query.size(0),
                "paged_head_attention: bad query_start_loc at request ", r);
    if (q_len == 0) continue;
    const int32_t first_metric = metrics ? std::clamp(mqs_p[r], 0, q_len) : q_len;
    const int32_t metric_k0 = metrics && mks_p ? std::max(mks_p[r], 0) : 0;
    for (int64_t h = 0; h < H; ++h) {
      const int32_t n = kvl[r * H + h];
      TORCH_CHECK(n >= q_len, "paged_head_attention: kv_lens[", r, ", ", h, "] = ", n,
                  " < q_len = ", q_len, " (kv_lens must include the new tokens)");
      TORCH_CHECK(n <= max_pages * N, "paged_head_attention: kv_lens[", r, ", ", h,
                  "] exceeds the page table");
      const int32_t* pages = pt_p + (r * H + h) * max_pages;
      for (int64_t p = 0; p < (n + N - 1) / N; ++p)
        TORCH_CHECK(pages[p] >= 0 && pages[p] < P, "paged_head_attention: page_table[", r, ", ",
                    h, ", ", p, "] = ", pages[p], " out of range");
      tasks.push_back(Task{static_cast<int32_t>(r), static_cast<int32_t>(h), tok0, q_len, n,
                           first_metric, metric_k0, pages, packed != nullptr && packed[r] != 0});
    }
  }

  // ---- work items, grouped into scheduling units (items run in order by one
  // worker; units are handed out dynamically, costliest first)
  const int nthreads = at::get_num_threads();
  std::vector<Item> items;
  std::vector<int32_t> unit_begin;  // first item of each unit
  std::vector<double> unit_cost;
  auto new_unit = [&](double cost) {
    unit_begin.push_back(static_cast<int32_t>(items.size()));
    unit_cost.push_back(cost);
  };
  auto tile_item = [&](int32_t ti, int32_t a, int32_t b) {
    const Task& t = tasks[ti];
    const double cost = static_cast<double>(b - a) * G * (t.n - t.q_len + 0.5 * (a + b) + 1);
    return Item{ti, a, b, 0, -1, -1, 0, 1, 0, cost};
  };
  std::vector<int32_t> single;  // single-tile tasks (decode rows, short chunks)
  double single_cost = 0;
  for (int32_t ti = 0; ti < static_cast<int32_t>(tasks.size()); ++ti) {
    const Task& t = tasks[ti];
    if (t.q_len <= QT) {
      single.push_back(ti);
      single_cost += static_cast<double>(t.q_len) * G * t.n;
      continue;
    }
    // Prefill chunk: one unit per tile without metric rows; the tiles with
    // metric rows add to the same metrics entries, so they form one unit.
    const int32_t mtile = t.first_metric < t.q_len
                              ? static_cast<int32_t>(t.first_metric / QT * QT) : t.q_len;
    for (int32_t a = 0; a < mtile; a += static_cast<int32_t>(QT)) {
      const Item it = tile_item(ti, a, std::min<int32_t>(mtile, a + static_cast<int32_t>(QT)));
      new_unit(it.cost);
      items.push_back(it);
    }
    if (mtile < t.q_len) {
      const Item it = tile_item(ti, mtile, t.q_len);
      new_unit(it.cost);
      items.push_back(it);
    }
  }

  // Single-tile tasks: one unit each when there are enough of them; otherwise
  // (flash-decoding) their KV ranges are laid end to end and cut into
  // nseg units of equal cost, so a task may be split into partitions that
  // are merged by the thread that finishes its last one.
  const int64_t want = static_cast<int64_t>(kSplitFactor) * nthreads;
  int64_t nseg = 0;
  if (nthreads > 1 && static_cast<int64_t>(items.size() + single.size()) < want) {
    nseg = std::min<int64_t>(want, static_cast<int64_t>(single_cost / (kMinPartKeys * G)));
    nseg = nseg / nthreads * nthreads;
    if (nseg <= static_cast<int64_t>(single.size())) nseg = 0;
  }
  int32_t num_split = 0;
  int64_t pm_total = 0;
  std::vector<int32_t> split_first;  // per task: index of its first partition item (or -1)
  split_first.assign(tasks.size(), -1);
  if (nseg == 0) {
    for (int32_t ti : single) {
      const Item it = tile_item(ti, 0, tasks[ti].q_len);
      new_unit(it.cost);
      items.push_back(it);
    }
  } else {
    const double seg_cost = single_cost / nseg;
    double done = 0;  // cost laid out so far
    int64_t seg = 0;
    new_unit(0);
    for (int32_t ti : single) {
      const Task& t = tasks[ti];
      const double rows = static_cast<double>(t.q_len) * G;
      const size_t first = items.size();
      int64_t pos = 0;
      while (pos < t.n) {
        const double room = seg_cost * (seg + 1) - done;  // left in the current unit
        int64_t end = t.n;
        if (seg + 1 < nseg && (t.n - pos) * rows > room + 0.5 * kKB * rows) {
          end = pos + round_up(static_cast<int64_t>(room / rows), kKB);
          if (end - pos < kKB) {  // current unit full: start the next one
            ++seg;
            new_unit(0);
            continue;
          }
          end = std::min<int64_t>(end, t.n);
        }
        Item it = tile_item(ti, 0, t.q_len);
        it.k0 = static_cast<int32_t>(pos);
        it.k1 = static_cast<int32_t>(end);
        it.cost = rows * (end - pos);
        items.push_back(it);
        unit_cost.back() += it.cost;
        done += it.cost;
        pos = end;
        if (end < t.n) {
          ++seg;
          new_unit(0);
        }
      }
      const int nparts = static_cast<int>(items.size() - first);
      if (nparts > 1) {
        split_first[ti] = static_cast<int32_t>(first);
        const int mrows = (t.q_len - t.first_metric) * static_cast<int>(G);
        for (int p = 0; p < nparts; ++p) {
          Item& it = items[first + p];
          it.split = num_split++;
          it.part = p;
          it.nparts = nparts;
          it.pm_off = pm_total;
          pm_total += count_blocks(it.k0, it.k1, N) * mrows * kKB;
        }
      } else {
        items[first].k1 = -1;  // whole task in one item
      }
    }
  }
  unit_begin.push_back(static_cast<int32_t>(items.size()));

  // Shared buffers of split partitions (the calling thread's, reused across
  // calls: every entry that is read is written first in this call).
  static thread_local Scratch shared;
  float* part_m = nullptr;
  float* part_l = nullptr;
  float* part_o = nullptr;
  float* pm_shared = nullptr;
  float* mref_shared = nullptr;
  std::unique_ptr<std::atomic<int32_t>[]> parts_done;
  if (num_split > 0) {
    const size_t split_rows = static_cast<size_t>(num_split) * QT * G;
    part_m = Scratch::get(shared.m, split_rows);
    part_l = Scratch::get(shared.l, split_rows);
    part_o = Scratch::get(shared.o, split_rows * round_up(D, 8));
    pm_shared = Scratch::get(shared.pm, pm_total + 1);
    mref_shared = Scratch::get(shared.mref, pm_total / kKB + 1);
    parts_done.reset(new std::atomic<int32_t>[tasks.size()]);
    for (size_t i = 0; i < tasks.size(); ++i) parts_done[i].store(0, std::memory_order_relaxed);
  }

  Ctx<T> c;
  c.kv = reinterpret_cast<const T*>(kv_pages.data_ptr());
  c.N = N;
  c.D = D;
  c.Dp = round_up(D, 8);
  c.G = G;
  c.QT = QT;
  c.q = reinterpret_cast<const T*>(query.data_ptr());
  c.qs0 = query.stride(0);
  c.qs1 = query.stride(1);
  c.out = reinterpret_cast<T*>(output.data_ptr());
  c.os0 = output.stride(0);
  c.os1 = output.stride(1);
  c.metrics = metrics;
  c.scale = static_cast<float>(scale);
  const CpuIsa isa = active_isa();
  c.bf16_avx512 = std::is_same_v<T, c10::BFloat16> && D % 32 == 0 && isa != CpuIsa::kBaseline;
  c.k = c.bf16_avx512 ? &avx512_kernels(isa) : nullptr;
  c.amx = c.bf16_avx512 && isa == CpuIsa::kAvx512Amx;
  c.layout = layout;
  c.tasks = tasks.data();
  c.part_m = part_m;
  c.part_l = part_l;
  c.part_o = part_o;
  c.pm_shared = pm_shared;
  c.mref_shared = mref_shared;

  run_units(static_cast<int64_t>(unit_cost.size()), unit_cost, [&](int64_t u) {
    for (int32_t idx = unit_begin[u]; idx < unit_begin[u + 1]; ++idx) {
      const Item& it = items[idx];
      const Task& t = tasks[it.task];
      if (it.split >= 0) {
        attend_tile(c, t, it.i0, it.i1, it.k0, it.k1, &it);
        // The thread finishing the last partition merges (acq_rel: sees the
        // partials written by the others).
        if (parts_done[it.task].fetch_add(1, std::memory_order_acq_rel) == it.nparts - 1)
          finish_split(c, t, &items[split_first[it.task]], it.nparts);
        continue;
      }
      for (int32_t a = it.i0; a < it.i1; a += static_cast<int32_t>(QT)) {
        const int32_t b = std::min<int32_t>(it.i1, a + static_cast<int32_t>(QT));
        attend_tile(c, t, a, b, 0, t.n, nullptr);
      }
    }
  });
}

}  // namespace

void paged_head_attention(const at::Tensor& query, const at::Tensor& kv_pages,
                          const at::Tensor& page_table, const at::Tensor& kv_lens,
                          const at::Tensor& query_start_loc, double scale,
                          const std::optional<at::Tensor>& metrics,
                          const at::Tensor& metric_q_start, const at::Tensor& output,
                          const std::optional<at::Tensor>& packed, int64_t packed_layout,
                          const std::optional<at::Tensor>& metric_k_start) {
  TORCH_CHECK(kv_pages.device().is_cpu(), "paged_head_attention: CPU tensors expected");
  TORCH_CHECK(kv_pages.dim() == 4 && kv_pages.size(1) == 2 && kv_pages.is_contiguous(),
              "paged_head_attention: kv_pages must be a contiguous [P, 2, N, D] tensor");
  TORCH_CHECK(query.dim() == 3 && output.dim() == 3 && query.sizes() == output.sizes(),
              "paged_head_attention: query and output must be [T, Hq, D] of the same shape");
  TORCH_CHECK(query.size(2) == kv_pages.size(3), "paged_head_attention: head_dim mismatch");
  TORCH_CHECK(query.scalar_type() == kv_pages.scalar_type() &&
                  output.scalar_type() == kv_pages.scalar_type(),
              "paged_head_attention: query, output and kv_pages must share a dtype");
  TORCH_CHECK(query.stride(2) == 1 && output.stride(2) == 1,
              "paged_head_attention: the last dim of query/output must be contiguous");
  TORCH_CHECK(page_table.dim() == 3, "paged_head_attention: page_table must be [R, H, max_pages]");
  const int64_t R = page_table.size(0), H = page_table.size(1);
  TORCH_CHECK(H > 0 && query.size(1) % H == 0,
              "paged_head_attention: query heads must be a multiple of KV heads");
  TORCH_CHECK(kv_lens.dim() == 2 && kv_lens.size(0) == R && kv_lens.size(1) == H,
              "paged_head_attention: kv_lens must be [R, H]");
  TORCH_CHECK(query_start_loc.numel() == R + 1, "paged_head_attention: query_start_loc must be [R + 1]");
  TORCH_CHECK(metric_q_start.numel() >= R || !metrics.has_value(),
              "paged_head_attention: metric_q_start must be [R]");
  float* mptr = nullptr;
  if (metrics.has_value()) {
    const at::Tensor& m = *metrics;
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 2 &&
                    m.size(0) == kv_pages.size(0) && m.size(1) == kv_pages.size(2),
                "paged_head_attention: metrics must be a contiguous float32 [P, N] tensor");
    mptr = m.data_ptr<float>();
  }
  const at::Tensor pt = page_table.to(at::kInt).contiguous();
  const at::Tensor kvl = kv_lens.to(at::kInt).contiguous();
  const at::Tensor qsl = query_start_loc.to(at::kInt).contiguous();
  const at::Tensor mqs = metric_q_start.to(at::kInt).contiguous();
  at::Tensor mks;
  const int32_t* mks_p = nullptr;
  if (metric_k_start.has_value()) {
    TORCH_CHECK(metric_k_start->numel() == R,
                "paged_head_attention: metric_k_start must be [R] (one per request), got ",
                metric_k_start->sizes());
    mks = metric_k_start->to(at::kInt).contiguous();
    mks_p = mks.data_ptr<int32_t>();
  }
  at::Tensor packed_flags;
  const uint8_t* packed_p = nullptr;
  if (packed.has_value()) {
    TORCH_CHECK(packed->dim() == 1 && packed->size(0) == R,
                "paged_head_attention: packed must be [R] (one flag per request), got ",
                packed->sizes());
    // bool (one byte, 0 or 1) and uint8 flags are read as they are.
    const bool bytes = packed->scalar_type() == at::kBool || packed->scalar_type() == at::kByte;
    packed_flags = bytes ? packed->contiguous() : packed->to(at::kByte).contiguous();
    packed_p = static_cast<const uint8_t*>(packed_flags.data_ptr());
    const int64_t N = kv_pages.size(2), D = kv_pages.size(3);
    TORCH_CHECK(N % 16 == 0 && D % 32 == 0,
                "paged_head_attention: packed head-pages (vLLM's in-page layouts) need "
                "block_size % 16 == 0 and head_dim % 32 == 0, got block_size ", N,
                ", head_dim ", D);
  }
  TORCH_CHECK(packed_layout == static_cast<int64_t>(PackedLayout::kPackedAmx) ||
                  packed_layout == static_cast<int64_t>(PackedLayout::kPackedVec),
              "paged_head_attention: packed_layout must be 0 (vLLM's AMX layout) or 1 (its vec "
              "layout), got ", packed_layout);
  const auto layout = static_cast<PackedLayout>(packed_layout);
  if (query.size(0) == 0 || R == 0) return;

  switch (kv_pages.scalar_type()) {
    case at::kFloat:
      run_attention<float>(query, kv_pages, pt, kvl, qsl, scale, mptr, mqs, mks_p, output, packed_p, layout);
      break;
    case at::kBFloat16:
      run_attention<c10::BFloat16>(query, kv_pages, pt, kvl, qsl, scale, mptr, mqs, mks_p, output, packed_p, layout);
      break;
    case at::kHalf:
      run_attention<c10::Half>(query, kv_pages, pt, kvl, qsl, scale, mptr, mqs, mks_p, output, packed_p, layout);
      break;
    default:
      TORCH_CHECK(false, "paged_head_attention: unsupported dtype ", kv_pages.scalar_type());
  }
}

}  // namespace kvc
