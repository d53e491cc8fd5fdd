// Prefill attention over the cached prefix on AMX tiles: what prefill_attention_bf16.h computes (the same
// definition: inputs rounded to bf16, fp32 sums, softmax weights rounded to bf16), for CPUs with tiles.
//
// Layout (why it is not the vdpbf16ps kernel's): the keys are the A operand of the score tiles and the
// queries the B operand, so a score tile row holds one key's scores for 16 query rows. The online softmax
// then runs across vectors (one per key) with no horizontal reduction and no scalar exponential per row;
// the weights come out as the B operand of the value tiles directly (pairs of keys, 16 rows), and the value
// sums come out transposed (dimensions by rows) from V^T as the A operand. An item is a kv head and 16 of
// its rows; every item streams its head's packed keys and values (from L2 at agent lengths) up to the last
// key its rows see: all of them, or with a causal limit (Problem::causal) the cached keys and the chunk's
// own up to each row's position, so one call computes a whole prefill chunk's attention.
//
// Tiles (configure(), all 16 rows of 64 bytes): see rows_any (any head dimension) and rows_d64 (64).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "amx_linear.h"
#include "attention.h"
#include "exp2_avx512.h"
#include "prefill_attention_bf16.h"

#if defined(QD_X86) && defined(QD_AMX)
#define QD_PREFILL_AMX 1

namespace qd_prefill_amx {

constexpr int64_t KC = 64;  // keys per chunk: four score tiles, two weight tiles

using qd_prefill::Problem;  // the same problem as the vdpbf16ps kernel's

inline int64_t padded_keys(int64_t Lk) { return (Lk + KC - 1) / KC * KC; }

__attribute__((target("amx-tile,amx-bf16"))) inline void configure() {
  qd_amx::TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  asm volatile("" : : "r"(&cfg) : "memory");  // ldtilecfg reads all 64 bytes (see qd_amx::configure)
  _tile_loadconfig(&cfg);
}

#define QD_AMX_PREFILL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Keys [j0, j1) of kv head g in bf16, one row of D each (kb + j * D); keys past Lk are zero.
QD_AMX_PREFILL_TARGET inline void pack_keys(const Problem& a, int64_t g, int64_t j0, int64_t j1, uint16_t* kb) {
  for (int64_t j = j0; j < j1; ++j) {
    uint16_t* dst = kb + j * a.D;
    if (j >= a.Lk) {
      std::memset(dst, 0, static_cast<size_t>(a.D) * 2);
      continue;
    }
    const float* k = a.k + g * a.k_head + j * a.k_tok;
    for (int64_t d = 0; d < a.D; d += 32)
      _mm512_storeu_si512(dst + d, reinterpret_cast<__m512i>(
          _mm512_cvtne2ps_pbh(_mm512_loadu_ps(k + d + 16), _mm512_loadu_ps(k + d))));
  }
}

// Values of keys [j0, j1) (a multiple of 32 apart) of kv head g, transposed into bf16 blocks of 32 keys:
// dimension d of key j at vt + (j / 32) * D * 32 + d * 32 + j % 32. One value tile (16 dimensions by 16
// pairs of keys) is then 1 KB in a row, not 16 rows a whole cache apart.
QD_AMX_PREFILL_TARGET inline void pack_values(const Problem& a, int64_t g, int64_t j0, int64_t j1, uint16_t* vt) {
  for (int64_t j = j0; j < j1; j += 16)
    for (int64_t d0 = 0; d0 < a.D; d0 += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = j + i < a.Lk ? _mm512_loadu_ps(a.v + g * a.v_head + (j + i) * a.v_tok + d0) : _mm512_setzero_ps();
      qd_attention::avx512_transpose16(r);  // r[d] holds dimension d0 + d of the 16 keys
      for (int64_t d = 0; d < 16; ++d)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vt + (j / 32) * a.D * 32 + (d0 + d) * 32 + j % 32),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r[d])));
    }
}

// 2^t (exp2_avx512.h): here t stays at most LAG, and far below -126 it underflows to zero.
using qd_vec::exp2_vec;

struct alignas(64) Scratch {
  alignas(64) uint32_t qt[8 * 16 * 16];    // queries: [D / 32][16 pairs][16 rows] bf16 pairs (D <= 256)
  alignas(64) float s[KC * 16];            // one chunk's scores: [key][row]
  alignas(64) uint32_t pb[KC / 2 * 16];    // its weights: [pair of keys][row] bf16 pairs
  alignas(64) float o[256 * 16];           // value sums: [dimension][row]
};

// cvtne2ps gives [16 of a | 16 of b]; this interleaves them into 16 pairs (a_i, b_i).
QD_AMX_PREFILL_TARGET inline __m512i pairs_of(__m512 a, __m512 b) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
}

// The reference maximum m of a row moves only when a chunk's scores pass it by more than 2^LAG (base 2):
// weights up to 2^LAG are exact enough in fp32 sums and in bf16 (rounding is relative), and moving m means
// scaling every running sum of the row, the costly part (the sums live in tiles on the head-dim-64 path).
constexpr float LAG = 8.0f;

// GCC's tile loads and stores are asm statements that do not say they touch memory: this tells the compiler
// that scratch written by vector code is read by tiles (and the reverse) at this point, so it keeps the order.
inline void fence() { asm volatile("" : : : "memory"); }

// Queries of the item's rows as the score tiles' B operand: [D / 32][16 pairs][16 rows]; rows past n zero.
QD_AMX_PREFILL_TARGET inline void pack_queries(const Problem& a, int64_t base, int64_t n, Scratch& sc) {
  const int64_t chunks = a.D / 32;
  std::memset(sc.qt, 0, static_cast<size_t>(chunks * 256) * 4);
  for (int64_t r = 0; r < n; ++r) {
    const float* q = a.q + (base + r) * a.D;
    for (int64_t c = 0; c < chunks; ++c) {
      alignas(64) uint32_t pairs[16];
      _mm512_store_si512(pairs, reinterpret_cast<__m512i>(
          _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + 32 * c + 16), _mm512_loadu_ps(q + 32 * c))));
      for (int p = 0; p < 16; ++p) sc.qt[(c * 16 + p) * 16 + r] = pairs[p];
    }
  }
  fence();
}

// The online softmax over `count` keys' scores sc.s ([key][row]), 16 rows at once: weights 2^(cv s - m)
// into sc.pb as bf16 pairs of keys, their sum into l. Masked: key j0 + t counts for a row only up to the
// row's last visible key `last` (the causal diagonal, and keys past the end); its weight is zero beyond.
// Returns the rows whose reference maximum moved, with alpha the factor their running sums must take.
template <bool Masked>
QD_AMX_PREFILL_TARGET inline __mmask16 softmax_step(int64_t count, int64_t j0, __m512 last, __m512 cv, __m512& m,
                                                    __m512& l, __m512& alpha, Scratch& sc) {
  fence();
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = minus_inf;
  for (int64_t t = 0; t < count; ++t) {
    const __m512 st = _mm512_load_ps(sc.s + t * 16);
    if constexpr (Masked)
      top = _mm512_mask_max_ps(top, _mm512_cmp_ps_mask(last, _mm512_set1_ps(float(j0 + t)), _CMP_GE_OQ), top, st);
    else
      top = _mm512_max_ps(top, st);
  }
  top = _mm512_mul_ps(top, cv);
  const __mmask16 moved = _mm512_cmp_ps_mask(top, _mm512_add_ps(m, _mm512_set1_ps(LAG)), _CMP_GT_OQ);
  alpha = _mm512_set1_ps(1.0f);
  if (moved) {  // (exactly 1 for the rows that stay: exp2_vec(0) is 1 only to 6e-7)
    const __m512 m_new = _mm512_mask_mov_ps(m, moved, top);
    alpha = _mm512_mask_mov_ps(alpha, moved, exp2_vec(_mm512_sub_ps(m, m_new)));
    m = m_new;
  }
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < count; t += 2) {  // weights may exceed 1 (by at most 2^LAG)
    __m512 e0 = exp2_vec(_mm512_fmsub_ps(_mm512_load_ps(sc.s + t * 16), cv, m));
    __m512 e1 = exp2_vec(_mm512_fmsub_ps(_mm512_load_ps(sc.s + (t + 1) * 16), cv, m));
    if constexpr (Masked) {  // (a hidden key's weight may be any number, even infinite: it is replaced)
      e0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(last, _mm512_set1_ps(float(j0 + t)), _CMP_GE_OQ), e0);
      e1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(last, _mm512_set1_ps(float(j0 + t + 1)), _CMP_GE_OQ), e1);
    }
    sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
    _mm512_store_si512(sc.pb + (t / 2) * 16, pairs_of(e0, e1));
  }
  l = _mm512_fmadd_ps(l, alpha, sum);
  fence();
  return moved;
}

// Which keys the item's rows see: every row key 0 to its `last` (all keys, or in a causal call the cached
// keys and the chunk's up to the row's own position). Steps up to key `unmasked` need no mask; no row sees
// past key `end` - 1.
struct Visible {
  __m512 last;
  int64_t unmasked, end;
};

QD_AMX_PREFILL_TARGET inline Visible visible(const Problem& a, int64_t base, int64_t n) {
  alignas(64) float last[16];
  int64_t lo = a.Lk - 1, hi = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row_last = a.causal < 0 ? a.Lk - 1 : std::min(a.Lk - 1, a.causal + (base + r) % a.Lq);
    last[r] = float(row_last);
    lo = std::min(lo, row_last);
    hi = std::max(hi, row_last);
  }
  for (int64_t r = n; r < 16; ++r) last[r] = float(hi);  // rows past n are computed and dropped
  return {_mm512_load_ps(last), lo, hi + 1};
}

// The rows' outputs from the value sums sc.o ([dimension][row]) and the softmax's m and l.
QD_AMX_PREFILL_TARGET inline void finish(const Problem& a, int64_t base, int64_t n, __m512 m, __m512 l,
                                         const Scratch& sc) {
  fence();
  alignas(64) float m_row[16], l_row[16];
  _mm512_store_ps(m_row, m);
  _mm512_store_ps(l_row, l);
  for (int64_t r = 0; r < n; ++r) {
    float* out = a.out + (base + r) * a.D;
    const float inv = 1.0f / l_row[r];
    for (int64_t d = 0; d < a.D; ++d) out[d] = sc.o[d * 16 + r] * inv;
    a.lse[base + r] = (m_row[r] + std::log2(l_row[r])) * 0.6931471805599453f;  // back to base e
  }
}

// Rows [r0, r0 + n) (n <= 16) of kv head g (head-major: row r is query head g * n_rep + r / Lq at position
// r % Lq), over the head's packed keys kb and values vt (keys rounded up to KC). Any head dimension (a
// multiple of 64): the value sums live in sc.o and pass through tiles 0-3 each chunk.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16"))) inline void rows_any(
    const Problem& a, int64_t g, int64_t r0, int64_t n, const uint16_t* kb, const uint16_t* vt, Scratch& sc) {
  const int64_t D = a.D, chunks = D / 32, n_rep = a.H / a.Hkv;
  const int64_t base = g * n_rep * a.Lq + r0;
  pack_queries(a, base, n, sc);
  std::memset(sc.o, 0, static_cast<size_t>(D * 16) * 4);
  const __m512 cv = _mm512_set1_ps(a.scale * 1.4426950408889634f);  // base 2: weights 2^(c s - m)
  __m512 m = _mm512_set1_ps(-1e30f), l = _mm512_setzero_ps(), alpha;  // (finite: 2^(m - m') stays a number)
  const Visible seen = visible(a, base, n);
  for (int64_t j0 = 0; j0 < seen.end; j0 += KC) {
    // Scores: tile b holds keys j0 + 16 b .. + 16 (rows of the tile) for the 16 query rows (columns).
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* k = kb + j0 * D;
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(5, sc.qt + c * 256, 64);
      _tile_loadd(4, k + 32 * c, D * 2);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, k + 16 * D + 32 * c, D * 2);
      _tile_dpbf16ps(1, 6, 5);
      _tile_loadd(4, k + 32 * D + 32 * c, D * 2);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, k + 48 * D + 32 * c, D * 2);
      _tile_dpbf16ps(3, 6, 5);
    }
    _tile_stored(0, sc.s, 64);
    _tile_stored(1, sc.s + 256, 64);
    _tile_stored(2, sc.s + 512, 64);
    _tile_stored(3, sc.s + 768, 64);
    const bool moved = j0 + KC - 1 <= seen.unmasked ? softmax_step<false>(KC, j0, seen.last, cv, m, l, alpha, sc)
                                                    : softmax_step<true>(KC, j0, seen.last, cv, m, l, alpha, sc);
    if (moved)
      for (int64_t d = 0; d < D; ++d) _mm512_store_ps(sc.o + d * 16, _mm512_mul_ps(_mm512_load_ps(sc.o + d * 16), alpha));
    // Value sums: o[d][row] += sum over the chunk's keys of v[key][d] * weight[key][row].
    fence();
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      float* o = sc.o + d0 * 16;
      _tile_loadd(0, o, 64);
      _tile_loadd(1, o + 256, 64);
      _tile_loadd(2, o + 512, 64);
      _tile_loadd(3, o + 768, 64);
      for (int64_t p0 = 0; p0 < KC / 2; p0 += 16) {  // 16 pairs of keys (one block of 32) a step
        const uint16_t* v = vt + (j0 + 2 * p0) / 32 * D * 32 + d0 * 32;
        _tile_loadd(5, sc.pb + p0 * 16, 64);
        _tile_loadd(4, v, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, v + 16 * 32, 64);
        _tile_dpbf16ps(1, 6, 5);
        _tile_loadd(4, v + 32 * 32, 64);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, v + 48 * 32, 64);
        _tile_dpbf16ps(3, 6, 5);
      }
      _tile_stored(0, o, 64);
      _tile_stored(1, o + 256, 64);
      _tile_stored(2, o + 512, 64);
      _tile_stored(3, o + 768, 64);
    }
  }
  finish(a, base, n, m, l, sc);
}

// The head-dimension-64 path's value sums (tiles 2-5, 16 dimensions each) to and from o ([dimension][row]).
__attribute__((target("amx-tile"))) inline void sums_d64_out(float* o) {
  _tile_stored(2, o, 64);
  _tile_stored(3, o + 256, 64);
  _tile_stored(4, o + 512, 64);
  _tile_stored(5, o + 768, 64);
  fence();
}

__attribute__((target("amx-tile"))) inline void sums_d64_in(const float* o) {
  fence();
  _tile_loadd(2, o, 64);
  _tile_loadd(3, o + 256, 64);
  _tile_loadd(4, o + 512, 64);
  _tile_loadd(5, o + 768, 64);
}

// The same rows for a head dimension of 64 (SmolLM2's): the value sums stay in tiles 2-5 for the whole
// call, which leaves two tiles for scores, so a step takes 32 keys; 6 and 7 take the A and B operands.
// The sums go through memory only when a row's reference maximum moves (rarely, with LAG).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16"))) inline void rows_d64(
    const Problem& a, int64_t g, int64_t r0, int64_t n, const uint16_t* kb, const uint16_t* vt, Scratch& sc) {
  constexpr int64_t D = 64;
  const int64_t n_rep = a.H / a.Hkv, base = g * n_rep * a.Lq + r0;
  pack_queries(a, base, n, sc);
  const __m512 cv = _mm512_set1_ps(a.scale * 1.4426950408889634f);
  __m512 m = _mm512_set1_ps(-1e30f), l = _mm512_setzero_ps(), alpha;
  _tile_zero(2);
  _tile_zero(3);
  _tile_zero(4);
  _tile_zero(5);
  const Visible seen = visible(a, base, n);
  for (int64_t j0 = 0; j0 < seen.end; j0 += 32) {
    const uint16_t* k = kb + j0 * D;
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(7, sc.qt, 64);
    _tile_loadd(6, k, D * 2);
    _tile_dpbf16ps(0, 6, 7);
    _tile_loadd(6, k + 16 * D, D * 2);
    _tile_dpbf16ps(1, 6, 7);
    _tile_loadd(7, sc.qt + 256, 64);
    _tile_loadd(6, k + 32, D * 2);
    _tile_dpbf16ps(0, 6, 7);
    _tile_loadd(6, k + 16 * D + 32, D * 2);
    _tile_dpbf16ps(1, 6, 7);
    _tile_stored(0, sc.s, 64);
    _tile_stored(1, sc.s + 256, 64);
    const bool moved = j0 + 31 <= seen.unmasked ? softmax_step<false>(32, j0, seen.last, cv, m, l, alpha, sc)
                                                : softmax_step<true>(32, j0, seen.last, cv, m, l, alpha, sc);
    if (moved && j0 > 0) {
      sums_d64_out(sc.o);
      for (int64_t d = 0; d < D; ++d) _mm512_store_ps(sc.o + d * 16, _mm512_mul_ps(_mm512_load_ps(sc.o + d * 16), alpha));
      sums_d64_in(sc.o);
    }
    const uint16_t* v = vt + j0 * D;  // the block of these 32 keys
    _tile_loadd(7, sc.pb, 64);
    _tile_loadd(6, v, 64);
    _tile_dpbf16ps(2, 6, 7);
    _tile_loadd(6, v + 16 * 32, 64);
    _tile_dpbf16ps(3, 6, 7);
    _tile_loadd(6, v + 32 * 32, 64);
    _tile_dpbf16ps(4, 6, 7);
    _tile_loadd(6, v + 48 * 32, 64);
    _tile_dpbf16ps(5, 6, 7);
  }
  sums_d64_out(sc.o);
  finish(a, base, n, m, l, sc);
}

inline void rows(const Problem& a, int64_t g, int64_t r0, int64_t n, const uint16_t* kb, const uint16_t* vt,
                 Scratch& sc) {
  if (a.D == 64)
    rows_d64(a, g, r0, n, kb, vt, sc);
  else
    rows_any(a, g, r0, n, kb, vt, sc);
}

#undef QD_AMX_PREFILL_TARGET

}  // namespace qd_prefill_amx

#endif  // QD_X86 && QD_AMX
