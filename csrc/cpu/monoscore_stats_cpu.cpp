// CPU implementation: one pass over acts in row chunks. Each chunk is reduced
// to the per-latent statistics, then multiplied by the chunk's unit embeddings
// in one BLAS call (the GEMM every exact method pays for), while still in cache.
//
// Two ways to feed that GEMM:
//  - in place: float32 row-major acts with shift 0. The GEMM reads acts
//    directly; no copy of acts is written. This is the common (and fast) case.
//    Shift 0 loses float32 accuracy in `cross` only for latents whose minimum
//    sits far from 0 relative to their mean value above it (|min| >
//    kMaxOffsetToMass * mean(a - min), e.g. 1000 + noise, or 2.9 + u^128);
//    those latents are recomputed afterwards from a shifted pass over their
//    columns alone.
//  - staged: every other input (half, bfloat16, float64, strided) is converted
//    and shifted by acts[0] into a float32 chunk buffer the GEMM then reads.
#include "../monoscore.h"
#include "vectorize.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace monoloss_kernels {
namespace {

// Chunk height: a staged chunk (rows x M float32) is kept near 8 MiB so it is
// still in cache (L3) when the GEMM reads it, while a K of a few hundred or more
// keeps the GEMM efficient. Measured on the 2-core dev machine: against 4 MiB
// and at most 1024 rows, 5-10% faster at N=16384, M=4096, d=512 and at N=2048,
// M=1024, d=256 (one GEMM instead of two).
constexpr int64_t kChunkBytes = int64_t{8} << 20;
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kMaxChunkRows = 2048;
// Rows reduced together: each latent's accumulators are loaded and stored once
// per kRowBlock rows instead of once per row (halves the pass at M=4096).
constexpr int kRowBlock = 4;
// Rows whose products the GEMM sums into one float32 buffer before it joins
// cross. A BLAS may add a long K into C in sequence, continuing from C's value:
// MKL on a 2-core AVX2 EPYC does at d = 9, where chunk after chunk of addmm_
// into cross left it 1.2e-5 off (relative) at N = 10^5 -- the scores of
// test_large_n_float32_mass_at_min 2.1e-5 off -- against 3e-7 for sums of
// 2048-row products. One more (d, M) add per block: ~1% of the GEMM at d = 512.
constexpr int64_t kRowsPerCrossBlock = 8192;
// Smallest latent range worth a parallel task.
constexpr int64_t kLatentGrain = 256;
// In-place latents whose |min| exceeds this multiple of their mean value above
// the min get a shifted recomputation. finalize forms Σ ê (a - min) as cross -
// min ΣÊ: the float32 error of cross grows with Σ|a| <= Σ(a - min) + N |min|,
// the scores' scale with Σ(a - min), so this bounds the accuracy loss against
// shifting to 1 + 4 = 5x. Comparing with the range instead missed the 2e-5
// bound by 4.7x for 2.9 + u^128 at N = 10^5 (test_large_n_float32_mass_at_min):
// its mass sits at the min. ReLU latents (min 0) never qualify.
constexpr double kMaxOffsetToMass = 4.0;

// Per-latent accumulators, float64 so that den = (sum b)^2 - sum b^2 is exact
// enough to tell a latent with one nonzero value (den = 0) from a real pair.
struct LatentAccumulators {
  double* sum;
  double* sumsq;
  double* zero_row_sum;
  double* zero_row_sumsq;
  float* min;
  float* max;
};

// kRows rows of a chunk, latents [k0, k1): b = a - shift into the moments,
// a into min/max, and (if kStage) b as float32 into `staged`; without kStage
// (the in-place path) the shift is 0 and not read. The pass is
// memory-bound only if this loop vectorises across latents: unit column
// stride is its own instantiation (no gathers), pointers are restrict, and
// AVX-512/AVX2 clones (picked at load time by what the CPU has) widen the
// float64 lanes of the baseline x86-64 build.
template <typename scalar_t, bool kUnitStride, bool kStage, int kRows>
MONOLOSS_VECTOR_CLONES
void reduce_rows(const scalar_t* __restrict__ rows, int64_t row_stride, int64_t col_stride,
                 int64_t k0, int64_t k1, const float* __restrict__ shift,
                 float* __restrict__ staged, int64_t staged_stride, double* __restrict__ sum,
                 double* __restrict__ sumsq, float* __restrict__ act_min,
                 float* __restrict__ act_max) {
  for (int64_t k = k0; k < k1; ++k) {
    const float c = kStage ? shift[k] : 0.0f;  // unstaged = in place, where the shift is 0
    double s = 0.0, ss = 0.0;
    float lo = act_min[k], hi = act_max[k];
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const float a = static_cast<float>(rows[r * row_stride + (kUnitStride ? k : k * col_stride)]);
      // a - shift is exact in float64 for float32 a and shift.
      const double b = static_cast<double>(a) - static_cast<double>(c);
      s += b;
      ss += b * b;
      lo = a < lo ? a : lo;
      hi = a > hi ? a : hi;
      if constexpr (kStage) staged[r * staged_stride + k] = a - c;
    }
    sum[k] += s;
    sumsq[k] += ss;
    act_min[k] = lo;
    act_max[k] = hi;
  }
}

template <typename scalar_t, bool kStage>
void reduce_chunk(const at::Tensor& acts_chunk, const float* shift, const float* inv_norm,
                  float* staged, const LatentAccumulators& acc) {
  const int64_t rows = acts_chunk.size(0), M = acts_chunk.size(1);
  const int64_t row_stride = acts_chunk.stride(0), col_stride = acts_chunk.stride(1);
  const scalar_t* base = acts_chunk.const_data_ptr<scalar_t>();
  auto reduce = [&](auto unit_stride, auto num_rows, int64_t r, int64_t k0, int64_t k1) {
    reduce_rows<scalar_t, decltype(unit_stride)::value, kStage, decltype(num_rows)::value>(
        base + r * row_stride, row_stride, col_stride, k0, k1, shift,
        kStage ? staged + r * M : nullptr, M, acc.sum, acc.sumsq, acc.min, acc.max);
  };
  using Unit = std::true_type;
  using Strided = std::false_type;
  using Block = std::integral_constant<int, kRowBlock>;
  using One = std::integral_constant<int, 1>;
  at::parallel_for(0, M, kLatentGrain, [&](int64_t k0, int64_t k1) {
    int64_t r = 0;
    for (; r + kRowBlock <= rows; r += kRowBlock) {
      col_stride == 1 ? reduce(Unit{}, Block{}, r, k0, k1) : reduce(Strided{}, Block{}, r, k0, k1);
    }
    for (; r < rows; ++r) {
      col_stride == 1 ? reduce(Unit{}, One{}, r, k0, k1) : reduce(Strided{}, One{}, r, k0, k1);
    }
    for (r = 0; r < rows; ++r) {
      if (inv_norm[r] != 0.0f) continue;  // rare: a row whose embedding has zero norm
      const scalar_t* row = base + r * row_stride;
      for (int64_t k = k0; k < k1; ++k) {
        const double b = static_cast<double>(static_cast<float>(row[k * col_stride])) -
                         static_cast<double>(shift[k]);
        acc.zero_row_sum[k] += b;
        acc.zero_row_sumsq[k] += b * b;
      }
    }
  });
}

// The statistics of (acts, emb) for a given per-latent shift, in one pass.
// in_place: acts is float32 with unit column stride and shift is all zero.
MonoScoreStats accumulate(const at::Tensor& acts, const at::Tensor& emb,
                          const at::Tensor& inv_norm, const at::Tensor& shift_values,
                          bool in_place) {
  auto [cross, unit_emb_sum, shift, act_range, moments, counts] = empty_stats(acts, emb);
  const int64_t N = acts.size(0), M = acts.size(1);
  shift.copy_(shift_values);
  act_range.select(0, 0).fill_(std::numeric_limits<float>::infinity());
  act_range.select(0, 1).fill_(-std::numeric_limits<float>::infinity());
  counts.select(0, 0).fill_(static_cast<double>(N));
  counts.select(0, 1).copy_((inv_norm > 0).sum());
  if (M == 0) return {cross, unit_emb_sum, shift, act_range, moments, counts};

  const LatentAccumulators acc{moments.select(0, 0).data_ptr<double>(),
                               moments.select(0, 1).data_ptr<double>(),
                               moments.select(0, 2).data_ptr<double>(),
                               moments.select(0, 3).data_ptr<double>(),
                               act_range.select(0, 0).data_ptr<float>(),
                               act_range.select(0, 1).data_ptr<float>()};
  const int64_t chunk_rows = std::clamp<int64_t>(kChunkBytes / (4 * M), kMinChunkRows, kMaxChunkRows);
  at::Tensor staged;
  if (!in_place) staged = at::empty({std::min(chunk_rows, N), M}, acts.options().dtype(at::kFloat));

  const IeeeFloat32Matmuls ieee_matmuls;
  // cross itself when one block holds every row.
  const bool blocked = N > kRowsPerCrossBlock;
  at::Tensor block_cross = blocked ? at::empty_like(cross) : cross;
  int64_t block_rows = 0;
  for (int64_t n0 = 0; n0 < N; n0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, N - n0);
    const at::Tensor acts_chunk = acts.narrow(0, n0, rows);
    const at::Tensor inv_chunk = inv_norm.narrow(0, n0, rows);
    at::Tensor gemm_input = in_place ? acts_chunk : staged.narrow(0, 0, rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acts.scalar_type(),
                                    "monoscore_stats_cpu", [&] {
      if (in_place) {
        reduce_chunk<scalar_t, false>(acts_chunk, shift.const_data_ptr<float>(),
                                      inv_chunk.const_data_ptr<float>(), nullptr, acc);
      } else {
        reduce_chunk<scalar_t, true>(acts_chunk, shift.const_data_ptr<float>(),
                                     inv_chunk.const_data_ptr<float>(),
                                     gemm_input.data_ptr<float>(), acc);
      }
    });
    const at::Tensor unit_emb = emb.narrow(0, n0, rows).to(at::kFloat) * inv_chunk.unsqueeze(1);
    // (d, rows) @ (rows, M); a separate block buffer starts from its block's first product.
    block_cross.addmm_(unit_emb.t(), gemm_input, /*beta=*/blocked && block_rows == 0 ? 0 : 1);
    block_rows += rows;
    if (blocked && (block_rows >= kRowsPerCrossBlock || n0 + rows == N)) {
      cross.add_(block_cross);
      block_rows = 0;
    }
    // A float32 sum over one chunk's rows is exact enough; chunks add up in float64.
    unit_emb_sum.add_(unit_emb.sum(0));
  }
  return {cross, unit_emb_sum, shift, act_range, moments, counts};
}

}  // namespace

MonoScoreStats monoscore_stats_cpu(const at::Tensor& acts, const at::Tensor& emb) {
  check_stats_inputs(acts, emb);
  const at::Tensor inv_norm = row_inv_norm(emb);
  const bool in_place = acts.scalar_type() == at::kFloat && acts.stride(1) == 1;
  if (!in_place) return accumulate(acts, emb, inv_norm, acts.select(0, 0), false);

  MonoScoreStats stats = accumulate(acts, emb, inv_norm, at::zeros({acts.size(1)}, acts.options()), true);
  auto& [cross, unit_emb_sum, shift, act_range, moments, counts] = stats;
  const at::Tensor act_min = act_range.select(0, 0), act_max = act_range.select(0, 1);
  const at::Tensor mean_above_min =
      moments.select(0, 0) / static_cast<double>(acts.size(0)) - act_min.to(at::kDouble);  // (M,) Σa/N - min
  const at::Tensor far =
      ((act_max > act_min) & (act_min.abs().to(at::kDouble) > kMaxOffsetToMass * mean_above_min)).nonzero().squeeze(1);
  if (far.numel() > 0) {
    // Shifting these latents by their (now known) minimum makes them as
    // accurate as latents near 0: a second pass over their columns only.
    const at::Tensor far_acts = acts.index_select(1, far);
    const auto [far_cross, far_emb_sum, far_shift, far_range, far_moments, far_counts] =
        accumulate(far_acts, emb, inv_norm, act_min.index_select(0, far), false);
    cross.index_copy_(1, far, far_cross);
    shift.index_copy_(0, far, far_shift);
    moments.index_copy_(1, far, far_moments);
  }
  return stats;
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CPU, m) {
  m.impl("monoscore_stats", &monoscore_stats_cpu);
}

}  // namespace monoloss_kernels
