// What the CPU kernels share for explicit vectorisation.
//
// MONOLOSS_VECTOR_CLONES: AVX-512 and AVX2 clones of a function, picked at load
// time by what the CPU has; the build itself targets baseline x86-64.
//
// LineVec: 16 floats, one cache line (one AVX-512 register), as a GCC/Clang
// vector type. It is split into AVX2/SSE registers by the other clones. Used
// where the auto-vectoriser would vectorise across entries (gathers) instead of
// across the embedding dims.
#pragma once

#include <cstdint>

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

constexpr int64_t kLineFloats = 16;
typedef float LineVec __attribute__((vector_size(kLineFloats * sizeof(float))));

MONOLOSS_VECTOR_INLINE LineVec load_line(const float* p) {
  LineVec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

MONOLOSS_VECTOR_INLINE void store_line(float* p, LineVec v) { __builtin_memcpy(p, &v, sizeof(v)); }

// The 16 lane sums of 16 vectors, as one vector: lane i holds the sum of p[i]'s
// lanes. Four rounds of pairwise "halves of two, added" (30 shuffles and 15
// adds for 16 sums) instead of reducing each vector to a scalar on its own
// (about 10 dependent steps each).
MONOLOSS_VECTOR_INLINE LineVec lane_sums(const LineVec* p) {
  LineVec halves[8], quarters[4], eighths[2];
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

}  // namespace monoloss_kernels
