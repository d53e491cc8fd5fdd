// Batch-invariant bf16 linear layer with AVX-512 BF16 (vdpbf16ps), for CPUs that multiply bf16
// in vector registers but have no AMX tiles (AMD Zen 4 and later, Intel Cooper Lake).
//
// y[m, n] = sum_k bf16(x[m, k]) * bf16(w[n, k]) (+ b[n]), accumulated in fp32, on the weights
// packed for the AMX kernel (amx_linear.h): a packed tile's row i holds, for its 16 features,
// the pair (k = 2i, 2i + 1) of each, which is vdpbf16ps's layout for 16 lanes of features. So
// one lane per feature takes, for each 32-k chunk in order and each of its 16 pairs in order,
// acc = vdpbf16ps(acc, x pair broadcast, w pair): a fixed sequence for every row, whatever the
// call's other rows, its row count, the tile a row falls in or the thread computing it. The
// values are not the AMX kernel's (its instruction rounds inside a step its own way), so a worker
// uses one bf16 kernel for all its verification passes, as it does with the fp32 kernel.
//
// Cost: a pass streams half the fp32 kernel's bytes, and each 64-byte weight row loaded feeds
// one vdpbf16ps (32 products) per row of the pass.

#pragma once

#include "amx_linear.h"
#include "reduce.h"

#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10)
#define QD_AVX512_BF16 1
#endif

namespace qd_bf16v {

constexpr int RT = 4;  // rows per register tile: RT x GROUP accumulators, GROUP weight rows
constexpr int64_t PREFETCH = 16384;  // bf16 elements ahead of the weight stream (32 KB)

#ifdef QD_AVX512_BF16
inline bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// Rows [m0, m0 + R) against feature group g (W blocks of 16 features).
template <int R, int W>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void group(const qd_amx::Problem& p, int64_t m0,
                                                                            int64_t g) {
  using namespace qd_amx;
  const Layout& l = p.layout;
  const int64_t xstride = l.chunks * KC;  // bf16 elements per converted row
  __m512 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < W; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint16_t* w = p.w + l.offset(g, 0, 0);
  for (int64_t c = 0; c < l.chunks; ++c, w += W * TILE) {
    const uint16_t* x = p.x + m0 * xstride + c * KC;
    // Tile by tile, so the group's weights (laid out chunk by chunk, tile by tile) are read in
    // address order: taken a pair of every tile at a time, the four 1 KB-apart streams kept the
    // prefetchers from running ahead (out of cache, 8 rows streamed 12-13 GB/s on two Zen 4
    // cores, now 19-21). Each accumulator still takes its pairs in the same order.
    for (int t = 0; t < W; ++t) {
      for (int i = 0; i < KC / 2; ++i) {
        // One or two rows give a weight line too little work for enough loads to be in flight:
        // fetched into L2 32 KB ahead, one row streams 27-33 GB/s instead of 17-19 (two Zen 4 cores,
        // a 49152 x 576 weight), a plain decoding pass about 4 ms less. At four rows the lines
        // keep the core busy and the extra requests only compete (8 rows in cache: half speed).
        if constexpr (R <= 2)
          _mm_prefetch(reinterpret_cast<const char*>(w + t * TILE + i * 2 * NC + PREFETCH), _MM_HINT_T1);
        const __m512bh b = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(w + t * TILE + i * 2 * NC));
        for (int r = 0; r < R; ++r) {
          int32_t pair;
          std::memcpy(&pair, x + r * xstride + 2 * i, sizeof pair);
          acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)_mm512_set1_epi32(pair), b);
        }
      }
    }
  }
  for (int t = 0; t < W; ++t) {
    const int64_t n0 = (g * GROUP + t) * NC, count = std::min<int64_t>(NC, l.N - n0);
    const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
    const __m512 bias = p.b ? _mm512_maskz_loadu_ps(mask, p.b + n0) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 out = p.b ? _mm512_add_ps(acc[r][t], bias) : acc[r][t];
      _mm512_mask_storeu_ps(p.y + (m0 + r) * l.N + n0, mask, out);
    }
  }
}

template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void rows(const qd_amx::Problem& p, int64_t m0,
                                                                           int64_t g) {
  switch (p.layout.width(g)) {
    case 4: group<R, 4>(p, m0, g); break;
    case 3: group<R, 3>(p, m0, g); break;
    case 2: group<R, 2>(p, m0, g); break;
    default: group<R, 1>(p, m0, g); break;
  }
}

// Feature groups [g0, g1) for every row; called once per thread. Each group's packed weights
// (GROUP x 1 KB per 32 k) stay in L2 while the row tiles pass over them.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void range(const qd_amx::Problem& p,
                                                                                   int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    qd::in_groups<RT>(p.M, [&](auto R, int64_t m) { rows<R()>(p, m, g); });
  }
}
#else
inline bool supported() { return false; }
inline void range(const qd_amx::Problem&, int64_t, int64_t) {}
#endif

}  // namespace qd_bf16v
