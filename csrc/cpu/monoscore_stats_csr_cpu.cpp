// CPU implementation for sparse activations in CSR form: O(nnz + M) passes over
// the stored entries, then O(nnz·d) for cross. Entries not stored are
// activations of 0, which add nothing to any sum taken with shift 0.
//
//  1. per latent: number of stored entries, their min and max (one pass,
//     parallel over row ranges, which also refuses out-of-range latents and a
//     latent stored twice in a row); shift = 0 if the latent has an implicit
//     zero in the batch, else its min.
//  2. per block of kBlockRows rows (csr_tiles.h): the block's entries sorted by
//     latent; per latent, in row order, b = a - shift and the float64 moments
//     (so the sums do not depend on the number of threads); then cross, each
//     task one tile of the block's unit embeddings (kTileWidth dims) and a
//     range of latents: every latent sums Σ_e b_e·tile[row_e] over its
//     entries. Gathering whole embedding rows instead reads them from
//     memory once per entry (about 2x slower at N=32768, M=16384, k=32, d=512
//     on the 2-core dev Xeon). Each thread builds the tiles it reads, one at a
//     time: O(kBlockRows·kTileWidth) memory per thread whatever N and d are.
// cross is written latent-major ((M, d), returned transposed): each latent's
// tile row is four adjacent cache lines, where a (d, M) layout would take 64.
//
// MonoLoss's op monoloss_stats_csr runs the same passes and, in the last
// block's, also sums ‖(cross[:, j] - δ_j·unit_emb_sum) / scale_j‖² tile by tile
// from the finished row of cross still in registers: finalize's
// shifted_sq_norms without its pass over cross (act_min, hence δ = act_min -
// shift, is known from step 1). It also returns the sorted entries of every
// block (KeptOrder, csr_tiles.h), which its backward reuses instead of sorting.
#include "../monoscore.h"
#include "buffer_pool.h"
#include "csr_tiles.h"
#include "vectorize.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace monoloss_kernels {
namespace {

// Entries summed in float32 before joining the float64 total: keeps the
// float32 rounding of a partial sum near 2^-24·sqrt(64).
constexpr int64_t kEntriesPerPartial = 64;
// Latents per task of the cross pass (tasks also split by tile, so that a
// few tiles still keep every thread busy).
constexpr int64_t kLatentsPerTask = 2048;

// partial[v] = Σ_{p in [p0, p1)} weights[p] · tile[rows[p]] (vector v of the
// row), in float32; two entries at a time, so that consecutive entries do not
// wait on one another's FMA latency.
template <int W>
MONOLOSS_VECTOR_INLINE void tile_row_sums(const int32_t* __restrict__ rows, const float* __restrict__ weights,
                                          const float* __restrict__ tile, int64_t p0, int64_t p1,
                                          Vec<W>* partial) {
  Vec<W> even[kTileVecs<W>] = {}, odd[kTileVecs<W>] = {};
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) {
    prefetch_tile_row(tile, rows, p);
    prefetch_tile_row(tile, rows, p + 1);
    const float* row0 = tile + int64_t{rows[p]} * kTileWidth;
    const float* row1 = tile + int64_t{rows[p + 1]} * kTileWidth;
    for (int64_t v = 0; v < kTileVecs<W>; ++v) {
      even[v] += weights[p] * load_vec<W>(row0 + v * W);
      odd[v] += weights[p + 1] * load_vec<W>(row1 + v * W);
    }
  }
  if (p < p1) {
    const float* row = tile + int64_t{rows[p]} * kTileWidth;
    for (int64_t v = 0; v < kTileVecs<W>; ++v) even[v] += weights[p] * load_vec<W>(row + v * W);
  }
  for (int64_t v = 0; v < kTileVecs<W>; ++v) partial[v] = even[v] + odd[v];
}

// What the cross pass needs to also give, tile by tile, each latent's share of
// ‖(cross[:, j] - delta[j] · unit_emb_sum) / scale[j]‖² (finalize's
// shifted_sq_norms, fused: the finished row of cross is still in registers).
struct TileSqNorms {
  alignas(64) float unit_sum[kTileWidth];  // this tile's dims of unit_emb_sum, zero past d
  const float* delta;                      // (M,) act_min - shift
  const float* inv_scale;                  // (M,) 1 / (act_max - act_min), 1 for a constant latent
  double* out;                             // (M,) this tile's share, squares summed in float64
};

// The lanes I of v (a shuffle with a constant index list).
template <int W, int... I>
MONOLOSS_VECTOR_INLINE auto lanes(Vec<W> v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, I...);
}
template <int Offset, int... I>
constexpr std::integer_sequence<int, (Offset + I)...> shifted(std::integer_sequence<int, I...>) {
  return {};
}

template <int N>
struct DoubleVecOf {
  typedef double type __attribute__((vector_size(N * sizeof(double))));
};

// Σ_i ((x_i - delta·u_i) · inv_scale)² over a tile row, in float64 (as
// shifted_sq_norms sums its squares).
template <int W>
MONOLOSS_VECTOR_INLINE double shifted_tile_sq_norm(const Vec<W>* x, const float* unit_sum, float delta,
                                                   float inv_scale) {
  using Half = typename DoubleVecOf<W / 2>::type;
  constexpr auto low_lanes = std::make_integer_sequence<int, W / 2>{};
  constexpr auto high_lanes = shifted<W / 2>(low_lanes);
  Half total = {};
  for (int64_t v = 0; v < kTileVecs<W>; ++v) {
    const Vec<W> c = (x[v] - delta * load_vec<W>(unit_sum + v * W)) * inv_scale;
    const Half low = __builtin_convertvector(lanes<W>(c, low_lanes), Half);
    const Half high = __builtin_convertvector(lanes<W>(c, high_lanes), Half);
    total += low * low + high * high;
  }
  double sum = 0;
  for (int64_t i = 0; i < W / 2; ++i) sum += total[i];
  return sum;
}

// cross_t[j, t0:t0+width) for the latents [j0, j1), reading one tile of the
// block's unit embeddings; adds to what is there if `accumulate`. With `sq`
// (the last block), also each latent's share of the shifted squared norm.
template <int W>
MONOLOSS_VECTOR_INLINE void latent_tile_sums_at(const int64_t* __restrict__ latent_offsets,
                                                const int32_t* __restrict__ rows, const float* __restrict__ weights,
                                                const float* __restrict__ tile, int64_t j0, int64_t j1,
                                                float* __restrict__ out, int64_t out_stride, int64_t width,
                                                bool accumulate, const TileSqNorms* sq) {
  constexpr int kVecs = kTileVecs<W>;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t p0 = latent_offsets[j], p1 = latent_offsets[j + 1];
    float* out_row = out + j * out_stride;
    if (accumulate && p0 == p1 && sq == nullptr) continue;
    Vec<W> sums[kVecs];
    if (p1 - p0 <= kEntriesPerPartial) {  // the common case: one float32 partial is the sum
      tile_row_sums<W>(rows, weights, tile, p0, p1, sums);
    } else {
      double total[kTileWidth] = {};
      for (int64_t e0 = p0; e0 < p1; e0 += kEntriesPerPartial) {
        Vec<W> partial[kVecs];
        tile_row_sums<W>(rows, weights, tile, e0, std::min(e0 + kEntriesPerPartial, p1), partial);
        for (int64_t i = 0; i < kTileWidth; ++i) total[i] += partial[i / W][i % W];
      }
      for (int64_t i = 0; i < kTileWidth; ++i) sums[i / W][i % W] = static_cast<float>(total[i]);
    }
    Vec<W> row[kVecs] = {};  // the row as stored, zero past width
    if (width == kTileWidth) {
      for (int64_t v = 0; v < kVecs; ++v) {
        float* part = out_row + v * W;
        row[v] = accumulate ? load_vec<W>(part) + sums[v] : sums[v];
        store_vec<W>(part, row[v]);
      }
    } else {
      for (int64_t i = 0; i < width; ++i) {
        out_row[i] = (accumulate ? out_row[i] : 0.0f) + sums[i / W][i % W];
        row[i / W][i % W] = out_row[i];
      }
    }
    if (sq != nullptr) sq->out[j] = shifted_tile_sq_norm<W>(row, sq->unit_sum, sq->delta[j], sq->inv_scale[j]);
  }
}

void latent_tile_sums(const int64_t* latent_offsets, const int32_t* rows, const float* weights, const float* tile,
                      int64_t j0, int64_t j1, float* out, int64_t out_stride, int64_t width, bool accumulate,
                      const TileSqNorms* sq) {
  with_vector_width([&](auto vector_width) MONOLOSS_VECTOR_LAMBDA {
    latent_tile_sums_at<decltype(vector_width)::value>(latent_offsets, rows, weights, tile, j0, j1, out,
                                                       out_stride, width, accumulate, sq);
  });
}

// Per latent, over a range of rows: stored entries, min, max, and the last row
// that stored it (to refuse a latent stored twice in a row).
struct LatentScan {
  std::vector<int64_t> stored, last_row;
  std::vector<float> min, max;
  explicit LatentScan(int64_t M)
      : stored(M, 0), last_row(M, -1), min(M, std::numeric_limits<float>::infinity()),
        max(M, -std::numeric_limits<float>::infinity()) {}
};

// The statistics; for MonoLoss's op (`for_loss`) also the squared norms at the
// minimum and the sorted entries (KeptOrder) for its backward, else undefined.
std::tuple<MonoScoreStats, at::Tensor, at::Tensor> csr_stats_cpu(const at::Tensor& crow_indices,
                                                                 const at::Tensor& col_indices, const at::Tensor& values,
                                                                 const at::Tensor& emb, int64_t num_latents,
                                                                 bool for_loss) {
  check_csr_stats_inputs(crow_indices, col_indices, values, emb, num_latents);
  TORCH_CHECK_VALUE(emb.size(0) < std::numeric_limits<int32_t>::max(),
                    "monoscore_stats_csr: at most 2^31 - 2 rows per call (stream larger sets in batches)");
  const int64_t N = emb.size(0), d = emb.size(1), M = num_latents, nnz = values.size(0);
  const auto f32 = emb.options().dtype(at::kFloat);
  const auto f64 = emb.options().dtype(at::kDouble);

  const at::Tensor inv_norm_t = row_inv_norm(emb);
  const at::Tensor emb32 = emb.to(at::kFloat).contiguous();
  const at::Tensor crow_t = crow_indices.contiguous(), cols_t = col_indices.contiguous();
  // float64 values in a pooled buffer (a fresh 2 MiB costs 512 page faults a call at nnz=262144).
  const at::Tensor values64 = pooled_empty({nnz}, f64).copy_(values);
  const int64_t* crow = crow_t.const_data_ptr<int64_t>();
  const int64_t* cols = cols_t.const_data_ptr<int64_t>();
  const double* vals = values64.const_data_ptr<double>();
  const float* inv_norm = inv_norm_t.const_data_ptr<float>();
  check_crow(crow, N, nnz, "monoscore_stats_csr");

  // 1. Stored entries per latent, their min and max; the shift.
  at::Tensor act_range = at::empty({2, M}, f32);
  at::Tensor shift = at::empty({M}, f32);
  {
    const int64_t parts = entry_pass_parts(nnz);
    std::vector<LatentScan> scans;
    for (int64_t p = 0; p < parts; ++p) scans.emplace_back(M);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        LatentScan& scan = scans[p];
        for (int64_t n = N * p / parts; n < N * (p + 1) / parts; ++n) {
          for (int64_t e = crow[n]; e < crow[n + 1]; ++e) {
            const int64_t j = cols[e];
            TORCH_CHECK_VALUE(j >= 0 && j < M, "monoscore_stats_csr: col_indices must lie in [0, num_latents=" +
                                                   std::to_string(M) + "), got " + std::to_string(j));
            TORCH_CHECK_VALUE(scan.last_row[j] != n,
                              "acts stores latent " + std::to_string(j) + " twice in row " + std::to_string(n) +
                                  "; the latent indices of a row must be distinct (as torch.topk returns them)");
            scan.last_row[j] = n;
            const float a = static_cast<float>(vals[e]);
            ++scan.stored[j];
            scan.min[j] = std::min(scan.min[j], a);
            scan.max[j] = std::max(scan.max[j], a);
          }
        }
      }
    });
    float* act_min = act_range.select(0, 0).data_ptr<float>();
    float* act_max = act_range.select(0, 1).data_ptr<float>();
    float* shift_ptr = shift.data_ptr<float>();
    for (const auto j : c10::irange(M)) {
      int64_t stored = 0;
      float lo = std::numeric_limits<float>::infinity(), hi = -lo;
      for (const LatentScan& scan : scans) {
        stored += scan.stored[j];
        lo = std::min(lo, scan.min[j]);
        hi = std::max(hi, scan.max[j]);
      }
      const bool has_implicit_zero = stored < N;
      shift_ptr[j] = has_implicit_zero ? 0.0f : lo;
      act_min[j] = has_implicit_zero ? std::min(lo, 0.0f) : lo;
      act_max[j] = has_implicit_zero ? std::max(hi, 0.0f) : hi;
    }
  }

  // What the squared norms at the minimum need per latent: the shift to it and
  // the latent's range, float32 as finalize passes them to shifted_sq_norms.
  at::Tensor delta;
  std::vector<float> scale, inv_scale;
  std::vector<double> tile_sq_norms;  // (num_tiles, M): each tile's share
  const int64_t num_tiles = (d + kTileWidth - 1) / kTileWidth;
  if (for_loss) {
    const float* act_min = act_range.select(0, 0).const_data_ptr<float>();
    const float* act_max = act_range.select(0, 1).const_data_ptr<float>();
    delta = shift_to_min(act_range, shift);
    scale.resize(M);
    inv_scale.resize(M);
    tile_sq_norms.resize(num_tiles * M);
    for (int64_t j = 0; j < M; ++j) {
      scale[j] = act_max[j] > act_min[j] ? act_max[j] - act_min[j] : 1.0f;
      inv_scale[j] = 1.0f / scale[j];
    }
  }

  // 2. Block by block of rows: the entries sorted by latent, their weights b
  // and the moments, then cross.
  at::Tensor moments = at::zeros({4, M}, f64);
  const int64_t num_blocks = std::max<int64_t>(1, (N + kBlockRows - 1) / kBlockRows);
  const int64_t latent_tasks = std::max<int64_t>(1, (M + kLatentsPerTask - 1) / kLatentsPerTask);
  const int64_t tile_rows = std::min(N, kBlockRows);
  at::Tensor unit_emb_sum = at::zeros({d}, f64);
  at::Tensor cross_t = pooled_empty({M, d}, f32);
  const float* emb_ptr = emb32.const_data_ptr<float>();
  const float* shift_ptr = shift.const_data_ptr<float>();
  float* cross_ptr = cross_t.data_ptr<float>();
  double* unit_sum_ptr = unit_emb_sum.data_ptr<double>();
  double* sum_b = moments.select(0, 0).data_ptr<double>();
  double* sumsq_b = moments.select(0, 1).data_ptr<double>();
  double* zero_sum_b = moments.select(0, 2).data_ptr<double>();
  double* zero_sumsq_b = moments.select(0, 3).data_ptr<double>();
  std::vector<double> block_unit_sum(num_tiles * kTileWidth);  // this block's share of unit_emb_sum
  at::Tensor entry_order;
  std::optional<KeptOrder> kept;
  if (for_loss) {
    entry_order = pooled_empty({3, nnz}, emb.options().dtype(at::kInt));
    kept.emplace(entry_order.data_ptr<int32_t>(), nnz);
  }
  LatentOrder<double> order;
  for (int64_t block = 0; block < num_blocks; ++block) {
    const int64_t row_base = block * kBlockRows, block_rows = std::min(N, row_base + kBlockRows) - row_base;
    sort_block_by_latent(crow, cols, vals, row_base, row_base + block_rows, M, order, kept ? &*kept : nullptr);
    const at::Tensor weights_t = pooled_empty({order.offsets[M]}, f32);
    float* weights = weights_t.data_ptr<float>();  // b of each sorted entry; the tiles hold unit embeddings
    at::parallel_for(0, M, kLatentsPerTask, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        // Local sums: weights[] may alias the moments as far as the compiler
        // knows, which would send each += through memory.
        double sum = 0, sumsq = 0, zero_sum = 0, zero_sumsq = 0;
        for (int64_t p = order.offsets[j]; p < order.offsets[j + 1]; ++p) {
          const double b = order.values[p] - static_cast<double>(shift_ptr[j]);
          weights[p] = static_cast<float>(b);
          sum += b;
          sumsq += b * b;
          if (inv_norm[row_base + order.rows[p]] == 0.0f) {
            zero_sum += b;
            zero_sumsq += b * b;
          }
        }
        sum_b[j] += sum;
        sumsq_b[j] += sumsq;
        zero_sum_b[j] += zero_sum;
        zero_sumsq_b[j] += zero_sumsq;
      }
    });
    // Tasks in (tile, latent range) order: a thread builds each tile of its
    // range once, at the tile's first task; the task of a tile's first latent
    // range keeps the tile's column sums for unit_emb_sum (so each dim is
    // summed once), which is added to after the pass: the last block's tasks
    // read it meanwhile, for the squared norms.
    const bool last_block = block == num_blocks - 1;
    at::parallel_for(0, num_tiles * latent_tasks, 1, [&](int64_t task0, int64_t task1) {
      at::Tensor tile = pooled_empty({tile_rows, kTileWidth}, f32);
      double tile_sum[kTileWidth];
      TileSqNorms sq{{}, for_loss ? delta.const_data_ptr<float>() : nullptr, inv_scale.data(), nullptr};
      int64_t built = -1;
      for (int64_t task = task0; task < task1; ++task) {
        const int64_t t = task / latent_tasks, j0 = task % latent_tasks * kLatentsPerTask;
        const int64_t width = std::min(kTileWidth, d - t * kTileWidth);
        if (t != built) {
          build_unit_tile(emb_ptr, inv_norm, row_base, block_rows, d, t, tile.data_ptr<float>(), tile_sum);
          for (int64_t i = 0; i < kTileWidth; ++i) {  // float32, as finalize passes it
            sq.unit_sum[i] = i < width ? static_cast<float>(unit_sum_ptr[t * kTileWidth + i] + tile_sum[i]) : 0.0f;
          }
          built = t;
        }
        if (j0 == 0) std::copy(tile_sum, tile_sum + width, block_unit_sum.begin() + t * kTileWidth);
        sq.out = tile_sq_norms.data() + t * M;
        latent_tile_sums(order.offsets.data(), order.rows, weights, tile.const_data_ptr<float>(), j0,
                         std::min(M, j0 + kLatentsPerTask), cross_ptr + t * kTileWidth, d, width,
                         /*accumulate=*/block > 0, for_loss && last_block ? &sq : nullptr);
      }
    });
    for (int64_t i = 0; i < d; ++i) unit_sum_ptr[i] += block_unit_sum[i];
  }

  const at::Tensor counts = at::stack({at::scalar_tensor(static_cast<double>(N), f64),
                                       (inv_norm_t > 0).sum().to(at::kDouble)});
  MonoScoreStats stats{cross_t.t(), unit_emb_sum, shift, act_range, moments, counts};
  if (!for_loss) return {stats, at::Tensor(), at::Tensor()};
  // The tiles' shares in tile order (so the sum does not depend on the number of threads).
  at::Tensor sq_norms = at::zeros({M}, f64);
  double* sq_ptr = sq_norms.data_ptr<double>();
  for (int64_t t = 0; t < num_tiles; ++t) {
    for (int64_t j = 0; j < M; ++j) sq_ptr[j] += tile_sq_norms[t * M + j];
  }
  for (int64_t j = 0; j < M; ++j) sq_ptr[j] *= static_cast<double>(scale[j]) * static_cast<double>(scale[j]);
  return {stats, sq_norms, entry_order};
}

}  // namespace

MonoScoreStats monoscore_stats_csr_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                       const at::Tensor& values, const at::Tensor& emb, int64_t num_latents) {
  return std::get<0>(csr_stats_cpu(crow_indices, col_indices, values, emb, num_latents, /*for_loss=*/false));
}

MonoLossStats monoloss_stats_csr_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                     const at::Tensor& values, const at::Tensor& emb, int64_t num_latents) {
  auto [stats, sq_norms, entry_order] = csr_stats_cpu(crow_indices, col_indices, values, emb, num_latents,
                                                      /*for_loss=*/true);
  return std::tuple_cat(stats, std::make_tuple(sq_norms, entry_order));
}

int64_t cpu_vector_width_op() { return cpu_vector_width(); }

TORCH_LIBRARY_FRAGMENT(monoloss_kernels, m) {
  // The floats per vector the CSR kernels run with (vectorize.h): 16, 8 or 4.
  m.def("cpu_vector_width() -> int", &cpu_vector_width_op);
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CPU, m) {
  m.impl("monoscore_stats_csr", &monoscore_stats_csr_cpu);
  m.impl("monoloss_stats_csr", &monoloss_stats_csr_cpu);
}

}  // namespace monoloss_kernels
