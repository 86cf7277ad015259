// C++ test of the monoloss_kernels::monoscore_stats and monoscore_stats_csr ops
// on CPU, run by ctest.
//
// Calls the op through the dispatcher, as any C++ or Python caller does, and
// checks the statistics against a float64 reference built from ATen ops. The
// CPU kernel picks its own per-latent shift (0, the latent's minimum, or
// acts[0], depending on the input's layout and offset), so the sums are
// compared through the one shift-independent quantity: the MonoScore that
// `finalize` (monoloss_kernels/stats.py, ported below) computes from them,
// against the O(N^2) pairwise definition. Returns nonzero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>

namespace {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

int g_failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s  %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++g_failures;
}

Stats monoscore_stats(const at::Tensor& acts, const at::Tensor& emb) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("monoloss_kernels::monoscore_stats", "")
          .typed<Stats(const at::Tensor&, const at::Tensor&)>();
  return op.call(acts, emb);
}

// Per latent: ã = (a - min) / (max - min), s[n,m] = cos(emb[n], emb[m]) (0 for
// zero rows), MS = Σ_{n<m} ã_n ã_m s_nm / Σ_{n<m} ã_n ã_m; NaN where the
// denominator is 0. Pairwise, in float64.
at::Tensor reference_monoscore(const at::Tensor& acts, const at::Tensor& emb) {
  const at::Tensor a = acts.to(at::kDouble), e = emb.to(at::kDouble);
  const at::Tensor lo = a.amin(0), range = a.amax(0) - lo;
  const at::Tensor safe_range = at::where(range > 0, range, at::ones_like(range));
  const at::Tensor a_tilde = (a - lo) / safe_range;  // all 0 for a constant latent
  const at::Tensor norm = e.norm(2, {1}, /*keepdim=*/true);
  const at::Tensor unit = at::where(norm > 0, e / at::where(norm > 0, norm, at::ones_like(norm)),
                                    at::zeros_like(e));
  const int64_t N = a.size(0);
  const at::Tensor upper = at::ones({N, N}, a.options()).triu(1);  // the pairs n < m
  const at::Tensor cosine = unit.matmul(unit.t());
  const at::Tensor numerator = ((upper * cosine).matmul(a_tilde) * a_tilde).sum(0);
  const at::Tensor denominator = (upper.matmul(a_tilde) * a_tilde).sum(0);
  return at::where(denominator > 0, numerator / denominator,
                   at::full_like(numerator, std::numeric_limits<double>::quiet_NaN()));
}

// monoloss_kernels.stats.finalize: moves the sums of b = a - shift to a - min
// (reshift) and forms the score, (M,) float32, NaN where undefined.
at::Tensor finalize(const Stats& stats) {
  const auto& [cross, unit_emb_sum, shift, act_range, moments, counts] = stats;
  const at::Tensor act_min = act_range[0], act_max = act_range[1];
  const at::Tensor num_rows = counts[0], num_zero_rows = counts[0] - counts[1];
  const at::Tensor delta = act_min.to(at::kDouble) - shift.to(at::kDouble);
  const at::Tensor sum_b = moments[0], sumsq_b = moments[1];
  const at::Tensor zero_sum_b = moments[2], zero_sumsq_b = moments[3];
  const at::Tensor sum_a = sum_b - num_rows * delta;
  const at::Tensor sumsq_a = sumsq_b - 2 * delta * sum_b + num_rows * delta * delta;
  const at::Tensor zero_sumsq_a =
      zero_sumsq_b - 2 * delta * zero_sum_b + num_zero_rows * delta * delta;
  const at::Tensor cross_a = cross.to(at::kDouble) - unit_emb_sum.unsqueeze(1) * delta.unsqueeze(0);
  const at::Tensor numerator = (cross_a * cross_a).sum(0) - (sumsq_a - zero_sumsq_a);
  const at::Tensor denominator = sum_a * sum_a - sumsq_a;
  const double den_rtol = 32 * std::numeric_limits<double>::epsilon();  // stats.DEN_RTOL
  const at::Tensor defined =
      (act_max > act_min) & (denominator > den_rtol * num_rows * sum_a * sum_a);
  const at::Tensor safe_denominator = at::where(defined, denominator, at::ones_like(denominator));
  return at::where(defined, numerator / safe_denominator,
                   at::full_like(numerator, std::numeric_limits<double>::quiet_NaN()))
      .to(at::kFloat);
}

bool has(const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType dtype) {
  return t.sizes() == sizes && t.scalar_type() == dtype && t.device().is_cpu();
}

// The sparse op on the CSR form of acts: entries not stored are 0.
Stats monoscore_stats_csr(const at::Tensor& acts, const at::Tensor& emb) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("monoloss_kernels::monoscore_stats_csr", "")
          .typed<Stats(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       int64_t)>();
  const at::Tensor csr = acts.to_sparse_csr();
  return op.call(csr.crow_indices(), csr.col_indices(), csr.values(), emb, acts.size(1));
}

// One input layout: the op's outputs against the float64 reference.
void check_stats(const std::string& name, const at::Tensor& acts, const at::Tensor& emb,
                 int64_t constant_latent, bool sparse = false) {
  std::printf("-- %s: acts %s strides %s, emb %s\n", name.c_str(),
              c10::toString(acts.scalar_type()), c10::str(acts.strides()).c_str(),
              c10::str(emb.sizes()).c_str());
  const int64_t N = acts.size(0), M = acts.size(1), d = emb.size(1);
  const Stats stats = sparse ? monoscore_stats_csr(acts, emb) : monoscore_stats(acts, emb);
  const auto& [cross, unit_emb_sum, shift, act_range, moments, counts] = stats;

  expect(has(cross, {d, M}, at::kFloat), name + ": cross is (d, M) float32");
  expect(has(unit_emb_sum, {d}, at::kDouble), name + ": unit_emb_sum is (d,) float64");
  expect(has(shift, {M}, at::kFloat), name + ": shift is (M,) float32");
  expect(has(act_range, {2, M}, at::kFloat), name + ": act_range is (2, M) float32");
  expect(has(moments, {4, M}, at::kDouble), name + ": moments is (4, M) float64");
  expect(has(counts, {2}, at::kDouble), name + ": counts is (2,) float64");

  expect(at::equal(act_range[0], acts.amin(0).to(at::kFloat)) &&
             at::equal(act_range[1], acts.amax(0).to(at::kFloat)),
         name + ": act_range is exactly (amin, amax)");
  const double nonzero_rows = emb.norm(2, {1}).gt(0).sum().item<double>();
  expect(counts[0].item<double>() == static_cast<double>(N) &&
             counts[1].item<double>() == nonzero_rows,
         name + ": counts == {N, " + std::to_string(static_cast<int64_t>(nonzero_rows)) + "}");

  const at::Tensor score = finalize(stats).to(at::kDouble);
  const at::Tensor expected = reference_monoscore(acts, emb);
  const bool same_nans = at::equal(score.isnan(), expected.isnan());
  expect(same_nans, name + ": NaN exactly where the reference is undefined");
  expect(std::isnan(score[constant_latent].item<double>()),
         name + ": the constant latent scores NaN");
  const at::Tensor finite = expected.isfinite();
  const double max_err = (score - expected).abs().masked_select(finite).max().item<double>();
  constexpr double kTolerance = 2e-5;
  char message[160];
  std::snprintf(message, sizeof(message),
                ": max |MonoScore - pairwise float64| = %.3g <= %g over %lld latents", max_err,
                kTolerance, static_cast<long long>(finite.sum().item<int64_t>()));
  expect(same_nans && max_err <= kTolerance, name + message);
}

}  // namespace

int main() {
  try {
    at::manual_seed(0);
    constexpr int64_t N = 97, M = 41, d = 23;
    constexpr int64_t kOffsetLatent = 7, kConstantLatent = 20;
    at::Tensor acts = at::relu(at::randn({N, M}));
    acts.select(1, kOffsetLatent).copy_(1000 + at::randn({N}));  // far from 0
    acts.select(1, kConstantLatent).fill_(2.5);
    at::Tensor emb = at::randn({N, d});
    emb[3].zero_();  // rows with zero norm: no similarity, left out of counts[1]
    emb[60].zero_();

    // float32 row-major acts: the kernel's in-place path (shift 0, offset
    // latents recomputed with their minimum as shift).
    check_stats("float32 contiguous", acts, emb, kConstantLatent);
    // Column-major and float64 acts: the staged path (shift = acts[0]).
    check_stats("float32 column-major", acts.t().contiguous().t(), emb, kConstantLatent);
    check_stats("float64", acts.to(at::kDouble), emb.to(at::kDouble), kConstantLatent);
    // CSR: the ReLU zeros are not stored; the offset latent is stored in every row.
    check_stats("float32 CSR", acts, emb, kConstantLatent, /*sparse=*/true);

    bool threw = false;
    try {
      monoscore_stats(acts, emb.narrow(0, 0, N - 1));
    } catch (const c10::Error&) {
      threw = true;
    }
    expect(threw, "mismatched N (acts 97 rows, emb 96) throws c10::Error");
  } catch (const std::exception& e) {
    std::printf("FAIL  unexpected exception: %s\n", e.what());
    ++g_failures;
  }
  std::printf("%s (%d failure%s)\n", g_failures == 0 ? "PASSED" : "FAILED", g_failures,
              g_failures == 1 ? "" : "s");
  return g_failures == 0 ? 0 : 1;
}
