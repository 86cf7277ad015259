// CPU kernel of monoloss_kernels::deflated_scores (defined, with a torch
// implementation for every device, in monoloss_kernels/refine.py): the float64
// MonoScores of the latents the one-pass closed form cannot resolve in float32,
// each from its stored entries with its top sample n* taken out of the sums.
// refine.py's module docstring derives the formula; with ã_0 the weight of the
// rows without an entry (-min/range where there are such rows other than n*,
// else 0) and ê the unit embedding rows:
//   V  = Σ_{entries ≠ n*} (ã - ã_0) ê + ã_0 (ΣÊ - ê*)
//   numerator   = ê*·V + ½(‖V‖² - Σ_{n≠n*} ã²‖ê‖²)
//   denominator = S1' + ½(S1'² - Σ_{n≠n*} ã²),   S1' = Σ_{n≠n*} ã.
// One pass per latent over its entries' embedding rows, each row read twice from
// L1 (its norm, then V += (ã - ã_0)/‖e‖ · e), everything in float64. The torch
// implementation runs ~30 ops per block of 256 latents: 206 ms for the 7.5k
// latents (47k entries, d = 512) of a Zipf-distributed TopK batch that this
// kernel takes in 20 ms on 2 cores (benchmarks/test_bench_topk.py::
// test_deflated_scores_heavy_tailed), bound by reading the entries' scattered
// embedding rows (96 MB) from memory.
#include "vectorize.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace monoloss_kernels {
namespace {

// Independent partial sums per reduction, so that the compiler can vectorise
// it without reassociating.
constexpr int64_t kLanes = 16;
// Rows per partial sum of ΣÊ: fixed (not per thread) so that the result does
// not depend on the number of threads; 1024 rows of d = 512 float32 are 2 MiB.
constexpr int64_t kRowsPerPartial = 1024;
// Parallel tasks per thread for the latents, balanced by their numbers of
// entries: the entries of a heavy-tailed batch are far from even across latents.
constexpr int64_t kTasksPerThread = 4;
// Cost of a latent beyond its entries, in entries: the ΣÊ term and the two dot
// products are O(d) each, as an entry is.
constexpr int64_t kLatentCost = 4;

std::string shape_str(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + ")";
}

// Σ x² of one embedding row in float64.
template <typename scalar_t>
MONOLOSS_VECTOR_INLINE double row_sq_norm(const scalar_t* x, int64_t d) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const double v = static_cast<double>(x[i + l]);
      lanes[l] += v * v;
    }
  }
  for (; i < d; ++i) lanes[0] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  double total = 0;
  for (const double lane : lanes) total += lane;
  return total;
}

// out += scale · x, in float64.
template <typename scalar_t>
MONOLOSS_VECTOR_INLINE void add_scaled_row(const scalar_t* x, int64_t d, double scale, double* out) {
  for (int64_t i = 0; i < d; ++i) out[i] += scale * static_cast<double>(x[i]);
}

// The two row loops for float32 embeddings (the common case), in AVX-512/AVX2
// clones; the baseline build's SSE2 does two doubles per instruction.
MONOLOSS_VECTOR_CLONES
double row_sq_norm(const float* x, int64_t d) { return row_sq_norm<float>(x, d); }

MONOLOSS_VECTOR_CLONES
void add_scaled_row(const float* x, int64_t d, double scale, double* out) { add_scaled_row<float>(x, d, scale, out); }

MONOLOSS_VECTOR_CLONES
double dot(const double* a, const double* b, int64_t d) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  for (; i < d; ++i) lanes[0] += a[i] * b[i];
  double total = 0;
  for (const double lane : lanes) total += lane;
  return total;
}

// Asks for the next entry's embedding row while this one is summed: the rows
// of a latent's entries are scattered over emb, and a miss on each cost most
// of the kernel's time (N = 16384, d = 512: 32 MiB of emb).
template <typename scalar_t>
void prefetch_row(const scalar_t* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(p + b);
}

double inverse_norm(double sq_norm) { return sq_norm > 0 ? 1.0 / std::sqrt(sq_norm) : 0.0; }

void check_inputs(const at::Tensor& rows, const at::Tensor& local, const at::Tensor& values,
                  const at::Tensor& act_range, const at::Tensor& emb) {
  TORCH_CHECK(rows.dim() == 1 && local.dim() == 1 && values.dim() == 1 && rows.size(0) == local.size(0) &&
                  rows.size(0) == values.size(0),
              "deflated_scores: rows, local and values must be 1-D of one length (the entries), got " +
                  shape_str(rows) + ", " + shape_str(local) + " and " + shape_str(values));
  TORCH_CHECK(rows.scalar_type() == at::kLong && local.scalar_type() == at::kLong,
              "deflated_scores: rows and local must be int64");
  TORCH_CHECK(act_range.dim() == 2 && act_range.size(0) == 2,
              "deflated_scores: act_range must have shape (2, F), got " + shape_str(act_range));
  TORCH_CHECK(emb.dim() == 2, "deflated_scores: emb must be 2-D (N, d), got " + shape_str(emb));
  TORCH_CHECK(at::isFloatingType(values.scalar_type()) && at::isFloatingType(act_range.scalar_type()) &&
                  at::isFloatingType(emb.scalar_type()),
              "deflated_scores: values, act_range and emb must be floating point");
  for (const at::Tensor* t : {&rows, &local, &values, &act_range}) {
    TORCH_CHECK(t->device() == emb.device(),
                "deflated_scores: every input must be on " + emb.device().str() + ", got one on " + t->device().str());
  }
}

// ΣÊ (d) and the number of nonzero-norm rows over all N rows, in float64.
template <typename scalar_t>
std::pair<std::vector<double>, double> unit_emb_sum(const scalar_t* emb, int64_t N, int64_t d) {
  const int64_t parts = std::max<int64_t>(1, (N + kRowsPerPartial - 1) / kRowsPerPartial);
  std::vector<double> partial(parts * d, 0.0), partial_units(parts, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t n = p * kRowsPerPartial; n < std::min(N, (p + 1) * kRowsPerPartial); ++n) {
        const double inv = inverse_norm(row_sq_norm(emb + n * d, d));
        add_scaled_row(emb + n * d, d, inv, partial.data() + p * d);
        partial_units[p] += inv > 0;
      }
    }
  });
  std::vector<double> total(d, 0.0);
  double units = 0;
  for (int64_t p = 0; p < parts; ++p) {  // in part order: the same result for any number of threads
    for (int64_t i = 0; i < d; ++i) total[i] += partial[p * d + i];
    units += partial_units[p];
  }
  return {std::move(total), units};
}

at::Tensor deflated_scores_cpu(const at::Tensor& rows, const at::Tensor& local, const at::Tensor& values,
                               const at::Tensor& act_range, const at::Tensor& emb) {
  check_inputs(rows, local, values, act_range, emb);
  const int64_t N = emb.size(0), d = emb.size(1), F = act_range.size(1), E = rows.size(0);
  const at::Tensor range_t = act_range.to(at::kDouble).contiguous();
  // Values as float32, as the statistics kernels read them: the result is the
  // exact score of what they saw.
  const at::Tensor values_t = values.to(at::kFloat).contiguous();
  const at::Tensor rows_t = rows.contiguous(), local_t = local.contiguous();
  const double* lo = range_t.const_data_ptr<double>();
  const double* hi = lo + F;
  const float* vals = values_t.const_data_ptr<float>();
  const int64_t* row_of = rows_t.const_data_ptr<int64_t>();
  const int64_t* latent_of = local_t.const_data_ptr<int64_t>();

  // The entries grouped by latent (a stable counting sort: within a latent, in
  // input order, so that n* is the first entry at the max, as in torch).
  std::vector<int64_t> start(F + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t f = latent_of[e], n = row_of[e];
    TORCH_CHECK(f >= 0 && f < F, "deflated_scores: local holds " + std::to_string(f) + ", outside [0, " +
                                     std::to_string(F) + ")");
    TORCH_CHECK(n >= 0 && n < N, "deflated_scores: rows holds " + std::to_string(n) + ", outside [0, " +
                                     std::to_string(N) + ")");
    ++start[f + 1];
  }
  for (int64_t f = 0; f < F; ++f) start[f + 1] += start[f];
  std::vector<int64_t> order(E), next(start.begin(), start.end() - 1);
  for (int64_t e = 0; e < E; ++e) order[next[latent_of[e]]++] = e;

  bool needs_unit_emb_sum = false;  // some latent's rows without an entry carry weight -min/range != 0
  for (int64_t f = 0; f < F && !needs_unit_emb_sum; ++f) needs_unit_emb_sum = start[f + 1] - start[f] < N && lo[f] != 0;

  // Task boundaries over the latents, with about equal cost each.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(F, at::get_num_threads() * kTasksPerThread));
  const double cost_per_task = static_cast<double>(E + kLatentCost * F) / static_cast<double>(tasks);
  std::vector<int64_t> task_start(tasks + 1, F);
  task_start[0] = 0;
  for (int64_t f = 0, t = 1; f < F && t < tasks; ++f) {
    if (static_cast<double>(start[f + 1] + kLatentCost * (f + 1)) >= cost_per_task * static_cast<double>(t)) {
      task_start[t++] = f + 1;
    }
  }

  at::Tensor scores = at::empty({F}, emb.options().dtype(at::kDouble));
  double* out = scores.data_ptr<double>();
  const at::Tensor emb_t = emb.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb_t.scalar_type(), "deflated_scores", [&] {
    const scalar_t* x = emb_t.const_data_ptr<scalar_t>();
    std::vector<double> sum_unit(d, 0.0);
    double num_unit_rows = 0;
    if (needs_unit_emb_sum) std::tie(sum_unit, num_unit_rows) = unit_emb_sum(x, N, d);
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<double> rest(d), top_unit(d);  // V and ê* of one latent
      for (int64_t f = task_start[t0]; f < task_start[t1]; ++f) {
        const double span = hi[f] - lo[f];
        const int64_t* entries = order.data() + start[f];
        const int64_t count = start[f + 1] - start[f];
        const auto weight = [&](int64_t e) { return (static_cast<double>(vals[e]) - lo[f]) / span; };
        // n*, a row at the max (ã = 1 exactly): the first entry there; where the max is
        // an implicit 0, the one row without an entry if there is only one (several put
        // at least 2 into the denominator: well conditioned in float64, refine.py).
        int64_t top = -1;
        for (int64_t i = 0; i < count && top < 0; ++i) {
          if (weight(entries[i]) == 1.0) top = i;
        }
        const bool implicit_top = top < 0 && count == N - 1 && hi[f] == 0;
        // ã_0, the weight of a row without an entry (activation 0). A latent with such
        // rows has min <= 0 <= max, so |ã - ã_0| <= 1; one without them (or whose only
        // one is n*) gets 0, not -min/range, which for a latent at 1000 + x would cancel.
        const double implicit = count < N && !implicit_top ? -lo[f] / span : 0.0;
        std::fill(rest.begin(), rest.end(), 0.0);
        std::fill(top_unit.begin(), top_unit.end(), 0.0);
        double sum_w = 0, sum_w2 = 0, sum_w2_unit = 0, entry_units = 0, top_is_unit = 0;
        if (implicit_top) {  // its row: the one missing from the entries' rows 0..N-1
          int64_t missing_row = N * (N - 1) / 2;
          for (int64_t i = 0; i < count; ++i) missing_row -= row_of[entries[i]];
          const scalar_t* row = x + missing_row * d;
          const double inv = inverse_norm(row_sq_norm(row, d));
          add_scaled_row(row, d, inv, top_unit.data());
          top_is_unit = inv > 0;
        }
        for (int64_t i = 0; i < count; ++i) {
          const int64_t e = entries[i];
          const scalar_t* row = x + row_of[e] * d;
          if (i + 1 < count) prefetch_row(x + row_of[entries[i + 1]] * d, d);
          const double inv = inverse_norm(row_sq_norm(row, d));
          if (i == top) {
            add_scaled_row(row, d, inv, top_unit.data());
            top_is_unit = inv > 0;
            continue;
          }
          const double w = weight(e);
          add_scaled_row(row, d, (w - implicit) * inv, rest.data());
          sum_w += w;
          sum_w2 += w * w;
          if (inv > 0) {
            sum_w2_unit += w * w;
            entry_units += 1;
          }
        }
        if (implicit != 0) {  // every row other than n* at ã_0: ã_0 (ΣÊ - ê*)
          for (int64_t i = 0; i < d; ++i) rest[i] += implicit * (sum_unit[i] - top_unit[i]);
        }
        const double num_implicit = static_cast<double>(implicit_top ? 0 : N - count);  // n* not counted
        const double implicit_units = num_unit_rows - entry_units - top_is_unit;  // nonzero-norm rows without an entry
        const double t = top >= 0 || implicit_top ? 1.0 : 0.0;  // ã* = 1 where n* was taken out, else 0
        const double sum_rest = sum_w + implicit * num_implicit;
        const double sumsq_rest = sum_w2 + implicit * implicit * num_implicit;
        const double sumsq_unit_rest = sum_w2_unit + implicit * implicit * implicit_units;
        const double numerator = t * dot(top_unit.data(), rest.data(), d) +
                                 0.5 * (dot(rest.data(), rest.data(), d) - sumsq_unit_rest);
        const double denominator = t * sum_rest + 0.5 * (sum_rest * sum_rest - sumsq_rest);
        // 0 exactly where fewer than two rows sit above the min (then so is the numerator).
        out[f] = denominator > 0 ? numerator / denominator : std::numeric_limits<double>::quiet_NaN();
      }
    });
  });
  return scores;
}

}  // namespace

// The op is defined by monoloss_kernels/refine.py (torch.library.custom_op).
TORCH_LIBRARY_IMPL(monoloss_kernels, CPU, m) { m.impl("deflated_scores", &deflated_scores_cpu); }

}  // namespace monoloss_kernels
