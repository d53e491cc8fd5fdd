// Batch-invariant fp32 linear layer for the worker's CPU verification passes.
//
// y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]), with W in nn.Linear's layout [N, K].
//
// Why: speculation is lossless only if a position's logits and KV do not depend
// on how many other rows share its forward pass. BLAS libraries pick different
// kernels (and so different summation orders) for different M, and they are
// slow at the small M of a verification pass (1 + a few draft tokens): the
// weights must be streamed from memory once per pass whatever M is, and the
// arithmetic of 16 rows takes less time than that stream.
//
// The summation order is fixed by one definition that every path implements
// exactly, so the result is also the same on AVX-512, AVX2 and plain C++:
//   * 16 accumulators ("lanes"), lane j starts at +0 and takes, for k = j,
//     j + 16, j + 32, ... in increasing order, acc = fma(x[m, k], w[n, k], acc),
//     with x = w = 0 past the end of K;
//   * then a fixed tree: s8[i] = l[i] + l[i + 8], s4[i] = s8[i] + s8[i + 4],
//     s2[i] = s4[i] + s4[i + 2], y = s2[0] + s2[1], then y += b[n] if biased.
// Nothing in it depends on M, on the other rows, on the tile a row falls in or
// on the thread that computes it (threads split N only).
//
// The weights may also be held as the GGUF blocks they were dequantized from
// (``linear_quant``; ``exact_quant.py`` finds them): each weight is expanded to the
// very fp32 value the model holds just before its product, so the sums are bit for
// bit those of the fp32 weights while a pass streams 3.5-5x fewer bytes.

#include <pybind11/pybind11.h>

#include <omp.h>

#include "csrc/act_mul_bf16.h"
#include "csrc/amx_linear.h"
#include "csrc/attention.h"
#include "csrc/attention_amx.h"
#include "csrc/attention_bf16.h"
#include "csrc/bf16_linear_avx512.h"
#include "csrc/prefill_attention_amx.h"
#include "csrc/reduce.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

using qd::tree16;
#ifdef QD_X86
using qd::avx2_mask;
using qd::avx512_tree;
using qd::avx512_tree4;
#endif

// Weights as GGUF block quantizations hold them, blocks of 32 along K (K a multiple of 32).
enum Format : int { F32 = 0, Q4_1 = 1, Q8_0 = 2, FORMAT_COUNT = 3 };

struct Quant {
  const uint8_t* qs;  // Q4_1: [N, K/32, 16], byte j holds weight j (low nibble) and j + 16; Q8_0: [N, K] int8
  const float* d;     // [N, K/32] block scales
  const float* m;     // Q4_1: [N, K/32] block minimums
};

struct Problem {
  const float* x;
  const float* w;  // fp32 weights (F32)
  const float* b;  // nullptr: no bias
  float* y;
  int64_t M, N, K;
  Quant q{};
};

#ifdef QD_X86
// Eight lanes from src; in the tail chunk (FULL false) the lanes outside `mask` read as zero.
template <bool FULL>
__attribute__((target("avx2,fma"))) inline __m256 avx2_load(const float* src, __m256i mask) {
  if constexpr (FULL) return _mm256_loadu_ps(src);
  else return _mm256_maskload_ps(src, mask);
}
#endif

// The weight rows [n0, n0 + r) a tile reads: at(r, k) is W[n0 + r, k]; the vector loads give 8 or 16
// consecutive k (masked lanes zero).
struct F32Rows {
  const float* w;
  int64_t K;
  F32Rows(const Problem& p, int64_t n0) : w(p.w + n0 * p.K), K(p.K) {}
  F32Rows(const float* rows, int64_t K) : w(rows), K(K) {}
  float at(int r, int64_t k) const { return w[r * K + k]; }
#ifdef QD_X86
  template <bool FULL>
  __attribute__((target("avx2,fma"))) __m256 avx2(int r, int64_t k, __m256i mask) const {
    return avx2_load<FULL>(w + r * K + k, mask);
  }
  __attribute__((target("avx512f"))) __m512 avx512(int r, int64_t k, __mmask16 mask) const {
    return _mm512_maskz_loadu_ps(mask, w + r * K + k);
  }
#endif
};

// Expanded as gguf's dequantization computed the fp32 weights: d * q (exact: an fp16 scale times a
// 4-bit code), then + m, rounded. K is whole blocks: no tail, no mask.
struct Q41Rows {
  const uint8_t* qs;
  const float* d;
  const float* m;
  int64_t blocks;
  Q41Rows(const Problem& p, int64_t n0)
      : qs(p.q.qs + n0 * (p.K / 32) * 16), d(p.q.d + n0 * (p.K / 32)), m(p.q.m + n0 * (p.K / 32)),
        blocks(p.K / 32) {}
  float at(int r, int64_t k) const {
    const int64_t i = r * blocks + k / 32;
    const unsigned byte = qs[i * 16 + (k & 15)];
    return d[i] * static_cast<float>((k & 16) ? byte >> 4 : byte & 15u) + m[i];
  }
#ifdef QD_X86
  template <bool FULL>
  __attribute__((target("avx2,fma"))) __m256 avx2(int r, int64_t k, __m256i) const {
    const int64_t i = r * blocks + k / 32;
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + i * 16 + (k & 15))));
    const __m256i q = (k & 16) ? _mm256_srli_epi32(bytes, 4) : _mm256_and_si256(bytes, _mm256_set1_epi32(15));
    return _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(d[i]), _mm256_cvtepi32_ps(q)), _mm256_set1_ps(m[i]));
  }
  __attribute__((target("avx512f"))) __m512 avx512(int r, int64_t k, __mmask16) const {
    const int64_t i = r * blocks + k / 32;
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + i * 16)));
    const __m512i q = (k & 16) ? _mm512_srli_epi32(bytes, 4) : _mm512_and_si512(bytes, _mm512_set1_epi32(15));
    return _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(d[i]), _mm512_cvtepi32_ps(q)), _mm512_set1_ps(m[i]));
  }
#endif
};

// Expanded as q * d (exact: an 8-bit code times an fp16 scale).
struct Q80Rows {
  const int8_t* qs;
  const float* d;
  int64_t K, blocks;
  Q80Rows(const Problem& p, int64_t n0)
      : qs(reinterpret_cast<const int8_t*>(p.q.qs) + n0 * p.K), d(p.q.d + n0 * (p.K / 32)), K(p.K),
        blocks(p.K / 32) {}
  float at(int r, int64_t k) const { return static_cast<float>(qs[r * K + k]) * d[r * blocks + k / 32]; }
#ifdef QD_X86
  template <bool FULL>
  __attribute__((target("avx2,fma"))) __m256 avx2(int r, int64_t k, __m256i) const {
    const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + r * K + k)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(d[r * blocks + k / 32]));
  }
  __attribute__((target("avx512f"))) __m512 avx512(int r, int64_t k, __mmask16) const {
    const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + r * K + k)));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(d[r * blocks + k / 32]));
  }
#endif
};

// Rows of x processed together; a block of M that stays in L2 while the weights stream past.
constexpr int64_t M_BLOCK = 128;

// ---------------------------------------------------------------- portable path
template <class Rows>
void scalar_range(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const Rows w(p, n);
    for (int64_t m = 0; m < p.M; ++m) {
      const float* x = p.x + m * p.K;
      float acc[16] = {};
      for (int64_t k0 = 0; k0 < p.K; k0 += 16) {
        for (int j = 0; j < 16; ++j) {
          const int64_t k = k0 + j;
          const float xv = k < p.K ? x[k] : 0.0f;
          const float wv = k < p.K ? w.at(0, k) : 0.0f;
          acc[j] = std::fma(xv, wv, acc[j]);
        }
      }
      float out = tree16(acc);
      if (p.b) out += p.b[n];
      p.y[m * p.N + n] = out;
    }
  }
}

// A thread's scratch rows for expanded weight blocks (grown, never shrunk).
inline float* expansion_panel(int64_t floats) {
  thread_local std::vector<float> panel;
  if (static_cast<int64_t>(panel.size()) < floats) panel.resize(floats);
  return panel.data();
}

#ifdef QD_X86
// ---------------------------------------------------------------- AVX2 + FMA
// A 16-lane accumulator is two 8-lane registers: lo holds lanes 0-7, hi lanes 8-15.
__attribute__((target("avx2,fma"))) inline float avx2_tree(__m256 lo, __m256 hi) {
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// One half (lanes 0-7 or 8-15) of a 16-k chunk: NR weight registers and one x register at a time,
// so a 3 x 2 tile keeps 12 accumulators in flight (8 were too few to cover the FMA latency here).
template <class Rows, int MT, int NR, bool FULL>
__attribute__((target("avx2,fma"))) inline void avx2_half(const float* x, const Rows& w, int64_t k, int64_t K,
                                                         __m256i mask, __m256 (&acc)[MT][NR]) {
  __m256 wv[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) wv[r] = w.template avx2<FULL>(r, k, mask);
  #pragma GCC unroll 16
  for (int i = 0; i < MT; ++i) {
    const __m256 xv = avx2_load<FULL>(x + i * K, mask);
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
  }
}

template <class Rows, int MT, int NR, bool FULL>
__attribute__((target("avx2,fma"))) inline void avx2_step(const float* x, const Rows& w, int64_t k, int64_t K,
                                                         __m256i mlo, __m256i mhi, __m256 (&lo)[MT][NR],
                                                         __m256 (&hi)[MT][NR]) {
  avx2_half<Rows, MT, NR, FULL>(x, w, k, K, mlo, lo);
  avx2_half<Rows, MT, NR, FULL>(x + 8, w, k + 8, K, mhi, hi);
}

template <class Rows, int MT, int NR>
__attribute__((target("avx2,fma"))) void avx2_tile(const Problem& p, const Rows& w, int64_t m0, int64_t n0) {
  __m256 lo[MT][NR], hi[MT][NR];
  #pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) lo[i][r] = hi[i][r] = _mm256_setzero_ps();
  const float* x = p.x + m0 * p.K;
  const int64_t K = p.K;
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) avx2_step<Rows, MT, NR, true>(x + k, w, k, K, all, all, lo, hi);
  if (k < K)
    avx2_step<Rows, MT, NR, false>(x + k, w, k, K, avx2_mask(K - k, 0), avx2_mask(K - k, 8), lo, hi);
  #pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      float out = avx2_tree(lo[i][r], hi[i][r]);
      if (p.b) out += p.b[n0 + r];
      p.y[(m0 + i) * p.N + n0 + r] = out;
    }
}

constexpr int AVX2_TILE_M = 3;

template <class Rows, int NR>
__attribute__((target("avx2,fma"))) void avx2_rows(const Problem& p, const Rows& w, int64_t m0, int64_t m1,
                                                  int64_t n0) {
  constexpr int MT = AVX2_TILE_M;
  int64_t m = m0;
  for (; m + MT <= m1; m += MT) avx2_tile<Rows, MT, NR>(p, w, m, n0);
  if (m1 - m == 2) avx2_tile<Rows, 2, NR>(p, w, m, n0);
  else if (m1 - m == 1) avx2_tile<Rows, 1, NR>(p, w, m, n0);
}

// Weight rows [n, n + NR) against rows [m0, m1) of x. Blocks read by more than one tile are expanded
// once into fp32 rows first (the same values, so the same sums) instead of once per tile.
template <class Rows, int NR>
__attribute__((target("avx2,fma"))) void avx2_weight_rows(const Problem& p, int64_t m0, int64_t m1, int64_t n) {
  const Rows w(p, n);
  if constexpr (!std::is_same_v<Rows, F32Rows>) {
    if (m1 - m0 > AVX2_TILE_M) {
      float* panel = expansion_panel(NR * p.K);
      for (int r = 0; r < NR; ++r)
        for (int64_t k = 0; k < p.K; k += 8)
          _mm256_storeu_ps(panel + r * p.K + k, w.template avx2<true>(r, k, _mm256_setzero_si256()));
      avx2_rows<F32Rows, NR>(p, F32Rows(panel, p.K), m0, m1, n);
      return;
    }
  }
  avx2_rows<Rows, NR>(p, w, m0, m1, n);
}

template <class Rows>
__attribute__((target("avx2,fma"))) void avx2_range(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int NR = 2;
  for (int64_t mb = 0; mb < p.M; mb += M_BLOCK) {
    const int64_t me = std::min(p.M, mb + M_BLOCK);
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) avx2_weight_rows<Rows, NR>(p, mb, me, n);
    for (; n < n1; ++n) avx2_weight_rows<Rows, 1>(p, mb, me, n);
  }
}

// ---------------------------------------------------------------- AVX-512
inline void avx512_store(const Problem& p, int64_t m, int64_t n, float out) {
  p.y[m * p.N + n] = p.b ? out + p.b[n] : out;
}

template <class Rows, int MT, int NR>
__attribute__((target("avx512f"))) inline void avx512_step(const float* x, const Rows& w, int64_t k, int64_t K,
                                                          __mmask16 mask, __m512 (&acc)[MT][NR]) {
  __m512 wv[NR];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) wv[r] = w.avx512(r, k, mask);
  #pragma GCC unroll 16
  for (int i = 0; i < MT; ++i) {
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K);
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
  }
}

// Rows [m0, m0 + MT) of x against weight rows [n0, n0 + NR), written to y.
template <class Rows, int MT, int NR>
__attribute__((target("avx512f"))) void avx512_tile(const Problem& p, const Rows& w, int64_t m0, int64_t n0) {
  __m512 acc[MT][NR];
  #pragma GCC unroll 16
  for (int i = 0; i < MT; ++i)
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  const float* x = p.x + m0 * p.K;
  const int64_t K = p.K;
  int64_t k = 0;
  // Full chunks with an all-ones mask (a masked load with every lane set is a plain load), then
  // the tail with zeros past K: one code path, so the tail cannot round differently.
  for (; k + 16 <= K; k += 16) avx512_step<Rows, MT, NR>(x + k, w, k, K, static_cast<__mmask16>(0xFFFF), acc);
  if (k < K) avx512_step<Rows, MT, NR>(x + k, w, k, K, static_cast<__mmask16>((1u << (K - k)) - 1u), acc);
  // Reduce the accumulators four at a time, in (row, weight row) order.
  constexpr int COUNT = MT * NR;
  #pragma GCC unroll 16
  for (int j = 0; j + 4 <= COUNT; j += 4) {
    alignas(16) float out[4];
    _mm_store_ps(out, avx512_tree4(acc[j / NR][j % NR], acc[(j + 1) / NR][(j + 1) % NR],
                                   acc[(j + 2) / NR][(j + 2) % NR], acc[(j + 3) / NR][(j + 3) % NR]));
    #pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) avx512_store(p, m0 + (j + q) / NR, n0 + (j + q) % NR, out[q]);
  }
  #pragma GCC unroll 4
  for (int j = COUNT / 4 * 4; j < COUNT; ++j)
    avx512_store(p, m0 + j / NR, n0 + j % NR, avx512_tree(acc[j / NR][j % NR]));
}

// The tile: TILE_M rows of x against TILE_N weight rows, 16 accumulators in registers. Larger tiles
// (6 x 4, 8 x 3, 2 x 8) and prefetching ahead of the weight stream measured the same here: at
// M <= 16 a pass costs about memory time plus arithmetic time, whatever the tile.
constexpr int TILE_M = 4;
constexpr int TILE_N = 4;

template <class Rows, int W>
__attribute__((target("avx512f"))) void avx512_rows(const Problem& p, const Rows& w, int64_t m0, int64_t m1,
                                                   int64_t n) {
  qd::in_groups<TILE_M>(m1 - m0, [&](auto R, int64_t r) { avx512_tile<Rows, R(), W>(p, w, m0 + r, n); });
}

// As avx2_weight_rows: blocks that more than one tile reads are expanded once.
template <class Rows, int W>
__attribute__((target("avx512f"))) void avx512_weight_rows(const Problem& p, int64_t m0, int64_t m1, int64_t n) {
  const Rows w(p, n);
  if constexpr (!std::is_same_v<Rows, F32Rows>) {
    if (m1 - m0 > TILE_M) {
      float* panel = expansion_panel(W * p.K);
      for (int r = 0; r < W; ++r)
        for (int64_t k = 0; k < p.K; k += 16)
          _mm512_storeu_ps(panel + r * p.K + k, w.avx512(r, k, static_cast<__mmask16>(0xFFFF)));
      avx512_rows<F32Rows, W>(p, F32Rows(panel, p.K), m0, m1, n);
      return;
    }
  }
  avx512_rows<Rows, W>(p, w, m0, m1, n);
}

// Blocks of M_BLOCK rows of x stay in L2 while the weights stream past; within a block every
// group of TILE_N weight rows is loaded into L1 once and used by all the block's tiles.
template <class Rows>
__attribute__((target("avx512f"))) void avx512_range(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t mb = 0; mb < p.M; mb += M_BLOCK) {
    const int64_t me = std::min(p.M, mb + M_BLOCK);
    int64_t n = n0;
    for (; n + TILE_N <= n1; n += TILE_N) avx512_weight_rows<Rows, TILE_N>(p, mb, me, n);
    for (; n < n1; ++n) avx512_weight_rows<Rows, 1>(p, mb, me, n);
  }
}

#endif  // QD_X86

// ---------------------------------------------------------------- dispatch
using RangeFn = void (*)(const Problem&, int64_t, int64_t);

struct Isa {
  const char* name;
  RangeFn fn[FORMAT_COUNT];  // by Format
  bool supported;
};

#ifdef QD_X86
constexpr int ISA_COUNT = 3;
Isa* isas() {
  __builtin_cpu_init();
  static Isa table[ISA_COUNT] = {
      {"avx512",
       {avx512_range<F32Rows>, avx512_range<Q41Rows>, avx512_range<Q80Rows>},
       static_cast<bool>(__builtin_cpu_supports("avx512f"))},
      {"avx2",
       {avx2_range<F32Rows>, avx2_range<Q41Rows>, avx2_range<Q80Rows>},
       static_cast<bool>(__builtin_cpu_supports("avx2")) && static_cast<bool>(__builtin_cpu_supports("fma"))},
      {"scalar", {scalar_range<F32Rows>, scalar_range<Q41Rows>, scalar_range<Q80Rows>}, true},
  };
  return table;
}
#else
constexpr int ISA_COUNT = 1;
Isa* isas() {
  static Isa table[ISA_COUNT] = {{"scalar", {scalar_range<F32Rows>, scalar_range<Q41Rows>, scalar_range<Q80Rows>}, true}};
  return table;
}
#endif

Isa* active_isa() {
  static Isa* chosen = [] {
    for (Isa* isa = isas();; ++isa)
      if (isa->supported) return isa;
  }();
  return chosen;
}

Isa* find_isa(const std::string& name) {
  if (name.empty() || name == "auto") return active_isa();
  for (int i = 0; i < ISA_COUNT; ++i) {
    Isa* isa = isas() + i;
    if (name == isa->name) {
      if (!isa->supported) throw std::invalid_argument("this CPU cannot run the " + name + " kernel");
      return isa;
    }
  }
  throw std::invalid_argument("unknown kernel: " + name);
}

// Units [0, units) in contiguous ranges, one per thread (no more threads than units), each thread
// in IEEE mode: range(u0, u1). The split never changes a result, only who computes it.
template <class Range>
void split(int64_t units, int threads, const Range& range) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, units)));
  if (threads == 1) {
    qd::FpMode mode;
    range(int64_t{0}, units);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    qd::FpMode mode;
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
    if (u0 < u1) range(u0, u1);
  }
}

void run(const Problem& p, int threads, RangeFn fn) {
  // Whole blocks of 8 weight rows per thread, so no thread splits a tile (the result would be
  // the same anyway; this only keeps the tiles full).
  split((p.N + 7) / 8, threads,
        [&](int64_t b0, int64_t b1) { fn(p, std::min(p.N, b0 * 8), std::min(p.N, b1 * 8)); });
}

// A checked call: the sizes, then the format's kernel for `isa`, run without the GIL.
void call(const Problem& p, Format format, int threads, const std::string& isa) {
  if (p.M < 0 || p.N < 0 || p.K < 0) throw std::invalid_argument("negative size");
  RangeFn fn = find_isa(isa)->fn[format];
  if (p.M == 0 || p.N == 0) return;
  py::gil_scoped_release release;
  run(p, threads, fn);
}

void linear(uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, int64_t M, int64_t N, int64_t K, int threads,
            const std::string& isa) {
  call({reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(b),
        reinterpret_cast<float*>(y), M, N, K},
       F32, threads, isa);
}

void linear_quant(uintptr_t x, uintptr_t qs, uintptr_t d, uintptr_t m, uintptr_t b, uintptr_t y, int64_t M,
                  int64_t N, int64_t K, int format, int threads, const std::string& isa) {
  if (format != Q4_1 && format != Q8_0) throw std::invalid_argument("unknown weight format");
  if (K % 32) throw std::invalid_argument("quantized weights need whole blocks of 32 along K");
  if (!qs || !d || (format == Q4_1 && !m)) throw std::invalid_argument("missing block codes, scales or minimums");
  Problem p{reinterpret_cast<const float*>(x), nullptr, reinterpret_cast<const float*>(b),
            reinterpret_cast<float*>(y), M, N, K};
  p.q = Quant{reinterpret_cast<const uint8_t*>(qs), reinterpret_cast<const float*>(d),
              reinterpret_cast<const float*>(m)};
  call(p, static_cast<Format>(format), threads, isa);
}

// ---------------------------------------------------------------- bf16 linear on AMX tiles
int64_t packed_bf16_elements(int64_t N, int64_t K) { return qd_amx::Layout(N, K).packed_elements(); }

void pack_bf16(uintptr_t w, uintptr_t out, int64_t N, int64_t K) {
  if (N <= 0 || K <= 0) throw std::invalid_argument("empty weight");
  py::gil_scoped_release release;
  qd_amx::pack(reinterpret_cast<const float*>(w), N, K, reinterpret_cast<uint16_t*>(out));
}

// The bf16 kernel a call asks for: "amx" (tiles), "avx512_bf16" (vector dot products), "reference"
// (plain C++, for tests), or "auto": the tiles where they run, else the vector kernel.
std::string bf16_linear_isa(const std::string& isa) {
  // Asked on every call of every layer: the CPU's answer is read once.
  static const bool amx = qd_amx::supported(), avx = qd_bf16v::supported();
  if (isa == "auto" || isa.empty()) {
    if (amx) return "amx";
    if (avx) return "avx512_bf16";
    throw std::invalid_argument("this CPU multiplies bf16 neither on AMX tiles nor with AVX-512 BF16");
  }
  if (isa == "amx" && !amx) throw std::invalid_argument("this CPU (or its kernel) does not offer AMX tiles");
  if (isa == "avx512_bf16" && !avx) throw std::invalid_argument("this CPU has no AVX-512 BF16 instructions");
  if (isa != "amx" && isa != "avx512_bf16" && isa != "reference")
    throw std::invalid_argument("unknown bf16 kernel: " + isa);
  return isa;
}

void linear_bf16(uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, int64_t M, int64_t N, int64_t K, int threads,
                 const std::string& isa) {
  if (M < 0 || N <= 0 || K <= 0) throw std::invalid_argument("negative or empty size");
  const std::string path = bf16_linear_isa(isa);
  if (M == 0) return;
  py::gil_scoped_release release;
  std::vector<uint16_t> rows;
  qd_amx::convert_rows(reinterpret_cast<const float*>(x), M, K, rows);
  const qd_amx::Problem p{rows.data(), reinterpret_cast<const uint16_t*>(w), reinterpret_cast<const float*>(b),
                          reinterpret_cast<float*>(y), M, qd_amx::Layout(N, K)};
  if (path == "reference") {
    qd::FpMode mode;
    qd_amx::reference(p);
  } else if (path == "amx") {
    split(p.layout.groups(), threads, [&](int64_t g0, int64_t g1) { qd_amx::range(p, g0, g1); });
  } else {
    split(p.layout.groups(), threads, [&](int64_t g0, int64_t g1) { qd_bf16v::range(p, g0, g1); });
  }
}

// ---------------------------------------------------------------- attention
void attention(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t mask, uintptr_t out, int64_t H, int64_t Hkv,
               int64_t Lq, int64_t Lk, int64_t D, int64_t k_head, int64_t k_tok, int64_t v_head, int64_t v_tok,
               int64_t mask_row, float scale, int threads, const std::string& isa) {
  if (H <= 0 || Hkv <= 0 || H % Hkv != 0) throw std::invalid_argument("query heads must be a multiple of kv heads");
  if (D <= 0 || D % 64 != 0) throw std::invalid_argument("head dimension must be a multiple of 64");
  if (Lq < 0 || Lk < 0) throw std::invalid_argument("negative length");
  // The attention kernel has the linear kernel's instruction sets (AVX-512, AVX2 with FMA, portable),
  // chosen and refused by the same table; AMX tiles are its own extra.
  std::string path = active_isa()->name;
  [[maybe_unused]] bool tiles = false, bf16 = false;
  if (isa == "amx") {
    if (!qd_attention::amx_attention_supported())
      throw std::invalid_argument("this CPU (or its kernel) cannot run the amx attention kernel");
    tiles = true;
  } else if (isa == "avx512_bf16") {
    if (!qd_attention::bf16_attention_supported())
      throw std::invalid_argument("this CPU cannot run the avx512_bf16 attention kernel (no AVX-512 BF16)");
    bf16 = true;
  } else {
    path = find_isa(isa)->name;
  }
  [[maybe_unused]] const bool avx512 = path == "avx512", avx2 = path == "avx2";  // x86 only
  const qd_attention::Problem a{reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
                                reinterpret_cast<const float*>(v), reinterpret_cast<const uint8_t*>(mask),
                                reinterpret_cast<float*>(out), H, Hkv, Lq, Lk, D, k_head, k_tok, v_head, v_tok,
                                mask_row, scale};
  if (Lq == 0) return;
  py::gil_scoped_release release;
  const qd_attention::Lists lists(a);
  // An item is one segment of one kv head's keys, for every query position: its K and V are read
  // once for all rows, and a long context gives every thread several items whatever the rows.
  const int64_t segments = lists.segments, items = Hkv * segments;
  std::vector<float> partial(static_cast<size_t>(H * Lq * segments * qd_attention::partial_stride(a)));
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
#pragma omp parallel num_threads(threads)
  {
    qd::FpMode mode;
    qd_attention::Scratch scratch;
#if defined(QD_X86) && defined(QD_AVX512_BF16)
    qd_attention::Bf16Scratch bf16_scratch;
#endif
#if defined(QD_X86) && defined(QD_AMX)
    qd_attention::TileScratch tile_scratch;
    if (tiles) qd_amx::configure(16);
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t g = item / segments, seg = item % segments;
#if defined(QD_X86) && defined(QD_AMX)
      if (tiles) {
        qd_attention::amx_segment(a, lists, g, seg, partial.data(), tile_scratch);
        continue;
      }
#endif
#if defined(QD_X86) && defined(QD_AVX512_BF16)
      if (bf16) {
        qd_attention::bf16_segment(a, lists, g, seg, partial.data(), bf16_scratch);
        continue;
      }
#endif
#ifdef QD_X86
      if (avx512) {
        qd_attention::avx512_segment(a, lists, g, seg, partial.data(), scratch);
        continue;
      }
      if (avx2) {
        qd_attention::avx2_segment(a, lists, g, seg, partial.data(), scratch);
        continue;
      }
#endif
      qd_attention::scalar_segment(a, lists, g, seg, partial.data(), scratch);
    }
#if defined(QD_X86) && defined(QD_AMX)
    if (tiles) qd_amx::release();
#endif
#pragma omp for schedule(static)
    for (int64_t row = 0; row < Lq * H; ++row) {
#ifdef QD_X86
      if (avx512) {
        qd_attention::avx512_merge_row(a, lists, partial.data(), row / H, row % H);
        continue;
      }
      if (avx2) {
        qd_attention::avx2_merge_row(a, lists, partial.data(), row / H, row % H);
        continue;
      }
#endif
      qd_attention::merge_row(a, lists, partial.data(), row / H, row % H);
    }
  }
}

// ---------------------------------------------------------------- prefill attention in bf16
bool prefill_attention_bf16_supported() {
  static const bool avx = qd_bf16v::supported();
  return avx;
}

bool prefill_attention_tiles_supported() {
#ifdef QD_PREFILL_AMX
  static const bool tiles = prefill_attention_bf16_supported() && qd_amx::supported();
  return tiles;
#else
  return false;
#endif
}

#ifdef QD_PREFILL_AMX
// The tile kernel (prefill_attention_amx.h): keys and values packed once, then items of 16 rows.
void prefill_attention_tiles(const qd_prefill::Problem& a, int threads) {
  using qd_prefill_amx::KC;
  const int64_t keys = qd_prefill_amx::padded_keys(a.Lk), per_head = keys * a.D, chunks = keys / KC;
  std::vector<uint16_t> kb(static_cast<size_t>(a.Hkv * per_head)), vt(static_cast<size_t>(a.Hkv * per_head));
  const int64_t rows_per_head = a.H / a.Hkv * a.Lq, groups = (rows_per_head + 15) / 16;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < a.Hkv * chunks; ++item) {
      const int64_t g = item / chunks, j0 = item % chunks * KC;
      qd_prefill_amx::pack_keys(a, g, j0, j0 + KC, kb.data() + g * per_head);
      qd_prefill_amx::pack_values(a, g, j0, j0 + KC, vt.data() + g * per_head);
    }
    qd_prefill_amx::configure();
    qd_prefill_amx::Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < a.Hkv * groups; ++item) {
      const int64_t g = item / groups, r0 = item % groups * 16;
      qd_prefill_amx::rows(a, g, r0, std::min<int64_t>(16, rows_per_head - r0), kb.data() + g * per_head,
                           vt.data() + g * per_head, scratch);
    }
    qd_amx::release();
  }
}
#endif

// The vdpbf16ps kernel (prefill_attention_bf16.h): keys and values packed once, then blocks of rows.
void prefill_attention_vectors(const qd_prefill::Problem& a, int threads) {
#ifdef QD_AVX512_BF16
  using qd_prefill::KC, qd_prefill::RB;
  const int64_t keys = qd_prefill::padded_keys(a.Lk), per_head = keys * a.D / 2, chunks = keys / KC;
  std::vector<uint32_t> kp(static_cast<size_t>(a.Hkv * per_head)), vp(static_cast<size_t>(a.Hkv * per_head));
  const int64_t rows_per_head = a.H / a.Hkv * a.Lq, blocks = (rows_per_head + RB - 1) / RB;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < a.Hkv * chunks; ++item) {
      const int64_t g = item / chunks, j0 = item % chunks * KC;
      qd_prefill::pack_keys(a, g, j0, j0 + KC, kp.data() + g * per_head);
      qd_prefill::pack_values(a, g, j0 / 2, (j0 + KC) / 2, vp.data() + g * per_head);
    }
    qd_prefill::Scratch scratch;
    scratch.fit(a.D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < a.Hkv * blocks; ++item) {
      const int64_t g = item / blocks, r0 = item % blocks * RB;
      qd_prefill::rows(a, g, r0, std::min(r0 + RB, rows_per_head), kp.data() + g * per_head,
                       vp.data() + g * per_head, scratch);
    }
  }
#endif
}

void prefill_attention_bf16(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, int64_t H,
                            int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t k_head, int64_t k_tok,
                            int64_t v_head, int64_t v_tok, float scale, int threads, bool tiles, int64_t causal) {
  if (!prefill_attention_bf16_supported()) throw std::invalid_argument("this CPU has no AVX-512 BF16 instructions");
  if (tiles && !prefill_attention_tiles_supported()) throw std::invalid_argument("this CPU has no AMX tiles");
  if (H <= 0 || Hkv <= 0 || H % Hkv != 0) throw std::invalid_argument("query heads must be a multiple of kv heads");
  if (D <= 0 || D % 64 != 0 || (tiles && D > 256))
    throw std::invalid_argument("head dimension must be a multiple of 64 (at most 256 on tiles)");
  if (Lq <= 0 || Lk <= 0) throw std::invalid_argument("no queries or no keys");
  if (causal < -1 || causal > Lk - Lq)
    throw std::invalid_argument("causal must be -1 or the cached keys before the chunk (at most k_len - q_len)");
  const qd_prefill::Problem a{reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
                              reinterpret_cast<const float*>(v), reinterpret_cast<float*>(out),
                              reinterpret_cast<float*>(lse), H, Hkv, Lq, Lk, D, k_head, k_tok, v_head, v_tok, scale,
                              causal};
  py::gil_scoped_release release;
#ifdef QD_PREFILL_AMX
  if (tiles) return prefill_attention_tiles(a, std::max(1, threads));
#endif
  prefill_attention_vectors(a, std::max(1, threads));
}

// The same AVX-512 BF16 instructions as the vdpbf16ps prefill attention.
bool act_mul_bf16_supported() { return prefill_attention_bf16_supported(); }

void act_mul_bf16(uintptr_t gate, uintptr_t up, uintptr_t out, int64_t rows, int64_t cols, int64_t gate_stride,
                  int64_t up_stride, int64_t out_stride, int act, int threads, const std::string& isa) {
  if (act != qd_actmul::SILU && act != qd_actmul::GELU_TANH)
    throw std::invalid_argument("act must be 0 (SiLU) or 1 (GELU, tanh form)");
  if (rows < 0 || cols < 0 || gate_stride < cols || up_stride < cols || out_stride < cols)
    throw std::invalid_argument("rows and columns must not be negative, and each stride must hold a row");
  if (isa != "auto" && isa != "reference") throw std::invalid_argument("isa must be auto or reference");
  if (isa == "auto" && !act_mul_bf16_supported()) throw std::invalid_argument("this CPU has no AVX-512 BF16 instructions");
  const qd_actmul::Problem p{reinterpret_cast<const uint16_t*>(gate), reinterpret_cast<const uint16_t*>(up),
                             reinterpret_cast<uint16_t*>(out), rows, cols, gate_stride, up_stride, out_stride, act};
  py::gil_scoped_release release;
  qd_actmul::run(p, std::max(1, threads), isa == "auto");
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "Batch-invariant fp32 linear kernel for CPU verification passes";
  m.def("linear", &linear, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("m"), py::arg("n"),
        py::arg("k"), py::arg("threads") = 1, py::arg("isa") = "auto",
        "y[m, n] = x[m, :] . w[n, :] (+ b[n]) on contiguous fp32 buffers given by address (b = 0: no bias)");
  m.def("linear_quant", &linear_quant, py::arg("x"), py::arg("qs"), py::arg("d"), py::arg("m"), py::arg("b"),
        py::arg("y"), py::arg("m_rows"), py::arg("n"), py::arg("k"), py::arg("format"), py::arg("threads") = 1,
        py::arg("isa") = "auto",
        "linear() with the weight held as GGUF blocks (format 1: Q4_1, qs [n, k/32, 16] nibbles, d and m "
        "[n, k/32] fp32; 2: Q8_0, qs [n, k] int8, d [n, k/32]); bit for bit linear() on the weights they expand to");
  m.def("amx_supported", [] { return qd_amx::supported(); }, "whether this CPU and kernel run AMX bf16 tiles");
  m.def("packed_bf16_elements", &packed_bf16_elements, py::arg("n"), py::arg("k"),
        "bf16 elements pack_bf16 writes for an [n, k] weight");
  m.def("pack_bf16", &pack_bf16, py::arg("w"), py::arg("out"), py::arg("n"), py::arg("k"),
        "an [n, k] fp32 weight into linear_bf16's packed bf16 layout, buffers given by address");
  m.def("linear_bf16", &linear_bf16, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("m"),
        py::arg("n"), py::arg("k"), py::arg("threads") = 1, py::arg("isa") = "auto",
        "y[m, n] = bf16(x[m, :]) . w[n, :] (+ b[n]) accumulated in fp32, w packed by pack_bf16: isa 'amx' (tiles), "
        "'avx512_bf16' (vector dot products), 'reference' (plain C++, for tests) or 'auto' (the first two in "
        "that order, where they run)");
  m.def("bf16_linear_isa", &bf16_linear_isa, py::arg("isa") = "auto",
        "the bf16 linear kernel linear_bf16(isa) runs here (ValueError where it cannot)");
  m.def("isa", [] { return std::string(active_isa()->name); }, "the kernel this CPU runs by default");
  m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("out"),
        py::arg("heads"), py::arg("kv_heads"), py::arg("q_len"), py::arg("k_len"), py::arg("head_dim"),
        py::arg("k_head_stride"), py::arg("k_token_stride"), py::arg("v_head_stride"), py::arg("v_token_stride"),
        py::arg("mask_row_stride"), py::arg("scale"), py::arg("threads") = 1, py::arg("isa") = "auto",
        "softmax(q k^T * scale, over the keys the uint8 mask shows) v, one row independent of the others; "
        "q [heads, q_len, head_dim] and out [q_len, heads, head_dim] contiguous fp32, strides in elements");
  m.def("attention_isa", [] { return std::string(active_isa()->name); },
        "the attention kernel this CPU runs by default (the linear kernel's: isa())");
  m.def("bf16_attention_supported", [] { return qd_attention::bf16_attention_supported(); },
        "whether attention(isa='avx512_bf16') runs here (vdpbf16ps; not bitwise the fp32 or tile kernels)");
  m.def("amx_attention_supported", [] { return qd_attention::amx_attention_supported(); },
        "whether attention(isa='amx') runs here (bf16 tiles; not bitwise the fp32 kernels)");
  m.def("prefill_attention_bf16", &prefill_attention_bf16, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("heads"), py::arg("kv_heads"), py::arg("q_len"), py::arg("k_len"),
        py::arg("head_dim"), py::arg("k_head_stride"), py::arg("k_token_stride"), py::arg("v_head_stride"),
        py::arg("v_token_stride"), py::arg("scale"), py::arg("threads") = 1, py::arg("tiles") = false,
        py::arg("causal") = -1,
        "softmax(q k^T * scale) v over every key, products in bf16 (AVX-512 BF16, or AMX tiles with tiles), "
        "for a prefill chunk's cached prefix; with causal = P >= 0, query position i sees keys "
        "0 .. P + i (the keys hold the chunk after P cached ones); q and out [heads, q_len, head_dim], lse "
        "[heads, q_len] contiguous fp32");
  m.def("prefill_attention_bf16_supported", &prefill_attention_bf16_supported,
        "whether prefill_attention_bf16 runs here (AVX-512 BF16)");
  m.def("prefill_attention_tiles_supported", &prefill_attention_tiles_supported,
        "whether prefill_attention_bf16(tiles=True) runs here (AMX tiles)");
  m.def("act_mul_bf16", &act_mul_bf16, py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("rows"),
        py::arg("cols"), py::arg("gate_stride"), py::arg("up_stride"), py::arg("out_stride"), py::arg("act"),
        py::arg("threads"), py::arg("isa") = "auto",
        "out = act(gate) * up over bf16 rows (act 0: SiLU, 1: GELU in tanh form), computed in fp32 and rounded "
        "once to bf16; isa: auto (AVX-512 BF16) or reference (plain C++)");
  m.def("act_mul_bf16_supported", &act_mul_bf16_supported, "whether act_mul_bf16 runs here (AVX-512 BF16)");
  m.def("supported_isas", [] {
    py::list out;
    for (int i = 0; i < ISA_COUNT; ++i)
      if (isas()[i].supported) out.append(isas()[i].name);
    return out;
  });
}
