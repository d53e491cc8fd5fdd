// Batch-invariant attention for the worker's CPU verification passes.
//
// One query row's output depends only on that row and on the keys it may see,
// taken in cache order; never on the masked keys between them (the sibling
// branches of a draft tree), on how many rows share the call, or on threads.
// So a draft node computes exactly what the same token computes when plain
// decoding feeds it alone, and a session packed with others computes what it
// computes alone. torch's SDPA blocks keys and rows by the call's shape and
// sums masked keys' zeros in between, which moves the rounding.
//
// Definition, for query row q (head h, position i), over the keys j it may see in increasing
// order, numbered t = 0, 1, ... (kv head h / n_rep), cut into segments of SEGMENT consecutive t:
// for each segment s that holds any of them (t in [sS, sS + S)):
//   s_t = dot(q, k_j) * scale              dot: acc = fma(q[d], k_j[d], acc) for
//                                          d = 0, 1, ..., D - 1 from acc = +0
//   m_s = max_t s_t
//   p_t = exp16(s_t - m_s)                 exp16 below, elementwise
//   l_s = tree(lane sums: lane t % 16 adds p_t in increasing t)
//   o_s = sum over t in increasing order of fma(p_t, v_j, o), per dimension, from +0
// then, over those segments in increasing s, from l = o = +0:
//   m = max_s m_s,  w_s = exp16(m_s - m),  l = fma(w_s, l_s, l),  o = fma(w_s, o_s, o)
//   out = o / l
// The segments are numbered in the row's own keys, so they too depend on nothing but the row;
// they let a long context's keys be split between threads (each segment's K and V read once for
// every row of the call) instead of giving a whole kv head to one thread.
// The AVX-512, AVX2 and portable paths implement it operation for operation.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "reduce.h"

namespace qd_attention {

using qd::tree16;

struct Problem {
  const float* q;        // [H, Lq, D] contiguous
  const float* k;        // kv head g, key j at k + g * k_head + j * k_tok (D contiguous floats)
  const float* v;
  const uint8_t* mask;   // row i at mask + i * mask_row; nonzero: visible
  float* out;            // [Lq, H, D] contiguous
  int64_t H, Hkv, Lq, Lk, D;
  int64_t k_head, k_tok, v_head, v_tok, mask_row;
  float scale;
};

// exp(x) for x <= 0: Cody-Waite reduction by ln 2 and a degree-7 polynomial (Cephes' expf
// coefficients), about 1 ulp; below -87 it is 0. Every step is one IEEE operation.
constexpr float EXP_CUTOFF = -87.0f;
constexpr float LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693359375f;
constexpr float LN2_LO = -2.12194440e-4f;
constexpr float ROUNDER = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
constexpr float P0 = 5.0000001201e-1f, P1 = 1.6666665459e-1f, P2 = 4.1665795894e-2f, P3 = 8.3334519073e-3f,
                P4 = 1.3981999507e-3f, P5 = 1.9875691500e-4f;

inline float exp16(float x) {
  if (x < EXP_CUTOFF) return 0.0f;
  const float n = (x * LOG2E + ROUNDER) - ROUNDER;
  float r = std::fma(n, -LN2_HI, x);
  r = std::fma(n, -LN2_LO, r);
  float p = std::fma(P5, r, P4);
  p = std::fma(p, r, P3);
  p = std::fma(p, r, P2);
  p = std::fma(p, r, P1);
  p = std::fma(p, r, P0);
  const float y = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// Keys per segment (a multiple of 16, so a key's softmax lane is the same counted from the
// segment's start or from the row's first key).
constexpr int64_t SEGMENT = 512;

// Each query position's visible keys, computed once per call and read by every item.
struct Lists {
  std::vector<int32_t> keys;    // [Lq][Lk]: position i's visible keys, in order
  std::vector<int64_t> counts;  // [Lq]: how many
  int64_t shared = 0;           // every position sees keys 0, 1, ..., shared - 1 (the cached context)
  int64_t segments = 1;         // segments of the position that sees the most keys
  explicit Lists(const Problem& a);
  const int32_t* of(int64_t i, int64_t Lk) const { return keys.data() + i * Lk; }
};

// A segment's result for one row, before the merge: o (D floats), l, m.
inline int64_t partial_stride(const Problem& a) { return a.D + 2; }
inline int64_t partial_offset(const Problem& a, const Lists& L, int64_t i, int64_t h, int64_t seg) {
  return ((i * a.H + h) * L.segments + seg) * partial_stride(a);
}

// An item's segment results (kv head g, rows position-major: o, D floats a row, and l, m) into the
// partials; a row whose position sees no key of the segment has none.
inline void store_segment(const Problem& a, const Lists& L, int64_t g, int64_t seg, const float* o,
                          const float* l, const float* m, float* partial) {
  const int64_t n_rep = a.H / a.Hkv, t0 = seg * SEGMENT, t1 = t0 + SEGMENT;
  for (int64_t row = 0; row < n_rep * a.Lq; ++row) {
    const int64_t pos = row / n_rep;
    if (std::min(t1, L.counts[pos]) <= t0) continue;
    float* out = partial + partial_offset(a, L, pos, g * n_rep + row % n_rep, seg);
    std::memcpy(out, o + row * a.D, static_cast<size_t>(a.D) * sizeof(float));
    out[a.D] = l[row];
    out[a.D + 1] = m[row];
  }
}

// Scratch of one worker thread, for one item (one segment of one kv head, every query position).
struct Scratch {
  std::vector<float> p;         // [rows][SEGMENT + 16]: scores, then softmax weights, compacted per row
  std::vector<float> o;         // [rows][D]: value sums between key blocks
  std::vector<float> l;         // [rows]: the segment's softmax denominators
  std::vector<float> m;         // [rows]: the segment's maxima
  std::vector<float> kt;        // [D][16]: a block of 16 keys, transposed
  std::vector<float> qt;        // [D][rows]: the item's queries, transposed
  static constexpr int64_t stride = SEGMENT + 16;
  void fit(int64_t rows, int64_t D) {
    l.resize(static_cast<size_t>(rows));
    m.resize(static_cast<size_t>(rows));
    kt.resize(static_cast<size_t>(D * 16));
    qt.resize(static_cast<size_t>(D * rows));
    p.resize(static_cast<size_t>(rows * stride));
    o.resize(static_cast<size_t>(rows * D));
  }
};

// One score's dot product, in the definition's order (a chain: the vector path runs 16 keys'
// chains side by side).
inline float dot(const float* q, const float* k, int64_t D) {
  float acc = 0.0f;
  for (int64_t d = 0; d < D; ++d) acc = std::fma(q[d], k[d], acc);
  return acc;
}

// The keys position i sees, in order; run gets how many leading keys 0, 1, 2, ... it sees. The mask holds 0/1 bytes and is mostly ones (the cached context): eight at a time
// while they are all ones.
inline int64_t visible_keys(const Problem& a, int64_t i, int32_t* keys, int64_t& run) {
  const uint8_t* row = a.mask + i * a.mask_row;
  constexpr uint64_t ALL = 0x0101010101010101ULL;
  int64_t n = 0, j = 0;
  for (; j + 8 <= a.Lk; j += 8) {
    uint64_t word;
    std::memcpy(&word, row + j, sizeof word);
    if (word != ALL) break;
    for (int b = 0; b < 8; ++b) keys[n + b] = static_cast<int32_t>(j + b);
    n += 8;
  }
  while (j < a.Lk && row[j]) keys[n++] = static_cast<int32_t>(j++);
  run = n;
  for (; j + 8 <= a.Lk; j += 8) {
    uint64_t word;
    std::memcpy(&word, row + j, sizeof word);
    if (word == ALL) {
      for (int b = 0; b < 8; ++b) keys[n + b] = static_cast<int32_t>(j + b);
      n += 8;
    } else if (word != 0) {
      for (int b = 0; b < 8; ++b)
        if (row[j + b]) keys[n++] = static_cast<int32_t>(j + b);
    }
  }
  for (; j < a.Lk; ++j)
    if (row[j]) keys[n++] = static_cast<int32_t>(j);
  return n;
}

inline Lists::Lists(const Problem& a)
    : keys(static_cast<size_t>(a.Lq * a.Lk)), counts(static_cast<size_t>(a.Lq)), shared(a.Lk) {
  int64_t most = 0;
  for (int64_t i = 0; i < a.Lq; ++i) {
    int64_t run;
    counts[i] = visible_keys(a, i, keys.data() + i * a.Lk, run);
    shared = std::min(shared, run);
    most = std::max(most, counts[i]);
  }
  segments = std::max<int64_t>(1, (most + SEGMENT - 1) / SEGMENT);
}

// A row's segment results, for the merge (the definition's last lines): where they are, how many
// the row has, and their largest maximum.
struct RowSegments {
  const float* first;
  int64_t used, stride;
  float m;
  RowSegments(const Problem& a, const Lists& L, const float* partial, int64_t i, int64_t h)
      : first(partial + partial_offset(a, L, i, h, 0)),
        used((L.counts[i] + SEGMENT - 1) / SEGMENT), stride(partial_stride(a)), m(-INFINITY) {
    for (int64_t s = 0; s < used; ++s) m = std::max(m, at(s)[a.D + 1]);
  }
  const float* at(int64_t s) const { return first + s * stride; }
};

// The merge of a row's segments, for every position and head.
inline void merge_row(const Problem& a, const Lists& L, const float* partial, int64_t i, int64_t h) {
  const int64_t D = a.D;
  const RowSegments r(a, L, partial, i, h);
  float* out = a.out + (i * a.H + h) * D;
  float l = 0.0f;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  for (int64_t s = 0; s < r.used; ++s) {
    const float* seg = r.at(s);
    const float w = exp16(seg[D + 1] - r.m);
    l = std::fma(w, seg[D], l);
    for (int64_t d = 0; d < D; ++d) out[d] = std::fma(w, seg[d], out[d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] = out[d] / l;
}

// ---------------------------------------------------------------- portable path
// The item: kv head g, segment seg, every position's n_rep query heads of g.
inline void scalar_segment(const Problem& a, const Lists& L, int64_t g, int64_t seg, float* partial,
                           Scratch& s) {
  const int64_t n_rep = a.H / a.Hkv, D = a.D, t0 = seg * SEGMENT;
  s.fit(1, D);
  for (int64_t i = 0; i < a.Lq; ++i) {
    const int32_t* keys = L.of(i, a.Lk);
    const int64_t t1 = std::min(t0 + SEGMENT, L.counts[i]);
    if (t1 <= t0) continue;
    for (int64_t r = 0; r < n_rep; ++r) {
      const int64_t h = g * n_rep + r;
      const float* q = a.q + (h * a.Lq + i) * D;
      float* p = s.p.data();
      float m = -INFINITY;
      for (int64_t t = t0; t < t1; ++t) {
        const float score = dot(q, a.k + g * a.k_head + keys[t] * a.k_tok, D) * a.scale;
        p[t - t0] = score;
        m = std::max(m, score);
      }
      float lanes[16] = {};
      for (int64_t t = t0; t < t1; ++t) {
        p[t - t0] = exp16(p[t - t0] - m);
        lanes[t % 16] += p[t - t0];
      }
      float* out = partial + partial_offset(a, L, i, h, seg);
      for (int64_t d = 0; d < D; ++d) {
        float o = 0.0f;
        for (int64_t t = t0; t < t1; ++t) o = std::fma(p[t - t0], a.v[g * a.v_head + keys[t] * a.v_tok + d], o);
        out[d] = o;
      }
      out[D] = tree16(lanes);
      out[D + 1] = m;
    }
  }
}

#ifdef QD_X86
// ---------------------------------------------------------------- AVX-512
__attribute__((target("avx512f"))) inline __m512 avx512_exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_CUTOFF), _CMP_GE_OQ);
  const __m512 rounder = _mm512_set1_ps(ROUNDER);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), rounder), rounder);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(P5), r, _mm512_set1_ps(P4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P0));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  // n is in [-126, 0] for live lanes; dead lanes are zeroed below, whatever their bits.
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(live, _mm512_mul_ps(y, _mm512_castsi512_ps(bits)));
}

// One item: kv head g, segment seg (the row's keys t in [t0, t0 + SEGMENT)), every query position
// with the n_rep query heads of g (rows ordered position-major). Keys t < L.shared are the same
// for every row (t = j, the cached context, in a verification pass): their K and V blocks are
// loaded once for all rows. Each position's keys after that follow, in order, for its rows.
struct Item {
  int64_t g, n_rep, rows, t0;
  const float* q(const Problem& a, int64_t row) const {
    return a.q + ((g * n_rep + row % n_rep) * a.Lq + row / n_rep) * a.D;
  }
};

// Keys per block of the shared prefix's value sums: a block of V stays in L1 while every row
// of the item uses it.
inline int64_t key_block(int64_t D) { return std::max<int64_t>(16, 16384 / (4 * D)); }

// One item's steps, the same for every vector path; the instruction set's pieces come as template
// arguments: a block of 16 keys' scores, a row's softmax, the shared keys' value sums, a row's own
// keys' value sums (continuing from the shared ones, into its segment result).
using BlockScoresFn = void (*)(const Problem&, const Item&, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                               Scratch&);
using SoftmaxFn = float (*)(float*, int64_t, float*);
using PrefixValuesFn = void (*)(const Problem&, const Item&, int64_t, int64_t, Scratch&);
using OwnValuesFn = void (*)(const Problem&, int64_t, const int32_t*, const float*, const float*, int64_t, int64_t,
                             int64_t, float*);

template <BlockScoresFn block_scores, SoftmaxFn softmax, PrefixValuesFn prefix_values, OwnValuesFn own_values>
inline void vector_segment(const Problem& a, const Lists& L, int64_t g, int64_t seg, float* partial, Scratch& s) {
  const int64_t n_rep = a.H / a.Hkv, t0 = seg * SEGMENT, t1 = t0 + SEGMENT;
  Item it{g, n_rep, n_rep * a.Lq, t0};
  s.fit(it.rows, a.D);
  for (int64_t row = 0; row < it.rows; ++row) {
    const float* q = it.q(a, row);
    for (int64_t d = 0; d < a.D; ++d) s.qt[d * it.rows + row] = q[d];
  }
  // Shared keys in this segment: every row at once (every position's list starts 0, 1, 2, ...).
  const int64_t shared_end = std::min(t1, L.shared);
  for (int64_t t = t0; t < shared_end; t += 16)
    block_scores(a, it, L.of(0, a.Lk) + t, std::min<int64_t>(16, shared_end - t), t - t0, 0, it.rows, s);
  // Then each position's own keys in this segment, for its n_rep rows.
  const int64_t own_start = std::max(t0, L.shared);
  for (int64_t pos = 0; pos < a.Lq; ++pos) {
    const int32_t* keys = L.of(pos, a.Lk);
    const int64_t end = std::min(t1, L.counts[pos]);
    for (int64_t t = own_start; t < end; t += 16)
      block_scores(a, it, keys + t, std::min<int64_t>(16, end - t), t - t0, pos * n_rep, n_rep, s);
  }
  for (int64_t row = 0; row < it.rows; ++row) {
    const int64_t n = std::min(t1, L.counts[row / n_rep]) - t0;
    if (n > 0) s.l[row] = softmax(s.p.data() + row * Scratch::stride, n, &s.m[row]);
  }
  std::fill(s.o.begin(), s.o.begin() + it.rows * a.D, 0.0f);
  const int64_t block = key_block(a.D);
  for (int64_t j0 = t0; j0 < shared_end; j0 += block)
    prefix_values(a, it, j0, std::min(shared_end, j0 + block), s);
  for (int64_t row = 0; row < it.rows; ++row) {
    const int64_t pos = row / n_rep, end = std::min(t1, L.counts[pos]);
    if (end <= t0) continue;
    float* out = partial + partial_offset(a, L, pos, g * n_rep + row % n_rep, seg);
    own_values(a, g, L.of(pos, a.Lk), s.p.data() + row * Scratch::stride, s.o.data() + row * a.D, own_start, end,
               t0, out);
    out[a.D] = s.l[row];
    out[a.D + 1] = s.m[row];
  }
}

// 16 rows of 16 floats -> 16 columns (r[c] holds column c of the 16 rows afterwards).
__attribute__((target("avx512f"))) inline void avx512_transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // In each 128-bit lane L, a[4i + e] holds rows 4i..4i+3 of column 4L + e.
  __m512 a[16];
  for (int i = 0; i < 4; ++i) {
    const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
    a[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    a[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    a[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    a[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int e = 0; e < 4; ++e) {
    const __m512 x = _mm512_shuffle_f32x4(a[e], a[4 + e], 0x88), y = _mm512_shuffle_f32x4(a[e], a[4 + e], 0xDD);
    const __m512 z = _mm512_shuffle_f32x4(a[8 + e], a[12 + e], 0x88), w = _mm512_shuffle_f32x4(a[8 + e], a[12 + e], 0xDD);
    r[e] = _mm512_shuffle_f32x4(x, z, 0x88);
    r[8 + e] = _mm512_shuffle_f32x4(x, z, 0xDD);
    r[4 + e] = _mm512_shuffle_f32x4(y, w, 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(y, w, 0xDD);
  }
}

// G rows' scores for the 16 transposed keys in kt: G independent FMA chains over d (up to 12,
// enough to keep both FMA units busy through the 4-cycle latency).
template <int G>
__attribute__((target("avx512f"))) void avx512_score_rows(const Problem& a, const Item& it, int64_t row0, int64_t j0,
                                                          __mmask16 live, const float* kt, Scratch& s) {
  __m512 acc[G];
  for (int r = 0; r < G; ++r) acc[r] = _mm512_setzero_ps();
  const float* q = s.qt.data() + row0;  // q of row row0 + r, dimension d: q[d * rows + r]
  for (int64_t d = 0; d < a.D; ++d, q += it.rows) {
    const __m512 k = _mm512_loadu_ps(kt + d * 16);
    #pragma GCC unroll 12
    for (int r = 0; r < G; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r]), k, acc[r]);
  }
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int r = 0; r < G; ++r)
    _mm512_mask_storeu_ps(s.p.data() + (row0 + r) * Scratch::stride + j0, live, _mm512_mul_ps(acc[r], scale));
}

// Scores of rows [row0, row0 + rows) for the keys keys[0..n) (n <= 16), which are those rows'
// visible keys it.t0 + t0, it.t0 + t0 + 1, ... in compacted order (t0 counted in the segment): the block of K is transposed once, then each
// row's scores are 16 independent chains over d.
__attribute__((target("avx512f"))) void avx512_block_scores(const Problem& a, const Item& it, const int32_t* keys,
                                                            int64_t n, int64_t t0, int64_t row0, int64_t rows,
                                                            Scratch& s) {
  const int64_t D = a.D;
  const __mmask16 live = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
  float* kt = s.kt.data();
  const float* k = a.k + it.g * a.k_head;
  for (int64_t c = 0; c < D; c += 16) {
    __m512 r[16];
    if (n == 16) {
      #pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(k + keys[j] * a.k_tok + c);
    } else {
      for (int j = 0; j < 16; ++j) r[j] = j < n ? _mm512_loadu_ps(k + keys[j] * a.k_tok + c) : _mm512_setzero_ps();
    }
    avx512_transpose16(r);
    for (int d = 0; d < 16; ++d) _mm512_storeu_ps(kt + (c + d) * 16, r[d]);
  }
  qd::in_groups<12>(rows, [&](auto G, int64_t r) { avx512_score_rows<G()>(a, it, row0 + r, t0, live, kt, s); });
}

// Softmax weights of one row's segment in place (compacted scores -> p_t); returns l, and m in *max.
__attribute__((target("avx512f"))) inline float avx512_softmax(float* p, int64_t n, float* max) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(p + t));
  float m = _mm512_reduce_max_ps(mv);
  for (; t < n; ++t) m = std::max(m, p[t]);
  *max = m;
  const __m512 mb = _mm512_set1_ps(m);
  __m512 lanes = _mm512_setzero_ps();
  for (t = 0; t < n; t += 16) {
    const __mmask16 live = n - t >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - t)) - 1u);
    // Past n the lanes hold exp(-inf) = 0: adding +0 to a sum of non-negative terms changes nothing.
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, p + t);
    const __m512 e = avx512_exp16(_mm512_sub_ps(x, mb));
    _mm512_mask_storeu_ps(p + t, live, e);
    lanes = _mm512_add_ps(lanes, e);
  }
  alignas(64) float l[16];
  _mm512_store_ps(l, lanes);
  return tree16(l);
}

// o_r += p_r[t] v_j for shared keys j in [j0, j1) (t = j there), R rows, 64 dimensions from d0;
// the sums live in the scratch between key blocks.
template <int R>
__attribute__((target("avx512f"))) void avx512_values(const Problem& a, const Item& it, int64_t row0, int64_t j0,
                                                      int64_t j1, int64_t d0, Scratch& s) {
  __m512 o[R][4];
  const float* p[R];
  for (int r = 0; r < R; ++r) {
    p[r] = s.p.data() + (row0 + r) * Scratch::stride;
    for (int c = 0; c < 4; ++c) o[r][c] = _mm512_loadu_ps(s.o.data() + (row0 + r) * a.D + d0 + 16 * c);
  }
  for (int64_t j = j0; j < j1; ++j) {
    const float* v = a.v + it.g * a.v_head + j * a.v_tok + d0;
    __m512 vv[4];
    #pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) vv[c] = _mm512_loadu_ps(v + 16 * c);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r][j - it.t0]);
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) o[r][c] = _mm512_fmadd_ps(pb, vv[c], o[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s.o.data() + (row0 + r) * a.D + d0 + 16 * c, o[r][c]);
}

// Value sums of every row of the item over the shared keys [j0, j1), four rows at a time.
__attribute__((target("avx512f"))) void avx512_prefix_values(const Problem& a, const Item& it, int64_t j0,
                                                             int64_t j1, Scratch& s) {
  qd::in_groups<4>(it.rows, [&](auto R, int64_t row0) {
    for (int64_t d0 = 0; d0 < a.D; d0 += 64) avx512_values<R()>(a, it, row0, j0, j1, d0, s);
  });
}

// A row's own keys' value sums for one segment (keys t in [t_begin, t_end), weights p[t - t0]),
// continuing from the shared keys' sums o, into out.
__attribute__((target("avx512f"))) inline void avx512_own_values(const Problem& a, int64_t g, const int32_t* keys,
                                                                 const float* p, const float* o, int64_t t_begin,
                                                                 int64_t t_end, int64_t t0, float* out) {
  for (int64_t d0 = 0; d0 < a.D; d0 += 16) {
    __m512 acc = _mm512_loadu_ps(o + d0);
    for (int64_t t = t_begin; t < t_end; ++t)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(p[t - t0]), _mm512_loadu_ps(a.v + g * a.v_head + keys[t] * a.v_tok + d0),
                            acc);
    _mm512_storeu_ps(out + d0, acc);
  }
}

inline void avx512_segment(const Problem& a, const Lists& L, int64_t g, int64_t seg, float* partial, Scratch& s) {
  vector_segment<avx512_block_scores, avx512_softmax, avx512_prefix_values, avx512_own_values>(a, L, g, seg, partial,
                                                                                              s);
}

// merge_row with the dimensions 16 at a time: the same fma per dimension, in the same order.
__attribute__((target("avx512f"))) inline void avx512_merge_row(const Problem& a, const Lists& L,
                                                                const float* partial, int64_t i, int64_t h) {
  const int64_t D = a.D;
  const RowSegments r(a, L, partial, i, h);
  float* out = a.out + (i * a.H + h) * D;
  float l = 0.0f;
  for (int64_t s = 0; s < r.used; ++s) l = std::fma(exp16(r.at(s)[D + 1] - r.m), r.at(s)[D], l);
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    __m512 o = _mm512_setzero_ps();
    for (int64_t s = 0; s < r.used; ++s)
      o = _mm512_fmadd_ps(_mm512_set1_ps(exp16(r.at(s)[D + 1] - r.m)), _mm512_loadu_ps(r.at(s) + d0), o);
    _mm512_storeu_ps(out + d0, _mm512_div_ps(o, _mm512_set1_ps(l)));
  }
}

// ---------------------------------------------------------------- AVX2 + FMA
// The AVX-512 path's operations on pairs of 8-lane registers: a 16-key block's lanes 0-7 and 8-15
// live in two registers and take the same operations, so every value is the definition's.
__attribute__((target("avx2,fma"))) inline __m256 avx2_exp8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_CUTOFF), _CMP_GE_OQ);
  const __m256 rounder = _mm256_set1_ps(ROUNDER);
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), rounder), rounder);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(P5), r, _mm256_set1_ps(P4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P0));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

// 8 rows of 8 floats -> 8 columns.
__attribute__((target("avx2,fma"))) inline void avx2_transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

// G rows' scores for the 16 transposed keys in kt: two chains over d per row. All 16 lanes are
// stored: past the block's n keys they are zeros, which a later block overwrites or the row's
// softmax never reads (a row's scores have 16 floats of room past the segment).
template <int G>
__attribute__((target("avx2,fma"))) void avx2_score_rows(const Problem& a, const Item& it, int64_t row0, int64_t j0,
                                                         const float* kt, Scratch& s) {
  __m256 lo[G], hi[G];
  for (int r = 0; r < G; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  const float* q = s.qt.data() + row0;
  for (int64_t d = 0; d < a.D; ++d, q += it.rows) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * 16), k1 = _mm256_loadu_ps(kt + d * 16 + 8);
    #pragma GCC unroll 6
    for (int r = 0; r < G; ++r) {
      const __m256 qb = _mm256_set1_ps(q[r]);
      lo[r] = _mm256_fmadd_ps(qb, k0, lo[r]);
      hi[r] = _mm256_fmadd_ps(qb, k1, hi[r]);
    }
  }
  const __m256 scale = _mm256_set1_ps(a.scale);
  for (int r = 0; r < G; ++r) {
    float* out = s.p.data() + (row0 + r) * Scratch::stride + j0;
    _mm256_storeu_ps(out, _mm256_mul_ps(lo[r], scale));
    _mm256_storeu_ps(out + 8, _mm256_mul_ps(hi[r], scale));
  }
}

__attribute__((target("avx2,fma"))) void avx2_block_scores(const Problem& a, const Item& it, const int32_t* keys,
                                                           int64_t n, int64_t t0, int64_t row0, int64_t rows,
                                                           Scratch& s) {
  float* kt = s.kt.data();
  const float* k = a.k + it.g * a.k_head;
  for (int half = 0; half < 2; ++half) {
    for (int64_t c = 0; c < a.D; c += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) {
        const int64_t key = 8 * half + j;
        r[j] = key < n ? _mm256_loadu_ps(k + keys[key] * a.k_tok + c) : _mm256_setzero_ps();
      }
      avx2_transpose8(r);
      for (int d = 0; d < 8; ++d) _mm256_storeu_ps(kt + (c + d) * 16 + 8 * half, r[d]);
    }
  }
  qd::in_groups<6>(rows, [&](auto G, int64_t r) { avx2_score_rows<G()>(a, it, row0 + r, t0, kt, s); });
}

// avx512_softmax on register pairs: the same maximum (max_ps(acc, x), as there) and the same
// exp16 and lane sums per key.
__attribute__((target("avx2,fma"))) inline float avx2_softmax(float* p, int64_t n, float* max) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(p + t));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(p + t + 8));
  }
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, m0);
  _mm256_store_ps(lanes + 8, m1);
  float m = -INFINITY;
  for (int i = 0; i < 16; ++i) m = std::max(m, lanes[i]);
  for (; t < n; ++t) m = std::max(m, p[t]);
  *max = m;
  const __m256 mb = _mm256_set1_ps(m), ninf = _mm256_set1_ps(-INFINITY);
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (t = 0; t < n; t += 16) {
    // Past n the lanes hold exp(-inf) = 0: adding +0 to a sum of non-negative terms changes nothing.
    __m256 x0, x1;
    __m256i live0, live1;
    const bool full = n - t >= 16;
    if (full) {
      x0 = _mm256_loadu_ps(p + t);
      x1 = _mm256_loadu_ps(p + t + 8);
    } else {
      live0 = qd::avx2_mask(n - t, 0);
      live1 = qd::avx2_mask(n - t, 8);
      x0 = _mm256_blendv_ps(ninf, _mm256_maskload_ps(p + t, live0), _mm256_castsi256_ps(live0));
      x1 = _mm256_blendv_ps(ninf, _mm256_maskload_ps(p + t + 8, live1), _mm256_castsi256_ps(live1));
    }
    const __m256 e0 = avx2_exp8(_mm256_sub_ps(x0, mb)), e1 = avx2_exp8(_mm256_sub_ps(x1, mb));
    if (full) {
      _mm256_storeu_ps(p + t, e0);
      _mm256_storeu_ps(p + t + 8, e1);
    } else {
      _mm256_maskstore_ps(p + t, live0, e0);
      _mm256_maskstore_ps(p + t + 8, live1, e1);
    }
    lo = _mm256_add_ps(lo, e0);
    hi = _mm256_add_ps(hi, e1);
  }
  _mm256_store_ps(lanes, lo);
  _mm256_store_ps(lanes + 8, hi);
  return tree16(lanes);
}

// o_r += p_r[t] v_j for shared keys j in [j0, j1), R rows, 16 dimensions from d0: 2R chains, up to
// 12, enough to keep both FMA units busy, for two loads of V per key.
template <int R>
__attribute__((target("avx2,fma"))) void avx2_values(const Problem& a, const Item& it, int64_t row0, int64_t j0,
                                                     int64_t j1, int64_t d0, Scratch& s) {
  __m256 o[R][2];
  const float* p[R];
  for (int r = 0; r < R; ++r) {
    p[r] = s.p.data() + (row0 + r) * Scratch::stride;
    for (int c = 0; c < 2; ++c) o[r][c] = _mm256_loadu_ps(s.o.data() + (row0 + r) * a.D + d0 + 8 * c);
  }
  const float* v = a.v + it.g * a.v_head + d0;
  for (int64_t j = j0; j < j1; ++j) {
    const __m256 v0 = _mm256_loadu_ps(v + j * a.v_tok), v1 = _mm256_loadu_ps(v + j * a.v_tok + 8);
    #pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 pb = _mm256_set1_ps(p[r][j - it.t0]);
      o[r][0] = _mm256_fmadd_ps(pb, v0, o[r][0]);
      o[r][1] = _mm256_fmadd_ps(pb, v1, o[r][1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2; ++c) _mm256_storeu_ps(s.o.data() + (row0 + r) * a.D + d0 + 8 * c, o[r][c]);
}

// Value sums of every row of the item over the shared keys [j0, j1), six rows at a time.
__attribute__((target("avx2,fma"))) void avx2_prefix_values(const Problem& a, const Item& it, int64_t j0, int64_t j1,
                                                            Scratch& s) {
  qd::in_groups<6>(it.rows, [&](auto R, int64_t row0) {
    for (int64_t d0 = 0; d0 < a.D; d0 += 16) avx2_values<R()>(a, it, row0, j0, j1, d0, s);
  });
}

__attribute__((target("avx2,fma"))) inline void avx2_own_values(const Problem& a, int64_t g, const int32_t* keys,
                                                                const float* p, const float* o, int64_t t_begin,
                                                                int64_t t_end, int64_t t0, float* out) {
  for (int64_t d0 = 0; d0 < a.D; d0 += 8) {
    __m256 acc = _mm256_loadu_ps(o + d0);
    for (int64_t t = t_begin; t < t_end; ++t)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(p[t - t0]), _mm256_loadu_ps(a.v + g * a.v_head + keys[t] * a.v_tok + d0),
                            acc);
    _mm256_storeu_ps(out + d0, acc);
  }
}

inline void avx2_segment(const Problem& a, const Lists& L, int64_t g, int64_t seg, float* partial, Scratch& s) {
  vector_segment<avx2_block_scores, avx2_softmax, avx2_prefix_values, avx2_own_values>(a, L, g, seg, partial, s);
}

__attribute__((target("avx2,fma"))) inline void avx2_merge_row(const Problem& a, const Lists& L,
                                                               const float* partial, int64_t i, int64_t h) {
  const int64_t D = a.D;
  const RowSegments r(a, L, partial, i, h);
  float* out = a.out + (i * a.H + h) * D;
  float l = 0.0f;
  for (int64_t s = 0; s < r.used; ++s) l = std::fma(exp16(r.at(s)[D + 1] - r.m), r.at(s)[D], l);
  for (int64_t d0 = 0; d0 < D; d0 += 8) {
    __m256 o = _mm256_setzero_ps();
    for (int64_t s = 0; s < r.used; ++s)
      o = _mm256_fmadd_ps(_mm256_set1_ps(exp16(r.at(s)[D + 1] - r.m)), _mm256_loadu_ps(r.at(s) + d0), o);
    _mm256_storeu_ps(out + d0, _mm256_div_ps(o, _mm256_set1_ps(l)));
  }
}
#endif

}  // namespace qd_attention
