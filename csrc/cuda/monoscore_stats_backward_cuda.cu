// CUDA backward of the statistics ops with respect to acts (or the stored
// values of CSR activations). The formula is derived in
// monoloss_kernels/_autograd.py; csrc/cpu/monoscore_stats_backward_cpu.cpp is
// the reference: the same float32/float64 choices, entry for entry.
//
//   dense: grad = Ê · G, one float32 GEMM by cuBLAS (at::mm_out), then
//          dense_terms_kernel adds the per-entry terms in place, reading acts
//          once more. The tie counts come first from count_ties_kernel (one
//          read of acts), and latent_terms_kernel turns them and the incoming
//          gradients into six float32 coefficients per latent, in float64 as
//          the CPU does.
//   CSR:   csr_entries_kernel gives each stored entry ê[row] · G[:, col] plus
//          the same per-entry terms: one warp per entry, its lanes over d, so
//          each entry reads one row of Ê and one row of Gᵀ (M, d) as 128-byte
//          lines; a warp shuffle sums the lanes. The ties (stored values equal
//          to the extreme, plus the implicit zeros when the extreme is 0) come
//          from csr_count_ties_kernel, one thread per entry.
//
// Only the gradient with respect to acts (or the stored values) is computed
// here; the optional gradient with respect to emb stays in torch.
#include "../monoscore.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10/cuda only: ATen/cuda/CUDAContext.h would pull in the cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit (or a pip-installed one) may not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

namespace monoloss_kernels {
namespace {

// Threads per block of the per-latent and elementwise kernels (one thread per
// latent of a row range): 256 keeps every warp's loads of a row coalesced and
// lets 8 blocks share an SM.
constexpr int kLatentThreads = 256;
// Rows per block of the tie count: a thread counts this many rows of its latent
// before its one atomicAdd; N / 256 blocks along y fill the GPU for M >= 4096.
constexpr int64_t kTieRowsPerBlock = 256;
// Row blocks of the elementwise pass, at most: each thread loads its latent's
// coefficients once and strides over N / 64 rows of it; ceil(M / 256) x 64
// blocks fill 132 SMs for M >= 512.
constexpr int64_t kTermsRowBlocks = 64;
// Threads per block of the CSR kernels: 8 warps, one stored entry per warp at a
// time in csr_entries_kernel.
constexpr int kEntryThreads = 256;
constexpr int kWarp = 32;
// Blocks of the CSR kernels, at most (each strides over the rest): 8 per SM
// on 132 SMs, enough to keep every SM busy while bounding the grid for huge nnz.
constexpr int64_t kMaxEntryBlocks = 8 * 132;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Counts, per latent k, the entries of acts equal (as float32, the precision of
// act_range) to its min and its max. ties: (2, M) int64, zero-initialised.
template <typename scalar_t>
__global__ void count_ties_kernel(const scalar_t* __restrict__ acts, int64_t N, int64_t M, int64_t stride_n,
                                  int64_t stride_m, const float* __restrict__ range,  // (2, M)
                                  int64_t* __restrict__ ties) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= M) return;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * kTieRowsPerBlock;
  const int64_t n_end = N < n_begin + kTieRowsPerBlock ? N : n_begin + kTieRowsPerBlock;
  const float lo = range[k], hi = range[M + k];
  unsigned long long min_ties = 0, max_ties = 0;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const float a = static_cast<float>(acts[n * stride_n + k * stride_m]);
    min_ties += a == lo;
    max_ties += a == hi;
  }
  if (min_ties) atomicAdd(reinterpret_cast<unsigned long long*>(ties + k), min_ties);
  if (max_ties) atomicAdd(reinterpret_cast<unsigned long long*>(ties + M + k), max_ties);
}

// The same for CSR entries, one thread per entry, and stored[k] = entries of latent k.
__global__ void csr_count_ties_kernel(const int64_t* __restrict__ cols, const float* __restrict__ values,
                                      int64_t nnz, int64_t M, const float* __restrict__ range,  // (2, M)
                                      int64_t* __restrict__ ties,                               // (2, M)
                                      int64_t* __restrict__ stored) {                           // (M,)
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < nnz; e += stride) {
    const int64_t k = cols[e];
    const float v = values[e];
    atomicAdd(reinterpret_cast<unsigned long long*>(stored + k), 1ull);
    if (v == range[k]) atomicAdd(reinterpret_cast<unsigned long long*>(ties + k), 1ull);
    if (v == range[M + k]) atomicAdd(reinterpret_cast<unsigned long long*>(ties + M + k), 1ull);
  }
}

// Per-latent coefficients of the elementwise terms, float32, computed in float64
// from the incoming gradients as latent_terms() on the CPU:
//   terms (6, M): g0, 2 g1, g2, 2 g3, dL/dmin / #ties at the min, dL/dmax / #ties at the max.
// With stored != nullptr (CSR), the N - stored[k] implicit zeros join the ties of
// an extreme equal to 0.
__global__ void latent_terms_kernel(const double* __restrict__ grad_moments,  // (4, M)
                                    const double* __restrict__ grad_range,    // (2, M)
                                    const float* __restrict__ range,          // (2, M)
                                    const int64_t* __restrict__ ties,         // (2, M)
                                    const int64_t* __restrict__ stored,       // (M,) or nullptr
                                    int64_t N, int64_t M, float* __restrict__ terms) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= M) return;
  double min_ties = static_cast<double>(ties[k]), max_ties = static_cast<double>(ties[M + k]);
  if (stored != nullptr) {
    const double implicit_zeros = static_cast<double>(N) - static_cast<double>(stored[k]);
    if (range[k] == 0.0f) min_ties += implicit_zeros;
    if (range[M + k] == 0.0f) max_ties += implicit_zeros;
  }
  terms[k] = static_cast<float>(grad_moments[k]);
  terms[M + k] = static_cast<float>(2 * grad_moments[M + k]);
  terms[2 * M + k] = static_cast<float>(grad_moments[2 * M + k]);
  terms[3 * M + k] = static_cast<float>(2 * grad_moments[3 * M + k]);
  terms[4 * M + k] = min_ties > 0 ? static_cast<float>(grad_range[k] / min_ties) : 0.0f;
  terms[5 * M + k] = max_ties > 0 ? static_cast<float>(grad_range[M + k] / max_ties) : 0.0f;
}

// The per-entry terms of one activation a of latent k (b = a - shift), float32.
struct LatentCoefficients {
  float sum, sumsq, zero_sum, zero_sumsq, min_share, max_share, lo, hi, shift;

  __device__ LatentCoefficients(const float* __restrict__ terms, const float* __restrict__ range,
                                const float* __restrict__ shift_, int64_t M, int64_t k)
      : sum(terms[k]), sumsq(terms[M + k]), zero_sum(terms[2 * M + k]), zero_sumsq(terms[3 * M + k]),
        min_share(terms[4 * M + k]), max_share(terms[5 * M + k]), lo(range[k]), hi(range[M + k]),
        shift(shift_[k]) {}

  __device__ float entry(float a, bool zero_row) const {
    const float b = a - shift;
    float g = sum + b * sumsq;
    g += a == lo ? min_share : 0.0f;
    g += a == hi ? max_share : 0.0f;
    if (zero_row) g += zero_sum + b * zero_sumsq;
    return g;
  }
};

// out[n, k] = grad[n, k] + the per-entry terms. grad: (N, M) float32 row-major,
// holding Ê G; out: (N, M) row-major in acts' dtype, which for float32 acts is
// grad itself (each element is read, then written, by the same thread).
template <typename scalar_t>
__global__ void dense_terms_kernel(const scalar_t* __restrict__ acts, int64_t N, int64_t M, int64_t stride_n,
                                   int64_t stride_m, const float* __restrict__ terms,  // (6, M)
                                   const float* __restrict__ range,                    // (2, M)
                                   const float* __restrict__ shift,                    // (M,)
                                   const float* __restrict__ inv_norm,                 // (N,)
                                   const float* grad, scalar_t* out) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= M) return;
  const LatentCoefficients c(terms, range, shift, M, k);
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const float a = static_cast<float>(acts[n * stride_n + k * stride_m]);
    // inv_norm is NaN for a non-finite row: not a zero row, as on the CPU.
    const float g = grad[n * M + k] + c.entry(a, inv_norm[n] == 0.0f);
    out[n * M + k] = static_cast<scalar_t>(g);
  }
}

// out[e] = ê[row_e] · Gᵀ[col_e] + the per-entry terms of stored entry e. One warp
// per entry (warp-uniform loop, so every lane reaches the shuffles): lane j sums
// dims j, j + 32, ... in float32, then the warp adds its lanes by shuffles.
template <typename scalar_t>
__global__ void __launch_bounds__(kEntryThreads)
    csr_entries_kernel(const int64_t* __restrict__ rows, const int64_t* __restrict__ cols,  // (nnz,)
                       const float* __restrict__ values, int64_t nnz,                     // (nnz,)
                       const float* __restrict__ unit, const float* __restrict__ grad_t,  // (N, d), (M, d)
                       int64_t D, int64_t M, const float* __restrict__ terms,            // (6, M)
                       const float* __restrict__ range, const float* __restrict__ shift,
                       const float* __restrict__ inv_norm, scalar_t* __restrict__ out) {  // (nnz,)
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = kEntryThreads / kWarp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp; e < nnz;
       e += stride) {
    const int64_t n = rows[e], k = cols[e];
    const float* u = unit + n * D;
    const float* g = grad_t + k * D;
    float dot = 0.0f;
    for (int64_t j = lane; j < D; j += kWarp) dot = fmaf(u[j], g[j], dot);
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
    if (lane == 0) {
      const LatentCoefficients c(terms, range, shift, M, k);
      out[e] = static_cast<scalar_t>(dot + c.entry(values[e], inv_norm[n] == 0.0f));
    }
  }
}

// As in the forward: the kernels are built for sm_80+ (setup.py's arch list).
void check_compute_capability(const char* op, const at::Device& device) {
  int cc_major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device.index()));
  TORCH_CHECK(cc_major >= 8, std::string(op) + ": the CUDA kernels are built for compute capability 8.0+, this GPU "
              "is sm_" + std::to_string(cc_major) + "x");
}

// The six float32 coefficients per latent (see latent_terms_kernel).
at::Tensor latent_terms(const at::Tensor& grad_moments, const at::Tensor& grad_range, const at::Tensor& range32,
                        const at::Tensor& ties, const at::Tensor* stored, int64_t N, int64_t M,
                        cudaStream_t stream) {
  const at::Tensor gm = grad_moments.to(at::kDouble).contiguous();
  const at::Tensor gr = grad_range.to(at::kDouble).contiguous();
  at::Tensor terms = at::empty({6, M}, range32.options());
  latent_terms_kernel<<<ceil_div(M, kLatentThreads), kLatentThreads, 0, stream>>>(
      gm.const_data_ptr<double>(), gr.const_data_ptr<double>(), range32.const_data_ptr<float>(),
      ties.const_data_ptr<int64_t>(), stored ? stored->const_data_ptr<int64_t>() : nullptr, N, M,
      terms.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return terms;
}

}  // namespace

at::Tensor monoscore_stats_backward_cuda(const at::Tensor& acts, const at::Tensor& emb, const at::Tensor& shift,
                                         const at::Tensor& act_range, const at::Tensor& grad_cross,
                                         const at::Tensor& grad_moments, const at::Tensor& grad_range) {
  check_stats_inputs(acts, emb);
  const int64_t N = acts.size(0), M = acts.size(1), D = emb.size(1);
  check_backward_inputs("monoscore_stats_backward", acts, M, D, shift, act_range, grad_cross, grad_moments,
                        grad_range);
  const c10::cuda::CUDAGuard device_guard(acts.device());
  check_compute_capability("monoscore_stats_backward", acts.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor inv_norm = row_inv_norm(emb);  // (N,) float32
  const at::Tensor range32 = act_range.to(at::kFloat).contiguous();
  const at::Tensor shift32 = shift.to(at::kFloat).contiguous();

  // Ê G in float32 (N, M), never TF32 (~1e-3 relative), whatever the caller's
  // matmul precision (IeeeFloat32Matmuls: cuBLAS handles fetched in its scope; torch's
  // cublasLt path does not consult it as of 2.14, and is only taken where the user
  // prefers cublasLt, TORCH_BLAS_PREFER_CUBLASLT=1).
  at::Tensor grad = at::empty({N, M}, acts.options().dtype(at::kFloat));
  {
    const IeeeFloat32Matmuls ieee_matmuls;
    at::mm_out(grad, emb.to(at::kFloat) * inv_norm.unsqueeze(1), grad_cross.to(at::kFloat));  // (N, d) @ (d, M)
  }
  if (M == 0) return grad.to(acts.scalar_type());

  at::Tensor ties = at::zeros({2, M}, acts.options().dtype(at::kLong));
  at::Tensor out = acts.scalar_type() == at::kFloat ? grad : at::empty({N, M}, acts.options());
  const int64_t latent_blocks = ceil_div(M, kLatentThreads);
  const int64_t tie_row_blocks = ceil_div(N, kTieRowsPerBlock);
  TORCH_CHECK(latent_blocks <= 2147483647LL && tie_row_blocks <= 65535,
              "monoscore_stats_backward: N=" + std::to_string(N) + ", M=" + std::to_string(M) +
                  " is too large for one call; split it into batches");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acts.scalar_type(), "monoscore_stats_backward_cuda", [&] {
    const dim3 tie_grid(static_cast<unsigned>(latent_blocks), static_cast<unsigned>(tie_row_blocks));
    count_ties_kernel<scalar_t><<<tie_grid, kLatentThreads, 0, stream>>>(
        acts.const_data_ptr<scalar_t>(), N, M, acts.stride(0), acts.stride(1), range32.const_data_ptr<float>(),
        ties.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor terms = latent_terms(grad_moments, grad_range, range32, ties, nullptr, N, M, stream);
    const int64_t row_blocks = N < kTermsRowBlocks ? N : kTermsRowBlocks;
    const dim3 terms_grid(static_cast<unsigned>(latent_blocks), static_cast<unsigned>(row_blocks));
    dense_terms_kernel<scalar_t><<<terms_grid, kLatentThreads, 0, stream>>>(
        acts.const_data_ptr<scalar_t>(), N, M, acts.stride(0), acts.stride(1), terms.const_data_ptr<float>(),
        range32.const_data_ptr<float>(), shift32.const_data_ptr<float>(), inv_norm.const_data_ptr<float>(),
        grad.const_data_ptr<float>(), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor monoscore_stats_csr_backward_cuda(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                             const at::Tensor& values, const at::Tensor& emb,
                                             int64_t num_latents, const at::Tensor& shift,
                                             const at::Tensor& act_range, const at::Tensor& grad_cross,
                                             const at::Tensor& grad_moments, const at::Tensor& grad_range) {
  check_csr_stats_inputs(crow_indices, col_indices, values, emb, num_latents);
  const int64_t N = emb.size(0), M = num_latents, D = emb.size(1), nnz = values.size(0);
  check_backward_inputs("monoscore_stats_csr_backward", emb, M, D, shift, act_range, grad_cross, grad_moments,
                        grad_range);
  const c10::cuda::CUDAGuard device_guard(emb.device());
  check_compute_capability("monoscore_stats_csr_backward", emb.device());
  at::Tensor out = at::empty({nnz}, values.options());
  if (nnz == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor inv_norm = row_inv_norm(emb);
  const at::Tensor unit = (emb.to(at::kFloat) * inv_norm.unsqueeze(1)).contiguous();  // (N, d)
  const at::Tensor grad_t = grad_cross.to(at::kFloat).t().contiguous();                // (M, d)
  const at::Tensor cols = col_indices.contiguous();
  const at::Tensor values32 = values.to(at::kFloat).contiguous();
  const at::Tensor range32 = act_range.to(at::kFloat).contiguous();
  const at::Tensor shift32 = shift.to(at::kFloat).contiguous();
  // The row of each entry (output_size avoids a sync): one warp per entry then
  // balances the work whatever the rows hold, where a warp per row would leave a
  // batch of a few long rows (a CSR tensor made from dense latents) to a few warps.
  // std::optional: a plain int64 would pick the overload repeat_interleave(self, int repeats).
  const at::Tensor rows = at::repeat_interleave(at::diff(crow_indices), std::optional<int64_t>(nnz));

  // col_indices must lie in [0, M), as the forward checked (with its one host
  // read); not checked again here, which would cost a sync per backward.
  at::Tensor ties = at::zeros({2, M}, emb.options().dtype(at::kLong));
  at::Tensor stored = at::zeros({M}, emb.options().dtype(at::kLong));
  const unsigned entry_blocks = static_cast<unsigned>(std::min(ceil_div(nnz, kEntryThreads), kMaxEntryBlocks));
  csr_count_ties_kernel<<<entry_blocks, kEntryThreads, 0, stream>>>(
      cols.const_data_ptr<int64_t>(), values32.const_data_ptr<float>(), nnz, M, range32.const_data_ptr<float>(),
      ties.data_ptr<int64_t>(), stored.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor terms = latent_terms(grad_moments, grad_range, range32, ties, &stored, N, M, stream);

  const int64_t entries_per_block = kEntryThreads / kWarp;
  const unsigned warp_blocks =
      static_cast<unsigned>(std::min(ceil_div(nnz, entries_per_block), kMaxEntryBlocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "monoscore_stats_csr_backward_cuda",
                                  [&] {
    csr_entries_kernel<scalar_t><<<warp_blocks, kEntryThreads, 0, stream>>>(
        rows.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(), values32.const_data_ptr<float>(), nnz,
        unit.const_data_ptr<float>(), grad_t.const_data_ptr<float>(), D, M, terms.const_data_ptr<float>(),
        range32.const_data_ptr<float>(), shift32.const_data_ptr<float>(), inv_norm.const_data_ptr<float>(),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CUDA, m) {
  m.impl("monoscore_stats_backward", &monoscore_stats_backward_cuda);
  m.impl("monoscore_stats_csr_backward", &monoscore_stats_csr_backward_cuda);
}

}  // namespace monoloss_kernels
