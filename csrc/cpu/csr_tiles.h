// What the two CSR kernels (statistics and their backward) share: the stored
// entries of a block of rows sorted by latent, and that block's unit
// embeddings cut into tiles of kTileWidth dims.
//
// Both kernels walk every latent's entries once per tile, each entry reading its
// row of the tile: a tile (kBlockRows x kTileWidth float32, 2 MiB) stays in a
// core's L2 while all the latents read it, so the O(nnz·d) work costs one L2
// read per entry and cache line. Tuned on the 2-core dev Xeon (2 MiB of L2 per
// core) at N=4096, M=8192, k=64, d=768 and N=16384, M=16384, k=32: four cache
// lines per row read 2x faster than one (fewer passes over the entries, four
// adjacent lines per load), and 8192-row blocks beat 4096 (more entries per
// latent and block) and 16384 (a 4 MiB tile leaves L2).
#pragma once

#include "vectorize.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace monoloss_kernels {

constexpr int64_t kTileWidth = 64;  // dims per tile row: four cache lines
constexpr int64_t kTileLines = kTileWidth / kLineFloats;
constexpr int64_t kBlockRows = 8192;
// How many entries ahead the kernels fetch tile rows: a tile row is four lines
// the hardware prefetcher cannot predict (the rows are in no order across
// latents); 8 entries cover the L2 latency (~15% faster at the shapes above).
constexpr int64_t kPrefetchEntries = 8;

// The stored entries of rows [row_begin, row_end) sorted by latent, rows
// ascending within a latent.
struct LatentOrder {
  std::vector<int64_t> offsets;  // (M + 1): latent j's entries are [offsets[j], offsets[j + 1])
  std::vector<int32_t> rows;     // each entry's row - row_begin; kPrefetchEntries more (0) for the prefetch
  std::vector<int64_t> source;   // each entry's index into col_indices and values
};

// Fewest entries per thread worth a parallel sort.
constexpr int64_t kSortGrain = 16384;

// A counting sort by latent, parallel over row ranges of about equal numbers of
// entries: each range counts its latents, one scan over (latent, range) gives
// each range its place within every latent, and each range scatters its
// entries there, so rows stay ascending whatever the number of threads. The
// caller has checked that crow is non-decreasing and cols lie in [0, M).
inline void sort_block_by_latent(const int64_t* crow, const int64_t* cols, int64_t row_begin, int64_t row_end,
                                 int64_t M, LatentOrder& order) {
  const int64_t first = crow[row_begin], count = crow[row_end] - first;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count / kSortGrain));
  std::vector<int64_t> part_rows(parts + 1, row_end);
  for (int64_t p = 0; p < parts; ++p) {
    part_rows[p] = std::lower_bound(crow + row_begin, crow + row_end, first + count * p / parts) - crow;
  }
  part_rows[0] = row_begin;
  std::vector<int64_t> cursor(parts * M, 0);  // per range: counts, then next positions
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* counts = cursor.data() + p * M;
      for (int64_t e = crow[part_rows[p]]; e < crow[part_rows[p + 1]]; ++e) ++counts[cols[e]];
    }
  });
  order.offsets.resize(M + 1);
  int64_t position = 0;
  for (int64_t j = 0; j < M; ++j) {
    order.offsets[j] = position;
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t c = cursor[p * M + j];
      cursor[p * M + j] = position;
      position += c;
    }
  }
  order.offsets[M] = position;
  order.rows.assign(count + kPrefetchEntries, 0);
  order.source.resize(count);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* next = cursor.data() + p * M;
      for (int64_t n = part_rows[p]; n < part_rows[p + 1]; ++n) {
        for (int64_t e = crow[n]; e < crow[n + 1]; ++e) {
          const int64_t position = next[cols[e]]++;
          order.rows[position] = static_cast<int32_t>(n - row_begin);
          order.source[position] = e;
        }
      }
    }
  });
}

// Fetches the tile rows of entries p + kPrefetchEntries (rows is padded for it).
MONOLOSS_VECTOR_INLINE void prefetch_tile_row(const float* tile, const int32_t* rows, int64_t p) {
  const float* row = tile + int64_t{rows[p + kPrefetchEntries]} * kTileWidth;
  for (int64_t l = 0; l < kTileLines; ++l) __builtin_prefetch(row + l * kLineFloats);
}

namespace {

// Rows summed in float32 before their float64 total (as the dense kernel's chunks).
constexpr int64_t kRowsPerPartial = 64;

// Unit embedding rows [n0, n1) into the tiles (num_tiles, tile_rows, kTileWidth)
// of the block starting at row_base, zero-padded past d; adds their column sums
// into unit_sum (d, float64) unless it is null.
MONOLOSS_VECTOR_CLONES
void unit_tiles(const float* __restrict__ emb, const float* __restrict__ inv_norm, int64_t n0, int64_t n1,
                int64_t row_base, int64_t tile_rows, int64_t d, float* __restrict__ tiles,
                double* __restrict__ unit_sum) {
  const int64_t num_lines = (d + kLineFloats - 1) / kLineFloats, full_lines = d / kLineFloats;
  const int64_t padded = (d + kTileWidth - 1) / kTileWidth * kTileWidth;
  std::vector<float> partial(num_lines * kLineFloats);
  for (int64_t r0 = n0; r0 < n1; r0 += kRowsPerPartial) {
    std::fill(partial.begin(), partial.end(), 0.0f);
    for (int64_t n = r0; n < std::min(r0 + kRowsPerPartial, n1); ++n) {
      const float* row = emb + n * d;
      for (int64_t dim = 0; dim < padded; dim += kLineFloats) {
        const int64_t line = dim / kLineFloats;
        LineVec unit = {};
        if (line < full_lines) {
          unit = load_line(row + dim) * inv_norm[n];
        } else {
          for (int64_t i = 0; i < d - dim; ++i) unit[i] = row[dim + i] * inv_norm[n];
        }
        const int64_t tile = dim / kTileWidth;
        store_line(tiles + (tile * tile_rows + n - row_base) * kTileWidth + dim % kTileWidth, unit);
        if (line < num_lines) store_line(&partial[dim], load_line(&partial[dim]) + unit);
      }
    }
    if (unit_sum == nullptr) continue;
    for (int64_t i = 0; i < d; ++i) unit_sum[i] += partial[i];
  }
}

}  // namespace

}  // namespace monoloss_kernels
