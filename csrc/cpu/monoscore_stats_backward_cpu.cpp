// CPU backward of the statistics ops (the formula is derived in
// monoloss_kernels/_autograd.py), fused so that acts is read once:
//
//   dense: grad = Ê · G in one BLAS call (per row chunk it would re-read the
//          (d, M) matrix G from memory for every chunk: the product took 1.5x
//          longer at N=4096, M=8192, d=768), then one elementwise pass adds the moment
//          terms and the min/max tie shares. The tie counts come from a first
//          pass over acts.
//   CSR:   each stored entry gets ê[row] · G[:, latent] plus the same
//          per-entry terms: O(nnz·d). The dot products are summed over tiles
//          of 16 dims: Ê and Gᵀ regrouped as (tiles, N, 16) and (tiles, M, 16),
//          one tile of each stays in L2 while every entry reads it (reading
//          whole rows of Gᵀ from memory per entry was about 2x slower).
//
// Only the gradient with respect to acts (or the stored values) is computed
// here; the optional gradient with respect to emb stays in torch.
#include "../monoscore.h"
#include "vectorize.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace monoloss_kernels {
namespace {

constexpr int64_t kLatentGrain = 256;
constexpr int64_t kRowGrain = 64;
typedef float HalfVec __attribute__((vector_size(kTileWidth / 2 * sizeof(float))));

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

// The per-entry terms of one activation a (b = a - shift) of latent k.
inline float entry_terms(const LatentTerms& t, int64_t k, float a, float b, bool zero_row) {
  float g = t.sum[k] + b * t.sumsq[k];
  if (zero_row) g += t.zero_sum[k] + b * t.zero_sumsq[k];
  if (a == t.min[k]) g += t.min_share[k];
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

// Rows [n0, n1): dots[e] += ê_tile[row_e] · g_tile[col_e] for their entries.
MONOLOSS_VECTOR_CLONES
void add_tile_dots(const int64_t* __restrict__ crow, const int64_t* __restrict__ cols,
                   const float* __restrict__ unit_tile, const float* __restrict__ g_tile, int64_t n0,
                   int64_t n1, float* __restrict__ dots) {
  for (int64_t n = n0; n < n1; ++n) {
    const TileVec u = load_tile_row(unit_tile + n * kTileWidth);
    for (int64_t e = crow[n]; e < crow[n + 1]; ++e) {
      const TileVec p = u * load_tile_row(g_tile + cols[e] * kTileWidth);
      const HalfVec h = __builtin_shufflevector(p, p, 0, 1, 2, 3, 4, 5, 6, 7) +
                        __builtin_shufflevector(p, p, 8, 9, 10, 11, 12, 13, 14, 15);
      float sum = 0.0f;
      for (int i = 0; i < kTileWidth / 2; ++i) sum += h[i];
      dots[e] += sum;
    }
  }
}

// (tiles, rows, kTileWidth) from a (rows, d) matrix, zero-padded past d.
at::Tensor to_tiles(const at::Tensor& x) {
  const int64_t rows = x.size(0), d = x.size(1);
  const int64_t num_tiles = (d + kTileWidth - 1) / kTileWidth;
  return at::constant_pad_nd(x, {0, num_tiles * kTileWidth - d})
      .view({rows, num_tiles, kTileWidth})
      .permute({1, 0, 2})
      .contiguous();
}

}  // namespace

at::Tensor monoscore_stats_backward_cpu(const at::Tensor& acts, const at::Tensor& emb, const at::Tensor& shift,
                                        const at::Tensor& act_range, const at::Tensor& grad_cross,
                                        const at::Tensor& grad_moments, const at::Tensor& grad_range) {
  check_stats_inputs(acts, emb);
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

  at::Tensor grad = at::empty({N, M}, acts.options().dtype(at::kFloat));
  at::mm_out(grad, emb.to(at::kFloat) * inv_norm.unsqueeze(1), g_cross);  // (N, d) @ (d, M)
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

at::Tensor monoscore_stats_csr_backward_cpu(const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                            const at::Tensor& values, const at::Tensor& emb,
                                            int64_t num_latents, const at::Tensor& shift,
                                            const at::Tensor& act_range, const at::Tensor& grad_cross,
                                            const at::Tensor& grad_moments, const at::Tensor& grad_range) {
  check_csr_stats_inputs(crow_indices, col_indices, values, emb, num_latents);
  const int64_t N = emb.size(0), M = num_latents, nnz = values.size(0);
  const at::Tensor inv_norm = row_inv_norm(emb);
  const at::Tensor emb32 = emb.to(at::kFloat).contiguous();
  const at::Tensor crow_t = crow_indices.contiguous(), cols_t = col_indices.contiguous();
  const at::Tensor values32 = values.to(at::kFloat).contiguous();
  const at::Tensor shift32 = shift.to(at::kFloat).contiguous();
  const at::Tensor unit_tiles = to_tiles(emb32 * inv_norm.unsqueeze(1));  // (tiles, N, 16)
  const at::Tensor g_tiles = to_tiles(grad_cross.to(at::kFloat).t());        // (tiles, M, 16)
  const int64_t num_tiles = unit_tiles.size(0);
  const int64_t* crow = crow_t.const_data_ptr<int64_t>();
  const int64_t* cols = cols_t.const_data_ptr<int64_t>();
  const float* v = values32.const_data_ptr<float>();
  const float* inv = inv_norm.const_data_ptr<float>();

  // Ties: stored values equal to the extreme, plus the implicit zeros when the extreme is 0.
  std::vector<double> min_ties(M, 0.0), max_ties(M, 0.0), stored(M, 0.0);
  {
    const at::Tensor range = act_range.to(at::kFloat).contiguous();
    const float* lo = range.const_data_ptr<float>();
    const float* hi = lo + M;
    for (const auto e : c10::irange(nnz)) {
      const int64_t k = cols[e];
      stored[k] += 1;
      min_ties[k] += v[e] == lo[k];
      max_ties[k] += v[e] == hi[k];
    }
    for (const auto k : c10::irange(M)) {
      const double implicit_zeros = static_cast<double>(N) - stored[k];
      if (lo[k] == 0.0f) min_ties[k] += implicit_zeros;
      if (hi[k] == 0.0f) max_ties[k] += implicit_zeros;
    }
  }
  const LatentTerms terms = latent_terms(act_range, grad_moments, grad_range, min_ties, max_ties);

  at::Tensor grad = at::zeros({nnz}, values.options().dtype(at::kFloat));
  float* out = grad.data_ptr<float>();
  const float* u_ptr = unit_tiles.const_data_ptr<float>();
  const float* g_ptr = g_tiles.const_data_ptr<float>();
  const float* s = shift32.const_data_ptr<float>();
  at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t t = 0; t < num_tiles; ++t) {
      add_tile_dots(crow, cols, u_ptr + t * N * kTileWidth, g_ptr + t * M * kTileWidth, n0, n1, out);
    }
    for (int64_t n = n0; n < n1; ++n) {
      const bool zero_row = inv[n] == 0.0f;
      for (int64_t e = crow[n]; e < crow[n + 1]; ++e) {
        out[e] += entry_terms(terms, cols[e], v[e], v[e] - s[cols[e]], zero_row);
      }
    }
  });
  return grad.to(values.scalar_type());
}

TORCH_LIBRARY_IMPL(monoloss_kernels, CPU, m) {
  m.impl("monoscore_stats_backward", &monoscore_stats_backward_cpu);
  m.impl("monoscore_stats_csr_backward", &monoscore_stats_csr_backward_cpu);
}

}  // namespace monoloss_kernels
