// CUDA implementation of the sparse (CSR) statistics, the same numbers as the
// Triton path (monoloss_kernels/ops/triton_monoscore_stats_csr.py) and the
// torch reference (stats.csr_latent_stats + latent_major_order):
//   - the O(nnz) per-latent sums (min, max, moments, shift) are ATen scatters on
//     the current stream, op for op as in csr_latent_stats;
//   - the entries are sorted by latent (keys latent * N + row), which also
//     exposes a latent stored twice in a row;
//   - csr_cross_kernel computes the O(nnz * d) part, cross_t[latent] +=
//     sum_e w[e] * emb[row[e]], with w = (value - shift) / ||emb[row]||. Each
//     block owns one piece of <= kEntriesPerBlock entries of one latent and one
//     d-tile; pieces of one latent meet in one float32 atomicAdd per output, so
//     an always-on latent (N entries) spreads over the GPU instead of one block.
// The one host read combines the backstop range check of col_indices with the
// duplicate check (both must precede the scatters, which would device-assert).
#include "../monoscore.h"

#include <ATen/ATen.h>
// c10/cuda only: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit (or a pip-installed one) may not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

namespace monoloss_kernels {
namespace {

// Entries per block, as the Triton kernel's ENTRIES_PER_PROGRAM: long enough to
// amortise a block's start (a TopK latent has N*k/M entries, 128-512 in
// practice), short enough that one always-on latent spreads over the GPU, and
// it bounds each float32 accumulation.
constexpr int kEntriesPerBlock = 256;
// d-columns per block, one per thread: 4 warps, each warp reading one 128-byte
// line of an embedding row per entry (coalesced); d = 512/768 gives 4-6 tiles.
constexpr int kTileD = 128;
// Embedding rows loaded before they are summed: 8 independent gathers in flight
// per thread hide most of the L2/HBM latency without costing occupancy.
constexpr int kUnroll = 8;

// Grid: x = piece bound (extra blocks find no piece and return), y = d-tile.
// The piece of block x is located by a binary search over piece_end (log2 M
// cached loads) instead of ~10 ATen ops building per-item arrays first.
__global__ void __launch_bounds__(kTileD)
    csr_cross_kernel(const int64_t* __restrict__ piece_end,       // (M,) inclusive cumsum of pieces
                     const int64_t* __restrict__ latent_offsets,  // (M+1,) entry range of each latent
                     int64_t M, const int64_t* __restrict__ entry_rows,  // (nnz,) latent-major
                     const float* __restrict__ entry_weights,            // (nnz,) latent-major
                     const float* __restrict__ emb, int64_t D,           // (N, d) contiguous
                     float* __restrict__ cross_t) {                      // (M, d) zero-initialised
  __shared__ int64_t rows_s[kEntriesPerBlock];
  __shared__ float weights_s[kEntriesPerBlock];
  const int64_t item = blockIdx.x;
  int64_t lo = 0, hi = M;  // first latent whose pieces end after this item
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (piece_end[mid] > item) hi = mid; else lo = mid + 1;
  }
  if (lo == M) return;  // past the last piece: uniform over the block, before any barrier
  const int64_t latent = lo;
  const int64_t first_piece = latent > 0 ? piece_end[latent - 1] : 0;
  const int64_t begin = latent_offsets[latent] + (item - first_piece) * kEntriesPerBlock;
  const int64_t remaining = latent_offsets[latent + 1] - begin;  // >= 1 for a real piece
  const int count = remaining < kEntriesPerBlock ? static_cast<int>(remaining) : kEntriesPerBlock;
  for (int e = threadIdx.x; e < count; e += kTileD) {
    rows_s[e] = entry_rows[begin + e];
    weights_s[e] = entry_weights[begin + e];
  }
  __syncthreads();
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kTileD + threadIdx.x;
  if (d >= D) return;  // no barrier follows
  float acc = 0.0f;
  int e = 0;
  for (; e + kUnroll <= count; e += kUnroll) {
    float x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) x[u] = emb[rows_s[e + u] * D + d];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc = fmaf(weights_s[e + u], x[u], acc);
  }
  for (; e < count; ++e) acc = fmaf(weights_s[e], emb[rows_s[e] * D + d], acc);
  atomicAdd(cross_t + latent * D + d, acc);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

MonoScoreStats monoscore_stats_csr_cuda(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                        const at::Tensor& values, const at::Tensor& emb,
                                        int64_t num_latents) {
  check_csr_stats_inputs(crow_indices, col_indices, values, emb, num_latents);
  const c10::cuda::CUDAGuard device_guard(emb.device());
  const int64_t N = crow_indices.size(0) - 1, M = num_latents, D = emb.size(1);
  const int64_t nnz = col_indices.size(0);
  const auto i64 = emb.options().dtype(at::kLong);
  const auto f32 = emb.options().dtype(at::kFloat);
  const auto f64 = emb.options().dtype(at::kDouble);
  const at::Tensor& cols = col_indices;
  TORCH_CHECK_VALUE(N > 0 || nnz == 0, "monoscore_stats_csr: " + std::to_string(nnz) + " entries but no rows");

  // Row of each entry (output_size avoids a sync), then the latent-major order.
  // std::optional: a plain int64 would pick the overload repeat_interleave(self, int repeats).
  const at::Tensor rows = at::repeat_interleave(at::diff(crow_indices), std::optional<int64_t>(nnz));
  at::Tensor order = at::empty({0}, i64);
  if (nnz > 0) {
    auto [sorted_keys, sort_order] = at::sort(cols * N + rows);
    order = sort_order;
    // Smallest repeated key (as the reference reports), or kNoRepeat.
    constexpr int64_t kNoRepeat = std::numeric_limits<int64_t>::max();
    const at::Tensor later = sorted_keys.slice(0, 1), earlier = sorted_keys.slice(0, 0, nnz - 1);
    const at::Tensor repeated =
        nnz > 1 ? at::where(later == earlier, later, kNoRepeat).amin() : at::full({}, kNoRepeat, i64);
    auto [col_min, col_max] = at::aminmax(cols);
    const at::Tensor host = at::stack({col_min, col_max, repeated}).cpu();  // the one sync
    const int64_t* h = host.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(h[0] >= 0 && h[1] < M, "monoscore_stats_csr: col_indices must lie in [0, num_latents=" +
                      std::to_string(M) + "), got values from " + std::to_string(h[0]) + " to " +
                      std::to_string(h[1]));
    if (h[2] != kNoRepeat) {
      const int64_t key = h[2];
      TORCH_CHECK_VALUE(false, "acts stores latent " + std::to_string(key / N) + " twice in row " +
                        std::to_string(key % N) +
                        "; the latent indices of a row must be distinct (as torch.topk returns them)");
    }
  }

  // Per-latent sums, op for op as stats.csr_latent_stats.
  const at::Tensor stored = at::zeros({M}, i64).index_add_(0, cols, at::ones_like(cols));
  const at::Tensor value32 = values.to(at::kFloat);
  const float inf = std::numeric_limits<float>::infinity();
  const at::Tensor stored_min = at::full({M}, inf, f32).scatter_reduce_(0, cols, value32, "amin");
  const at::Tensor stored_max = at::full({M}, -inf, f32).scatter_reduce_(0, cols, value32, "amax");
  const at::Tensor has_implicit_zero = stored < N;
  const at::Tensor shift = at::where(has_implicit_zero, 0.0, stored_min);
  const at::Tensor act_range = at::stack({at::where(has_implicit_zero, stored_min.clamp_max(0), stored_min),
                                          at::where(has_implicit_zero, stored_max.clamp_min(0), stored_max)});
  const at::Tensor inv_norm = row_inv_norm(emb);
  const at::Tensor b = values.to(at::kDouble) - shift.to(at::kDouble).index_select(0, cols);
  const at::Tensor b_zero = at::where(inv_norm.index_select(0, rows) == 0, b, 0.0);
  const at::Tensor moments = at::zeros({4, M}, f64);
  const at::Tensor terms[] = {b, b * b, b_zero, b_zero * b};
  for (int64_t i = 0; i < 4; ++i) moments.select(0, i).index_add_(0, cols, terms[i]);
  const at::Tensor emb_f32 = emb.to(at::kFloat).contiguous();  // no copy for float32 row-major
  const at::Tensor unit_emb_sum = (emb_f32 * inv_norm.unsqueeze(1)).sum({0}, false, at::kDouble);
  const at::Tensor counts =
      at::stack({at::full({}, static_cast<double>(N), f64), (inv_norm > 0).sum().to(at::kDouble)});

  at::Tensor cross_t = at::zeros({M, D}, f32);
  if (M > 0 && D > 0 && nnz > 0) {
    const at::Tensor entry_rows = rows.index_select(0, order);
    const at::Tensor entry_weights =
        (b.index_select(0, order) * inv_norm.index_select(0, entry_rows).to(at::kDouble)).to(at::kFloat);
    const at::Tensor latent_offsets = at::zeros({M + 1}, i64);
    latent_offsets.slice(0, 1).copy_(stored.cumsum(0));
    const at::Tensor piece_end = stored.add(kEntriesPerBlock - 1).div(kEntriesPerBlock, "floor").cumsum(0);
    // At most one partial piece per latent with entries (<= min(M, nnz) of them).
    const int64_t num_items = std::min(M, nnz) + ceil_div(nnz, kEntriesPerBlock);
    const int64_t d_tiles = ceil_div(D, kTileD);
    TORCH_CHECK(num_items <= std::numeric_limits<int32_t>::max() && d_tiles <= 65535,
                "monoscore_stats_csr: too many entries (nnz=" + std::to_string(nnz) + ") or dimensions (d=" +
                    std::to_string(D) + ") for one call; split the batch");
    const dim3 grid(static_cast<unsigned>(num_items), static_cast<unsigned>(d_tiles));
    csr_cross_kernel<<<grid, kTileD, 0, c10::cuda::getCurrentCUDAStream()>>>(
        piece_end.const_data_ptr<int64_t>(), latent_offsets.const_data_ptr<int64_t>(), M,
        entry_rows.const_data_ptr<int64_t>(), entry_weights.const_data_ptr<float>(),
        emb_f32.const_data_ptr<float>(), D, cross_t.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {cross_t.t(), unit_emb_sum, shift, act_range, moments, counts};
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CUDA, m) {
  m.impl("monoscore_stats_csr", &monoscore_stats_csr_cuda);
}

}  // namespace monoloss_kernels
