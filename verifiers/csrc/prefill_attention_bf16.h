// Prefill attention over the cached prefix in bf16 with AVX-512 BF16 (vdpbf16ps), for CPUs that
// multiply bf16 in vector registers but have no AMX tiles (AMD Zen 4 and later).
//
// A prefill chunk of Lq new positions attends to every cached key and, with a causal limit
// (Problem::causal), to its own keys up to its position, so one call computes the chunk's attention. For
// each query head h and position i this computes
//   s_j = scale * dot(bf16(q), bf16(k_j))        pairs of dimensions by vdpbf16ps, fp32 sums
//   out = sum_j softmax(s)_j * v_j                 weights rounded to bf16, v_j in bf16, fp32 sums
//   lse = log(sum_j exp(s_j))                      natural log, as torch's flash kernel returns it
// flash style: keys in chunks of KC with a running maximum, rows in blocks, so scores never leave
// the caches. Inputs are rounded to bf16 as torch's bf16 flash attention rounds them; it is not a
// verification kernel (prefill is the same computation with speculation on and off, and a session
// that is rebuilt prefills the same chunks again), so it need not be batch-invariant.
//
// Why not torch: on these CPUs its bf16 flash attention is slower than its fp32 one, which runs
// the FMA units; vdpbf16ps takes twice the products per instruction.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attention.h"
#include "bf16_linear_avx512.h"

namespace qd_prefill {

struct Problem {
  const float* q;  // [H, Lq, D] contiguous
  const float* k;  // kv head g, key j at k + g * k_head + j * k_tok (D contiguous floats)
  const float* v;
  float* out;      // [H, Lq, D] contiguous
  float* lse;      // [H, Lq]
  int64_t H, Hkv, Lq, Lk, D;
  int64_t k_head, k_tok, v_head, v_tok;
  float scale;
  int64_t causal = -1;  // >= 0: the row at position p sees keys 0 .. causal + p only
};

constexpr int64_t KC = 128;  // keys per chunk: a multiple of 64 (four blocks of 16 per score step)
constexpr int64_t RB = 32;   // query rows per item

inline int64_t padded_keys(int64_t Lk) { return (Lk + KC - 1) / KC * KC; }

#ifdef QD_AVX512_BF16

#define QD_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Keys [j0, j1) of kv head g, packed for the score products: block of 16 keys b, dimension pair p
// at kp + (b * D / 2 + p) * 16, lane = key in the block. Keys past Lk are zero (masked later).
QD_BF16_TARGET inline void pack_keys(const Problem& a, int64_t g, int64_t j0, int64_t j1, uint32_t* kp) {
  const int64_t D = a.D, half = D / 2;
  for (int64_t j = j0; j < j1; ++j) {
    uint32_t* dst = kp + (j / 16) * half * 16 + j % 16;
    if (j >= a.Lk) {
      for (int64_t p = 0; p < half; ++p) dst[p * 16] = 0;
      continue;
    }
    const float* k = a.k + g * a.k_head + j * a.k_tok;
    for (int64_t d = 0; d < D; d += 32) {
      alignas(64) uint32_t pairs[16];
      _mm512_store_si512(pairs, reinterpret_cast<__m512i>(
          _mm512_cvtne2ps_pbh(_mm512_loadu_ps(k + d + 16), _mm512_loadu_ps(k + d))));
      for (int i = 0; i < 16; ++i) dst[(d / 2 + i) * 16] = pairs[i];
    }
  }
}

// Values of key pairs [t0, t1) (keys 2t, 2t + 1) of kv head g, packed for the weighted sums: pair t,
// 16 dimensions from 16c at vp + (t * D / 16 + c) * 16, lane i = (v_2t[16c + i], v_2t+1[16c + i]).
QD_BF16_TARGET inline void pack_values(const Problem& a, int64_t g, int64_t t0, int64_t t1, uint32_t* vp) {
  const int64_t D = a.D;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j = 2 * t;
    const float* v0 = j < a.Lk ? a.v + g * a.v_head + j * a.v_tok : nullptr;
    const float* v1 = j + 1 < a.Lk ? a.v + g * a.v_head + (j + 1) * a.v_tok : nullptr;
    for (int64_t c = 0; c < D / 16; ++c) {
      const __m512 x0 = v0 ? _mm512_loadu_ps(v0 + 16 * c) : zero;
      const __m512 x1 = v1 ? _mm512_loadu_ps(v1 + 16 * c) : zero;
      // bf16 of x0 in the low half of each 32-bit lane, of x1 in the high half: interleave the
      // two rounded vectors lane by lane.
      const __m256i b0 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x0));
      const __m256i b1 = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x1));
      const __m512i w0 = _mm512_cvtepu16_epi32(b0), w1 = _mm512_cvtepu16_epi32(b1);
      _mm512_storeu_si512(vp + (t * D / 16 + c) * 16, _mm512_or_si512(w0, _mm512_slli_epi32(w1, 16)));
    }
  }
}

struct Scratch {
  std::vector<uint32_t> qb;  // [RB][D / 2]: the rows' queries as bf16 pairs
  std::vector<float> s;      // [RB][KC]: one chunk's scores
  std::vector<uint16_t> pb;  // [RB][KC]: their softmax weights in bf16
  std::vector<float> o, m, l;
  std::vector<int64_t> last;  // [RB]: the last key each row sees
  void fit(int64_t D) {
    qb.resize(static_cast<size_t>(RB * D / 2));
    s.resize(static_cast<size_t>(RB * KC));
    pb.resize(static_cast<size_t>(RB * KC));
    o.resize(static_cast<size_t>(RB * D));
    m.resize(RB);
    l.resize(RB);
    last.resize(RB);
  }
};

// Scores of R rows (from row r) against the 4 key blocks from b0: s[r][16 * (b - b0) + lane].
template <int R>
QD_BF16_TARGET inline void score_tile(const uint32_t* qb, int64_t half, const uint32_t* kp, int64_t b0, float* s) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 4; ++b) acc[r][b] = _mm512_setzero_ps();
  const uint32_t* k = kp + b0 * half * 16;
  for (int64_t p = 0; p < half; ++p) {
    __m512bh kb[4];
    for (int b = 0; b < 4; ++b) kb[b] = (__m512bh)_mm512_loadu_si512(k + (b * half + p) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(qb[r * half + p]));
      for (int b = 0; b < 4; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], qv, kb[b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 4; ++b) _mm512_storeu_ps(s + r * KC + b * 16, acc[r][b]);
}

// o[r] += sum over the chunk's key pairs of the weights' pair times the values' pair, R rows, the
// 64 dimensions from d0.
template <int R>
QD_BF16_TARGET inline void value_tile(const uint16_t* pb, const uint32_t* vp, int64_t D, int64_t d0, int64_t pairs,
                                      float* o) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(o + r * D + d0 + 16 * c);
  const int64_t per_pair = D / 16;
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh vb[4];
    for (int c = 0; c < 4; ++c)
      vb[c] = (__m512bh)_mm512_loadu_si512(vp + (t * per_pair + d0 / 16 + c) * 16);
    for (int r = 0; r < R; ++r) {
      int32_t w;
      std::memcpy(&w, pb + r * KC + 2 * t, sizeof w);
      const __m512bh wv = (__m512bh)_mm512_set1_epi32(w);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv, vb[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * D + d0 + 16 * c, acc[r][c]);
}

// Rows [r0, r1) of kv head g's rows (its query heads' positions, head-major: row r is query head
// g * n_rep + r / Lq at position r % Lq, which is also its row of q and out).
QD_BF16_TARGET inline void rows(const Problem& a, int64_t g, int64_t r0, int64_t r1, const uint32_t* kp,
                                const uint32_t* vp, Scratch& sc) {
  const int64_t D = a.D, half = D / 2, n = r1 - r0, n_rep = a.H / a.Hkv;
  const int64_t base = g * n_rep * a.Lq + r0;  // row index into q, out and lse
  for (int64_t r = 0; r < n; ++r) {
    const float* q = a.q + (base + r) * D;
    for (int64_t d = 0; d < D; d += 32)
      _mm512_storeu_si512(sc.qb.data() + r * half + d / 2, reinterpret_cast<__m512i>(
          _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + d + 16), _mm512_loadu_ps(q + d))));
  }
  std::fill(sc.o.begin(), sc.o.begin() + n * D, 0.0f);
  std::fill(sc.m.begin(), sc.m.begin() + n, -std::numeric_limits<float>::infinity());
  std::fill(sc.l.begin(), sc.l.begin() + n, 0.0f);
  const __m512 scale = _mm512_set1_ps(a.scale);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  // The last key each row sees: every key, or with a causal limit the cached ones and the chunk's up to the
  // row's own position; the block stops after its rows' last.
  int64_t end = 0;
  for (int64_t r = 0; r < n; ++r) {
    sc.last[r] = a.causal < 0 ? a.Lk - 1 : std::min(a.Lk - 1, a.causal + (base + r) % a.Lq);
    end = std::max(end, sc.last[r] + 1);
  }
  for (int64_t j0 = 0; j0 < end; j0 += KC) {
    const int64_t live = std::min(KC, end - j0);
    for (int64_t b0 = 0; b0 < KC / 16; b0 += 4)
      qd::in_groups<4>(n, [&](auto R, int64_t r) {
        score_tile<R()>(sc.qb.data() + r * half, half, kp, j0 / 16 + b0, sc.s.data() + r * KC + b0 * 16);
      });
    for (int64_t r = 0; r < n; ++r) {
      float* s = sc.s.data() + r * KC;
      const int64_t seen = std::clamp<int64_t>(sc.last[r] - j0 + 1, 0, live);  // this row's keys in the chunk
      __m512 top = minus_inf;
      for (int64_t t = 0; t < KC; t += 16) {
        const __mmask16 in = t + 16 <= seen ? static_cast<__mmask16>(0xFFFF)
                             : t >= seen   ? static_cast<__mmask16>(0)
                                           : static_cast<__mmask16>((1u << (seen - t)) - 1u);
        const __m512 x = _mm512_mask_mov_ps(minus_inf, in, _mm512_mul_ps(_mm512_loadu_ps(s + t), scale));
        _mm512_storeu_ps(s + t, x);
        top = _mm512_max_ps(top, x);
      }
      const float m_new = std::max(sc.m[r], _mm512_reduce_max_ps(top));
      const float alpha = sc.m[r] == -std::numeric_limits<float>::infinity()
                              ? 0.0f : qd_attention::exp16(sc.m[r] - m_new);
      sc.m[r] = m_new;
      const __m512 mb = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < KC; t += 32) {
        const __m512 e0 = qd_attention::avx512_exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), mb));
        const __m512 e1 = qd_attention::avx512_exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t + 16), mb));
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        _mm512_storeu_si512(sc.pb.data() + r * KC + t, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
      }
      sc.l[r] = sc.l[r] * alpha + _mm512_reduce_add_ps(sum);
      if (alpha != 1.0f) {
        const __m512 al = _mm512_set1_ps(alpha);
        float* o = sc.o.data() + r * D;
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), al));
      }
    }
    const uint32_t* vchunk = vp + (j0 / 2) * (D / 16) * 16;
    const int64_t pairs = (live + 1) / 2;
    for (int64_t d0 = 0; d0 < D; d0 += 64)
      qd::in_groups<4>(n, [&](auto R, int64_t r) {
        value_tile<R()>(sc.pb.data() + r * KC, vchunk, D, d0, pairs, sc.o.data() + r * D);
      });
  }
  for (int64_t r = 0; r < n; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / sc.l[r]);
    float* out = a.out + (base + r) * D;
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_loadu_ps(sc.o.data() + r * D + d), inv));
    a.lse[base + r] = sc.m[r] + std::log(sc.l[r]);
  }
}

#undef QD_BF16_TARGET

#endif  // QD_AVX512_BF16

}  // namespace qd_prefill
