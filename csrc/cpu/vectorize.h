// What the CPU kernels share for explicit vectorisation, and the tiles of unit
// embeddings that both sparse (CSR) kernels read.
//
// MONOLOSS_VECTOR_CLONES: AVX-512 and AVX2 clones of a function, picked at load
// time by what the CPU has; the build itself targets baseline x86-64.
//
// TileVec: one 16-float row of a tile (one cache line, one AVX-512 register) as
// a GCC/Clang vector type. It is split into AVX2/SSE registers by the other
// clones. Used where the auto-vectoriser would vectorise across entries
// (gathers) instead of across the tile.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MONOLOSS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MONOLOSS_VECTOR_CLONES
#endif

// 64-byte vectors passed by value have another ABI in the baseline build than in
// the AVX-512 clones (-Wpsabi), so the helpers taking or returning them must be
// inlined into each clone (MONOLOSS_VECTOR_INLINE): an out-of-line baseline copy
// called from the AVX-512 clone reads its arguments from the wrong place.
#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__GNUC__)
#define MONOLOSS_VECTOR_INLINE inline __attribute__((always_inline))
#else
#define MONOLOSS_VECTOR_INLINE inline
#endif

namespace monoloss_kernels {

constexpr int64_t kTileWidth = 16;
typedef float TileVec __attribute__((vector_size(kTileWidth * sizeof(float))));

MONOLOSS_VECTOR_INLINE TileVec load_tile_row(const float* p) {
  TileVec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// The 16 lane sums of 16 vectors, as one vector: lane i holds the sum of p[i]'s
// lanes. Four rounds of pairwise "halves of two, added" (30 shuffles and 15
// adds for 16 sums) instead of reducing each vector to a scalar on its own
// (about 10 dependent steps each).
MONOLOSS_VECTOR_INLINE TileVec lane_sums(const TileVec* p) {
  TileVec halves[8], quarters[4], eighths[2];
  for (int i = 0; i < 8; ++i) {  // lanes 0-7: p[2i]'s 8 partial sums, 8-15: p[2i+1]'s
    halves[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21,
                                        22, 23) +
                __builtin_shufflevector(p[2 * i], p[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27,
                                        28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {  // 4 lanes per vector p[4i..4i+3]
    quarters[i] = __builtin_shufflevector(halves[2 * i], halves[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                          19, 24, 25, 26, 27) +
                  __builtin_shufflevector(halves[2 * i], halves[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                          22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {  // 2 lanes per vector p[8i..8i+7]
    eighths[i] = __builtin_shufflevector(quarters[2 * i], quarters[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17,
                                         20, 21, 24, 25, 28, 29) +
                 __builtin_shufflevector(quarters[2 * i], quarters[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                         22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(eighths[0], eighths[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                 30) +
         __builtin_shufflevector(eighths[0], eighths[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                 31);
}

namespace {

// Rows per block of unit-embedding tiles: a block of one tile is 1 MiB, half of
// a core's 2 MiB L2 on the Xeon this was tuned on, leaving room for the stream
// of entries that reads it (a whole 2 MiB tile did not stay in L2 next to that
// stream).
constexpr int64_t kBlockRows = 16384;
// Rows summed in float32 before their float64 total (as the dense kernel's chunks).
constexpr int64_t kRowsPerPartial = 64;

// Unit embedding rows [n0, n1) into the tiles (num_tiles, tile_rows, kTileWidth)
// of the block starting at row_base, zero-padded past d; adds their column sums
// into unit_sum (d, float64) unless it is null.
MONOLOSS_VECTOR_CLONES
void unit_tiles(const float* __restrict__ emb, const float* __restrict__ inv_norm, int64_t n0, int64_t n1,
                int64_t row_base, int64_t tile_rows, int64_t d, float* __restrict__ tiles,
                double* __restrict__ unit_sum) {
  const int64_t num_tiles = (d + kTileWidth - 1) / kTileWidth, full_tiles = d / kTileWidth;
  // Plain floats: a std::vector<TileVec> would not get the vectors' 64-byte alignment.
  std::vector<float> partial(num_tiles * kTileWidth);
  for (int64_t r0 = n0; r0 < n1; r0 += kRowsPerPartial) {
    std::fill(partial.begin(), partial.end(), 0.0f);
    for (int64_t n = r0; n < std::min(r0 + kRowsPerPartial, n1); ++n) {
      const float* row = emb + n * d;
      for (int64_t t = 0; t < num_tiles; ++t) {
        TileVec unit = {};
        if (t < full_tiles) {
          unit = load_tile_row(row + t * kTileWidth) * inv_norm[n];
        } else {
          for (int64_t i = 0; i < d - t * kTileWidth; ++i) unit[i] = row[t * kTileWidth + i] * inv_norm[n];
        }
        __builtin_memcpy(tiles + (t * tile_rows + n - row_base) * kTileWidth, &unit, sizeof(unit));
        const TileVec sum = load_tile_row(&partial[t * kTileWidth]) + unit;
        __builtin_memcpy(&partial[t * kTileWidth], &sum, sizeof(sum));
      }
    }
    if (unit_sum == nullptr) continue;
    for (int64_t t = 0; t < num_tiles; ++t) {
      for (int64_t i = 0; i < std::min(kTileWidth, d - t * kTileWidth); ++i) {
        unit_sum[t * kTileWidth + i] += partial[t * kTileWidth + i];
      }
    }
  }
}

}  // namespace

}  // namespace monoloss_kernels
