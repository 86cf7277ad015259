// CUDA implementation: two kernels over the same read of acts.
//   latent_moments_kernel  per-latent min/max and float64 moments, one thread per
//                          latent and row split (coalesced along latents).
//   cross_kernel           cross = unit_emb^T (acts - shift) in float32 FMA,
//                          register-tiled through shared memory.
// Both split the rows so the grid fills the GPU whatever M and d are; the
// partial results are summed (min/maxed) by ATen on the current stream.
//
// Why not tensor cores: a 3xTF32 WMMA version of cross_kernel measured on an
// H200 (benchmarks/results/NVIDIA-H200/run3/diagnose.log) was both slower
// (78 ms vs 47 ms at N=65536, M=8192, d=768) and off by TF32-level errors
// (cross 7.6e-4 relative; scores 4e-4), so it was removed. The Triton
// backend's tf32x3 dot is the tensor-core path that holds float32 accuracy.
#include "../monoscore.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10/cuda only: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit (or a pip-installed one) may not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

namespace monoloss_kernels {
namespace {

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

// Threads per cross-product block.
constexpr int kCrossThreads = 256;
// Rows per split of the cross kernel: bounds the length of each float32
// accumulation (accuracy) and gives N / 8192 more blocks to the grid.
constexpr int64_t kCrossRowsPerSplit = 8192;

// cross tile of 64 (d) x 64 (latents) per block, 16 x 16 threads owning 4 x 4
// outputs each, 16 rows staged in shared memory per step.
constexpr int kCrossTile = 64;
constexpr int kCrossStep = 16;

template <typename scalar_t>
__global__ void __launch_bounds__(kCrossThreads)
    cross_kernel(const scalar_t* __restrict__ acts, int64_t N, int64_t M, int64_t stride_n,
                 int64_t stride_m, const float* __restrict__ emb,  // (N, d) contiguous
                 int64_t D, const float* __restrict__ inv_norm, const float* __restrict__ shift,
                 float* __restrict__ cross_partial) {  // (splits, d, M)
  __shared__ float emb_tile[kCrossStep][kCrossTile];   // [n][d]
  __shared__ float acts_tile[kCrossStep][kCrossTile];  // [n][latent]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kCrossTile;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kCrossTile;
  const int64_t split = blockIdx.z;
  const int64_t n_begin = split * kCrossRowsPerSplit;
  const int64_t n_end = N < n_begin + kCrossRowsPerSplit ? N : n_begin + kCrossRowsPerSplit;
  float acc[4][4] = {};
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kCrossStep) {
    for (int e = threadIdx.x; e < kCrossStep * kCrossTile; e += kCrossThreads) {
      const int r = e / kCrossTile, col = e % kCrossTile;
      const int64_t n = n0 + r, m = m0 + col, dd = d0 + col;
      acts_tile[r][col] = (n < n_end && m < M)
                              ? static_cast<float>(acts[n * stride_n + m * stride_m]) - shift[m]
                              : 0.0f;
      emb_tile[r][col] = (n < n_end && dd < D) ? emb[n * D + dd] * inv_norm[n] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kCrossStep; ++k) {
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
  TORCH_CHECK(cc_major >= 8, "monoscore_stats: the CUDA kernels are built for compute capability "
              "8.0+, this GPU is sm_" + std::to_string(cc_major) + "x; use backend='triton' or 'torch'");
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
    if (D > 0) {
      const dim3 cross_grid(ceil_div(M, kCrossTile), ceil_div(D, kCrossTile), cross_splits);
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
