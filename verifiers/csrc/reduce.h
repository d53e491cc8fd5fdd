// The fixed reductions shared by the kernels: 16 lanes summed by one tree,
// s8[i] = l[i] + l[i + 8], s4[i] = s8[i] + s8[i + 4], s2[i] = s4[i] + s4[i + 2],
// s2[0] + s2[1], whether the lanes sit in an array, a 512-bit register or four; and the small
// pieces the kernels share around them (the FP mode, AVX2 lane masks, row groups).

#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QD_X86 1
#endif

namespace qd {

// The IEEE floating-point mode (round to nearest, no flush-to-zero, no denormals-are-zero)
// for the life of the guard, on this thread: a pool thread that some library left in FTZ/DAZ
// mode must not round a row differently from the thread that computed it last time.
class FpMode {
 public:
#ifdef QD_X86
  FpMode() : saved_(_mm_getcsr()) { _mm_setcsr(0x1F80); }
  ~FpMode() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

inline float tree16(const float* l) {
  float s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; ++i) s8[i] = l[i] + l[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  for (int i = 0; i < 2; ++i) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}

// f(R, r) for rows [r, r + R) of n rows, in groups of G and then one smaller group, R passed as a
// std::integral_constant so each group size runs its own compiled tile.
template <int R, typename F>
inline void last_group(int64_t left, int64_t r, F& f) {
  if constexpr (R > 0) {
    if (left == R) f(std::integral_constant<int, R>{}, r);
    else last_group<R - 1>(left, r, f);
  }
}

template <int G, typename F>
inline void in_groups(int64_t n, F&& f) {
  int64_t r = 0;
  for (; r + G <= n; r += G) f(std::integral_constant<int, G>{}, r);
  last_group<G - 1>(n - r, r, f);
}

#ifdef QD_X86
// Lanes [lo, lo + 8) of a 16-lane chunk that holds `valid` elements: a mask with the sign bit set
// in the lanes to load (masked lanes read as zero).
__attribute__((target("avx2,fma"))) inline __m256i avx2_mask(int64_t valid, int lo) {
  const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(lo), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), lane);
}

// The tree for one accumulator.
__attribute__((target("avx512f"))) inline float avx512_tree(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// The same tree for four accumulators at once: each output takes the same additions in the same
// order as avx512_tree; only the shuffles that line the lanes up differ.
__attribute__((target("avx512f"))) inline __m128 avx512_tree4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // s8: 128-bit quarters [a0 a1 b0 b1] + [a2 a3 b2 b3] -> [a.s8 | b.s8]
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // s4: [a.s8 lo4, b.s8 lo4, c.s8 lo4, d.s8 lo4] + the hi4 halves: one s4 per quarter
  const __m512 s4 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  // s2, then s1, inside each quarter
  const __m512 s2 = _mm512_add_ps(s4, _mm512_permute_ps(s4, 0x4E));
  const __m512 s1 = _mm512_add_ps(s2, _mm512_permute_ps(s2, 0xB1));
  const __m512i first_of_quarter = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(first_of_quarter, s1));
}

#endif

}  // namespace qd
