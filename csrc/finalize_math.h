// The per-latent arithmetic of finalize_scores and its backward, shared by the CPU
// and CUDA kernels (csrc/cpu/finalize_scores_cpu.cpp, csrc/cuda/finalize_scores_cuda.cu),
// all in float64. The ops and their torch implementation are defined in
// monoloss_kernels/stats.py, which derives the formulas.
#pragma once

#include <limits>

#ifdef __CUDACC__
#define MONOLOSS_HOST_DEVICE __host__ __device__
#else
#define MONOLOSS_HOST_DEVICE
#endif

namespace monoloss_kernels {

// One latent's statistics (b = a - shift), as float64.
struct LatentStats {
  double sum_b, sumsq_b, zero_sum_b, zero_sumsq_b;  // moments: Σb, Σb², both over zero-norm rows
  double act_min, act_max, shift;
  double cross_sq_at_min;  // ‖Σ_n ê_n (a_n - min)‖²
};

// The same moments at b = a - min, and the score's parts.
struct ScoreTerms {
  double delta;  // min - shift
  double sum_a, sumsq_a, zero_sumsq_a;
  double numerator, denominator;
  bool defined;  // the latent varies and den > den_rtol·N·(Σ(a - min))²
};

MONOLOSS_HOST_DEVICE inline ScoreTerms score_terms(const LatentStats& s, double num_rows, double num_zero_rows,
                                                   double den_rtol) {
  ScoreTerms t;
  t.delta = s.act_min - s.shift;
  t.sum_a = s.sum_b - num_rows * t.delta;
  t.sumsq_a = s.sumsq_b - 2 * t.delta * s.sum_b + num_rows * t.delta * t.delta;
  t.zero_sumsq_a = s.zero_sumsq_b - 2 * t.delta * s.zero_sum_b + num_zero_rows * t.delta * t.delta;
  t.numerator = s.cross_sq_at_min - (t.sumsq_a - t.zero_sumsq_a);
  t.denominator = t.sum_a * t.sum_a - t.sumsq_a;
  t.defined = s.act_max > s.act_min && t.denominator > den_rtol * num_rows * t.sum_a * t.sum_a;
  return t;
}

MONOLOSS_HOST_DEVICE inline double latent_score(const LatentStats& s, double num_rows, double num_zero_rows,
                                                double den_rtol) {
  const ScoreTerms t = score_terms(s, num_rows, num_zero_rows, den_rtol);
  return t.defined ? t.numerator / t.denominator : std::numeric_limits<double>::quiet_NaN();
}

// Gradients of one latent's score; all zero where it is undefined.
struct LatentGrads {
  double sum_b, sumsq_b, zero_sum_b, zero_sumsq_b;  // of the moments
  double act_min, shift, cross_sq_at_min;
};

MONOLOSS_HOST_DEVICE inline LatentGrads latent_score_backward(const LatentStats& s, double grad_score,
                                                              double num_rows, double num_zero_rows,
                                                              double den_rtol) {
  const ScoreTerms t = score_terms(s, num_rows, num_zero_rows, den_rtol);
  LatentGrads g = {0, 0, 0, 0, 0, 0, 0};
  if (!t.defined) return g;
  const double score = t.numerator / t.denominator;
  const double grad_num = grad_score / t.denominator;
  const double grad_den = -grad_score * score / t.denominator;
  const double grad_sum_a = 2 * t.sum_a * grad_den;
  const double grad_sumsq_a = -grad_num - grad_den;
  const double grad_zero_sumsq_a = grad_num;
  const double grad_delta = -num_rows * grad_sum_a + (2 * num_rows * t.delta - 2 * s.sum_b) * grad_sumsq_a +
                            (2 * num_zero_rows * t.delta - 2 * s.zero_sum_b) * grad_zero_sumsq_a;
  g.sum_b = grad_sum_a - 2 * t.delta * grad_sumsq_a;
  g.sumsq_b = grad_sumsq_a;
  g.zero_sum_b = -2 * t.delta * grad_zero_sumsq_a;
  g.zero_sumsq_b = grad_zero_sumsq_a;
  g.act_min = grad_delta;
  g.shift = -grad_delta;
  g.cross_sq_at_min = grad_num;
  return g;
}

}  // namespace monoloss_kernels
