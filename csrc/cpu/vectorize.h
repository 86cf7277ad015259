// What the CPU kernels share for explicit vectorisation.
//
// MONOLOSS_VECTOR_CLONES: AVX-512 and AVX2 clones of a function, picked at load
// time by what the CPU has; the build itself targets baseline x86-64.
//
// TileVec: one 16-float row of a tile (one cache line, one AVX-512 register) as
// a GCC/Clang vector type. It is split into AVX2/SSE registers by the other
// clones. Used where the auto-vectoriser would vectorise across entries
// (gathers) instead of across the tile.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MONOLOSS_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MONOLOSS_VECTOR_CLONES
#endif

// 64-byte vectors passed by value have another ABI in the baseline build than in
// the AVX-512 clones (-Wpsabi). Harmless: the helpers are inline and file-local.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace monoloss_kernels {

constexpr int64_t kTileWidth = 16;
typedef float TileVec __attribute__((vector_size(kTileWidth * sizeof(float))));

inline TileVec load_tile_row(const float* p) {
  TileVec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

}  // namespace monoloss_kernels
