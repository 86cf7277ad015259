// CPU backward of the statistics ops (the formula is derived in
// monoloss_kernels/_autograd.py), fused so that acts is read once:
//
//   dense: grad = Ê · G in one BLAS call (per row chunk it would re-read the
//          (d, M) matrix G from memory for every chunk: the product took 1.5x
//          longer at N=4096, M=8192, d=768), then one elementwise pass adds the moment
//          terms and the min/max tie shares. The tie counts come from a first
//          pass over acts.
//   CSR:   each stored entry gets ê[row] · G[:, latent] plus the same
//          per-entry terms: O(nnz·d). The entries are sorted as the forward
//          kernel sorts them -- by latent within blocks of rows (csr_tiles.h)
//          -- so that each tile of the block's unit embeddings (64 dims, 2 MiB,
//          built by the thread that reads it) stays in L2 while every latent's
//          entries read it, and each latent
//          reads its 64 values of G once per tile, whatever M is. Each thread
//          owns a range of latents, and so a contiguous range of the sorted
//          entries. Products are reduced 16 entries at a time (`lane_sums`).
//          Reading Gᵀ tiles in row order instead needed a reordered copy of G
//          and one L2-resident (M, 16) tile per thread, and ran 2x slower at
//          N=4096, M=8192, k=64.
//
// MonoLoss's monoloss_stats_csr_backward is the CSR kernel with G formed from
// cross as each latent's tile is read, G[:, j] = 2 g_j (cross[:, j] - δ_j
// unit_emb_sum) for the gradient g of the fused squared norms (`CrossGrad`),
// and the norm's gradient through δ (-unit_emb_sumᵀ G[:, j]) shared among the
// ties at the minimum; it reads the entries in the order its forward sorted
// them (`KeptOrder`) instead of sorting them again.
//
// Only the gradient with respect to acts (or the stored values) is computed
// here; the optional gradient with respect to emb stays in torch.
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
#include <string>
#include <vector>

namespace monoloss_kernels {
namespace {

constexpr int64_t kLatentGrain = 256;
// How many latents ahead the CSR backward fetches G's values (about a memory
// latency's worth of latents at ~30 entries each).
constexpr int64_t kPrefetchLatents = 8;

// Per-latent coefficients of the elementwise terms, float32.
struct LatentTerms {
  std::vector<float> sum, sumsq, zero_sum, zero_sumsq;  // g0, 2 g1, g2, 2 g3
  std::vector<float> min_share, max_share;              // dL/dmin / ties, dL/dmax / ties
  std::vector<float> min, max;                          // the extremes, float32 as in act_range
};

template <typename count_t>
LatentTerms latent_terms(const at::Tensor& act_range, const at::Tensor& grad_moments,
                         const at::Tensor& grad_range, const std::vector<count_t>& min_ties,
                         const std::vector<count_t>& max_ties) {
  const int64_t M = act_range.size(1);
  const at::Tensor range = act_range.to(at::kFloat).contiguous();
  const at::Tensor gm = grad_moments.to(at::kDouble).contiguous();
  const at::Tensor gr = grad_range.to(at::kDouble).contiguous();
  const float* r = range.const_data_ptr<float>();
  const double* m = gm.const_data_ptr<double>();
  const double* g = gr.const_data_ptr<double>();
  LatentTerms t;
  for (auto* v : {&t.sum, &t.sumsq, &t.zero_sum, &t.zero_sumsq, &t.min_share, &t.max_share, &t.min, &t.max}) {
    v->resize(M);
  }
  for (const auto k : c10::irange(M)) {
    t.sum[k] = static_cast<float>(m[k]);
    t.sumsq[k] = static_cast<float>(2 * m[M + k]);
    t.zero_sum[k] = static_cast<float>(m[2 * M + k]);
    t.zero_sumsq[k] = static_cast<float>(2 * m[3 * M + k]);
    t.min_share[k] = min_ties[k] > 0 ? static_cast<float>(g[k] / static_cast<double>(min_ties[k])) : 0.0f;
    t.max_share[k] = max_ties[k] > 0 ? static_cast<float>(g[M + k] / static_cast<double>(max_ties[k])) : 0.0f;
    t.min[k] = r[k];
    t.max[k] = r[M + k];
  }
  return t;
}

// The per-entry terms of one activation a (b = a - shift) of latent k, whose
// minimum's ties each get min_share.
inline float entry_terms(const LatentTerms& t, int64_t k, float a, float b, bool zero_row, float min_share) {
  float g = t.sum[k] + b * t.sumsq[k];
  if (zero_row) g += t.zero_sum[k] + b * t.zero_sumsq[k];
  if (a == t.min[k]) g += min_share;
  if (a == t.max[k]) g += t.max_share[k];
  return g;
}

// One row of acts, latents [k0, k1): ties with each latent's min and max. The
// clones (AVX-512/AVX2, picked at load time) vectorise these branch-free loops.
MONOLOSS_VECTOR_CLONES
void count_ties_row(const float* __restrict__ a, const float* __restrict__ lo, const float* __restrict__ hi,
                    int32_t* __restrict__ min_ties, int32_t* __restrict__ max_ties, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    min_ties[k] += a[k] == lo[k];
    max_ties[k] += a[k] == hi[k];
  }
}

// One row of the output, latents [k0, k1): out += the per-entry terms (a row
// whose embedding is nonzero; zero rows add their two terms separately).
MONOLOSS_VECTOR_CLONES
void add_terms_row(float* __restrict__ out, const float* __restrict__ a, const float* __restrict__ shift,
                   const LatentTerms& t, int64_t k0, int64_t k1) {
  const float* __restrict__ sum = t.sum.data();
  const float* __restrict__ sumsq = t.sumsq.data();
  const float* __restrict__ lo = t.min.data();
  const float* __restrict__ hi = t.max.data();
  const float* __restrict__ lo_share = t.min_share.data();
  const float* __restrict__ hi_share = t.max_share.data();
  for (int64_t k = k0; k < k1; ++k) {
    const float x = a[k];
    float g = sum[k] + (x - shift[k]) * sumsq[k];
    g += x == lo[k] ? lo_share[k] : 0.0f;
    g += x == hi[k] ? hi_share[k] : 0.0f;
    out[k] += g;
  }
}

// Where the CSR backward reads G = ∂L/∂cross, latent by latent: x itself (a
// materialised grad_cross), or for MonoLoss's statistics
// G[:, j] = weight[j] · (x[:, j] - delta[j] · unit_sum) with x = cross, formed
// as each latent's tile is read, where a separate op would write all of G
// (M x d) to memory and this kernel read it back.
struct CrossGrad {
  const float* x;  // G[i, j] (or cross) = x[i * stride_dim + j * stride_latent]
  int64_t stride_dim, stride_latent;
  const float* unit_sum = nullptr;  // (d,) float32, or null: G = x
  const float* delta = nullptr;     // (M,)
  const float* weight = nullptr;    // (M,)
};

// dots[p] += ê[rows[p]] · g over one tile for the sorted entries p of latents
// [j0, j1) in one row block, g being latent j's kTileWidth values of G there
// (dims [dim0, dim0 + width), zero past them, where the tile is zero too);
// unless unit_dots is null, also unit_dots[j] += unit_sumᵀ g (G formed from
// cross), for every latent, entries or not.
template <int W>
MONOLOSS_VECTOR_INLINE void add_tile_dots_at(const int64_t* __restrict__ latent_offsets,
                                             const int32_t* __restrict__ rows, const float* __restrict__ tile,
                                             const CrossGrad& grad, int64_t dim0, int64_t width, int64_t j0,
                                             int64_t j1, float* __restrict__ dots, double* __restrict__ unit_dots) {
  constexpr int kVecs = kTileVecs<W>;
  const bool contiguous = grad.stride_dim == 1 && width == kTileWidth;
  const float* x = grad.x + dim0 * grad.stride_dim;
  const bool formed = grad.unit_sum != nullptr;
  Vec<W> unit[kVecs] = {};  // this tile's dims of unit_sum, zero past width
  if (formed) {
    for (int64_t i = 0; i < width; ++i) unit[i / W][i % W] = grad.unit_sum[dim0 + i];
  }
  // The products of up to kLineFloats entries, reduced together by lane_sums.
  Vec<W> products[kLineFloats];
  int64_t pending = 0, first = latent_offsets[j0];  // products[0, pending) belong to dots[first, ...)
  const auto add_sums = [&](int64_t count) MONOLOSS_VECTOR_LAMBDA {
    for (int64_t i = count; i < kLineFloats; ++i) products[i] = Vec<W>{};
    lane_sums<W>(products);  // entry first + i's dot in products[i / W][i % W]
    if (count == kLineFloats) {
      for (int64_t v = 0; v < kLineFloats / W; ++v) {
        store_vec<W>(dots + first + v * W, load_vec<W>(dots + first + v * W) + products[v]);
      }
    } else {
      for (int64_t i = 0; i < count; ++i) dots[first + i] += products[i / W][i % W];
    }
  };
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t p0 = latent_offsets[j], p1 = latent_offsets[j + 1];
    if (p0 == p1 && unit_dots == nullptr) continue;
    // With G latent-major, each latent's values sit a page apart: fetch ahead,
    // as the hardware prefetcher does not cross pages.
    const float* ahead = x + std::min(j + kPrefetchLatents, j1 - 1) * grad.stride_latent;
    for (int64_t l = 0; l < kTileLines; ++l) __builtin_prefetch(ahead + l * kLineFloats * grad.stride_dim);
    Vec<W> g[kVecs] = {};
    if (contiguous) {
      for (int64_t v = 0; v < kVecs; ++v) g[v] = load_vec<W>(x + j * grad.stride_latent + v * W);
    } else {
      for (int64_t i = 0; i < width; ++i) g[i / W][i % W] = x[i * grad.stride_dim + j * grad.stride_latent];
    }
    if (formed) {
      for (int64_t v = 0; v < kVecs; ++v) g[v] = grad.weight[j] * (g[v] - grad.delta[j] * unit[v]);
    }
    if (unit_dots != nullptr) {
      Vec<W> unit_products[kVecs];
      for (int64_t v = 0; v < kVecs; ++v) unit_products[v] = unit[v] * g[v];
      const Vec<W> lanes = tree_sum<W, kVecs>(unit_products);
      float sum = 0;
      for (int64_t i = 0; i < W; ++i) sum += lanes[i];
      unit_dots[j] += sum;
    }
    for (int64_t p = p0; p < p1; ++p) {
      prefetch_tile_row(tile, rows, p);
      const float* row = tile + int64_t{rows[p]} * kTileWidth;
      Vec<W> row_products[kVecs];
      for (int64_t v = 0; v < kVecs; ++v) row_products[v] = load_vec<W>(row + v * W) * g[v];
      products[pending++] = tree_sum<W, kVecs>(row_products);
      if (pending == kLineFloats) {
        add_sums(kLineFloats);
        first += kLineFloats;
        pending = 0;
      }
    }
  }
  if (pending > 0) add_sums(pending);
}

void add_tile_dots(const int64_t* latent_offsets, const int32_t* rows, const float* tile, const CrossGrad& grad,
                   int64_t dim0, int64_t width, int64_t j0, int64_t j1, float* dots, double* unit_dots) {
  with_vector_width([&](auto vector_width) MONOLOSS_VECTOR_LAMBDA {
    add_tile_dots_at<decltype(vector_width)::value>(latent_offsets, rows, tile, grad, dim0, width, j0, j1, dots,
                                                    unit_dots);
  });
}

}  // namespace

at::Tensor monoscore_stats_backward_cpu(const at::Tensor& acts, const at::Tensor& emb, const at::Tensor& shift,
                                        const at::Tensor& act_range, const at::Tensor& grad_cross,
                                        const at::Tensor& grad_moments, const at::Tensor& grad_range) {
  check_stats_inputs(acts, emb);
  check_backward_inputs("monoscore_stats_backward", acts, acts.size(1), emb.size(1), shift, act_range, grad_cross,
                        grad_moments, grad_range);
  const int64_t N = acts.size(0), M = acts.size(1);
  const at::Tensor inv_norm = row_inv_norm(emb);
  const at::Tensor acts32 = acts.to(at::kFloat).contiguous();  // no copy for float32 row-major acts
  const at::Tensor shift32 = shift.to(at::kFloat).contiguous();
  const at::Tensor g_cross = grad_cross.to(at::kFloat);
  const float* a = acts32.const_data_ptr<float>();

  // Tie counts at each latent's min and max (as float32, the precision of act_range).
  std::vector<int32_t> min_ties(M, 0), max_ties(M, 0);
  {
    const at::Tensor range = act_range.to(at::kFloat).contiguous();
    const float* lo = range.const_data_ptr<float>();
    at::parallel_for(0, M, kLatentGrain, [&](int64_t k0, int64_t k1) {
      for (const auto n : c10::irange(N)) {
        count_ties_row(a + n * M, lo, lo + M, min_ties.data(), max_ties.data(), k0, k1);
      }
    });
  }
  const LatentTerms terms = latent_terms(act_range, grad_moments, grad_range, min_ties, max_ties);

  at::Tensor grad = pooled_empty({N, M}, acts.options().dtype(at::kFloat));
  {
    const IeeeFloat32Matmuls ieee_matmuls;
    at::mm_out(grad, emb.to(at::kFloat) * inv_norm.unsqueeze(1), g_cross);  // (N, d) @ (d, M)
  }
  const float* s = shift32.const_data_ptr<float>();
  const float* inv = inv_norm.const_data_ptr<float>();
  float* o = grad.data_ptr<float>();
  at::parallel_for(0, M, kLatentGrain, [&](int64_t k0, int64_t k1) {
    for (const auto n : c10::irange(N)) {
      add_terms_row(o + n * M, a + n * M, s, terms, k0, k1);
      if (inv[n] != 0.0f) continue;  // rare: a row whose embedding has zero norm
      for (int64_t k = k0; k < k1; ++k) {
        o[n * M + k] += terms.zero_sum[k] + (a[n * M + k] - s[k]) * terms.zero_sumsq[k];
      }
    }
  });
  return grad.to(acts.scalar_type());
}

namespace {

// The CSR backward of both statistics ops: G from `grad` (see CrossGrad),
// whose x has been checked to be (d, M) float32.
at::Tensor csr_backward_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices, const at::Tensor& values,
                            const at::Tensor& emb, int64_t num_latents, const at::Tensor& shift,
                            const at::Tensor& act_range, const CrossGrad& grad, const at::Tensor& grad_moments,
                            const at::Tensor& grad_range, const KeptOrder* kept, const char* op) {
  const int64_t N = emb.size(0), d = emb.size(1), M = num_latents, nnz = values.size(0);
  const at::Tensor inv_norm = row_inv_norm(emb);
  const at::Tensor emb32 = emb.to(at::kFloat).contiguous();
  const at::Tensor crow_t = crow_indices.contiguous(), cols_t = col_indices.contiguous();
  const at::Tensor values32 = values.to(at::kFloat).contiguous();
  const at::Tensor shift32 = shift.to(at::kFloat).contiguous();
  const int64_t* crow = crow_t.const_data_ptr<int64_t>();
  const int64_t* cols = cols_t.const_data_ptr<int64_t>();
  const float* v = values32.const_data_ptr<float>();
  const float* inv = inv_norm.const_data_ptr<float>();

  check_crow(crow, N, nnz, op);

  // Ties: stored values equal to the extreme, plus the implicit zeros when the
  // extreme is 0; counted per range of rows in parallel (the forward already
  // refused repeated latents, so this pass does not look for them again).
  std::vector<double> min_ties(M, 0.0), max_ties(M, 0.0);
  {
    const at::Tensor range = act_range.to(at::kFloat).contiguous();
    const float* lo = range.const_data_ptr<float>();
    const float* hi = lo + M;
    const int64_t parts = entry_pass_parts(nnz);
    std::vector<int64_t> part_counts(3 * parts * M, 0);  // per range: stored, min ties, max ties
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        int64_t* stored = part_counts.data() + 3 * q * M;
        int64_t* at_min = stored + M;
        int64_t* at_max = stored + 2 * M;
        for (int64_t e = crow[N * q / parts]; e < crow[N * (q + 1) / parts]; ++e) {
          const int64_t k = cols[e];
          TORCH_CHECK_VALUE(k >= 0 && k < M, std::string(op) + ": col_indices must lie in [0, " +
                                                 std::to_string(M) + "), got " + std::to_string(k));
          ++stored[k];
          at_min[k] += v[e] == lo[k];
          at_max[k] += v[e] == hi[k];
        }
      }
    });
    for (const auto k : c10::irange(M)) {
      int64_t stored = 0, at_min = 0, at_max = 0;
      for (int64_t q = 0; q < parts; ++q) {
        stored += part_counts[3 * q * M + k];
        at_min += part_counts[(3 * q + 1) * M + k];
        at_max += part_counts[(3 * q + 2) * M + k];
      }
      const int64_t implicit_zeros = N - stored;
      min_ties[k] = static_cast<double>(at_min + (lo[k] == 0.0f ? implicit_zeros : 0));
      max_ties[k] = static_cast<double>(at_max + (hi[k] == 0.0f ? implicit_zeros : 0));
    }
  }
  const LatentTerms terms = latent_terms(act_range, grad_moments, grad_range, min_ties, max_ties);

  // Block by block of rows: the entries sorted by latent, then each thread's
  // latents: their dot products tile by tile (each thread builds each tile of
  // the block), then the per-entry terms.
  at::Tensor grad_values = pooled_empty({nnz}, values.options().dtype(at::kFloat));
  const int64_t num_blocks = std::max<int64_t>(1, (N + kBlockRows - 1) / kBlockRows);
  const int64_t num_tiles = (d + kTileWidth - 1) / kTileWidth;
  const int64_t tile_rows = std::min(N, kBlockRows);
  const float* emb_ptr = emb32.const_data_ptr<float>();
  float* out = grad_values.data_ptr<float>();
  // With G formed from cross: unit_sumᵀ G[:, j], the gradient of the squared norm
  // through the shift to the minimum, shared among the minimum's ties.
  std::vector<double> unit_dots(grad.unit_sum != nullptr ? M : 0, 0.0);
  const float* s = shift32.const_data_ptr<float>();
  LatentOrder<float> order;
  for (int64_t block = 0; block < num_blocks; ++block) {
    const int64_t row_base = block * kBlockRows, block_rows = std::min(N, row_base + kBlockRows) - row_base;
    if (kept != nullptr) {
      kept_block_order(crow, v, row_base, row_base + block_rows, M, *kept, order);
    } else {
      sort_block_by_latent(crow, cols, v, row_base, row_base + block_rows, M, order);
    }
    const int64_t first = crow[row_base];
    const at::Tensor dots_t = pooled_empty({order.offsets[M]}, emb32.options());
    float* dots = dots_t.data_ptr<float>();  // sorted order
    std::fill(dots, dots + order.offsets[M], 0.0f);
    const int64_t* offsets = order.offsets.data();
    at::parallel_for(0, M, kLatentGrain, [&](int64_t j0, int64_t j1) {
      at::Tensor tile = pooled_empty({tile_rows, kTileWidth}, emb32.options());
      for (int64_t t = 0; t < num_tiles; ++t) {
        build_unit_tile(emb_ptr, inv, row_base, block_rows, d, t, tile.data_ptr<float>(), nullptr);
        add_tile_dots(offsets, order.rows, tile.const_data_ptr<float>(), grad, t * kTileWidth,
                      std::min(kTileWidth, d - t * kTileWidth), j0, j1, dots,
                      unit_dots.empty() || block > 0 ? nullptr : unit_dots.data());  // once per latent
      }
      for (int64_t j = j0; j < j1; ++j) {
        float min_share = terms.min_share[j];
        if (!unit_dots.empty() && min_ties[j] > 0) min_share -= static_cast<float>(unit_dots[j] / min_ties[j]);
        for (int64_t p = offsets[j]; p < offsets[j + 1]; ++p) {
          const float a = order.values[p];
          const bool zero_row = inv[row_base + order.rows[p]] == 0.0f;
          out[first + order.source[p]] = dots[p] + entry_terms(terms, j, a, a - s[j], zero_row, min_share);
        }
      }
    });
  }
  return grad_values.to(values.scalar_type());
}

}  // namespace

at::Tensor monoscore_stats_csr_backward_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                            const at::Tensor& values, const at::Tensor& emb,
                                            int64_t num_latents, const at::Tensor& shift,
                                            const at::Tensor& act_range, const at::Tensor& grad_cross,
                                            const at::Tensor& grad_moments, const at::Tensor& grad_range) {
  check_csr_stats_inputs(crow_indices, col_indices, values, emb, num_latents);
  check_backward_inputs("monoscore_stats_csr_backward", emb, num_latents, emb.size(1), shift, act_range,
                        grad_cross, grad_moments, grad_range);
  // Any layout: the forward's cross is the transpose of an (M, d) buffer, and so
  // may be its gradient.
  const at::Tensor grad32 = grad_cross.to(at::kFloat);
  const CrossGrad grad{grad32.const_data_ptr<float>(), grad32.stride(0), grad32.stride(1)};
  return csr_backward_cpu(crow_indices, col_indices, values, emb, num_latents, shift, act_range, grad, grad_moments,
                          grad_range, /*kept=*/nullptr, "monoscore_stats_csr_backward");
}

at::Tensor monoloss_stats_csr_backward_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                           const at::Tensor& values, const at::Tensor& emb, int64_t num_latents,
                                           const at::Tensor& shift, const at::Tensor& act_range,
                                           const at::Tensor& cross, const at::Tensor& unit_emb_sum,
                                           const at::Tensor& entry_order, const at::Tensor& grad_cross_sq_at_min,
                                           const at::Tensor& grad_moments, const at::Tensor& grad_range) {
  const char* op = "monoloss_stats_csr_backward";
  check_csr_stats_inputs(crow_indices, col_indices, values, emb, num_latents);
  const int64_t d = emb.size(1), M = num_latents;
  TORCH_CHECK_VALUE(cross.dim() == 2 && cross.size(0) == d && cross.size(1) == M, op,
                    ": cross must have shape (d, num_latents)");
  TORCH_CHECK_VALUE(unit_emb_sum.dim() == 1 && unit_emb_sum.size(0) == d, op, ": unit_emb_sum must have shape (d,)");
  TORCH_CHECK_VALUE(grad_cross_sq_at_min.dim() == 1 && grad_cross_sq_at_min.size(0) == M, op,
                    ": grad_cross_sq_at_min must have shape (num_latents,)");
  for (const at::Tensor* t : {&unit_emb_sum, &grad_cross_sq_at_min}) {
    TORCH_CHECK_VALUE(t->device() == emb.device() && at::isFloatingType(t->scalar_type()), op,
                      ": unit_emb_sum and grad_cross_sq_at_min must be floating point, on emb's device");
  }
  const int64_t nnz = values.size(0);
  TORCH_CHECK_VALUE(entry_order.dim() == 2 && entry_order.size(0) == 3 && entry_order.size(1) == nnz &&
                        entry_order.scalar_type() == at::kInt && entry_order.device() == emb.device(),
                    op, ": entry_order must be the (3, nnz) int32 tensor monoloss_stats_csr returned");
  check_backward_inputs(op, emb, M, d, shift, act_range, cross, grad_moments, grad_range);
  // As finalize passes them to shifted_sq_norms: float32 unit_emb_sum and
  // delta; the squared norm's gradient is 2 g c.
  const at::Tensor cross32 = cross.to(at::kFloat);
  const at::Tensor unit32 = unit_emb_sum.to(at::kFloat).contiguous();
  const at::Tensor delta = shift_to_min(act_range, shift);
  const at::Tensor weight = (2 * grad_cross_sq_at_min).to(at::kFloat).contiguous();
  const CrossGrad grad{cross32.const_data_ptr<float>(), cross32.stride(0), cross32.stride(1),
                       unit32.const_data_ptr<float>(), delta.const_data_ptr<float>(), weight.const_data_ptr<float>()};
  const at::Tensor order = entry_order.contiguous();
  const KeptOrder kept(order.data_ptr<int32_t>(), nnz);  // read, not written
  return csr_backward_cpu(crow_indices, col_indices, values, emb, num_latents, shift, act_range, grad, grad_moments,
                          grad_range, &kept, op);
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CPU, m) {
  m.impl("monoscore_stats_backward", &monoscore_stats_backward_cpu);
  m.impl("monoscore_stats_csr_backward", &monoscore_stats_csr_backward_cpu);
  m.impl("monoloss_stats_csr_backward", &monoloss_stats_csr_backward_cpu);
}

}  // namespace monoloss_kernels
