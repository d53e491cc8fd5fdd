// Prefill attention over the cached prefix on AMX tiles: what prefill_attention_bf16.h computes (the same
// definition: inputs rounded to bf16, fp32 sums, softmax weights rounded to bf16), for CPUs with tiles.
//
// Layout (why it is not the vdpbf16ps kernel's): the keys are the A operand of the score tiles and the
// queries the B operand, so a score tile row holds one key's scores for 16 query rows. The online softmax
// then runs across vectors (one per key) with no horizontal reduction and no scalar exponential per row;
// the weights come out as the B operand of the value tiles directly (pairs of keys, 16 rows), and the value
// sums come out transposed (dimensions by rows) from V^T as the A operand. An item is a kv head and 16 of
// its rows; every item streams all of its head's packed keys and values (from L2 at agent lengths).
//
// Tiles (configure()): 0-3 accumulate (scores of 4 key blocks, or 4 blocks of 16 dimensions' sums), 4 and
// 6 take A operands in turn (keys, or V^T), 5 and 7 B operands (queries, or weights).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "amx_linear.h"
#include "attention.h"
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

// Values of keys [j0, j1) (a multiple of 16 apart) of kv head g transposed into bf16: vt + d * keys + j.
QD_AMX_PREFILL_TARGET inline void pack_values(const Problem& a, int64_t g, int64_t j0, int64_t j1, int64_t keys,
                                              uint16_t* vt) {
  for (int64_t j = j0; j < j1; j += 16)
    for (int64_t d0 = 0; d0 < a.D; d0 += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = j + i < a.Lk ? _mm512_loadu_ps(a.v + g * a.v_head + (j + i) * a.v_tok + d0) : _mm512_setzero_ps();
      qd_attention::avx512_transpose16(r);  // r[d] holds dimension d0 + d of the 16 keys
      for (int64_t d = 0; d < 16; ++d)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vt + (d0 + d) * keys + j),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r[d])));
    }
}

// 2^t for t <= 0, relative error under 6e-6 (a degree-4 fit on [-1/2, 1/2], scaled by 2^round(t)): ample
// for weights rounded to bf16 (2^-9). Far below -126 it underflows to zero.
QD_AMX_PREFILL_TARGET inline __m512 exp2_nonpositive(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.009554105f), f, _mm512_set1_ps(0.05587041f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24024697f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69312803f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99999944f));
  return _mm512_scalef_ps(p, n);
}

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

// Rows [r0, r0 + n) (n <= 16) of kv head g (head-major: row r is query head g * n_rep + r / Lq at position
// r % Lq), over the head's packed keys kb and values vt (keys rounded up to KC).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16"))) inline void rows(
    const Problem& a, int64_t g, int64_t r0, int64_t n, const uint16_t* kb, const uint16_t* vt, Scratch& sc) {
  const int64_t D = a.D, chunks = D / 32, keys = padded_keys(a.Lk), n_rep = a.H / a.Hkv;
  const int64_t base = g * n_rep * a.Lq + r0;
  std::memset(sc.qt, 0, static_cast<size_t>(chunks * 256) * 4);
  for (int64_t r = 0; r < n; ++r) {
    const float* q = a.q + (base + r) * D;
    for (int64_t c = 0; c < chunks; ++c) {
      alignas(64) uint32_t pairs[16];
      _mm512_store_si512(pairs, reinterpret_cast<__m512i>(
          _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + 32 * c + 16), _mm512_loadu_ps(q + 32 * c))));
      for (int p = 0; p < 16; ++p) sc.qt[(c * 16 + p) * 16 + r] = pairs[p];
    }
  }
  std::memset(sc.o, 0, static_cast<size_t>(D * 16) * 4);
  const __m512 cv = _mm512_set1_ps(a.scale * 1.4426950408889634f);  // base 2: weights 2^(c s - m)
  __m512 m = _mm512_set1_ps(-1e30f), l = _mm512_setzero_ps();      // (finite: 2^(m - m') stays a number)
  for (int64_t j0 = 0; j0 < keys; j0 += KC) {
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
    // Online softmax, 16 rows at once.
    const int64_t live = std::min(KC, a.Lk - j0);
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < live; ++t) top = _mm512_max_ps(top, _mm512_load_ps(sc.s + t * 16));
    const __m512 m_new = _mm512_max_ps(m, _mm512_mul_ps(top, cv));
    const __m512 alpha = exp2_nonpositive(_mm512_sub_ps(m, m_new));
    m = m_new;
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < KC; t += 2) {
      __m512 e0 = _mm512_setzero_ps(), e1 = _mm512_setzero_ps();
      if (t < live) e0 = exp2_nonpositive(_mm512_fmsub_ps(_mm512_load_ps(sc.s + t * 16), cv, m));
      if (t + 1 < live) e1 = exp2_nonpositive(_mm512_fmsub_ps(_mm512_load_ps(sc.s + (t + 1) * 16), cv, m));
      sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
      _mm512_store_si512(sc.pb + (t / 2) * 16, pairs_of(e0, e1));
    }
    l = _mm512_fmadd_ps(l, alpha, sum);
    if (_mm512_cmp_ps_mask(alpha, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ))  // a row's maximum grew
      for (int64_t d = 0; d < D; ++d) _mm512_store_ps(sc.o + d * 16, _mm512_mul_ps(_mm512_load_ps(sc.o + d * 16), alpha));
    // Value sums: o[d][row] += sum over the chunk's keys of v[key][d] * weight[key][row].
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      float* o = sc.o + d0 * 16;
      _tile_loadd(0, o, 64);
      _tile_loadd(1, o + 256, 64);
      _tile_loadd(2, o + 512, 64);
      _tile_loadd(3, o + 768, 64);
      for (int64_t p0 = 0; p0 < KC / 2; p0 += 16) {  // 16 pairs of keys a step
        const uint16_t* v = vt + d0 * keys + j0 + 2 * p0;
        _tile_loadd(5, sc.pb + p0 * 16, 64);
        _tile_loadd(4, v, keys * 2);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(6, v + 16 * keys, keys * 2);
        _tile_dpbf16ps(1, 6, 5);
        _tile_loadd(4, v + 32 * keys, keys * 2);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(6, v + 48 * keys, keys * 2);
        _tile_dpbf16ps(3, 6, 5);
      }
      _tile_stored(0, o, 64);
      _tile_stored(1, o + 256, 64);
      _tile_stored(2, o + 512, 64);
      _tile_stored(3, o + 768, 64);
    }
  }
  alignas(64) float m_row[16], l_row[16];
  _mm512_store_ps(m_row, m);
  _mm512_store_ps(l_row, l);
  for (int64_t r = 0; r < n; ++r) {
    float* out = a.out + (base + r) * D;
    const float inv = 1.0f / l_row[r];
    for (int64_t d = 0; d < D; ++d) out[d] = sc.o[d * 16 + r] * inv;
    a.lse[base + r] = (m_row[r] + std::log2(l_row[r])) * 0.6931471805599453f;  // back to base e
  }
}

#undef QD_AMX_PREFILL_TARGET

}  // namespace qd_prefill_amx

#endif  // QD_X86 && QD_AMX
