// The middle of a bf16 prefill chunk's MLP: h = act(gate) * up, read from bf16 and written as bf16
// (rounded once, to nearest even), for a down projection that multiplies in bf16 anyway.
//
// In torch the same step took five passes over the chunk's activations (gate and up cast to fp32,
// the activation, the product, the cast back), about as long as the MLP's three matrix products.
// Here it is one pass: each element read once from each input, computed in fp32 registers.
//
// Both activations are x * sigmoid(z): SiLU with z = x, the tanh form of GELU with
// z = 2 sqrt(2/pi) (x + 0.044715 x^3) (0.5 (1 + tanh(y)) = sigmoid(2y)). The exponential is a
// degree-4 polynomial in base 2 (exp2_avx512.h; relative error 6e-6, far under bf16's 2^-9), so an element
// may differ from torch's fp32 activation by one bf16 step where the exact value lies on a rounding
// boundary. Prefill is the same pass with speculation on and off, so this changes no comparison.

#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16_linear_avx512.h"  // QD_AVX512_BF16, qd_bf16v::supported(): the same instructions
#include "exp2_avx512.h"

namespace qd_actmul {

enum Act : int { SILU = 0, GELU_TANH = 1 };

constexpr float GELU_K = 1.5957691216057308f;  // 2 sqrt(2 / pi)
constexpr float GELU_C = 0.044715f;

struct Problem {
  const uint16_t* gate;
  const uint16_t* up;
  uint16_t* out;
  int64_t rows, cols;
  int64_t gate_stride, up_stride, out_stride;  // elements between rows
  int act;
};

inline float from_bf16(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as vcvtneps2bf16 and torch do
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // a quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

// The definition, in plain C++ (tests compare the vector path with it).
inline void reference_row(const Problem& p, int64_t r) {
  const uint16_t* g = p.gate + r * p.gate_stride;
  const uint16_t* u = p.up + r * p.up_stride;
  uint16_t* o = p.out + r * p.out_stride;
  for (int64_t j = 0; j < p.cols; ++j) {
    const float x = from_bf16(g[j]);
    const float z = p.act == SILU ? x : GELU_K * (x + GELU_C * x * x * x);
    o[j] = to_bf16(x / (1.0f + std::exp(-z)) * from_bf16(u[j]));
  }
}

#ifdef QD_AVX512_BF16
#define QD_ACTMUL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

QD_ACTMUL_TARGET inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 2^t, with t clamped first: an infinite t (GELU's cube of a huge input) would make exp2_vec's fraction
// NaN; at +-150 it gives infinity and 0, so x sigmoid(z) tends to 0 and to x as it should (a NaN input
// reaches the result through x).
QD_ACTMUL_TARGET inline __m512 exp2_clamped(__m512 t) {
  return qd_vec::exp2_vec(_mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(150.0f)), _mm512_set1_ps(-150.0f)));
}

QD_ACTMUL_TARGET inline void vector_row(const Problem& p, int64_t r) {
  const uint16_t* g = p.gate + r * p.gate_stride;
  const uint16_t* u = p.up + r * p.up_stride;
  uint16_t* o = p.out + r * p.out_stride;
  const __m512 minus_log2e = _mm512_set1_ps(-1.4426950408889634f);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < p.cols; j += 16) {
    const __mmask16 m = p.cols - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (p.cols - j)) - 1);
    const __m512 x = load_bf16(g + j, m);
    __m512 z = x;
    if (p.act == GELU_TANH) {
      const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
      z = _mm512_mul_ps(_mm512_set1_ps(GELU_K), _mm512_fmadd_ps(_mm512_set1_ps(GELU_C), x3, x));
    }
    const __m512 e = exp2_clamped(_mm512_mul_ps(z, minus_log2e));  // exp(-z)
    const __m512 h = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), load_bf16(u + j, m));
    _mm256_mask_storeu_epi16(o + j, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(h)));
  }
}
#endif

// Rows split among threads; an element's value does not depend on the split.
inline void run(const Problem& p, int threads, bool vector) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
#ifdef QD_AVX512_BF16
    if (vector) {
      vector_row(p, r);
      continue;
    }
#endif
    reference_row(p, r);
  }
}

}  // namespace qd_actmul
