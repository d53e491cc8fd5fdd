// Batch-invariant attention with AVX-512 BF16 (vdpbf16ps), for CPUs that multiply bf16 in vector
// registers but have no AMX tiles (AMD Zen 4 and later): the segment structure of attention.h,
// with the two products taken in bf16 pairs, twice the products per instruction of the fp32
// kernel. A verification pass's draft rows are compute-bound there (at a 4K context each row
// costs the fp32 kernel about 55 µs a layer on two Zen 4 cores), so they cost about two thirds
// (the softmax and the packing stay).
//
// Definition, for query row q (as attention.h, with these changes):
//   s_t = dotbf(q, k_j) * scale   acc = +0, then for each pair of dimensions (2i, 2i + 1) in
//                                 increasing i: acc = vdpbf16ps(acc, bf16 pair of q, bf16 pair of k_j)
//   p_t, m_s, l_s                 fp32, as attention.h
//   o_s[d]                        from +0, for each pair of the row's keys (t, t + 1) with t - t0
//                                 even, counted in the row's own keys from the segment's start, in
//                                 increasing t: o = vdpbf16ps(o, (bf16 p_t, bf16 p_t+1),
//                                 (bf16 v_t[d], bf16 v_t+1[d])); past the row's last key p = v = 0
// Every element takes that fixed sequence whatever else is in the call: a score lane belongs to
// one key and a sum lane to one dimension of one row, and a pair's keys come from the cache
// directly (the shared context, packed once for every row) or gathered for one position (a
// draft's own keys) with the same values in the same slots. Not bitwise attention.h or
// attention_amx.h (inputs are rounded to bf16, and each instruction rounds inside a step its own
// way): a worker uses one kernel for all its passes.

#pragma once

#include "attention.h"
#include "bf16_linear_avx512.h"

namespace qd_attention {

#if defined(QD_X86) && defined(QD_AVX512_BF16)

#define QD_BF16_ATTENTION_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Scratch of one worker thread for one item (a segment of one kv head, every row of the call).
struct Bf16Scratch {
  static constexpr int64_t STRIDE = SEGMENT + 32;  // room to round a row's weights up to whole vectors
  std::vector<uint32_t> qb;  // [rows][D / 2]: queries as bf16 pairs of dimensions
  std::vector<uint32_t> kp;  // [SEGMENT / 16 blocks][D / 2][16 keys]: keys as bf16 pairs, by block
  std::vector<float> p;      // [rows][STRIDE]: scores, then fp32 softmax weights (t - t0)
  std::vector<uint16_t> pb;  // [rows][STRIDE]: the weights in bf16, zero past the row's last key
  std::vector<uint32_t> vp;  // [SEGMENT / 2 pairs][D / 16][16 dims]: values as bf16 pairs of keys
  std::vector<float> o;      // [rows][D]: value sums
  std::vector<float> l, m;
  void fit(int64_t rows, int64_t D) {
    qb.resize(static_cast<size_t>(rows * D / 2));
    kp.resize(static_cast<size_t>(SEGMENT / 16 * D / 2 * 16));
    p.resize(static_cast<size_t>(rows * STRIDE));
    pb.resize(static_cast<size_t>(rows * STRIDE));
    vp.resize(static_cast<size_t>(SEGMENT / 2 * D));
    o.assign(static_cast<size_t>(rows * D), 0.0f);
    l.resize(static_cast<size_t>(rows));
    m.resize(static_cast<size_t>(rows));
  }
};

// 32 floats from x as 16 bf16 pairs (x[2i] in the low half of unit i), rounded to nearest even.
QD_BF16_ATTENTION_TARGET inline __m512i bf16_pairs(const float* x) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x)));
}

// Keys keys[0..n) (n <= 16) of kv head g as one block: pair i of key j at dst[i * 16 + j], zero
// past n. With `ahead`, the keys run on in the cache (the shared context): the block two ahead is
// fetched meanwhile, as a single row's pass is bound by reading the cache. (The address is formed
// as an integer: it may lie past the cache's end, where a prefetch does nothing.)
QD_BF16_ATTENTION_TARGET inline void pack_key_block(const Problem& a, int64_t g, const int32_t* keys, int64_t n,
                                                    uint32_t* dst, bool ahead) {
  const float* k = a.k + g * a.k_head;
  if (ahead) {
    const uintptr_t next = reinterpret_cast<uintptr_t>(k) + static_cast<uintptr_t>((keys[0] + 32) * a.k_tok) * 4;
    for (int64_t j = 0; j < 16; ++j)
      for (int64_t d = 0; d < a.D; d += 16)
        _mm_prefetch(reinterpret_cast<const char*>(next + static_cast<uintptr_t>(j * a.k_tok + d) * 4), _MM_HINT_T0);
  }
  for (int64_t d = 0; d < a.D; d += 32) {
    __m512 r[16];
    for (int j = 0; j < 16; ++j)
      r[j] = j < n ? _mm512_castsi512_ps(bf16_pairs(k + keys[j] * a.k_tok + d)) : _mm512_setzero_ps();
    avx512_transpose16(r);  // r[i]: pair d / 2 + i of the 16 keys
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(dst + (d / 2 + i) * 16), r[i]);
  }
}

// Scores of R rows (queries at qb, D / 2 pairs each) against B blocks of packed keys (n live keys
// from the first block's first lane), times the scale, into the rows' score lines at p.
template <int R, int B>
QD_BF16_ATTENTION_TARGET void bf16_score_tile(const uint32_t* qb, int64_t half, const uint32_t* kp, int64_t n,
                                              float scale, float* p) {
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t i = 0; i < half; ++i) {
    __m512bh kb[B];
    for (int b = 0; b < B; ++b) kb[b] = (__m512bh)_mm512_loadu_si512(kp + (b * half + i) * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(qb[r * half + i]));
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], qv, kb[b]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int b = 0; b < B; ++b) {
    const int64_t live = std::clamp<int64_t>(n - 16 * b, 0, 16);
    const __mmask16 mask = live == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << live) - 1u);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(p + r * Bf16Scratch::STRIDE + 16 * b, mask, _mm512_mul_ps(acc[r][b], s));
  }
}

// Scores of rows [row0, row0 + rows) for n keys packed at kp, from column col of their lines:
// up to four blocks of keys and four rows a tile (sixteen chains).
inline void bf16_scores(const Problem& a, const uint32_t* kp, int64_t n, int64_t col, int64_t row0, int64_t rows,
                        Bf16Scratch& s) {
  const int64_t half = a.D / 2;
  qd::in_groups<4>((n + 15) / 16, [&](auto B, int64_t b) {
    qd::in_groups<4>(rows, [&](auto R, int64_t r) {
      bf16_score_tile<R(), B()>(s.qb.data() + (row0 + r) * half, half, kp + b * half * 16, n - 16 * b, a.scale,
                                s.p.data() + (row0 + r) * Bf16Scratch::STRIDE + col + 16 * b);
    });
  });
}

// Values of the key pairs [i0, i1) of a row's list (pair i: keys t0 + 2i, t0 + 2i + 1, each zero
// from end on) packed for the sums: pair i, dimensions 16c.. at dst[((i - i0) * D / 16 + c) * 16],
// lane d = (v_first[16c + d], v_second[16c + d]).
QD_BF16_ATTENTION_TARGET inline void pack_value_pairs(const Problem& a, int64_t g, const int32_t* keys, int64_t t0,
                                                      int64_t end, int64_t i0, int64_t i1, uint32_t* dst) {
  // cvtne2ps gives [first key's 16 dims | second key's 16 dims]; interleave them into pairs.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const float* v = a.v + a.v_head * g;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t t = t0 + 2 * i;
    const float* v0 = t < end ? v + keys[t] * a.v_tok : nullptr;
    const float* v1 = t + 1 < end ? v + keys[t + 1] * a.v_tok : nullptr;
    for (int64_t d = 0; d < a.D; d += 16) {
      const __m512 x0 = v0 ? _mm512_loadu_ps(v0 + d) : _mm512_setzero_ps();
      const __m512 x1 = v1 ? _mm512_loadu_ps(v1 + d) : _mm512_setzero_ps();
      const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0));
      _mm512_storeu_si512(dst + ((i - i0) * a.D / 16 + d / 16) * 16, _mm512_permutexvar_epi16(interleave, both));
    }
  }
}

// o[r] (R rows, 64 dimensions from d0) += the weights' pairs [0, pairs) at pb times the packed
// value pairs at vp.
template <int R>
QD_BF16_ATTENTION_TARGET void bf16_value_tile(const uint16_t* pb, const uint32_t* vp, int64_t D, int64_t d0,
                                              int64_t pairs, float* o) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(o + r * D + d0 + 16 * c);
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh vb[4];
    for (int c = 0; c < 4; ++c) vb[c] = (__m512bh)_mm512_loadu_si512(vp + (i * D / 16 + d0 / 16 + c) * 16);
    for (int r = 0; r < R; ++r) {
      int32_t w;
      std::memcpy(&w, pb + r * Bf16Scratch::STRIDE + 2 * i, sizeof w);
      const __m512bh wv = (__m512bh)_mm512_set1_epi32(w);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv, vb[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * D + d0 + 16 * c, acc[r][c]);
}

// Rows [row0, row0 + rows)'s sums over the packed pairs [i0, i1) (vp holds pair i0 first): a block
// of 64 pairs' 64 dimensions (16 KB) stays in L1 while every row takes it, in pair order.
inline void bf16_values(const Problem& a, const uint32_t* vp, int64_t i0, int64_t i1, int64_t row0, int64_t rows,
                        Bf16Scratch& s) {
  constexpr int64_t PAIR_BLOCK = 64;
  for (int64_t c0 = i0; c0 < i1; c0 += PAIR_BLOCK) {
    const int64_t pairs = std::min(PAIR_BLOCK, i1 - c0);
    for (int64_t d0 = 0; d0 < a.D; d0 += 64)
      qd::in_groups<4>(rows, [&](auto R, int64_t r) {
        bf16_value_tile<R()>(s.pb.data() + (row0 + r) * Bf16Scratch::STRIDE + 2 * c0, vp + (c0 - i0) * a.D, a.D, d0,
                             pairs, s.o.data() + (row0 + r) * a.D);
      });
  }
}

// A row's softmax weights (n of them, fp32 at p) in bf16 at dst, zero from n to the next 32.
QD_BF16_ATTENTION_TARGET inline void weights_to_bf16(const float* p, int64_t n, uint16_t* dst) {
  for (int64_t t = 0; t < n; t += 32) {
    const int64_t lo = std::clamp<int64_t>(n - t, 0, 16), hi = std::clamp<int64_t>(n - t - 16, 0, 16);
    const __mmask16 ml = lo == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << lo) - 1u);
    const __mmask16 mh = hi == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << hi) - 1u);
    _mm512_storeu_si512(dst + t, reinterpret_cast<__m512i>(
        _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mh, p + t + 16), _mm512_maskz_loadu_ps(ml, p + t))));
  }
}

QD_BF16_ATTENTION_TARGET inline void pack_queries_bf16(const Problem& a, const Item& it, Bf16Scratch& s) {
  const int64_t half = a.D / 2;
  for (int64_t row = 0; row < it.rows; ++row) {
    const float* q = it.q(a, row);
    for (int64_t d = 0; d < a.D; d += 32) _mm512_storeu_si512(s.qb.data() + row * half + d / 2, bf16_pairs(q + d));
  }
}

// One item: kv head g, segment seg, every position's n_rep query heads of g (rows position-major).
inline void bf16_segment(const Problem& a, const Lists& L, int64_t g, int64_t seg, float* partial, Bf16Scratch& s) {
  const int64_t n_rep = a.H / a.Hkv, D = a.D, half = D / 2, t0 = seg * SEGMENT, t1 = t0 + SEGMENT;
  const Item it{g, n_rep, n_rep * a.Lq, t0};
  s.fit(it.rows, D);
  pack_queries_bf16(a, it, s);
  const int32_t* ident = L.of(0, a.Lk);  // keys 0, 1, 2, ... where every position's list starts so
  // Shared keys: packed once, scored for every row.
  const int64_t shared_end = std::min(t1, L.shared), shared = std::max<int64_t>(0, shared_end - t0);
  for (int64_t b = 0; b * 16 < shared; ++b)
    pack_key_block(a, g, ident + t0 + 16 * b, std::min<int64_t>(16, shared - 16 * b), s.kp.data() + b * half * 16,
                   true);
  if (shared > 0) bf16_scores(a, s.kp.data(), shared, 0, 0, it.rows, s);
  // Each position's own keys in this segment, gathered, for its rows (up to 64 at a time).
  const int64_t own_start = t0 + shared;
  for (int64_t pos = 0; pos < a.Lq; ++pos) {
    const int32_t* keys = L.of(pos, a.Lk);
    const int64_t end = std::min(t1, L.counts[pos]);
    for (int64_t t = own_start; t < end; t += 64) {
      const int64_t n = std::min<int64_t>(64, end - t);
      for (int64_t b = 0; b * 16 < n; ++b)
        pack_key_block(a, g, keys + t + 16 * b, std::min<int64_t>(16, n - 16 * b), s.kp.data() + b * half * 16,
                       false);
      bf16_scores(a, s.kp.data(), n, t - t0, pos * n_rep, n_rep, s);
    }
  }
  for (int64_t row = 0; row < it.rows; ++row) {
    const int64_t n = std::min(t1, L.counts[row / n_rep]) - t0;
    if (n <= 0) continue;
    float* p = s.p.data() + row * Bf16Scratch::STRIDE;
    s.l[row] = avx512_softmax(p, n, &s.m[row]);
    weights_to_bf16(p, n, s.pb.data() + row * Bf16Scratch::STRIDE);
  }
  // Value sums: pairs whose two keys are shared, for every row at once...
  const int64_t full = shared / 2;
  pack_value_pairs(a, g, ident, t0, shared_end, 0, full, s.vp.data());
  bf16_values(a, s.vp.data(), 0, full, 0, it.rows, s);
  // ...then each position's remaining pairs (a shared key's odd tail and its own keys), gathered.
  for (int64_t pos = 0; pos < a.Lq; ++pos) {
    const int64_t end = std::min(t1, L.counts[pos]);
    const int64_t last = (end - t0 + 1) / 2;
    if (last <= full) continue;
    pack_value_pairs(a, g, L.of(pos, a.Lk), t0, end, full, last, s.vp.data());
    bf16_values(a, s.vp.data(), full, last, pos * n_rep, n_rep, s);
  }
  store_segment(a, L, g, seg, s.o.data(), s.l.data(), s.m.data(), partial);
}

#undef QD_BF16_ATTENTION_TARGET

inline bool bf16_attention_supported() { return qd_bf16v::supported(); }

#else
inline bool bf16_attention_supported() { return false; }
#endif

}  // namespace qd_attention
