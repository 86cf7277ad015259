// CPU kernels of finalize's op pair monoloss_kernels::shifted_sq_norms and
// shifted_sq_norms_backward. The ops are defined in Python
// (monoloss_kernels/stats.py), with a plain-torch implementation for every
// device, so that finalize works without this extension; this file registers
// the CPU kernels that replace it when the extension is loaded.
//
// With c_k = cross[:, k] - delta[k] · unit_emb_sum and w_k = 2 · grad[k]:
//   forward   sq_norms[k] = ‖c_k / scale[k]‖² · scale[k]²  (float64)
//   backward  grad_cross[:, k] = w_k c_k,
//             grad_delta[k] = -unit_emb_sumᵀ (w_k c_k),
//             grad_unit_emb_sum = -Σ_k delta[k] w_k c_k.
// One pass over cross each, in its storage order: latent-major (the sparse
// kernels' (M, d) buffer, transposed) or dim-major (the dense kernels' (d, M)).
// In torch the same takes 4 passes per L2-sized chunk forward and 5 backward
// (~3x the time at d=768, M=8192).
#include "buffer_pool.h"
#include "vectorize.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace monoloss_kernels {
namespace {

// Latents per parallel task: latent-major rows are d long already; dim-major
// rows are read kDimMajorLatents at a time (4 KiB of float32 per row and task,
// where 64 latents made the backward a strided walk 1.4x slower than torch's).
constexpr int64_t kLatentGrain = 64;
constexpr int64_t kDimMajorLatents = 1024;
// Independent partial sums per reduction, so that the compiler can vectorise
// it without reassociating (and the adds do not wait on one another).
constexpr int64_t kLanes = 16;

bool is_latent_major(const at::Tensor& cross) { return !cross.is_contiguous() && cross.t().is_contiguous(); }

void check_inputs(const char* op, const at::Tensor& cross, const at::Tensor& unit_emb_sum, const at::Tensor& delta) {
  TORCH_CHECK_VALUE(cross.dim() == 2, op, ": cross must be (d, M), got ", cross.sizes());
  const int64_t d = cross.size(0), M = cross.size(1);
  TORCH_CHECK_VALUE(unit_emb_sum.dim() == 1 && unit_emb_sum.size(0) == d, op, ": unit_emb_sum must be (", d,
                    ",), got ", unit_emb_sum.sizes());
  TORCH_CHECK_VALUE(delta.dim() == 1 && delta.size(0) == M, op, ": delta must be (", M, ",), got ", delta.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(cross.scalar_type()), op, ": cross must be floating point, got ",
                   cross.scalar_type());
}

// ‖(x - shift·u) / scale‖² of one latent-major row x (d values), squares summed in float64.
template <typename scalar_t, typename acc_t>
MONOLOSS_VECTOR_INLINE double row_sq_norm(const scalar_t* x, const scalar_t* u, int64_t d, acc_t shift, acc_t inv_scale) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t c = (static_cast<acc_t>(x[i + l]) - shift * static_cast<acc_t>(u[i + l])) * inv_scale;
      lanes[l] += static_cast<double>(c) * static_cast<double>(c);
    }
  }
  for (; i < d; ++i) {
    const acc_t c = (static_cast<acc_t>(x[i]) - shift * static_cast<acc_t>(u[i])) * inv_scale;
    lanes[0] += static_cast<double>(c) * static_cast<double>(c);
  }
  double total = 0;
  for (const double lane : lanes) total += lane;
  return total;
}

// One latent-major row: out = weight·(x - shift·u); partial_u -= shift·out;
// returns uᵀ out.
template <typename scalar_t, typename acc_t>
MONOLOSS_VECTOR_INLINE acc_t row_backward(const scalar_t* x, const scalar_t* u, int64_t d, acc_t shift, acc_t weight, scalar_t* out,
                   acc_t* partial_u) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const acc_t ui = u[i + l];
      const acc_t g = weight * (static_cast<acc_t>(x[i + l]) - shift * ui);
      out[i + l] = static_cast<scalar_t>(g);
      lanes[l] += ui * g;
      partial_u[i + l] -= shift * g;
    }
  }
  for (; i < d; ++i) {
    const acc_t ui = u[i];
    const acc_t g = weight * (static_cast<acc_t>(x[i]) - shift * ui);
    out[i] = static_cast<scalar_t>(g);
    lanes[0] += ui * g;
    partial_u[i] -= shift * g;
  }
  acc_t total = 0;
  for (const acc_t lane : lanes) total += lane;
  return total;
}

// The two row loops for float32 (the cross of every kernel): overloads the
// calls below pick for float, in AVX-512/AVX2 clones (the baseline build's SSE2
// made the forward compute-bound, ~2x slower).
MONOLOSS_VECTOR_CLONES
double row_sq_norm(const float* x, const float* u, int64_t d, float shift, float inv_scale) {
  return row_sq_norm<float, float>(x, u, d, shift, inv_scale);
}

MONOLOSS_VECTOR_CLONES
float row_backward(const float* x, const float* u, int64_t d, float shift, float weight, float* out,
                   float* partial_u) {
  return row_backward<float, float>(x, u, d, shift, weight, out, partial_u);
}

at::Tensor shifted_sq_norms_cpu(const at::Tensor& cross, const at::Tensor& unit_emb_sum, const at::Tensor& delta,
                                const at::Tensor& scale) {
  check_inputs("shifted_sq_norms", cross, unit_emb_sum, delta);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == cross.size(1), "shifted_sq_norms: scale must be (",
                    cross.size(1), ",), got ", scale.sizes());
  const int64_t d = cross.size(0), M = cross.size(1);
  at::Tensor sq_norms = at::zeros({M}, cross.options().dtype(at::kDouble));
  const bool latent_major = is_latent_major(cross);
  const at::Tensor x = latent_major ? cross.t() : cross.contiguous();  // contiguous, in storage order
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cross.scalar_type(), "shifted_sq_norms", [&] {
    // float32 arithmetic for the half types, as their torch ops do.
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor u_t = unit_emb_sum.to(cross.scalar_type()).contiguous();
    const at::Tensor delta_t = delta.to(cross.scalar_type()).contiguous();
    const at::Tensor scale_t = scale.to(cross.scalar_type()).contiguous();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* u = u_t.const_data_ptr<scalar_t>();
    const scalar_t* dl = delta_t.const_data_ptr<scalar_t>();
    const scalar_t* sc = scale_t.const_data_ptr<scalar_t>();
    double* out = sq_norms.data_ptr<double>();
    at::parallel_for(0, M, kLatentGrain, [&](int64_t k0, int64_t k1) {
      if (latent_major) {
        for (int64_t k = k0; k < k1; ++k) {
          const acc_t shift = dl[k], inv_scale = acc_t{1} / static_cast<acc_t>(sc[k]);
          out[k] = row_sq_norm(xp + k * d, u, d, shift, inv_scale);
        }
      } else {  // rows of x are dims: each latent's sum runs down a column, vectorised across latents
        for (const auto i : c10::irange(d)) {
          const acc_t ui = u[i];
          for (int64_t k = k0; k < k1; ++k) {
            const acc_t c = (static_cast<acc_t>(xp[i * M + k]) - static_cast<acc_t>(dl[k]) * ui) /
                            static_cast<acc_t>(sc[k]);
            out[k] += static_cast<double>(c) * static_cast<double>(c);
          }
        }
      }
      for (int64_t k = k0; k < k1; ++k) out[k] *= static_cast<double>(sc[k]) * static_cast<double>(sc[k]);
    });
  });
  return sq_norms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shifted_sq_norms_backward_cpu(const at::Tensor& grad_sq_norms,
                                                                             const at::Tensor& cross,
                                                                             const at::Tensor& unit_emb_sum,
                                                                             const at::Tensor& delta) {
  check_inputs("shifted_sq_norms_backward", cross, unit_emb_sum, delta);
  const int64_t d = cross.size(0), M = cross.size(1);
  TORCH_CHECK_VALUE(grad_sq_norms.dim() == 1 && grad_sq_norms.size(0) == M,
                    "shifted_sq_norms_backward: grad_sq_norms must be (", M, ",), got ", grad_sq_norms.sizes());
  const bool latent_major = is_latent_major(cross);
  const at::Tensor x = latent_major ? cross.t() : cross.contiguous();
  at::Tensor grad_x = pooled_empty(x.sizes(), x.options());  // in x's (storage) order
  at::Tensor grad_delta = at::empty({M}, cross.options());
  at::Tensor grad_unit_emb_sum = at::empty({d}, cross.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cross.scalar_type(), "shifted_sq_norms_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor u_t = unit_emb_sum.to(cross.scalar_type()).contiguous();
    const at::Tensor delta_t = delta.to(cross.scalar_type()).contiguous();
    const at::Tensor weight_t = (2 * grad_sq_norms).to(cross.scalar_type()).contiguous();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* u = u_t.const_data_ptr<scalar_t>();
    const scalar_t* dl = delta_t.const_data_ptr<scalar_t>();
    const scalar_t* w = weight_t.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    scalar_t* gdelta = grad_delta.data_ptr<scalar_t>();
    // Each task's share of grad_unit_emb_sum, added up in task order (so the
    // result does not depend on the number of threads).
    const int64_t grain = latent_major ? kLatentGrain : kDimMajorLatents;
    const int64_t tasks = std::max<int64_t>(1, (M + grain - 1) / grain);
    std::vector<acc_t> partial_u(tasks * d, acc_t{0});
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t k0 = task * grain, k1 = std::min(M, k0 + grain);
        acc_t* pu = partial_u.data() + task * d;
        if (latent_major) {
          for (int64_t k = k0; k < k1; ++k) {
            const acc_t shift = dl[k], weight = w[k];
            gdelta[k] = static_cast<scalar_t>(-row_backward(xp + k * d, u, d, shift, weight, gx + k * d, pu));
          }
        } else {  // as in the forward, vectorised across latents
          std::vector<acc_t> dots(k1 - k0, acc_t{0});
          for (const auto i : c10::irange(d)) {
            const acc_t ui = u[i];
            acc_t lanes[kLanes] = {};
            for (int64_t kb = k0; kb < k1; kb += kLanes) {
              for (int64_t l = 0; l < std::min(kLanes, k1 - kb); ++l) {
                const int64_t k = kb + l;
                const acc_t shift = dl[k];
                const acc_t g = static_cast<acc_t>(w[k]) * (static_cast<acc_t>(xp[i * M + k]) - shift * ui);
                gx[i * M + k] = static_cast<scalar_t>(g);
                dots[k - k0] += ui * g;
                lanes[l] -= shift * g;
              }
            }
            for (const acc_t lane : lanes) pu[i] += lane;
          }
          for (int64_t k = k0; k < k1; ++k) gdelta[k] = static_cast<scalar_t>(-dots[k - k0]);
        }
      }
    });
    scalar_t* gu = grad_unit_emb_sum.data_ptr<scalar_t>();
    for (const auto i : c10::irange(d)) {
      acc_t total = 0;
      for (int64_t task = 0; task < tasks; ++task) total += partial_u[task * d + i];
      gu[i] = static_cast<scalar_t>(total);
    }
  });
  return {latent_major ? grad_x.t() : grad_x, grad_unit_emb_sum, grad_delta};
}

}  // namespace

// The ops are defined by monoloss_kernels/stats.py (torch.library.custom_op).
TORCH_LIBRARY_IMPL(monoloss_kernels, CPU, m) {
  m.impl("shifted_sq_norms", &shifted_sq_norms_cpu);
  m.impl("shifted_sq_norms_backward", &shifted_sq_norms_backward_cpu);
}

}  // namespace monoloss_kernels
