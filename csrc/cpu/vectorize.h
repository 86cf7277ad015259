// What the CPU kernels share for explicit vectorisation.
//
// MONOLOSS_VECTOR_CLONES: AVX-512 and AVX2+FMA (x86-64-v3) clones of a function
// whose loops the compiler vectorises, picked at load time by what the CPU has;
// the build itself targets baseline x86-64.
//
// Vec<W>: W floats as a GCC/Clang vector type, for the CSR kernels' loops over
// the dims of an embedding row, where the auto-vectoriser would vectorise across
// entries (gathers) instead. W must be the target's register width: GCC lowers
// wider vector types through the stack (a 16-float type in the AVX2 clone made
// the CSR statistics 3x slower on a 2-core AMD EPYC), so these kernels are
// templates on W, run by `with_vector_width` in a function compiled for the
// matching target: AVX-512 (W = 16), AVX2+FMA (8) or baseline SSE2 (4).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MONOLOSS_X86_TARGETS 1
#define MONOLOSS_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define MONOLOSS_VECTOR_CLONES
#endif

// Vectors passed by value have another ABI in the baseline build than in the
// wider targets (-Wpsabi), so the helpers taking or returning them must be
// inlined into each target's code (MONOLOSS_VECTOR_INLINE): an out-of-line
// baseline copy called from the AVX-512 code reads its arguments from the wrong
// place. Inlining is also what compiles a helper for the caller's target.
#pragma GCC diagnostic ignored "-Wpsabi"
#if defined(__GNUC__)
#define MONOLOSS_VECTOR_INLINE inline __attribute__((always_inline))
#define MONOLOSS_VECTOR_LAMBDA __attribute__((always_inline))
#else
#define MONOLOSS_VECTOR_INLINE inline
#define MONOLOSS_VECTOR_LAMBDA
#endif

namespace monoloss_kernels {

constexpr int64_t kLineFloats = 16;  // floats per cache line

template <int W>
struct VecOf {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
};
template <int W>
using Vec = typename VecOf<W>::type;

template <int W>
MONOLOSS_VECTOR_INLINE Vec<W> load_vec(const float* p) {
  Vec<W> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
MONOLOSS_VECTOR_INLINE void store_vec(float* p, Vec<W> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// Σ x[0..N), as the pairwise tree ((x0 + x1) + (x2 + x3)) ...
template <int W, int N>
MONOLOSS_VECTOR_INLINE Vec<W> tree_sum(const Vec<W>* x) {
  if constexpr (N == 1) {
    return x[0];
  } else {
    return tree_sum<W, N / 2>(x) + tree_sum<W, N - N / 2>(x + N / 2);
  }
}

// One round of `lane_sums`: a and b each hold W / G products of G partial sums
// each; the result holds a's then b's products, with G / 2 partial sums each
// (the two halves of each group added).
template <int W, int G, int... I>
MONOLOSS_VECTOR_INLINE Vec<W> halve_groups(Vec<W> a, Vec<W> b, std::integer_sequence<int, I...>) {
  constexpr auto first = [](int lane) { return lane / (G / 2) * G + lane % (G / 2); };
  return __builtin_shufflevector(a, b, first(I)..., (W + first(I))...) +
         __builtin_shufflevector(a, b, (first(I) + G / 2)..., (W + first(I) + G / 2)...);
}

template <int W, int G>
MONOLOSS_VECTOR_INLINE void lane_sum_rounds(Vec<W>* v, int count) {
  if constexpr (G > 1) {
    for (int i = 0; i < count / 2; ++i) {
      v[i] = halve_groups<W, G>(v[2 * i], v[2 * i + 1], std::make_integer_sequence<int, W / 2>{});
    }
    lane_sum_rounds<W, G / 2>(v, count / 2);
  }
}

// The lane sums of 16 vectors p[0..16), into 16 / W vectors: lane i of the
// result (out[i / W][i % W]) holds the sum of p[i]'s lanes. log2(W) rounds of
// pairwise "halves of two, added" (for W = 16: 30 shuffles and 15 adds for 16
// sums) instead of reducing each vector to a scalar on its own (about 10
// dependent steps each). Overwrites p.
template <int W>
MONOLOSS_VECTOR_INLINE void lane_sums(Vec<W>* p) {
  static_assert(W <= kLineFloats && kLineFloats % W == 0);
  lane_sum_rounds<W, W>(p, kLineFloats);
}

// The floats per vector of the CPU's widest target the CSR kernels have: 16
// with AVX-512F, 8 with AVX2 and FMA, else 4. MONOLOSS_CPU_ISA=avx2 or baseline
// caps it (to test or compare the narrower kernels on a wider CPU).
inline int cpu_vector_width() {
  static const int width = [] {
    int cpu = 4;
#ifdef MONOLOSS_X86_TARGETS
    if (__builtin_cpu_supports("avx512f")) {
      cpu = 16;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      cpu = 8;
    }
#endif
    const char* cap = std::getenv("MONOLOSS_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && cpu > 8) return 8;
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) return 4;
    return cpu;
  }();
  return width;
}

#ifdef MONOLOSS_X86_TARGETS
template <typename F>
__attribute__((target("avx512f"))) void run_avx512(const F& f) {
  f(std::integral_constant<int, 16>{});
}
template <typename F>
__attribute__((target("arch=x86-64-v3"))) void run_avx2(const F& f) {
  f(std::integral_constant<int, 8>{});
}
#endif

// Calls f(std::integral_constant<int, W>) compiled for the target of W =
// cpu_vector_width(). f must be a MONOLOSS_VECTOR_LAMBDA whose callees are
// MONOLOSS_VECTOR_INLINE: inlined into the target's function, they are
// compiled for it.
template <typename F>
void with_vector_width(const F& f) {
#ifdef MONOLOSS_X86_TARGETS
  switch (cpu_vector_width()) {
    case 16:
      return run_avx512(f);
    case 8:
      return run_avx2(f);
    default:
      break;
  }
#endif
  f(std::integral_constant<int, 4>{});
}

}  // namespace monoloss_kernels
