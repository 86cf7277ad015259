// CPU kernels of finalize's op pair monoloss_kernels::finalize_scores and
// finalize_scores_backward (defined, with a torch implementation for every device,
// in monoloss_kernels/stats.py): one loop over the latents each, in float64, with
// the arithmetic of csrc/finalize_math.h that the CUDA kernels share.
#include "../finalize_math.h"
#include "../monoscore.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <tuple>

namespace monoloss_kernels {
namespace {

// Latents per parallel task: a few hundred flops each, so only large M is split.
constexpr int64_t kLatentGrain = 16384;

// The k-th latent of finalize_inputs' float64 tensors.
struct StatsView {
  const double *moments, *act_range, *shift, *cross_sq_at_min;
  int64_t M;
  LatentStats operator[](int64_t k) const {
    return {moments[k],   moments[M + k],   moments[2 * M + k], moments[3 * M + k],
            act_range[k], act_range[M + k], shift[k],           cross_sq_at_min[k]};
  }
};

at::Tensor finalize_scores_cpu(const at::Tensor& moments, const at::Tensor& act_range, const at::Tensor& shift,
                               const at::Tensor& counts, const at::Tensor& cross_sq_at_min, double den_rtol,
                               at::ScalarType out_dtype) {
  const auto [mo, range, sh, cnt, sq] =
      finalize_inputs("finalize_scores", moments, act_range, shift, counts, cross_sq_at_min);
  const int64_t M = mo.size(1);
  const StatsView stats{mo.const_data_ptr<double>(), range.const_data_ptr<double>(), sh.const_data_ptr<double>(),
                        sq.const_data_ptr<double>(), M};
  const double num_rows = cnt.const_data_ptr<double>()[0];
  const double num_zero_rows = num_rows - cnt.const_data_ptr<double>()[1];
  at::Tensor scores = at::empty({M}, mo.options());
  double* out = scores.data_ptr<double>();
  at::parallel_for(0, M, kLatentGrain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) out[k] = latent_score(stats[k], num_rows, num_zero_rows, den_rtol);
  });
  return scores.to(out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finalize_scores_backward_cpu(
    const at::Tensor& grad_scores, const at::Tensor& moments, const at::Tensor& act_range, const at::Tensor& shift,
    const at::Tensor& counts, const at::Tensor& cross_sq_at_min, double den_rtol) {
  const auto [mo, range, sh, cnt, sq] =
      finalize_inputs("finalize_scores_backward", moments, act_range, shift, counts, cross_sq_at_min);
  const int64_t M = mo.size(1);
  TORCH_CHECK(grad_scores.dim() == 1 && grad_scores.size(0) == M && grad_scores.device() == mo.device(),
              "finalize_scores_backward: grad_scores must have shape (" + std::to_string(M) + ",) on " +
                  mo.device().str());
  const at::Tensor grad = grad_scores.to(at::kDouble).contiguous();
  const StatsView stats{mo.const_data_ptr<double>(), range.const_data_ptr<double>(), sh.const_data_ptr<double>(),
                        sq.const_data_ptr<double>(), M};
  const double num_rows = cnt.const_data_ptr<double>()[0];
  const double num_zero_rows = num_rows - cnt.const_data_ptr<double>()[1];
  at::Tensor grad_moments = at::empty({4, M}, mo.options());
  at::Tensor grad_range = at::zeros({2, M}, mo.options());  // the max row stays 0
  at::Tensor grad_shift = at::empty({M}, mo.options());
  at::Tensor grad_sq = at::empty({M}, mo.options());
  double *gm = grad_moments.data_ptr<double>(), *gr = grad_range.data_ptr<double>();
  double *gs = grad_shift.data_ptr<double>(), *gq = grad_sq.data_ptr<double>();
  const double* g = grad.const_data_ptr<double>();
  at::parallel_for(0, M, kLatentGrain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const LatentGrads d = latent_score_backward(stats[k], g[k], num_rows, num_zero_rows, den_rtol);
      gm[k] = d.sum_b;
      gm[M + k] = d.sumsq_b;
      gm[2 * M + k] = d.zero_sum_b;
      gm[3 * M + k] = d.zero_sumsq_b;
      gr[k] = d.act_min;
      gs[k] = d.shift;
      gq[k] = d.cross_sq_at_min;
    }
  });
  return {grad_moments.to(moments.scalar_type()), grad_range.to(act_range.scalar_type()),
          grad_shift.to(shift.scalar_type()), grad_sq.to(cross_sq_at_min.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(monoloss_kernels, CPU, m) {
  m.impl("finalize_scores", &finalize_scores_cpu);
  m.impl("finalize_scores_backward", &finalize_scores_backward_cpu);
}

}  // namespace monoloss_kernels
