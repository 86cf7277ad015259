// CUDA implementation: one pass over acts, then cross on the tensor cores.
//
//   split_moments_kernel  reads acts once, 32 rows x 32 latents per tile: the
//                         per-latent min/max and float64 moments of b = a - shift
//                         (shift = the first row), and b split for the tensor
//                         cores, written transposed (latent-major, rows
//                         contiguous): hi = b truncated to TF32 (float32), and
//                         bf16(hi), bf16(b - hi) side by side.
//   cross = Êᵀ b          split precision through cuBLAS, both operands with the
//                         reduction (rows) contiguous, the tensor cores' fast layout:
//                           Ê_hi·hi        TF32 (exact products: both are TF32)
//                         + Ê_lo·hi + Ê_hi·lo  one bf16 GEMM over 2 x the rows
//                         The corrections are 2^-10 of the main term, so bf16
//                         rounding costs ~2^-19 of it; Ê_lo·lo (2^-20) is dropped.
//
// Why chunks: the tensor cores add each product step into the float32
// accumulator with truncation, so one TF32 product over all N rows drifts with N
// (benchmarks/results/NVIDIA-H200/run6-split-gemm/probe.log: scores off by
// 2.9e-4 at N = 65536, as far off as plain TF32). The main term is therefore one
// product per kTf32ChunkRows rows (a strided batch), and the chunks are summed in
// float32 round-to-nearest.
//
// Why not a hand-written kernel: the FMA kernel this replaces ran at SGEMM speed
// at best (47 ms at N=65536, M=8192, d=768 on an H200, against 15.6 ms for
// cuBLAS SGEMM), and a 3xTF32 WMMA kernel was slower and inaccurate (run3).
#include "../monoscore.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// cuBLAS through torch's handle (on the current stream, with torch's workspace).
// Its headers come with the CUDA toolkit or with torch's pip CUDA libraries
// (setup.py / CMakeLists.txt add those include folders where the toolkit lacks them).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

namespace monoloss_kernels {
namespace {

// Rows per TF32 product (see "Why chunks" above): bounds the truncation drift of
// one accumulator; the float32 sum over chunks rounds to nearest.
constexpr int64_t kTf32ChunkRows = 1024;
// The split tile: 32 rows x 32 latents, blocks of 32 x 8 threads (4 rows each).
constexpr int kTile = 32;
constexpr int kTileRowStep = 8;
// Rows per block of split_moments_kernel, i.e. per moments split: a block walks
// 16 tiles down its 32 latents. Divides kTf32ChunkRows, so every row group
// (a multiple of the chunk) starts a split.
constexpr int64_t kSplitRows = 512;
// The split copies of acts take 8 bytes per entry (float32 hi, two bf16); a row
// group keeps them, and its chunks' partial sums, within this many bytes each
// (whole chunks, one chunk at least).
constexpr int64_t kGroupBytes = int64_t{1} << 30;
// ... and within the grid's y limit (65535 blocks of kSplitRows rows).
constexpr int64_t kMaxGroupRows = int64_t{1} << 24;

__device__ __forceinline__ float tf32_truncate(float x) {
  // Truncation, not rounding: the high part can never round up past FLT_MAX.
  return __uint_as_float(__float_as_uint(x) & 0xFFFFE000u);
}

// One block: latents [32·blockIdx.x, +32) x group rows [kSplitRows·blockIdx.y, +kSplitRows).
// Rows past N (the padding of the last chunk) are written as zeros and add nothing.
template <typename scalar_t>
__global__ void __launch_bounds__(kTile * kTileRowStep)
    split_moments_kernel(const scalar_t* __restrict__ acts, int64_t N, int64_t M, int64_t stride_n,
                         int64_t stride_m, int64_t group_begin, int64_t group_rows,
                         const float* __restrict__ shift, const float* __restrict__ inv_norm,
                         float* __restrict__ acts_hi,              // (M, group_rows)
                         __nv_bfloat16* __restrict__ acts_parts,   // (M, 2 group_rows): [bf16(hi) | bf16(lo)]
                         double* __restrict__ moments_partial,     // (splits, 4, M)
                         float* __restrict__ range_partial) {      // (splits, 2, M)
  __shared__ float hi_tile[kTile][kTile + 1];  // [row][latent], +1: no bank conflicts either way
  __shared__ float lo_tile[kTile][kTile + 1];
  __shared__ double moment_lanes[4][kTileRowStep][kTile];
  __shared__ float range_lanes[2][kTileRowStep][kTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t local_begin = static_cast<int64_t>(blockIdx.y) * kSplitRows;
  const int64_t m = m0 + tx;  // the latent this thread loads and sums
  const float c = m < M ? shift[m] : 0.0f;
  double sum = 0, sumsq = 0, zero_sum = 0, zero_sumsq = 0;
  float lo = __int_as_float(0x7f800000), hi = -lo;  // +inf, -inf
  for (int64_t t = 0; t < kSplitRows; t += kTile) {
#pragma unroll
    for (int r = ty; r < kTile; r += kTileRowStep) {
      const int64_t n = group_begin + local_begin + t + r;
      float b = 0.0f;
      if (n < N && m < M) {
        const float a = static_cast<float>(acts[n * stride_n + m * stride_m]);
        b = a - c;
        const double bd = static_cast<double>(a) - static_cast<double>(c);
        sum += bd;
        sumsq += bd * bd;
        if (inv_norm[n] == 0.0f) {
          zero_sum += bd;
          zero_sumsq += bd * bd;
        }
        lo = a < lo ? a : lo;
        hi = a > hi ? a : hi;
      }
      const float b_hi = tf32_truncate(b);
      hi_tile[r][tx] = b_hi;
      lo_tile[r][tx] = b - b_hi;
    }
    __syncthreads();
    // Transposed stores: lanes along rows, so each latent's 32 rows are one line.
    const int64_t k = local_begin + t + tx;
#pragma unroll
    for (int col = ty; col < kTile; col += kTileRowStep) {
      const int64_t latent = m0 + col;
      if (latent < M) {
        const float b_hi = hi_tile[tx][col];
        acts_hi[latent * group_rows + k] = b_hi;
        acts_parts[latent * 2 * group_rows + k] = __float2bfloat16_rn(b_hi);
        acts_parts[latent * 2 * group_rows + group_rows + k] = __float2bfloat16_rn(lo_tile[tx][col]);
      }
    }
    __syncthreads();
  }
  moment_lanes[0][ty][tx] = sum;
  moment_lanes[1][ty][tx] = sumsq;
  moment_lanes[2][ty][tx] = zero_sum;
  moment_lanes[3][ty][tx] = zero_sumsq;
  range_lanes[0][ty][tx] = lo;
  range_lanes[1][ty][tx] = hi;
  __syncthreads();
  if (ty == 0 && m < M) {
    const int64_t split = (group_begin + local_begin) / kSplitRows;
    double* out = moments_partial + split * 4 * M;
    for (int q = 0; q < 4; ++q) {
      double total = 0;
      for (int y = 0; y < kTileRowStep; ++y) total += moment_lanes[q][y][tx];
      out[q * M + m] = total;
    }
    for (int y = 1; y < kTileRowStep; ++y) {
      lo = range_lanes[0][y][tx] < lo ? range_lanes[0][y][tx] : lo;
      hi = range_lanes[1][y][tx] > hi ? range_lanes[1][y][tx] : hi;
    }
    range_partial[split * 2 * M + m] = lo;
    range_partial[split * 2 * M + M + m] = hi;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Ê's rows [begin, begin + rows) transposed to (d, group_rows) (zeros past `rows`),
// split as the acts are: hi (TF32, float32) and [bf16(lo) | bf16(hi)], paired so
// that one bf16 product with the acts' [bf16(hi) | bf16(lo)] gives Ê_lo·hi + Ê_hi·lo.
std::pair<at::Tensor, at::Tensor> split_unit_emb(const at::Tensor& unit_emb, int64_t begin, int64_t rows,
                                                 int64_t group_rows) {
  at::Tensor unit_t = at::zeros({unit_emb.size(1), group_rows}, unit_emb.options());
  unit_t.narrow(1, 0, rows).copy_(unit_emb.narrow(0, begin, rows).t());
  const at::Tensor hi = at::bitwise_and(unit_t.view(at::kInt), static_cast<int64_t>(int32_t(0xFFFFE000u)))
                            .view(at::kFloat);
  const at::Tensor parts = at::cat({(unit_t - hi).to(at::kBFloat16), hi.to(at::kBFloat16)}, 1);
  return {hi, parts};
}

// cross (d, M) row-major is the column-major (M, d) matrix C = opA · opB with
// opA = acts split (group_rows, M)ᵀ and opB = Ê split (group_rows, d): both stored
// with the rows contiguous ("TN", the tensor cores' native layout).
void add_group_cross(cublasHandle_t handle, at::Tensor& cross, const at::Tensor& acts_hi,
                     const at::Tensor& acts_parts, const at::Tensor& emb_hi, const at::Tensor& emb_parts,
                     int64_t group_rows) {
  const int64_t D = cross.size(0), M = cross.size(1);
  const int64_t chunks = group_rows / kTf32ChunkRows;
  at::Tensor partial = at::empty({chunks, D, M}, cross.options());
  const float one = 1.0f, zero = 0.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(M), static_cast<int>(D), static_cast<int>(kTf32ChunkRows),
      &one, acts_hi.const_data_ptr<float>(), CUDA_R_32F, static_cast<int>(group_rows), kTf32ChunkRows,
      emb_hi.const_data_ptr<float>(), CUDA_R_32F, static_cast<int>(group_rows), kTf32ChunkRows,
      &zero, partial.data_ptr<float>(), CUDA_R_32F, static_cast<int>(M), D * M, static_cast<int>(chunks),
      CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
  cross.add_(partial.sum(0));
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(M), static_cast<int>(D), static_cast<int>(2 * group_rows),
      &one, acts_parts.const_data_ptr(), CUDA_R_16BF, static_cast<int>(2 * group_rows),
      emb_parts.const_data_ptr(), CUDA_R_16BF, static_cast<int>(2 * group_rows),
      &one, cross.data_ptr<float>(), CUDA_R_32F, static_cast<int>(M), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

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
  const at::Tensor unit_emb = emb.to(at::kFloat) * inv_norm.unsqueeze(1);
  shift.copy_(acts.select(0, 0));
  counts.select(0, 0).fill_(static_cast<double>(N));
  counts.select(0, 1).copy_((inv_norm > 0).sum());
  unit_emb_sum.copy_(at::sum(unit_emb, {0}, false, at::kDouble));
  if (M == 0) return {cross, unit_emb_sum, shift, act_range, moments, counts};

  // Row groups of whole chunks; the last one is padded with zero rows.
  const int64_t padded_rows = ceil_div(N, kTf32ChunkRows) * kTf32ChunkRows;
  // Rows per group: the split copies (8 bytes per entry) and the per-chunk partial
  // sums (4·d·M bytes per chunk) each within kGroupBytes.
  const int64_t group_limit = std::min({kMaxGroupRows, kGroupBytes / (8 * M),
                                        kGroupBytes / (4 * std::max<int64_t>(D, 1) * M) * kTf32ChunkRows});
  const int64_t group_capacity =
      std::min(padded_rows, std::max<int64_t>(1, group_limit / kTf32ChunkRows) * kTf32ChunkRows);
  const int64_t splits = padded_rows / kSplitRows;
  at::Tensor moments_partial = at::empty({splits, 4, M}, moments.options());
  at::Tensor range_partial = at::empty({splits, 2, M}, act_range.options());
  const auto f32 = acts.options().dtype(at::kFloat);
  at::Tensor acts_hi = at::empty({M, group_capacity}, f32);
  at::Tensor acts_parts = at::empty({M, 2 * group_capacity}, acts.options().dtype(at::kBFloat16));
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();

  for (int64_t begin = 0; begin < padded_rows; begin += group_capacity) {
    const int64_t group_rows = std::min(group_capacity, padded_rows - begin);
    // The buffers as (M, group_rows) matrices: a shorter last group packs its rows.
    at::Tensor group_hi = acts_hi.view(-1).narrow(0, 0, M * group_rows).view({M, group_rows});
    at::Tensor group_parts = acts_parts.view(-1).narrow(0, 0, 2 * M * group_rows).view({M, 2 * group_rows});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acts.scalar_type(), "monoscore_stats_cuda", [&] {
      const dim3 grid(ceil_div(M, kTile), group_rows / kSplitRows);
      const dim3 block(kTile, kTileRowStep);
      split_moments_kernel<scalar_t><<<grid, block, 0, stream>>>(
          acts.const_data_ptr<scalar_t>(), N, M, acts.stride(0), acts.stride(1), begin, group_rows,
          shift.const_data_ptr<float>(), inv_norm.const_data_ptr<float>(), group_hi.data_ptr<float>(),
          reinterpret_cast<__nv_bfloat16*>(group_parts.data_ptr<at::BFloat16>()),
          moments_partial.data_ptr<double>(), range_partial.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (D > 0) {
      const int64_t rows = std::min(group_rows, N - begin);
      const auto [emb_hi, emb_parts] = split_unit_emb(unit_emb, begin, rows, group_rows);
      add_group_cross(handle, cross, group_hi, group_parts, emb_hi, emb_parts, group_rows);
    }
  }
  moments.copy_(moments_partial.sum(0));
  act_range.select(0, 0).copy_(range_partial.select(1, 0).amin(0));
  act_range.select(0, 1).copy_(range_partial.select(1, 1).amax(0));
  return {cross, unit_emb_sum, shift, act_range, moments, counts};
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CUDA, m) {
  m.impl("monoscore_stats", &monoscore_stats_cuda);
}

}  // namespace monoloss_kernels
