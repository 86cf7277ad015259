// CPU implementation for sparse activations in CSR form: O(nnz + M) passes over
// the stored entries, then O(nnz·d) for cross. Entries not stored are
// activations of 0, which add nothing to any sum taken with shift 0.
//
//  1. per latent: number of stored entries, their min and max (one pass);
//     shift = 0 if the latent has an implicit zero in the batch, else its min.
//  2. a counting sort of the entries by (row block, latent), rows ascending
//     within each bucket since rows are visited in order, which also exposes a
//     latent stored twice in a row; the float64 moments are summed on the way.
//  3. cross, one block of kBlockRows rows at a time: the block's unit
//     embeddings are regrouped into tiles of kTileWidth dims (one cache line
//     per row, 1 MiB per tile: stays in L2), threads take whole tiles, and
//     every latent sums Σ_e b_e·tile[row_e] over its entries in the block.
//     Gathering whole embedding rows instead reads them from memory once per
//     entry (about 2x slower at N=32768, M=16384, k=32, d=512 on the 2-core
//     dev Xeon). The tiles take O(kBlockRows·d) memory whatever N is.
// cross is written latent-major ((M, d), returned transposed): each latent's
// tile row is one cache line, where a (d, M) layout would take 16.
#include "../monoscore.h"
#include "vectorize.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

namespace monoloss_kernels {
namespace {

// Entries summed in float32 before joining the float64 total: keeps the
// float32 rounding of a partial sum near 2^-24·sqrt(64).
constexpr int64_t kEntriesPerPartial = 64;
// Rows per task when building the tiles.
constexpr int64_t kRowGrain = 256;

// cross_t[j, t0:t0+width) for the latents [j0, j1), reading one tile of the
// unit embeddings (N x kTileWidth).
MONOLOSS_VECTOR_CLONES
void latent_tile_sums(const int64_t* __restrict__ latent_offsets, const int32_t* __restrict__ rows,
                      const float* __restrict__ weights, const float* __restrict__ tile, int64_t j0,
                      int64_t j1, float* __restrict__ out, int64_t out_stride, int64_t width,
                      bool accumulate) {
  for (int64_t j = j0; j < j1; ++j) {
    double total[kTileWidth] = {};
    for (int64_t e0 = latent_offsets[j]; e0 < latent_offsets[j + 1]; e0 += kEntriesPerPartial) {
      const int64_t e1 = std::min(e0 + kEntriesPerPartial, latent_offsets[j + 1]);
      // kPartials = 4 independent sums, so consecutive entries do not wait on
      // one another's FMA latency.
      TileVec p0 = {}, p1 = {}, p2 = {}, p3 = {};
      int64_t e = e0;
      for (; e + 4 <= e1; e += 4) {
        p0 += weights[e] * load_tile_row(tile + int64_t{rows[e]} * kTileWidth);
        p1 += weights[e + 1] * load_tile_row(tile + int64_t{rows[e + 1]} * kTileWidth);
        p2 += weights[e + 2] * load_tile_row(tile + int64_t{rows[e + 2]} * kTileWidth);
        p3 += weights[e + 3] * load_tile_row(tile + int64_t{rows[e + 3]} * kTileWidth);
      }
      for (; e < e1; ++e) p0 += weights[e] * load_tile_row(tile + int64_t{rows[e]} * kTileWidth);
      const TileVec partial = (p0 + p1) + (p2 + p3);
      for (int64_t i = 0; i < kTileWidth; ++i) total[i] += partial[i];
    }
    float* out_row = out + j * out_stride;
    for (int64_t i = 0; i < width; ++i) {
      out_row[i] = (accumulate ? out_row[i] : 0.0f) + static_cast<float>(total[i]);
    }
  }
}

}  // namespace

MonoScoreStats monoscore_stats_csr_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                       const at::Tensor& values, const at::Tensor& emb,
                                       int64_t num_latents) {
  check_csr_stats_inputs(crow_indices, col_indices, values, emb, num_latents);
  TORCH_CHECK_VALUE(emb.size(0) < std::numeric_limits<int32_t>::max(),
                    "monoscore_stats_csr: at most 2^31 - 2 rows per call (stream larger sets in batches)");
  const int64_t N = emb.size(0), d = emb.size(1), M = num_latents, nnz = values.size(0);
  const auto f32 = emb.options().dtype(at::kFloat);
  const auto f64 = emb.options().dtype(at::kDouble);

  const at::Tensor inv_norm_t = row_inv_norm(emb);
  const at::Tensor emb32 = emb.to(at::kFloat).contiguous();
  const at::Tensor crow_t = crow_indices.contiguous(), cols_t = col_indices.contiguous();
  const at::Tensor values64 = values.to(at::kDouble).contiguous();
  const int64_t* crow = crow_t.const_data_ptr<int64_t>();
  const int64_t* cols = cols_t.const_data_ptr<int64_t>();
  const double* vals = values64.const_data_ptr<double>();
  const float* inv_norm = inv_norm_t.const_data_ptr<float>();
  TORCH_CHECK_VALUE(crow[0] == 0 && crow[N] == nnz,
                    "monoscore_stats_csr: crow_indices must run from 0 to nnz=" + std::to_string(nnz));

  // 1. Stored entries per latent, their min and max; the shift. Entries per
  // (row block, latent) bucket; bucket_offsets becomes their exclusive scan.
  const int64_t num_blocks = std::max<int64_t>(1, (N + kBlockRows - 1) / kBlockRows);
  std::vector<int64_t> bucket_offsets(num_blocks * M + 1, 0);
  std::vector<int64_t> stored(M, 0);
  at::Tensor act_range = at::empty({2, M}, f32);
  at::Tensor shift = at::empty({M}, f32);
  {
    float* act_min = act_range.select(0, 0).data_ptr<float>();
    float* act_max = act_range.select(0, 1).data_ptr<float>();
    std::fill_n(act_min, M, std::numeric_limits<float>::infinity());
    std::fill_n(act_max, M, -std::numeric_limits<float>::infinity());
    for (const auto n : c10::irange(N)) {
      TORCH_CHECK_VALUE(crow[n] <= crow[n + 1], "monoscore_stats_csr: crow_indices must be non-decreasing");
      for (int64_t e = crow[n]; e < crow[n + 1]; ++e) {
        const int64_t j = cols[e];
        TORCH_CHECK_VALUE(j >= 0 && j < M, "monoscore_stats_csr: col_indices must lie in [0, num_latents=" +
                                               std::to_string(M) + "), got " + std::to_string(j));
        const float a = static_cast<float>(vals[e]);
        ++bucket_offsets[(n / kBlockRows) * M + j + 1];
        ++stored[j];
        act_min[j] = std::min(act_min[j], a);
        act_max[j] = std::max(act_max[j], a);
      }
    }
    float* shift_ptr = shift.data_ptr<float>();
    for (const auto j : c10::irange(M)) {
      const bool has_implicit_zero = stored[j] < N;
      shift_ptr[j] = has_implicit_zero ? 0.0f : act_min[j];
      if (has_implicit_zero) {
        act_min[j] = std::min(act_min[j], 0.0f);
        act_max[j] = std::max(act_max[j], 0.0f);
      }
    }
    for (int64_t i = 0; i < num_blocks * M; ++i) bucket_offsets[i + 1] += bucket_offsets[i];
  }

  // 2. Counting sort by (row block, latent); moments; duplicate check.
  std::vector<int32_t> entry_rows(nnz);
  std::vector<float> entry_weights(nnz);  // b; the tiles hold unit embeddings
  at::Tensor moments = at::zeros({4, M}, f64);
  {
    double* sum_b = moments.select(0, 0).data_ptr<double>();
    double* sumsq_b = moments.select(0, 1).data_ptr<double>();
    double* zero_sum_b = moments.select(0, 2).data_ptr<double>();
    double* zero_sumsq_b = moments.select(0, 3).data_ptr<double>();
    const float* shift_ptr = shift.const_data_ptr<float>();
    std::vector<int64_t> next(bucket_offsets.begin(), bucket_offsets.end() - 1);
    for (const auto n : c10::irange(N)) {
      const int64_t first_bucket = (n / kBlockRows) * M;
      for (int64_t e = crow[n]; e < crow[n + 1]; ++e) {
        const int64_t j = cols[e];
        const int64_t pos = next[first_bucket + j]++;
        TORCH_CHECK_VALUE(pos == bucket_offsets[first_bucket + j] || entry_rows[pos - 1] != n % kBlockRows,
                          "acts stores latent " + std::to_string(j) + " twice in row " + std::to_string(n) +
                              "; the latent indices of a row must be distinct (as torch.topk returns them)");
        const double b = vals[e] - static_cast<double>(shift_ptr[j]);
        entry_rows[pos] = static_cast<int32_t>(n % kBlockRows);  // the row within its block
        entry_weights[pos] = static_cast<float>(b);
        sum_b[j] += b;
        sumsq_b[j] += b * b;
        if (inv_norm[n] == 0.0f) {
          zero_sum_b[j] += b;
          zero_sumsq_b[j] += b * b;
        }
      }
    }
  }

  // 3. cross, block by block of rows; each block's tiles, then one tile per thread.
  const int64_t num_tiles = (d + kTileWidth - 1) / kTileWidth;
  const int64_t tile_rows = std::min(N, kBlockRows);
  at::Tensor tiles = at::empty({num_tiles, tile_rows, kTileWidth}, f32);
  at::Tensor unit_emb_sum = at::zeros({d}, f64);
  at::Tensor cross_t = at::empty({M, d}, f32);
  if (d > 0) {
    const float* emb_ptr = emb32.const_data_ptr<float>();
    float* tiles_ptr = tiles.data_ptr<float>();
    float* cross_ptr = cross_t.data_ptr<float>();
    std::mutex sum_mutex;
    for (int64_t block = 0; block < num_blocks; ++block) {
      const int64_t row_base = block * kBlockRows, row_end = std::min(N, row_base + kBlockRows);
      at::parallel_for(row_base, row_end, kRowGrain, [&](int64_t n0, int64_t n1) {
        std::vector<double> partial_sum(d, 0.0);
        unit_tiles(emb_ptr, inv_norm, n0, n1, row_base, tile_rows, d, tiles_ptr, partial_sum.data());
        const std::lock_guard<std::mutex> lock(sum_mutex);
        double* sum_ptr = unit_emb_sum.data_ptr<double>();
        for (int64_t i = 0; i < d; ++i) sum_ptr[i] += partial_sum[i];
      });
      if (M == 0) continue;
      at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          latent_tile_sums(bucket_offsets.data() + block * M, entry_rows.data(), entry_weights.data(),
                           tiles_ptr + t * tile_rows * kTileWidth, 0, M, cross_ptr + t * kTileWidth, d,
                           std::min(kTileWidth, d - t * kTileWidth), /*accumulate=*/block > 0);
        }
      });
    }
  }

  const at::Tensor counts = at::stack({at::scalar_tensor(static_cast<double>(N), f64),
                                       (inv_norm_t > 0).sum().to(at::kDouble)});
  return {cross_t.t(), unit_emb_sum, shift, act_range, moments, counts};
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CPU, m) {
  m.impl("monoscore_stats_csr", &monoscore_stats_csr_cpu);
}

}  // namespace monoloss_kernels
