// CPU implementation: one pass over acts in row chunks. Each chunk is reduced
// to the per-latent statistics while being written, shifted, into a float32
// buffer that stays in cache; the product with the chunk's unit embeddings is
// then one BLAS call (the same GEMM every exact method pays for).
#include "../monoscore.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace monoloss_kernels {
namespace {

// Chunk height: the float32 shifted chunk (rows x M) is kept near 4 MiB so it
// is still in cache when the GEMM reads it, while a K of a few hundred keeps
// the GEMM efficient. Measured on the 2-core dev machine (N=16384, M=4096).
constexpr int64_t kChunkBytes = int64_t{4} << 20;
constexpr int64_t kMinChunkRows = 64;
constexpr int64_t kMaxChunkRows = 1024;
// Latents per parallel task in the statistics pass.
constexpr int64_t kLatentGrain = 256;

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

template <typename scalar_t>
void reduce_chunk(const at::Tensor& acts_chunk, const float* shift, const float* inv_norm,
                  float* shifted, const LatentAccumulators& acc) {
  const int64_t rows = acts_chunk.size(0), M = acts_chunk.size(1);
  const int64_t row_stride = acts_chunk.stride(0), col_stride = acts_chunk.stride(1);
  const scalar_t* base = acts_chunk.const_data_ptr<scalar_t>();
  at::parallel_for(0, M, kLatentGrain, [&](int64_t k0, int64_t k1) {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = base + r * row_stride;
      float* out = shifted + r * M;
      const bool zero_row = inv_norm[r] == 0.0f;
      for (int64_t k = k0; k < k1; ++k) {
        const float a = static_cast<float>(row[k * col_stride]);
        // a - shift is exact in float64 for float32 a and shift.
        const double b = static_cast<double>(a) - static_cast<double>(shift[k]);
        acc.sum[k] += b;
        acc.sumsq[k] += b * b;
        acc.min[k] = a < acc.min[k] ? a : acc.min[k];
        acc.max[k] = a > acc.max[k] ? a : acc.max[k];
        out[k] = a - shift[k];
      }
      if (zero_row) {  // rare: rows whose embedding has zero norm
        for (int64_t k = k0; k < k1; ++k) {
          const double b = static_cast<double>(static_cast<float>(row[k * col_stride])) -
                           static_cast<double>(shift[k]);
          acc.zero_row_sum[k] += b;
          acc.zero_row_sumsq[k] += b * b;
        }
      }
    }
  });
}

}  // namespace

MonoScoreStats monoscore_stats_cpu(const at::Tensor& acts, const at::Tensor& emb) {
  check_stats_inputs(acts, emb);
  auto [cross, unit_emb_sum, shift, act_range, moments, counts] = empty_stats(acts, emb);
  const int64_t N = acts.size(0), M = acts.size(1);

  const at::Tensor inv_norm = row_inv_norm(emb);
  shift.copy_(acts.select(0, 0));
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
  const int64_t chunk_rows =
      std::clamp<int64_t>(kChunkBytes / (4 * std::max<int64_t>(M, 1)), kMinChunkRows, kMaxChunkRows);
  at::Tensor shifted = at::empty({std::min(chunk_rows, N), M}, acts.options().dtype(at::kFloat));

  for (int64_t n0 = 0; n0 < N; n0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, N - n0);
    const at::Tensor inv_chunk = inv_norm.narrow(0, n0, rows);
    at::Tensor shifted_chunk = shifted.narrow(0, 0, rows);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acts.scalar_type(),
                                    "monoscore_stats_cpu", [&] {
      reduce_chunk<scalar_t>(acts.narrow(0, n0, rows), shift.const_data_ptr<float>(),
                             inv_chunk.const_data_ptr<float>(), shifted_chunk.data_ptr<float>(),
                             acc);
    });
    const at::Tensor unit_emb = emb.narrow(0, n0, rows).to(at::kFloat) * inv_chunk.unsqueeze(1);
    cross.addmm_(unit_emb.t(), shifted_chunk);  // (d, rows) @ (rows, M)
    unit_emb_sum.add_(unit_emb.sum(0, false, at::kDouble));
  }
  return {cross, unit_emb_sum, shift, act_range, moments, counts};
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CPU, m) {
  m.impl("monoscore_stats", &monoscore_stats_cpu);
}

}  // namespace monoloss_kernels
