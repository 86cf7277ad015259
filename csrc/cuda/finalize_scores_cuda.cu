// CUDA kernels of finalize's op pair monoloss_kernels::finalize_scores and
// finalize_scores_backward: one thread per latent, float64, the arithmetic of
// csrc/finalize_math.h that the CPU kernels share (and test on every CI run).
// One launch each where the torch implementation took ~25 and ~40 small kernels:
// a MonoLoss step on a GPU was bound by launching them
// (benchmarks/results/NVIDIA-H200/run6-suite).
#include "../finalize_math.h"
#include "../monoscore.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace monoloss_kernels {
namespace {

constexpr int kThreads = 256;

// The k-th latent of finalize_inputs' float64 tensors.
__device__ __forceinline__ LatentStats load_latent(const double* moments, const double* act_range,
                                                   const double* shift, const double* cross_sq_at_min, int64_t M,
                                                   int64_t k) {
  return {moments[k],   moments[M + k],   moments[2 * M + k], moments[3 * M + k],
          act_range[k], act_range[M + k], shift[k],           cross_sq_at_min[k]};
}

__global__ void finalize_scores_kernel(const double* __restrict__ moments, const double* __restrict__ act_range,
                                       const double* __restrict__ shift, const double* __restrict__ counts,
                                       const double* __restrict__ cross_sq_at_min, int64_t M, double den_rtol,
                                       double* __restrict__ scores) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= M) return;
  const LatentStats s = load_latent(moments, act_range, shift, cross_sq_at_min, M, k);
  scores[k] = latent_score(s, counts[0], counts[0] - counts[1], den_rtol);
}

__global__ void finalize_scores_backward_kernel(const double* __restrict__ grad_scores,
                                                const double* __restrict__ moments,
                                                const double* __restrict__ act_range,
                                                const double* __restrict__ shift,
                                                const double* __restrict__ counts,
                                                const double* __restrict__ cross_sq_at_min, int64_t M,
                                                double den_rtol, double* __restrict__ grad_moments,
                                                double* __restrict__ grad_range, double* __restrict__ grad_shift,
                                                double* __restrict__ grad_sq) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= M) return;
  const LatentStats s = load_latent(moments, act_range, shift, cross_sq_at_min, M, k);
  const LatentGrads d = latent_score_backward(s, grad_scores[k], counts[0], counts[0] - counts[1], den_rtol);
  grad_moments[k] = d.sum_b;
  grad_moments[M + k] = d.sumsq_b;
  grad_moments[2 * M + k] = d.zero_sum_b;
  grad_moments[3 * M + k] = d.zero_sumsq_b;
  grad_range[k] = d.act_min;
  grad_range[M + k] = 0;
  grad_shift[k] = d.shift;
  grad_sq[k] = d.cross_sq_at_min;
}

unsigned int blocks_for(int64_t M) { return static_cast<unsigned int>((M + kThreads - 1) / kThreads); }

at::Tensor finalize_scores_cuda(const at::Tensor& moments, const at::Tensor& act_range, const at::Tensor& shift,
                                const at::Tensor& counts, const at::Tensor& cross_sq_at_min, double den_rtol,
                                at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard device_guard(moments.device());
  const auto [mo, range, sh, cnt, sq] =
      finalize_inputs("finalize_scores", moments, act_range, shift, counts, cross_sq_at_min);
  const int64_t M = mo.size(1);
  at::Tensor scores = at::empty({M}, mo.options());
  if (M > 0) {
    finalize_scores_kernel<<<blocks_for(M), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        mo.const_data_ptr<double>(), range.const_data_ptr<double>(), sh.const_data_ptr<double>(),
        cnt.const_data_ptr<double>(), sq.const_data_ptr<double>(), M, den_rtol, scores.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return scores.to(out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finalize_scores_backward_cuda(
    const at::Tensor& grad_scores, const at::Tensor& moments, const at::Tensor& act_range, const at::Tensor& shift,
    const at::Tensor& counts, const at::Tensor& cross_sq_at_min, double den_rtol) {
  const c10::cuda::CUDAGuard device_guard(moments.device());
  const auto [mo, range, sh, cnt, sq] =
      finalize_inputs("finalize_scores_backward", moments, act_range, shift, counts, cross_sq_at_min);
  const int64_t M = mo.size(1);
  TORCH_CHECK(grad_scores.dim() == 1 && grad_scores.size(0) == M && grad_scores.device() == mo.device(),
              "finalize_scores_backward: grad_scores must have shape (" + std::to_string(M) + ",) on " +
                  mo.device().str());
  const at::Tensor grad = grad_scores.to(at::kDouble).contiguous();
  at::Tensor grad_moments = at::empty({4, M}, mo.options());
  at::Tensor grad_range = at::empty({2, M}, mo.options());
  at::Tensor grad_shift = at::empty({M}, mo.options());
  at::Tensor grad_sq = at::empty({M}, mo.options());
  if (M > 0) {
    finalize_scores_backward_kernel<<<blocks_for(M), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<double>(), mo.const_data_ptr<double>(), range.const_data_ptr<double>(),
        sh.const_data_ptr<double>(), cnt.const_data_ptr<double>(), sq.const_data_ptr<double>(), M, den_rtol,
        grad_moments.data_ptr<double>(), grad_range.data_ptr<double>(), grad_shift.data_ptr<double>(),
        grad_sq.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_moments.to(moments.scalar_type()), grad_range.to(act_range.scalar_type()),
          grad_shift.to(shift.scalar_type()), grad_sq.to(cross_sq_at_min.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(monoloss_kernels, CUDA, m) {
  m.impl("finalize_scores", &finalize_scores_cuda);
  m.impl("finalize_scores_backward", &finalize_scores_backward_cuda);
}

}  // namespace monoloss_kernels
