// CUDA implementation, chunk by chunk of at most kProductRows rows:
//   latent_moments_kernel  one read of the chunk: per-latent min/max and float64
//                          moments of b = a - shift (shift = the first row), one
//                          thread per latent and row split (coalesced along
//                          latents), and b as float32 (rows, M) for the product.
//   cross += Êᵀ b          cuBLAS SGEMM (at::addmm_), IEEE float32 whatever the
//                          caller's matmul precision (IeeeFloat32Matmuls).
//
// Why cuBLAS SGEMM: every exact float32 method computes this product, and SGEMM is
// its floor; the register-tiled FMA kernel this replaces ran at a third of its
// speed (47 ms against 15.6 ms at N=65536, M=8192, d=768 on an H200, run6-suite).
// Why chunks: one float32 accumulation over N = 65536 rows drifts past the 2e-5
// bound; 8192-row products summed in float32 hold it (the torch backend's
// TORCH_ROWS_PER_PRODUCT, which passed on the H200), and the staged b stays small.
// Why not tensor cores: TF32 truncates as it accumulates; 3xTF32 was off by 2.9e-4
// and a chunked TF32 + bf16-correction version by 2.8e-5 on an H200 (run3, run7;
// branch cuda-split-gemm keeps the latter, with a centering fix not yet run).
#include "../monoscore.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10/cuda only: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit (or a pip-installed one) may not ship; the products go
// through at::addmm_.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

namespace monoloss_kernels {
namespace {

// Rows per moments split: a thread's share of one latent. 8192-row chunks give
// 32 splits x M/256 blocks, which fills 132 SMs from M = 1024 on.
constexpr int64_t kMomentsRowsPerSplit = 256;
constexpr int kMomentsThreads = 256;
// Rows per float32 product (see "Why chunks"), at most; fewer where M is large, so
// that the staged b holds at most kStagedFloats (256 MB), but never fewer than
// kMinProductRows, which keeps the products' reduction long enough for SGEMM speed.
constexpr int64_t kProductRows = 8192;
constexpr int64_t kMinProductRows = 1024;
constexpr int64_t kStagedFloats = int64_t{1} << 26;

// Rows [n_begin, n_end) of acts, split blockIdx.y of them: writes that split's
// partial moments and range, and b to staged (row n at (n - n_begin) * M).
template <typename scalar_t>
__global__ void latent_moments_kernel(const scalar_t* __restrict__ acts, int64_t n_begin, int64_t n_end,
                                      int64_t M, int64_t stride_n, int64_t stride_m,
                                      const float* __restrict__ shift, const float* __restrict__ inv_norm,
                                      double* __restrict__ moments_partial,  // (splits, 4, M)
                                      float* __restrict__ range_partial,     // (splits, 2, M)
                                      float* __restrict__ staged) {          // (rows, M)
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= M) return;
  const int64_t split = blockIdx.y;
  const int64_t first = n_begin + static_cast<int64_t>(blockIdx.y) * kMomentsRowsPerSplit;
  const int64_t last = n_end < first + kMomentsRowsPerSplit ? n_end : first + kMomentsRowsPerSplit;
  const float c32 = shift[k];
  const double c = c32;
  double sum = 0, sumsq = 0, zero_sum = 0, zero_sumsq = 0;
  float lo = __int_as_float(0x7f800000), hi = -lo;  // +inf, -inf
#pragma unroll 4
  for (int64_t n = first; n < last; ++n) {
    const float a = static_cast<float>(acts[n * stride_n + k * stride_m]);
    staged[(n - n_begin) * M + k] = a - c32;  // the product's b, as the FMA kernel formed it
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

  // A multiple of the split, so that every chunk but the last is whole splits.
  const int64_t product_rows =
      std::clamp(kStagedFloats / M, kMinProductRows, kProductRows) / kMomentsRowsPerSplit * kMomentsRowsPerSplit;
  // One chunk's partial results (reused: the stream orders the chunks), folded into
  // the totals after each chunk, so memory does not grow with N.
  const int64_t chunk_splits = ceil_div(std::min(product_rows, N), kMomentsRowsPerSplit);
  at::Tensor moments_partial = at::empty({chunk_splits, 4, M}, moments.options());
  at::Tensor range_partial = at::empty({chunk_splits, 2, M}, act_range.options());
  at::Tensor staged = at::empty({std::min(product_rows, N), M}, cross.options());
  at::Tensor act_min = act_range.select(0, 0), act_max = act_range.select(0, 1);

  const IeeeFloat32Matmuls ieee_matmuls;
  for (int64_t n0 = 0; n0 < N; n0 += product_rows) {
    const int64_t rows = std::min(product_rows, N - n0);
    const int64_t splits = ceil_div(rows, kMomentsRowsPerSplit);
    const dim3 grid(ceil_div(M, kMomentsThreads), splits);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acts.scalar_type(), "monoscore_stats_cuda", [&] {
      latent_moments_kernel<scalar_t><<<grid, kMomentsThreads, 0, stream>>>(
          acts.const_data_ptr<scalar_t>(), n0, n0 + rows, M, acts.stride(0), acts.stride(1),
          shift.const_data_ptr<float>(), inv_norm.const_data_ptr<float>(), moments_partial.data_ptr<double>(),
          range_partial.data_ptr<float>(), staged.data_ptr<float>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (D > 0) {
      const at::Tensor unit_emb = emb_f32.narrow(0, n0, rows) * inv_norm.narrow(0, n0, rows).unsqueeze(1);
      cross.addmm_(unit_emb.t(), staged.narrow(0, 0, rows));  // += (d, rows) @ (rows, M); cross starts at 0
    }
    const at::Tensor chunk_range = range_partial.narrow(0, 0, splits);
    moments.add_(moments_partial.narrow(0, 0, splits).sum(0));  // moments start at 0
    const at::Tensor chunk_min = chunk_range.select(1, 0).amin(0), chunk_max = chunk_range.select(1, 1).amax(0);
    if (n0 == 0) {
      act_min.copy_(chunk_min);
      act_max.copy_(chunk_max);
    } else {
      at::minimum_out(act_min, act_min, chunk_min);
      at::maximum_out(act_max, act_max, chunk_max);
    }
  }
  return {cross, unit_emb_sum, shift, act_range, moments, counts};
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CUDA, m) {
  m.impl("monoscore_stats", &monoscore_stats_cuda);
}

}  // namespace monoloss_kernels
