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
#include <c10/util/Exception.h>

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

// Fewest entries per thread worth a parallel pass over the entries.
constexpr int64_t kEntryPassGrain = 16384;

// How many row ranges a parallel pass over `count` entries splits into.
inline int64_t entry_pass_parts(int64_t count) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count / kEntryPassGrain));
}

// Refuses a crow_indices that does not run from 0 to nnz in non-decreasing
// steps: the kernels index the entries and split the rows by it.
inline void check_crow(const int64_t* crow, int64_t N, int64_t nnz, const char* op) {
  TORCH_CHECK_VALUE(crow[0] == 0 && crow[N] == nnz, op, ": crow_indices must run from 0 to nnz=", nnz);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_VALUE(crow[n] <= crow[n + 1], op, ": crow_indices must be non-decreasing");
  }
}

// A counting sort by latent, parallel over row ranges of about equal numbers of
// entries: each range counts its latents, one scan over (latent, range) gives
// each range its place within every latent, and each range scatters its
// entries there, so rows stay ascending whatever the number of threads. The
// caller has checked that crow is non-decreasing and cols lie in [0, M).
inline void sort_block_by_latent(const int64_t* crow, const int64_t* cols, int64_t row_begin, int64_t row_end,
                                 int64_t M, LatentOrder& order) {
  const int64_t first = crow[row_begin], count = crow[row_end] - first;
  const int64_t parts = entry_pass_parts(count);
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

// Tile t of the unit embeddings of rows [row_base, row_base + rows): their dims
// [t·kTileWidth, (t + 1)·kTileWidth), zero past d, into `tile` (rows x
// kTileWidth, 64-byte aligned so that a row is four cache lines). Adds the
// tile's column sums into unit_sum (d, float64) unless it is null. Each thread
// builds the tile it reads into its own buffer: the tile is then in that core's
// L2 when the entries start reading it, and no all-tiles copy is written.
MONOLOSS_VECTOR_CLONES
void build_unit_tile(const float* __restrict__ emb, const float* __restrict__ inv_norm, int64_t row_base,
                     int64_t rows, int64_t d, int64_t t, float* __restrict__ tile, double* __restrict__ unit_sum) {
  const int64_t dim0 = t * kTileWidth, width = std::min(kTileWidth, d - dim0);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerPartial) {
    LineVec partial[kTileLines] = {};
    for (int64_t r = r0; r < std::min(r0 + kRowsPerPartial, rows); ++r) {
      const float* src = emb + (row_base + r) * d + dim0;
      const float scale = inv_norm[row_base + r];
      for (int64_t l = 0; l < kTileLines; ++l) {
        const int64_t line_width = width - l * kLineFloats;
        LineVec unit = {};
        if (line_width >= kLineFloats) {
          unit = load_line(src + l * kLineFloats) * scale;
        } else {
          for (int64_t i = 0; i < line_width; ++i) unit[i] = src[l * kLineFloats + i] * scale;
        }
        store_line(tile + r * kTileWidth + l * kLineFloats, unit);
        partial[l] += unit;
      }
    }
    if (unit_sum == nullptr) continue;
    for (int64_t i = 0; i < width; ++i) unit_sum[dim0 + i] += partial[i / kLineFloats][i % kLineFloats];
  }
}

}  // namespace

}  // namespace monoloss_kernels
