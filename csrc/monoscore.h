// Shared declarations for the MonoScore sufficient-statistics op.
//
// Every backend reduces a batch (acts: N x M, emb: N x d) to the same additive
// statistics; monoloss_kernels/stats.py turns them into scores. With
// b[n,k] = acts[n,k] - shift[k] (a per-latent shift chosen by the backend --
// acts[0] on CUDA, 0 or the minimum on CPU -- which keeps the sums small for
// latents that sit far from zero) and e_hat the unit rows of emb:
//   cross        (d, M) float32  sum_n e_hat[n] * b[n, :]
//   unit_emb_sum (d,)   float64  sum_n e_hat[n]
//   shift        (M,)   float32  the shift
//   act_range    (2, M) float32  per-latent min, max
//   moments      (4, M) float64  sum b, sum b^2, and the same two sums over the
//                                rows whose embedding has zero norm
//   counts       (2,)   float64  N, number of rows with nonzero embedding norm
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>

#include <tuple>

namespace monoloss_kernels {

using MonoScoreStats =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Shape/dtype/device checks shared by the CPU and CUDA implementations. The
// Python wrapper validates first with friendlier messages; these are the
// backstop for direct torch.ops calls.
void check_stats_inputs(const at::Tensor& acts, const at::Tensor& emb);

// The same for the CSR form of sparse activations (the op monoscore_stats_csr):
// shapes, index dtypes, devices. Index ranges and duplicates are checked by the
// kernels as they order the entries by latent.
void check_csr_stats_inputs(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                            const at::Tensor& values, const at::Tensor& emb, int64_t num_latents);

// The same for the backward ops' other inputs (shift, act_range and the incoming
// gradients, for M latents and d dims), on the device of `like`: the kernels read
// them by raw pointer, so a wrong shape or device would read out of bounds.
void check_backward_inputs(const char* op, const at::Tensor& like, int64_t M, int64_t D,
                           const at::Tensor& shift, const at::Tensor& act_range, const at::Tensor& grad_cross,
                           const at::Tensor& grad_moments, const at::Tensor& grad_range);

// finalize_scores(_backward)'s statistics, checked (shapes, one device, floating
// point) and as contiguous float64, the one precision of their kernels:
// {moments (4, M), act_range (2, M), shift (M), counts (2), cross_sq_at_min (M)}.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> finalize_inputs(
    const char* op, const at::Tensor& moments, const at::Tensor& act_range, const at::Tensor& shift,
    const at::Tensor& counts, const at::Tensor& cross_sq_at_min);

// Float32 matrix products (at::mm and friends) in IEEE float32 while alive,
// whatever the caller's torch.set_float32_matmul_precision or fp32_precision say:
// "high" lets cuBLAS use TF32, "medium" lets oneDNN use bf16 on CPUs with AMX,
// and either breaks the accuracy bound (CPU scores 8e-5 off at "medium", 2e-5
// allowed). Every product of the kernels runs under one. cuBLAS: at::NoTF32Guard
// (thread-local). oneDNN has no thread-local switch, so its process-wide setting
// is switched for as long as any guard lives (counted, under a mutex) and then
// restored: another thread's float32 products in that window run IEEE too.
class IeeeFloat32Matmuls {
 public:
  IeeeFloat32Matmuls();
  ~IeeeFloat32Matmuls();
  IeeeFloat32Matmuls(const IeeeFloat32Matmuls&) = delete;
  IeeeFloat32Matmuls& operator=(const IeeeFloat32Matmuls&) = delete;

 private:
  at::NoTF32Guard no_tf32_;
};

// 1 / ||emb[n]|| as float32 (the norm in float64 where float32 squares could under-
// or overflow): 0 for zero rows, NaN for rows with NaN/Inf values or whose 1 / norm
// is not a normal float32, which makes unit_emb_sum non-finite: the Python wrapper
// then refuses emb.
at::Tensor row_inv_norm(const at::Tensor& emb);

// Allocates the six outputs with their documented shapes and dtypes.
MonoScoreStats empty_stats(const at::Tensor& acts, const at::Tensor& emb);

MonoScoreStats monoscore_stats_cpu(const at::Tensor& acts, const at::Tensor& emb);
// Sparse activations in CSR form (entries not stored are 0). The same six
// statistics with shift 0 for latents that have an implicit zero in the batch
// and shift = min for latents stored in every row; cross is returned as the
// transpose of an (M, d) buffer.
MonoScoreStats monoscore_stats_csr_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                       const at::Tensor& values, const at::Tensor& emb,
                                       int64_t num_latents);
// MonoLoss's statistics of sparse activations: monoscore_stats_csr's six,
// cross_sq_at_min (M,) float64 = ‖cross[:, k] - (act_min[k] - shift[k]) ·
// unit_emb_sum‖², what finalize's shifted_sq_norms would compute from them,
// summed as the cross pass finishes each latent, and entry_order, the entries
// sorted by latent ((3, nnz) int32, see KeptOrder in cpu/csr_tiles.h) (CPU).
// Its backward takes the gradient of cross_sq_at_min instead of a materialised
// (d, M) grad_cross, and the entry order instead of sorting again.
using MonoLossStats =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
MonoLossStats monoloss_stats_csr_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                     const at::Tensor& values, const at::Tensor& emb, int64_t num_latents);
at::Tensor monoloss_stats_csr_backward_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                           const at::Tensor& values, const at::Tensor& emb, int64_t num_latents,
                                           const at::Tensor& shift, const at::Tensor& act_range,
                                           const at::Tensor& cross, const at::Tensor& unit_emb_sum,
                                           const at::Tensor& entry_order, const at::Tensor& grad_cross_sq_at_min,
                                           const at::Tensor& grad_moments, const at::Tensor& grad_range);
// The backward of the two ops with respect to acts / the stored values (CPU).
at::Tensor monoscore_stats_backward_cpu(const at::Tensor& acts, const at::Tensor& emb, const at::Tensor& shift,
                                        const at::Tensor& act_range, const at::Tensor& grad_cross,
                                        const at::Tensor& grad_moments, const at::Tensor& grad_range);
at::Tensor monoscore_stats_csr_backward_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                            const at::Tensor& values, const at::Tensor& emb,
                                            int64_t num_latents, const at::Tensor& shift,
                                            const at::Tensor& act_range, const at::Tensor& grad_cross,
                                            const at::Tensor& grad_moments, const at::Tensor& grad_range);
#ifdef MONOLOSS_WITH_CUDA
MonoScoreStats monoscore_stats_cuda(const at::Tensor& acts, const at::Tensor& emb);
MonoScoreStats monoscore_stats_csr_cuda(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                        const at::Tensor& values, const at::Tensor& emb,
                                        int64_t num_latents);
// The backward of the two ops with respect to acts / the stored values (CUDA).
at::Tensor monoscore_stats_backward_cuda(const at::Tensor& acts, const at::Tensor& emb, const at::Tensor& shift,
                                         const at::Tensor& act_range, const at::Tensor& grad_cross,
                                         const at::Tensor& grad_moments, const at::Tensor& grad_range);
at::Tensor monoscore_stats_csr_backward_cuda(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                             const at::Tensor& values, const at::Tensor& emb,
                                             int64_t num_latents, const at::Tensor& shift,
                                             const at::Tensor& act_range, const at::Tensor& grad_cross,
                                             const at::Tensor& grad_moments, const at::Tensor& grad_range);
#endif

}  // namespace monoloss_kernels
