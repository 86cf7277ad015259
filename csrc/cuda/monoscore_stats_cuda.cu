// CUDA implementation: two kernels over the same read of acts.
//   latent_moments_kernel  per-latent min/max and float64 moments, one thread per
//                          latent and row split (coalesced along latents).
//   cross_kernel           cross = unit_emb^T (acts - shift) on tensor cores in
//                          split precision (3xTF32: hi*hi + hi*lo + lo*hi), which
//                          keeps float32 accuracy that plain TF32 loses.
// Both split the rows so the grid fills the GPU whatever M and d are; the
// partial results are summed (min/maxed) by ATen on the current stream.
#include "../monoscore.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10/cuda only: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit (or a pip-installed one) may not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

namespace monoloss_kernels {
namespace {

namespace wmma = nvcuda::wmma;

// Rows per split of the statistics kernel: enough work per thread to amortize
// its setup, enough splits (N / 1024) to fill 132 SMs even for M = 4096.
constexpr int64_t kMomentsRowsPerSplit = 1024;
constexpr int kMomentsThreads = 256;

template <typename scalar_t>
__global__ void latent_moments_kernel(const scalar_t* __restrict__ acts, int64_t N, int64_t M,
                                      int64_t stride_n, int64_t stride_m,
                                      const float* __restrict__ shift,
                                      const float* __restrict__ inv_norm,
                                      double* __restrict__ moments_partial,  // (splits, 4, M)
                                      float* __restrict__ range_partial) {   // (splits, 2, M)
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= M) return;
  const int64_t split = blockIdx.y;
  const int64_t n_begin = split * kMomentsRowsPerSplit;
  const int64_t n_end = N < n_begin + kMomentsRowsPerSplit ? N : n_begin + kMomentsRowsPerSplit;
  const double c = shift[k];
  double sum = 0, sumsq = 0, zero_sum = 0, zero_sumsq = 0;
  float lo = __int_as_float(0x7f800000), hi = -lo;  // +inf, -inf
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float a = static_cast<float>(acts[n * stride_n + k * stride_m]);
    const double b = static_cast<double>(a) - c;
    sum += b;
    sumsq += b * b;
    if (inv_norm[n] == 0.0f) {
      zero_sum += b;
      zero_sumsq += b * b;
    }
    lo = a < lo ? a : lo;
    hi = a > hi ? a : hi;
  }
  double* out = moments_partial + split * 4 * M;
  out[k] = sum;
  out[M + k] = sumsq;
  out[2 * M + k] = zero_sum;
  out[3 * M + k] = zero_sumsq;
  range_partial[split * 2 * M + k] = lo;
  range_partial[split * 2 * M + M + k] = hi;
}

// Tile of the cross product handled by one block: 128 (d) x 128 (latents),
// 16 rows per step; 8 warps in a 2 x 4 grid, each owning 64 x 32 = 4 x 2 WMMA
// 16x16 accumulators. The +4 float padding keeps rows 16-byte aligned (WMMA's
// ldm rule) and spreads shared-memory banks.
constexpr int kTileD = 128;
constexpr int kTileM = 128;
constexpr int kTileN = 16;
constexpr int kPad = 4;
constexpr int kCrossThreads = 256;
constexpr int kWarpTilesD = 4;  // 16x16 fragments per warp along d
constexpr int kWarpTilesM = 2;  // ... and along latents
// Rows per split of the cross kernel: bounds the length of each float32
// accumulation (accuracy) and gives N / 8192 more blocks to the grid.
constexpr int64_t kCrossRowsPerSplit = 8192;

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// x ~ hi + lo with hi, lo exactly representable in tf32. Done while staging the
// tiles in shared memory, not on loaded fragments: a tf32 fragment load may
// already drop the low mantissa bits, which would leave lo = 0 (plain TF32).
__device__ __forceinline__ void split_tf32(float x, float& hi, float& lo) {
  hi = wmma::__float_to_tf32(x);
  lo = wmma::__float_to_tf32(x - hi);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kCrossThreads)
    cross_kernel(const scalar_t* __restrict__ acts, int64_t N, int64_t M, int64_t stride_n,
                 int64_t stride_m, const float* __restrict__ emb,  // (N, d) contiguous
                 int64_t D, const float* __restrict__ inv_norm, const float* __restrict__ shift,
                 float* __restrict__ cross_partial) {  // (splits, d, M)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // hi and lo tf32 parts of the staged rows.
  __shared__ __align__(128) float emb_hi[kTileN][kTileD + kPad];   // [n][d]
  __shared__ __align__(128) float emb_lo[kTileN][kTileD + kPad];
  __shared__ __align__(128) float acts_hi[kTileN][kTileM + kPad];  // [n][latent]
  __shared__ __align__(128) float acts_lo[kTileN][kTileM + kPad];
  __shared__ __align__(128) float staging[kCrossThreads / 32][16 * 16];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_d = warp / 4, warp_m = warp % 4;  // 2 x 4 warps
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kTileD;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t split = blockIdx.z;
  const int64_t n_begin = split * kCrossRowsPerSplit;
  const int64_t n_end = N < n_begin + kCrossRowsPerSplit ? N : n_begin + kCrossRowsPerSplit;

  FragC acc[kWarpTilesD][kWarpTilesM];
#pragma unroll
  for (int i = 0; i < kWarpTilesD; ++i)
#pragma unroll
    for (int j = 0; j < kWarpTilesM; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileN) {
    // Stage the step's rows: consecutive threads read consecutive columns.
#pragma unroll
    for (int e = threadIdx.x; e < kTileN * kTileM; e += kCrossThreads) {
      const int r = e / kTileM, col = e % kTileM;
      const int64_t n = n0 + r, m = m0 + col;
      float v = 0.0f;
      if (n < n_end && m < M) v = static_cast<float>(acts[n * stride_n + m * stride_m]) - shift[m];
      split_tf32(v, acts_hi[r][col], acts_lo[r][col]);
    }
#pragma unroll
    for (int e = threadIdx.x; e < kTileN * kTileD; e += kCrossThreads) {
      const int r = e / kTileD, col = e % kTileD;
      const int64_t n = n0 + r, dd = d0 + col;
      const float v = (n < n_end && dd < D) ? emb[n * D + dd] * inv_norm[n] : 0.0f;
      split_tf32(v, emb_hi[r][col], emb_lo[r][col]);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileN; k += 8) {
      FragB b_hi[kWarpTilesM], b_lo[kWarpTilesM];
#pragma unroll
      for (int j = 0; j < kWarpTilesM; ++j) {
        wmma::load_matrix_sync(b_hi[j], &acts_hi[k][warp_m * 32 + j * 16], kTileM + kPad);
        wmma::load_matrix_sync(b_lo[j], &acts_lo[k][warp_m * 32 + j * 16], kTileM + kPad);
      }
#pragma unroll
      for (int i = 0; i < kWarpTilesD; ++i) {
        FragA a_hi, a_lo;
        // matrix_a is unit_emb^T (d x n): element (i, kk) sits at emb_*[kk][i],
        // i.e. column-major with leading dimension kTileD + kPad.
        wmma::load_matrix_sync(a_hi, &emb_hi[k][warp_d * 64 + i * 16], kTileD + kPad);
        wmma::load_matrix_sync(a_lo, &emb_lo[k][warp_d * 64 + i * 16], kTileD + kPad);
#pragma unroll
        for (int j = 0; j < kWarpTilesM; ++j) {
          wmma::mma_sync(acc[i][j], a_lo, b_hi[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], a_hi, b_lo[j], acc[i][j]);
          wmma::mma_sync(acc[i][j], a_hi, b_hi[j], acc[i][j]);
        }
      }
    }
    __syncthreads();
  }

  // Store through shared memory so edge tiles are written with bounds checks.
  float* out = cross_partial + split * D * M;
#pragma unroll
  for (int i = 0; i < kWarpTilesD; ++i) {
#pragma unroll
    for (int j = 0; j < kWarpTilesM; ++j) {
      wmma::store_matrix_sync(staging[warp], acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t row0 = d0 + warp_d * 64 + i * 16, col0 = m0 + warp_m * 32 + j * 16;
      for (int e = lane; e < 256; e += 32) {
        const int64_t dd = row0 + e / 16, m = col0 + e % 16;
        if (dd < D && m < M) out[dd * M + m] = staging[warp][e];
      }
      __syncwarp();
    }
  }
#else
  __trap();  // the host refuses devices below sm_80 before launching
#endif
}

// Plain float32 FMA version of cross_kernel: 64 (d) x 64 (latents) per block,
// 16 x 16 threads owning 4 x 4 outputs each, 16 rows per step.
constexpr int kSimtTile = 64;
constexpr int kSimtStep = 16;

template <typename scalar_t>
__global__ void __launch_bounds__(kCrossThreads)
    cross_simt_kernel(const scalar_t* __restrict__ acts, int64_t N, int64_t M, int64_t stride_n,
                      int64_t stride_m, const float* __restrict__ emb, int64_t D,
                      const float* __restrict__ inv_norm, const float* __restrict__ shift,
                      float* __restrict__ cross_partial) {
  __shared__ float emb_tile[kSimtStep][kSimtTile];   // [n][d]
  __shared__ float acts_tile[kSimtStep][kSimtTile];  // [n][latent]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kSimtTile;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSimtTile;
  const int64_t split = blockIdx.z;
  const int64_t n_begin = split * kCrossRowsPerSplit;
  const int64_t n_end = N < n_begin + kCrossRowsPerSplit ? N : n_begin + kCrossRowsPerSplit;
  float acc[4][4] = {};
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kSimtStep) {
    for (int e = threadIdx.x; e < kSimtStep * kSimtTile; e += kCrossThreads) {
      const int r = e / kSimtTile, col = e % kSimtTile;
      const int64_t n = n0 + r, m = m0 + col, dd = d0 + col;
      acts_tile[r][col] = (n < n_end && m < M)
                              ? static_cast<float>(acts[n * stride_n + m * stride_m]) - shift[m]
                              : 0.0f;
      emb_tile[r][col] = (n < n_end && dd < D) ? emb[n * D + dd] * inv_norm[n] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSimtStep; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = emb_tile[k][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = acts_tile[k][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* out = cross_partial + split * D * M;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t dd = d0 + ty * 4 + i, m = m0 + tx * 4 + j;
      if (dd < D && m < M) out[dd * M + m] = acc[i][j];
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

MonoScoreStats monoscore_stats_cuda(const at::Tensor& acts, const at::Tensor& emb) {
  check_stats_inputs(acts, emb);
  const c10::cuda::CUDAGuard device_guard(acts.device());
  int cc_major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor,
                                        acts.device().index()));
  TORCH_CHECK(cc_major >= 8, "monoscore_stats: the CUDA kernels need compute capability 8.0+ "
              "(tensor-core TF32), this GPU is sm_" + std::to_string(cc_major) +
              "x; use backend='triton' or 'torch'");
  auto [cross, unit_emb_sum, shift, act_range, moments, counts] = empty_stats(acts, emb);
  const int64_t N = acts.size(0), M = acts.size(1), D = emb.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor inv_norm = row_inv_norm(emb);
  const at::Tensor emb_f32 = emb.to(at::kFloat).contiguous();
  shift.copy_(acts.select(0, 0));
  counts.select(0, 0).fill_(static_cast<double>(N));
  counts.select(0, 1).copy_((inv_norm > 0).sum());
  unit_emb_sum.copy_(at::mv(emb_f32.t(), inv_norm));
  if (M == 0) return {cross, unit_emb_sum, shift, act_range, moments, counts};

  const int64_t moment_splits = ceil_div(N, kMomentsRowsPerSplit);
  TORCH_CHECK(moment_splits <= 65535, "monoscore_stats: N=" + std::to_string(N) +
              " is too large for one call; split it into batches");
  at::Tensor moments_partial = at::empty({moment_splits, 4, M}, moments.options());
  at::Tensor range_partial = at::empty({moment_splits, 2, M}, act_range.options());
  const int64_t cross_splits = ceil_div(N, kCrossRowsPerSplit);
  at::Tensor cross_partial = at::empty({cross_splits, D, M}, cross.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acts.scalar_type(),
                                  "monoscore_stats_cuda", [&] {
    const dim3 moments_grid(ceil_div(M, kMomentsThreads), moment_splits);
    latent_moments_kernel<scalar_t><<<moments_grid, kMomentsThreads, 0, stream>>>(
        acts.const_data_ptr<scalar_t>(), N, M, acts.stride(0), acts.stride(1),
        shift.const_data_ptr<float>(), inv_norm.const_data_ptr<float>(),
        moments_partial.data_ptr<double>(), range_partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const char* cross_variant = std::getenv("MONOLOSS_CUDA_CROSS");  // diagnostic switch
    if (D > 0 && cross_variant != nullptr && std::string(cross_variant) == "simt") {
      const dim3 cross_grid(ceil_div(M, kSimtTile), ceil_div(D, kSimtTile), cross_splits);
      cross_simt_kernel<scalar_t><<<cross_grid, kCrossThreads, 0, stream>>>(
          acts.const_data_ptr<scalar_t>(), N, M, acts.stride(0), acts.stride(1),
          emb_f32.const_data_ptr<float>(), D, inv_norm.const_data_ptr<float>(),
          shift.const_data_ptr<float>(), cross_partial.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (D > 0) {
      const dim3 cross_grid(ceil_div(M, kTileM), ceil_div(D, kTileD), cross_splits);
      cross_kernel<scalar_t><<<cross_grid, kCrossThreads, 0, stream>>>(
          acts.const_data_ptr<scalar_t>(), N, M, acts.stride(0), acts.stride(1),
          emb_f32.const_data_ptr<float>(), D, inv_norm.const_data_ptr<float>(),
          shift.const_data_ptr<float>(), cross_partial.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  moments.copy_(moments_partial.sum(0));
  act_range.select(0, 0).copy_(range_partial.select(1, 0).amin(0));
  act_range.select(0, 1).copy_(range_partial.select(1, 1).amax(0));
  if (D > 0) cross.copy_(cross_partial.sum(0));
  return {cross, unit_emb_sum, shift, act_range, moments, counts};
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CUDA, m) {
  m.impl("monoscore_stats", &monoscore_stats_cuda);
}

}  // namespace monoloss_kernels
