// Batch-invariant attention on AMX tiles: the segment structure of attention.h, with the two
// products (scores q.k and value sums p.v) taken by bf16 tiles instead of fp32 FMA chains.
//
// Definition, for query row q (as attention.h, with these changes):
//   s_t = tile_dot(bf16(q), bf16(k_j)) * scale   the dot as the tile instruction computes it, over
//                                                 chunks of 32 dimensions in increasing order
//   p_t, m_s, l_s                                 fp32, as attention.h
//   o_s = tile sums of bf16(p_t) * bf16(v_j) over chunks of 32 consecutive t (counted in the row's
//         own keys from the segment's start), chunks in increasing order, zero past the row's keys
// A tile computes each output element from its own row and column only, so a row's scores and
// sums do not depend on the other rows of the call, on the other keys in a tile, or on whether
// its keys were read straight from the cache (the shared prefix, one tile for every row) or
// gathered for its position (a draft's own keys): each element sees the same inputs in the same
// slots. Not bitwise attention.h (inputs are rounded to bf16): a model uses one or the other.

#pragma once

#include "amx_linear.h"
#include "attention.h"

namespace qd_attention {

#if defined(QD_X86) && defined(QD_AMX)

constexpr int64_t KEY_BLOCK = 16;  // keys per score tile
constexpr int64_t KEY_CHUNK = 32;  // keys per value-sum step (one bf16 tile row)

struct TileScratch {
  static constexpr int64_t STRIDE = SEGMENT + KEY_CHUNK;
  std::vector<float> p;      // [rows][STRIDE]: scores, then fp32 softmax weights (t - t0)
  std::vector<uint16_t> pb;  // [rows + 16][STRIDE]: bf16 weights, zero from each row's last key to its chunk's end
  std::vector<uint16_t> qt;  // [groups][D / 32][16 pairs][16 rows][2]: queries, transposed by pairs
  std::vector<uint16_t> kb;  // [16 keys][D]: one block of keys in bf16
  std::vector<uint16_t> vb;  // [chunks][D / 16][16 key pairs][16 dims][2]: values by pairs of keys
  std::vector<float> o;      // [rows + 16][D]: value sums between chunks
  std::vector<float> l, m;
  alignas(64) float c[KEY_BLOCK * 16];
  int64_t groups = 0;
  std::vector<float> keep;    // [16][D]: rows a position's tiles overwrite but do not own
  // Padding rows (past the item's, up to the tile's 16) may hold anything: a tile row's result
  // depends on that row only, and theirs are never read. The rows' sums start at zero.
  void fit(int64_t rows, int64_t D) {
    groups = (rows + 15) / 16;
    p.resize(static_cast<size_t>(rows * STRIDE));
    pb.resize(static_cast<size_t>((rows + 16) * STRIDE));
    qt.resize(static_cast<size_t>(groups * D * 16));
    kb.resize(static_cast<size_t>(KEY_BLOCK * D));
    vb.resize(static_cast<size_t>(STRIDE / KEY_CHUNK * D * KEY_CHUNK));
    o.resize(static_cast<size_t>((rows + 16) * D));
    std::fill(o.begin(), o.begin() + rows * D, 0.0f);
    keep.resize(static_cast<size_t>(16 * D));
    l.resize(static_cast<size_t>(rows));
    m.resize(static_cast<size_t>(rows));
  }
};

// 32 fp32 values (two vectors) to 32 bf16, round to nearest even: a from src, b from src + 16.
__attribute__((target("avx512f,avx512bf16"))) inline __m512i to_bf16x32(__m512 lo, __m512 hi) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// The item's queries, by pairs of dimensions, 16 rows a group: the B operand of the score tiles.
__attribute__((target("avx512f,avx512bf16"))) inline void pack_queries(const Problem& a, const Item& it,
                                                                       TileScratch& s) {
  const int64_t D = a.D;
  uint32_t* qt = reinterpret_cast<uint32_t*>(s.qt.data());  // a pair of bf16 as one 32-bit unit
  for (int64_t row = 0; row < it.rows; ++row) {
    const float* q = it.q(a, row);
    const int64_t g = row / 16, col = row % 16;
    for (int64_t d = 0; d < D; d += 32) {
      alignas(64) uint32_t pairs[16];
      _mm512_store_si512(pairs, to_bf16x32(_mm512_loadu_ps(q + d), _mm512_loadu_ps(q + d + 16)));
      uint32_t* tile = qt + (g * (D / 32) + d / 32) * 256;
      for (int pr = 0; pr < 16; ++pr) tile[pr * 16 + col] = pairs[pr];
    }
  }
}

// Keys keys[0..n) (n <= 16) of kv head g in bf16, one row each, zero rows past n.
__attribute__((target("avx512f,avx512bf16"))) inline void pack_keys(const Problem& a, int64_t g, const int32_t* keys,
                                                                    int64_t n, TileScratch& s) {
  const int64_t D = a.D;
  for (int64_t i = 0; i < KEY_BLOCK; ++i) {
    uint16_t* dst = s.kb.data() + i * D;
    if (i >= n) {
      std::memset(dst, 0, static_cast<size_t>(D) * 2);
      continue;
    }
    const float* k = a.k + g * a.k_head + keys[i] * a.k_tok;
    for (int64_t d = 0; d < D; d += 32)
      _mm512_storeu_si512(dst + d, to_bf16x32(_mm512_loadu_ps(k + d), _mm512_loadu_ps(k + d + 16)));
  }
}

// Scores of the packed keys (n of them) for the rows of group grp that lie in [row0, row1), written
// at column j0 of those rows' score lines, times the scale.
__attribute__((target("avx512f,amx-tile,amx-bf16"))) inline void block_scores(const Problem& a, int64_t grp,
                                                                               int64_t row0, int64_t row1, int64_t n,
                                                                               int64_t j0, TileScratch& s) {
  const int64_t D = a.D;
  _tile_zero(0);
  for (int64_t d = 0; d < D; d += 32) {
    _tile_loadd(4, s.kb.data() + d, D * 2);
    _tile_loadd(5, s.qt.data() + (grp * (D / 32) + d / 32) * 512, 64);
    _tile_dpbf16ps(0, 4, 5);
  }
  _tile_stored(0, s.c, 64);  // c[key][column]
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(s.c + i * 16);
  avx512_transpose16(r);  // r[column] holds that row's 16 key scores
  const __mmask16 live = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t row = std::max(row0, grp * 16); row < std::min(row1, grp * 16 + 16); ++row)
    _mm512_mask_storeu_ps(s.p.data() + row * TileScratch::STRIDE + j0, live, _mm512_mul_ps(r[row % 16], scale));
}

// Rows [row0, row1)'s scores for keys keys[0..n) (n <= 16), column j0 of their score lines.
__attribute__((target("avx512f,avx512bf16,amx-tile,amx-bf16"))) inline void scores(const Problem& a, const Item& it,
                                                                                    const int32_t* keys, int64_t n,
                                                                                    int64_t j0, int64_t row0,
                                                                                    int64_t row1, TileScratch& s) {
  pack_keys(a, it.g, keys, n, s);
  for (int64_t grp = row0 / 16; grp * 16 < row1; ++grp) block_scores(a, grp, row0, row1, n, j0, s);
}

// Values of 32 keys (keys[0..n), zero past n) by pairs: B operands [D / 16][16 pairs][16 dims][2].
__attribute__((target("avx512f,avx512bf16"))) inline void pack_values(const Problem& a, int64_t g, const int32_t* keys,
                                                                      int64_t n, uint16_t* dst) {
  const int64_t D = a.D;
  // cvtne2ps gives [first key's 16 dims | second key's 16 dims]; interleave them into pairs.
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const float* v = a.v + g * a.v_head;
  for (int64_t kp = 0; kp < KEY_CHUNK / 2; ++kp) {
    const int64_t i0 = 2 * kp, i1 = 2 * kp + 1;
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 x0 = i0 < n ? _mm512_loadu_ps(v + keys[i0] * a.v_tok + d) : _mm512_setzero_ps();
      const __m512 x1 = i1 < n ? _mm512_loadu_ps(v + keys[i1] * a.v_tok + d) : _mm512_setzero_ps();
      _mm512_storeu_si512(dst + ((d / 16) * 16 + kp) * 32, _mm512_permutexvar_epi16(pairs, to_bf16x32(x0, x1)));
    }
  }
}

// o[rows r0 .. r0 + 16) += pb[those rows, chunk] . values of the chunk (packed at vb), D / 16 blocks
// of 16 dimensions, four accumulator tiles at a time. Rows past the item's are scratch padding.
__attribute__((target("amx-tile,amx-bf16"))) inline void chunk_sums(const Problem& a, int64_t r0, int64_t c0,
                                                                    int64_t c1, const uint16_t* vb, TileScratch& s) {
  const int64_t D = a.D, blocks = D / 16;
  for (int64_t b0 = 0; b0 < blocks; b0 += 4) {
    float* o = s.o.data() + r0 * D + b0 * 16;
    _tile_loadd(0, o, D * 4);
    _tile_loadd(1, o + 16, D * 4);
    _tile_loadd(2, o + 32, D * 4);
    _tile_loadd(3, o + 48, D * 4);
    for (int64_t c = c0; c < c1; ++c) {
      const uint16_t* v = vb + (c - c0) * D * KEY_CHUNK + b0 * 16 * 32;
      _tile_loadd(4, s.pb.data() + r0 * TileScratch::STRIDE + c * KEY_CHUNK, TileScratch::STRIDE * 2);
      _tile_loadd(5, v, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, v + 512, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(5, v + 1024, 64);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, v + 1536, 64);
      _tile_dpbf16ps(3, 4, 6);
    }
    _tile_stored(0, o, D * 4);
    _tile_stored(1, o + 16, D * 4);
    _tile_stored(2, o + 32, D * 4);
    _tile_stored(3, o + 48, D * 4);
  }
}

// Softmax weights of each row in bf16, zero from its last key to the end of its chunk.
__attribute__((target("avx512f,avx512bf16"))) inline void weights_bf16(const float* p, int64_t n, uint16_t* dst) {
  for (int64_t t = 0; t < n; t += 32) {
    const __mmask16 lo = n - t >= 16 ? static_cast<__mmask16>(0xFFFF)
                                     : static_cast<__mmask16>((1u << std::max<int64_t>(0, n - t)) - 1u);
    const __mmask16 hi = n - t >= 32 ? static_cast<__mmask16>(0xFFFF)
                                     : static_cast<__mmask16>((1u << std::max<int64_t>(0, n - t - 16)) - 1u);
    _mm512_storeu_si512(dst + t, to_bf16x32(_mm512_maskz_loadu_ps(lo, p + t), _mm512_maskz_loadu_ps(hi, p + t + 16)));
  }
}

__attribute__((target("avx512f,avx512bf16,amx-tile,amx-bf16"))) inline void amx_segment(const Problem& a,
                                                                                        const Lists& L, int64_t g,
                                                                                        int64_t seg, float* partial,
                                                                                        TileScratch& s) {
  const int64_t n_rep = a.H / a.Hkv, D = a.D, t0 = seg * SEGMENT, t1 = t0 + SEGMENT;
  const Item it{g, n_rep, n_rep * a.Lq, t0};
  s.fit(it.rows, D);
  pack_queries(a, it, s);
  const int32_t* ident = L.of(0, a.Lk);  // keys 0, 1, 2, ... where every position's list starts so
  // Shared keys: one block of K for every row.
  const int64_t shared_end = std::min(t1, L.shared);
  for (int64_t t = t0; t < shared_end; t += KEY_BLOCK)
    scores(a, it, ident + t, std::min<int64_t>(KEY_BLOCK, shared_end - t), t - t0, 0, it.rows, s);
  // Each position's own keys in this segment, for its rows.
  const int64_t own_start = std::max(t0, L.shared);
  for (int64_t pos = 0; pos < a.Lq; ++pos) {
    const int32_t* keys = L.of(pos, a.Lk);
    const int64_t end = std::min(t1, L.counts[pos]);
    for (int64_t t = own_start; t < end; t += KEY_BLOCK)
      scores(a, it, keys + t, std::min<int64_t>(KEY_BLOCK, end - t), t - t0, pos * n_rep, (pos + 1) * n_rep, s);
  }
  for (int64_t row = 0; row < it.rows; ++row) {
    const int64_t n = std::min(t1, L.counts[row / n_rep]) - t0;
    if (n <= 0) continue;
    float* p = s.p.data() + row * TileScratch::STRIDE;
    s.l[row] = avx512_softmax(p, n, &s.m[row]);
    weights_bf16(p, n, s.pb.data() + row * TileScratch::STRIDE);
  }
  // Value sums: chunks whose 32 keys are all shared, for every row at once...
  const int64_t full = std::max<int64_t>(0, shared_end - t0) / KEY_CHUNK;
  for (int64_t c = 0; c < full; ++c)
    pack_values(a, g, ident + t0 + c * KEY_CHUNK, KEY_CHUNK, s.vb.data() + c * D * KEY_CHUNK);
  if (full > 0)
    for (int64_t r0 = 0; r0 < it.rows; r0 += 16) chunk_sums(a, r0, 0, full, s.vb.data(), s);
  // ...then each position's remaining chunks (the shared keys' tail and its own), keys gathered.
  for (int64_t pos = 0; pos < a.Lq; ++pos) {
    const int32_t* keys = L.of(pos, a.Lk);
    const int64_t end = std::min(t1, L.counts[pos]), r0 = pos * n_rep;
    if (end <= t0) continue;
    const int64_t last = (end - t0 + KEY_CHUNK - 1) / KEY_CHUNK;
    if (last <= full) continue;
    // The tiles compute 16 rows at a time; only the position's rows are kept (a model with more
    // than 16 query heads per kv head takes several windows).
    std::vector<float>& keep = s.keep;
    for (int64_t w0 = r0; w0 < r0 + n_rep; w0 += 16) {
      const int64_t mine = std::min<int64_t>(16, r0 + n_rep - w0);
      std::memcpy(keep.data(), s.o.data() + w0 * D, keep.size() * sizeof(float));
      for (int64_t c = full; c < last; ++c) {
        const int64_t first = t0 + c * KEY_CHUNK;
        pack_values(a, g, keys + first, std::min<int64_t>(KEY_CHUNK, end - first), s.vb.data());
        chunk_sums(a, w0, c, c + 1, s.vb.data(), s);
      }
      std::memcpy(keep.data(), s.o.data() + w0 * D, static_cast<size_t>(mine * D) * sizeof(float));
      std::memcpy(s.o.data() + w0 * D, keep.data(), keep.size() * sizeof(float));
    }
  }
  store_segment(a, L, g, seg, s.o.data(), s.l.data(), s.m.data(), partial);
}

inline bool amx_attention_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && qd_amx::supported();
}

#else
inline bool amx_attention_supported() { return false; }
#endif

}  // namespace qd_attention
