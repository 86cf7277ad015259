// Op schemas and the device-independent helpers. Each device binds its
// implementation with TORCH_LIBRARY_IMPL next to its kernel, so the dispatcher
// picks the kernel by the inputs' device.
#include "monoscore.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <mutex>
#include <string>

#ifdef MONOLOSS_PYTHON_MODULE
#include <Python.h>
// An importable (empty) module: importing monoloss_kernels._C runs the static
// registrations below. Ops are reached through torch.ops.monoloss_kernels.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace monoloss_kernels {

namespace {

// Error messages are assembled from strings only (std::to_string, no numbers
// streamed into c10::str): on one GPU image (torch 2.11, g++ 13) streaming an
// integer from this library crashed inside libstdc++'s locale code.
std::string shape_str(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + ")";
}

}  // namespace

void check_stats_inputs(const at::Tensor& acts, const at::Tensor& emb) {
  TORCH_CHECK(acts.dim() == 2, "monoscore_stats: acts must be 2-D (N, M), got shape " + shape_str(acts));
  TORCH_CHECK(emb.dim() == 2, "monoscore_stats: emb must be 2-D (N, d), got shape " + shape_str(emb));
  TORCH_CHECK(acts.size(0) == emb.size(0), "monoscore_stats: acts has N=" + std::to_string(acts.size(0)) +
                                               " rows but emb has " + std::to_string(emb.size(0)));
  TORCH_CHECK(acts.size(0) >= 1, "monoscore_stats: needs at least one row");
  TORCH_CHECK(at::isFloatingType(acts.scalar_type()),
              std::string("monoscore_stats: acts must be floating point, got ") +
                  c10::toString(acts.scalar_type()));
  TORCH_CHECK(at::isFloatingType(emb.scalar_type()),
              std::string("monoscore_stats: emb must be floating point, got ") +
                  c10::toString(emb.scalar_type()));
  TORCH_CHECK(acts.device() == emb.device(), "monoscore_stats: acts is on " + acts.device().str() +
                                                 " but emb is on " + emb.device().str());
}

void check_csr_stats_inputs(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                            const at::Tensor& values, const at::Tensor& emb, int64_t num_latents) {
  TORCH_CHECK(crow_indices.dim() == 1 && crow_indices.size(0) >= 1,
              "monoscore_stats_csr: crow_indices must be 1-D (N + 1), got shape " + shape_str(crow_indices));
  TORCH_CHECK(col_indices.dim() == 1 && values.dim() == 1 && col_indices.size(0) == values.size(0),
              "monoscore_stats_csr: col_indices and values must be 1-D of the same length (nnz), got " +
                  shape_str(col_indices) + " and " + shape_str(values));
  TORCH_CHECK(crow_indices.scalar_type() == at::kLong && col_indices.scalar_type() == at::kLong,
              "monoscore_stats_csr: crow_indices and col_indices must be int64");
  TORCH_CHECK(emb.dim() == 2, "monoscore_stats_csr: emb must be 2-D (N, d), got shape " + shape_str(emb));
  TORCH_CHECK(crow_indices.size(0) - 1 == emb.size(0),
              "monoscore_stats_csr: crow_indices describes N=" + std::to_string(crow_indices.size(0) - 1) +
                  " rows but emb has " + std::to_string(emb.size(0)));
  TORCH_CHECK(num_latents >= 0, "monoscore_stats_csr: num_latents must be >= 0");
  TORCH_CHECK(at::isFloatingType(values.scalar_type()) && at::isFloatingType(emb.scalar_type()),
              "monoscore_stats_csr: values and emb must be floating point");
  for (const at::Tensor* t : {&crow_indices, &col_indices, &values}) {
    TORCH_CHECK(t->device() == emb.device(), "monoscore_stats_csr: inputs on " + t->device().str() +
                                                 " and " + emb.device().str());
  }
}

void check_backward_inputs(const char* op, const at::Tensor& like, int64_t M, int64_t D,
                           const at::Tensor& shift, const at::Tensor& act_range, const at::Tensor& grad_cross,
                           const at::Tensor& grad_moments, const at::Tensor& grad_range) {
  const std::string name(op);
  const std::string m = std::to_string(M), d = std::to_string(D);
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == M, name + ": shift must have shape (" + m + ",)");
  TORCH_CHECK(act_range.dim() == 2 && act_range.size(0) == 2 && act_range.size(1) == M,
              name + ": act_range must have shape (2, " + m + ")");
  TORCH_CHECK(grad_cross.dim() == 2 && grad_cross.size(0) == D && grad_cross.size(1) == M,
              name + ": grad_cross must have shape (" + d + ", " + m + ")");
  TORCH_CHECK(grad_moments.dim() == 2 && grad_moments.size(0) == 4 && grad_moments.size(1) == M,
              name + ": grad_moments must have shape (4, " + m + ")");
  TORCH_CHECK(grad_range.dim() == 2 && grad_range.size(0) == 2 && grad_range.size(1) == M,
              name + ": grad_range must have shape (2, " + m + ")");
  for (const at::Tensor* t : {&shift, &act_range, &grad_cross, &grad_moments, &grad_range}) {
    TORCH_CHECK(t->device() == like.device(),
                name + ": every input must be on " + like.device().str() + ", got one on " + t->device().str());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), name + ": the statistics and their gradients must be "
                "floating point, got " + std::string(c10::toString(t->scalar_type())));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finalize_inputs(
    const char* op, const at::Tensor& moments, const at::Tensor& act_range, const at::Tensor& shift,
    const at::Tensor& counts, const at::Tensor& cross_sq_at_min) {
  const std::string name(op);
  TORCH_CHECK(moments.dim() == 2 && moments.size(0) == 4, name + ": moments must have shape (4, M)");
  const int64_t M = moments.size(1);
  const std::string m = std::to_string(M);
  TORCH_CHECK(act_range.dim() == 2 && act_range.size(0) == 2 && act_range.size(1) == M,
              name + ": act_range must have shape (2, " + m + ")");
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == M, name + ": shift must have shape (" + m + ",)");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == 2, name + ": counts must have shape (2,)");
  TORCH_CHECK(cross_sq_at_min.dim() == 1 && cross_sq_at_min.size(0) == M,
              name + ": cross_sq_at_min must have shape (" + m + ",)");
  for (const at::Tensor* t : {&act_range, &shift, &counts, &cross_sq_at_min}) {
    TORCH_CHECK(t->device() == moments.device(),
                name + ": every input must be on " + moments.device().str() + ", got one on " + t->device().str());
  }
  for (const at::Tensor* t : {&moments, &act_range, &shift, &counts, &cross_sq_at_min}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), name + ": the statistics must be floating point, got " +
                std::string(c10::toString(t->scalar_type())));
  }
  const auto f64 = [](const at::Tensor& t) { return t.to(at::kDouble).contiguous(); };
  return {f64(moments), f64(act_range), f64(shift), f64(counts), f64(cross_sq_at_min)};
}

namespace {
std::mutex ieee_matmuls_mutex;
int ieee_matmuls_depth = 0;  // live IeeeFloat32Matmuls, all threads
at::Float32Precision saved_onednn_precision = at::Float32Precision::IEEE;

bool is_reduced(at::Float32Precision p) { return p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16; }
}  // namespace

IeeeFloat32Matmuls::IeeeFloat32Matmuls() {
  const std::lock_guard<std::mutex> lock(ieee_matmuls_mutex);
  if (ieee_matmuls_depth++ > 0) return;
  at::Context& context = at::globalContext();
  saved_onednn_precision = context.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  if (is_reduced(saved_onednn_precision)) {
    context.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, at::Float32Precision::IEEE);
  }
}

IeeeFloat32Matmuls::~IeeeFloat32Matmuls() {
  const std::lock_guard<std::mutex> lock(ieee_matmuls_mutex);
  if (--ieee_matmuls_depth > 0 || !is_reduced(saved_onednn_precision)) return;
  at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, saved_onednn_precision);
}

at::Tensor row_inv_norm(const at::Tensor& emb) {
  const at::ScalarType norm_dtype = at::promoteTypes(emb.scalar_type(), at::kFloat);
  at::Tensor norm = at::linalg_vector_norm(emb, 2, {1}, false, norm_dtype).to(at::kDouble);
  if (norm_dtype != at::kDouble) {
    // Rows whose float32 norm is outside [2^-50, 2^50] (zero rows too) may have had
    // their squares under- or overflow float32: a row at 1e-30 or 1e20 is an ordinary
    // row. Their norms again in float64: on a GPU for every row (cheap there, and no
    // host sync), on the CPU for those rows only (a 12x slower pass otherwise).
    const at::Tensor suspect = (norm < 0x1p-50) | (norm > 0x1p50) | norm.isnan();
    if (emb.is_cuda()) {
      norm = at::where(suspect, at::linalg_vector_norm(emb, 2, {1}, false, at::kDouble), norm);
    } else if (suspect.any().item<bool>()) {
      const at::Tensor rows = suspect.nonzero().squeeze(1);
      norm.index_put_({rows}, at::linalg_vector_norm(emb.index_select(0, rows), 2, {1}, false, at::kDouble));
    }
  }
  const at::Tensor inv_norm = at::where(norm > 0, norm.reciprocal(), at::zeros_like(norm)).to(at::kFloat);
  // NaN (not 0) for rows with NaN/Inf values or whose 1/norm is not a normal float32
  // (no float32 unit row), so that unit_emb_sum turns non-finite and the caller can
  // refuse the input.
  const at::Tensor usable = (norm == 0) | (norm.isfinite() & (inv_norm >= std::numeric_limits<float>::min()) &
                                           (inv_norm <= std::numeric_limits<float>::max()));
  return inv_norm.masked_fill_(usable.logical_not(), std::numeric_limits<float>::quiet_NaN());
}

MonoScoreStats empty_stats(const at::Tensor& acts, const at::Tensor& emb) {
  const int64_t M = acts.size(1), d = emb.size(1);
  const auto f32 = acts.options().dtype(at::kFloat);
  const auto f64 = acts.options().dtype(at::kDouble);
  return {at::zeros({d, M}, f32), at::zeros({d}, f64), at::empty({M}, f32),
          at::empty({2, M}, f32), at::zeros({4, M}, f64), at::empty({2}, f64)};
}

TORCH_LIBRARY(monoloss_kernels, m) {
#ifdef MONOLOSS_PYTHON_MODULE
  // The fake (meta) implementation lives in Python; this tells torch where. Not
  // in the CMake library: that module would load _C, a second registration.
  m.set_python_module("monoloss_kernels._extension");
#endif
  m.def(
      "monoscore_stats(Tensor acts, Tensor emb) -> (Tensor cross, Tensor unit_emb_sum, "
      "Tensor shift, Tensor act_range, Tensor moments, Tensor counts)");
  m.def(
      "monoscore_stats_csr(Tensor crow_indices, Tensor col_indices, Tensor values, Tensor emb, "
      "int num_latents) -> (Tensor cross, Tensor unit_emb_sum, Tensor shift, Tensor act_range, "
      "Tensor moments, Tensor counts)");
  // Gradients of the statistics with respect to acts (or the stored values),
  // given the gradients of cross, moments and act_range (see _autograd.py).
  m.def(
      "monoscore_stats_backward(Tensor acts, Tensor emb, Tensor shift, Tensor act_range, "
      "Tensor grad_cross, Tensor grad_moments, Tensor grad_range) -> Tensor");
  m.def(
      "monoscore_stats_csr_backward(Tensor crow_indices, Tensor col_indices, Tensor values, "
      "Tensor emb, int num_latents, Tensor shift, Tensor act_range, Tensor grad_cross, "
      "Tensor grad_moments, Tensor grad_range) -> Tensor");
  // MonoLoss's statistics of sparse activations (CPU): monoscore_stats_csr's,
  // ‖Σ_n ê_n (a_n - min)‖² per latent, fused into the pass that sums cross, and
  // the entries sorted by latent; the backward takes the norms' gradient in
  // place of grad_cross, and the sorted entries (see monoscore.h).
  m.def(
      "monoloss_stats_csr(Tensor crow_indices, Tensor col_indices, Tensor values, Tensor emb, "
      "int num_latents) -> (Tensor cross, Tensor unit_emb_sum, Tensor shift, Tensor act_range, "
      "Tensor moments, Tensor counts, Tensor cross_sq_at_min, Tensor entry_order)");
  m.def(
      "monoloss_stats_csr_backward(Tensor crow_indices, Tensor col_indices, Tensor values, "
      "Tensor emb, int num_latents, Tensor shift, Tensor act_range, Tensor cross, Tensor unit_emb_sum, "
      "Tensor entry_order, Tensor grad_cross_sq_at_min, Tensor grad_moments, Tensor grad_range) -> Tensor");
}

}  // namespace monoloss_kernels
