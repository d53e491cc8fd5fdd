// Batch-invariant bf16 linear layer on AMX tiles, for CPUs that have them (Intel Sapphire Rapids
// and later).
//
// y[m, n] = sum_k bf16(x[m, k]) * bf16(w[n, k]) (+ b[n]), accumulated in fp32.
//
// Why: a verification pass reads every weight once whatever its row count, so a pass costs
// the weight stream plus its arithmetic. bf16 weights halve the stream, and one tile
// instruction does 16 rows x 16 features x 32 products, so the arithmetic of the 1-16 rows
// of a pass costs next to nothing: the second row is almost free.
//
// Batch invariance: a tile computes each of its rows on its own (a row's products and their
// order of accumulation do not depend on the tile's other rows or on how many rows it holds),
// and the k loop below runs in one fixed order for every row, tile and thread. So a row's
// value never depends on the rest of the call, as with the fp32 kernel. It is not the fp32
// kernel's value (inputs are rounded to bf16), so a worker uses one kernel or the other for
// all its verification passes, never a mix.
//
// Weights are packed once per layer (pack()): for each group of up to GROUP blocks of 16
// features, for each chunk of 32 k, the blocks' 16 x 64-byte B tiles one after another, so a
// pass reads the packed weights as one sequential stream. Features past N and k past K are
// zero.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// Compilers from before AMX (GCC 11, Clang 12) build the extension without the tile kernels.
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define QD_AMX 1
#endif

namespace qd_amx {

constexpr int64_t KC = 32;    // k per tile step: 16 pairs of bf16, 64 bytes per tile row
constexpr int64_t NC = 16;    // features per tile
constexpr int64_t MC = 16;    // rows per tile
constexpr int64_t GROUP = 4;  // feature blocks computed together (4 accumulator tiles)
constexpr int64_t TILE = KC * NC;  // bf16 elements in one packed B tile

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// fp32 -> bf16, round to nearest even (what the hardware's conversion does); NaN stays NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Layout {
  int64_t N, K, blocks, chunks;  // blocks of NC features, chunks of KC k
  explicit Layout(int64_t n, int64_t k) : N(n), K(k), blocks(round_up(n, NC) / NC), chunks(round_up(k, KC) / KC) {}
  int64_t groups() const { return (blocks + GROUP - 1) / GROUP; }
  int64_t width(int64_t g) const { return std::min<int64_t>(GROUP, blocks - g * GROUP); }
  // Where block t of group g keeps its tile for chunk c.
  int64_t offset(int64_t g, int64_t c, int64_t t) const {
    return (g * GROUP * chunks + c * width(g) + t) * TILE;
  }
  int64_t packed_elements() const { return blocks * chunks * TILE; }
};

// W [N, K] fp32 (nn.Linear's layout) into the packed bf16 layout above.
inline void pack(const float* w, int64_t N, int64_t K, uint16_t* out) {
  const Layout l(N, K);
  for (int64_t g = 0; g < l.groups(); ++g)
    for (int64_t c = 0; c < l.chunks; ++c)
      for (int64_t t = 0; t < l.width(g); ++t) {
        uint16_t* tile = out + l.offset(g, c, t);
        for (int64_t kp = 0; kp < KC / 2; ++kp)
          for (int64_t n = 0; n < NC; ++n)
            for (int64_t j = 0; j < 2; ++j) {
              const int64_t feature = (g * GROUP + t) * NC + n, k = c * KC + 2 * kp + j;
              tile[kp * 2 * NC + n * 2 + j] = feature < N && k < K ? to_bf16(w[feature * K + k]) : 0;
            }
      }
}

// x [M, K] fp32 into bf16 rows of round_up(K, KC), zero past K.
inline void convert_rows(const float* x, int64_t M, int64_t K, std::vector<uint16_t>& out) {
  const int64_t kp = round_up(K, KC);
  out.assign(static_cast<size_t>(M * kp), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) out[m * kp + k] = to_bf16(x[m * K + k]);
}

struct Problem {
  const uint16_t* x;  // [M, round_up(K, KC)] bf16
  const uint16_t* w;  // packed
  const float* b;     // nullptr: no bias
  float* y;           // [M, N]
  int64_t M;
  Layout layout;
};

#ifdef QD_AMX
// Asks the kernel for the AMX tile state once per process (Linux keeps it off until asked).
inline bool request_permission() {
  static const bool granted = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return granted;
}

inline bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-tile") && request_permission();
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3 accumulate GROUP feature blocks, tile 4 holds the rows' inputs, tiles 5 and 6 take
// weight tiles in turn (so one loads while the other multiplies). Attention uses the same shapes.
__attribute__((target("amx-tile,amx-bf16"))) inline void configure(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) cfg.rows[t] = static_cast<uint8_t>(rows), cfg.colsb[t] = 64;
  for (int t = 5; t < 7; ++t) cfg.rows[t] = KC / 2, cfg.colsb[t] = 64;
  // The compiler does not see that ldtilecfg reads all 64 bytes and may drop the stores above.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Rows [m0, m0 + rows) against feature group g.
template <int W>
__attribute__((target("amx-tile,amx-bf16"))) void group(const Problem& p, int64_t m0, int rows, int64_t g) {
  const Layout& l = p.layout;
  const int64_t xstride = l.chunks * KC * 2;
  if constexpr (W > 0) _tile_zero(0);
  if constexpr (W > 1) _tile_zero(1);
  if constexpr (W > 2) _tile_zero(2);
  if constexpr (W > 3) _tile_zero(3);
  const uint16_t* x = p.x + m0 * l.chunks * KC;
  const uint16_t* w = p.w + l.offset(g, 0, 0);
  for (int64_t c = 0; c < l.chunks; ++c, w += W * TILE) {
    _tile_loadd(4, x + c * KC, xstride);
    _tile_loadd(5, w, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (W > 1) { _tile_loadd(6, w + TILE, 64); _tile_dpbf16ps(1, 4, 6); }
    if constexpr (W > 2) { _tile_loadd(5, w + 2 * TILE, 64); _tile_dpbf16ps(2, 4, 5); }
    if constexpr (W > 3) { _tile_loadd(6, w + 3 * TILE, 64); _tile_dpbf16ps(3, 4, 6); }
  }
  alignas(64) float out[GROUP][MC * NC];
  if constexpr (W > 0) _tile_stored(0, out[0], NC * 4);
  if constexpr (W > 1) _tile_stored(1, out[1], NC * 4);
  if constexpr (W > 2) _tile_stored(2, out[2], NC * 4);
  if constexpr (W > 3) _tile_stored(3, out[3], NC * 4);
  for (int t = 0; t < W; ++t) {
    const int64_t n0 = (g * GROUP + t) * NC, count = std::min<int64_t>(NC, l.N - n0);
    for (int r = 0; r < rows; ++r) {
      float* y = p.y + (m0 + r) * l.N + n0;
      const float* o = out[t] + r * NC;
      for (int64_t n = 0; n < count; ++n) y[n] = p.b ? o[n] + p.b[n0 + n] : o[n];
    }
  }
}

// Feature groups [g0, g1) for every row; called once per thread.
__attribute__((target("amx-tile,amx-bf16"))) inline void range(const Problem& p, int64_t g0, int64_t g1) {
  for (int64_t m0 = 0; m0 < p.M; m0 += MC) {
    const int rows = static_cast<int>(std::min<int64_t>(MC, p.M - m0));
    configure(rows);
    for (int64_t g = g0; g < g1; ++g) {
      switch (p.layout.width(g)) {
        case 4: group<4>(p, m0, rows, g); break;
        case 3: group<3>(p, m0, rows, g); break;
        case 2: group<2>(p, m0, rows, g); break;
        default: group<1>(p, m0, rows, g); break;
      }
    }
  }
  _tile_release();
}

__attribute__((target("amx-tile"))) inline void release() { _tile_release(); }
#else
inline bool supported() { return false; }
inline void range(const Problem&, int64_t, int64_t) {}
#endif

// The same sums in plain C++, in the order the tile instruction's definition gives: for each
// chunk, for each pair, acc += x[2i] * w[2i], then acc += x[2i + 1] * w[2i + 1] (each product
// of two bf16 is exact in fp32). The hardware rounds inside a tile step differently (it is not
// bitwise this), so tests use it to check the packed layout on any CPU, within fp32 rounding.
inline void reference(const Problem& p) {
  const Layout& l = p.layout;
  const int64_t kp = l.chunks * KC;
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = 0; n < l.N; ++n) {
      const int64_t g = n / NC / GROUP, t = n / NC % GROUP, col = n % NC;
      float acc = 0.0f;
      for (int64_t c = 0; c < l.chunks; ++c) {
        const uint16_t* tile = p.w + l.offset(g, c, t);
        for (int64_t i = 0; i < KC / 2; ++i)
          for (int64_t j = 0; j < 2; ++j)
            acc += from_bf16(p.x[m * kp + c * KC + 2 * i + j]) * from_bf16(tile[i * 2 * NC + col * 2 + j]);
      }
      p.y[m * l.N + n] = p.b ? acc + p.b[n] : acc;
    }
}

}  // namespace qd_amx
