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

#include "buffer_pool.h"
#include "vectorize.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace monoloss_kernels {

constexpr int64_t kTileWidth = 64;  // dims per tile row: four cache lines
constexpr int64_t kTileLines = kTileWidth / kLineFloats;
// Vectors of W floats per tile row, in the kernels templated on W (vectorize.h).
template <int W>
constexpr int kTileVecs = kTileWidth / W;
constexpr int64_t kBlockRows = 8192;
// How many entries ahead the kernels fetch tile rows: a tile row is four lines
// the hardware prefetcher cannot predict (the rows are in no order across
// latents); 8 entries cover the L2 latency (~15% faster at the shapes above).
constexpr int64_t kPrefetchEntries = 8;

// The stored entries of rows [row_begin, row_end) sorted by latent, rows
// ascending within a latent, with their values. The per-entry arrays live in
// pooled buffers (buffer_pool.h): fresh ones cost ~1200 page faults a call at
// N=4096, k=64.
template <typename value_t>
struct LatentOrder {
  std::vector<int64_t> offsets;  // (M + 1): latent j's entries are [offsets[j], offsets[j + 1])
  int32_t* rows = nullptr;       // each entry's row - row_begin; kPrefetchEntries more (0) for the prefetch
  int32_t* source = nullptr;     // each entry's index - crow[row_begin] into col_indices and values
  value_t* values = nullptr;     // each entry's value
  at::Tensor buffer;             // holds the three arrays
};

// The sorted entries of every block, kept by MonoLoss's forward for its backward:
// an int32 (3, nnz) tensor whose rows are each sorted entry's row - its block's
// first row, its index - its block's first entry, and its latent; a block's
// entries keep the places they have in col_indices. The row of rows comes
// first, so the kernels' reads kPrefetchEntries past its end stay inside the
// tensor.
struct KeptOrder {
  int32_t* rows;
  int32_t* source;
  int32_t* latents;
  explicit KeptOrder(int32_t* order, int64_t nnz) : rows(order), source(order + nnz), latents(order + 2 * nnz) {}
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

// Latents per bucket of the sort's first scatter.
constexpr int64_t kBucketLatents = 128;

// Uninitialised arrays of count0 T0s, count1 T1s, ... in one pooled buffer,
// each 64-byte aligned: returns the buffer and sets the pointers.
template <typename... T>
at::Tensor pooled_arrays(std::pair<T**, int64_t>... arrays) {
  const auto aligned = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t total = (aligned(arrays.second * int64_t{sizeof(T)}) + ... + 0);
  at::Tensor buffer = pooled_empty({total}, at::TensorOptions().dtype(at::kByte));
  uint8_t* next = buffer.data_ptr<uint8_t>();
  ((*arrays.first = reinterpret_cast<T*>(next), next += aligned(arrays.second * int64_t{sizeof(T)})), ...);
  return buffer;
}

// A counting sort by latent in two scatters, parallel over row ranges of about
// equal numbers of entries. Scattering every entry straight to its latent's
// place writes to M places at once, each write a cache miss (2.2 ms of the
// 11 ms statistics at N=4096, M=8192, k=64 on the dev Xeon); here each range
// first moves its entries, rows in order, to their bucket of kBucketLatents
// latents (M / kBucketLatents write streams, which the cache holds), then each
// bucket is scattered to its latents' places within its own cache-sized region.
// Rows stay ascending within a latent whatever the number of threads. The
// caller has checked that crow is non-decreasing and cols lie in [0, M).
// With `kept`, the rows and sources go to its arrays (and the latents too),
// at the block's places there.
template <typename value_t>
void sort_block_by_latent(const int64_t* crow, const int64_t* cols, const value_t* values, int64_t row_begin,
                          int64_t row_end, int64_t M, LatentOrder<value_t>& order, const KeptOrder* kept = nullptr) {
  const int64_t first = crow[row_begin], count = crow[row_end] - first;
  TORCH_CHECK_VALUE(count < std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 stored entries per ",
                    kBlockRows, " rows of acts");
  const int64_t parts = entry_pass_parts(count);
  const int64_t num_buckets = (M + kBucketLatents - 1) / kBucketLatents;
  std::vector<int64_t> part_rows(parts + 1, row_end);
  for (int64_t p = 0; p < parts; ++p) {
    part_rows[p] = std::lower_bound(crow + row_begin, crow + row_end, first + count * p / parts) - crow;
  }
  part_rows[0] = row_begin;

  // Entries per latent and range; from them each latent's place, and where each
  // range's entries start within each bucket.
  std::vector<int64_t> latent_counts(parts * M, 0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* counts = latent_counts.data() + p * M;
      for (int64_t e = crow[part_rows[p]]; e < crow[part_rows[p + 1]]; ++e) ++counts[cols[e]];
    }
  });
  order.offsets.resize(M + 1);
  std::vector<int64_t> bucket_next(parts * num_buckets);
  int64_t position = 0;
  for (int64_t b = 0; b < num_buckets; ++b) {
    const int64_t j0 = b * kBucketLatents, j1 = std::min(M, j0 + kBucketLatents);
    for (int64_t p = 0; p < parts; ++p) {
      bucket_next[p * num_buckets + b] = position;
      for (int64_t j = j0; j < j1; ++j) position += latent_counts[p * M + j];
    }
  }
  position = 0;
  for (int64_t j = 0; j < M; ++j) {
    order.offsets[j] = position;
    for (int64_t p = 0; p < parts; ++p) position += latent_counts[p * M + j];
  }
  order.offsets[M] = position;

  // One record per entry while staged: one write stream per bucket (separate
  // arrays made four, and ran 1.3x slower).
  struct Staged {
    uint16_t latent;  // - the bucket's first latent
    uint16_t row;     // - row_begin
    int32_t source;
    value_t value;
  };
  static_assert(kBucketLatents <= 65536 && kBlockRows <= 65536, "Staged holds both in 16 bits");
  Staged* staged;
  const at::Tensor staging = pooled_arrays(std::pair{&staged, count});
  int32_t* latents = nullptr;
  if (kept != nullptr) {
    order.buffer = pooled_arrays(std::pair{&order.values, count});
    order.rows = kept->rows + first;
    order.source = kept->source + first;
    latents = kept->latents + first;
  } else {
    order.buffer = pooled_arrays(std::pair{&order.rows, count + kPrefetchEntries}, std::pair{&order.source, count},
                                 std::pair{&order.values, count});
    std::fill(order.rows + count, order.rows + count + kPrefetchEntries, 0);
  }

  // 1. Each range's entries, rows in order, to their buckets.
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* next = bucket_next.data() + p * num_buckets;
      for (int64_t n = part_rows[p]; n < part_rows[p + 1]; ++n) {
        for (int64_t e = crow[n]; e < crow[n + 1]; ++e) {
          const int64_t bucket = cols[e] / kBucketLatents;
          staged[next[bucket]++] = {static_cast<uint16_t>(cols[e] - bucket * kBucketLatents),
                                    static_cast<uint16_t>(n - row_begin), static_cast<int32_t>(e - first), values[e]};
        }
      }
    }
  });
  // 2. Each bucket's entries, in the order staged, to their latents' places,
  // which are fetched first: a bucket's places are one region, whose lines
  // the scatter would otherwise fetch one miss at a time.
  at::parallel_for(0, num_buckets, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> next(kBucketLatents);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kBucketLatents, j1 = std::min(M, j0 + kBucketLatents);
      const int64_t q0 = order.offsets[j0], q1 = order.offsets[j1];
      for (int64_t q = q0; q < q1; q += kLineFloats) {  // 16 int32 a line
        __builtin_prefetch(order.rows + q, 1);
        __builtin_prefetch(order.source + q, 1);
      }
      for (int64_t q = q0; q < q1; q += 64 / int64_t{sizeof(value_t)}) __builtin_prefetch(order.values + q, 1);
      std::copy(order.offsets.begin() + j0, order.offsets.begin() + j1, next.begin());
      for (int64_t q = q0; q < q1; ++q) {
        const Staged entry = staged[q];
        const int64_t p = next[entry.latent]++;
        order.rows[p] = entry.row;
        order.source[p] = entry.source;
        order.values[p] = entry.value;
        if (latents != nullptr) latents[p] = static_cast<int32_t>(j0 + entry.latent);
      }
    }
  });
}

// The order of rows [row_begin, row_end) as the forward kept it: the offsets
// counted from the latents, the values gathered. Refuses an order that is not
// one (sorted latents in [0, M), rows and sources inside the block): the
// kernels index the tiles and the entries with it.
template <typename value_t>
void kept_block_order(const int64_t* crow, const value_t* values, int64_t row_begin, int64_t row_end, int64_t M,
                      const KeptOrder& kept, LatentOrder<value_t>& order) {
  const int64_t first = crow[row_begin], count = crow[row_end] - first, block_rows = row_end - row_begin;
  order.rows = kept.rows + first;
  order.source = kept.source + first;
  order.buffer = pooled_arrays(std::pair{&order.values, count});
  const int32_t* latents = kept.latents + first;
  order.offsets.assign(M + 1, 0);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t j = latents[p];
    TORCH_CHECK_VALUE(j >= 0 && j < M && (p == 0 || j >= latents[p - 1]) && order.rows[p] >= 0 &&
                          order.rows[p] < block_rows && order.source[p] >= 0 && order.source[p] < count,
                      "entry_order is not a valid order of these entries (the one monoloss_stats_csr returned)");
    ++order.offsets[j + 1];
  }
  for (int64_t j = 0; j < M; ++j) order.offsets[j + 1] += order.offsets[j];
  at::parallel_for(0, count, kEntryPassGrain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) order.values[p] = values[first + order.source[p]];
  });
}

// δ = act_min - shift per latent, float32: the shift that takes MonoLoss's fused
// squared norms (forward and backward) to each latent's minimum, as finalize
// passes it to shifted_sq_norms.
inline at::Tensor shift_to_min(const at::Tensor& act_range, const at::Tensor& shift) {
  return (act_range.select(0, 0).to(at::kDouble) - shift.to(at::kDouble)).to(at::kFloat).contiguous();
}

// Fetches the tile rows of entries p + kPrefetchEntries (rows is padded for it,
// or is followed by the rest of a KeptOrder).
MONOLOSS_VECTOR_INLINE void prefetch_tile_row(const float* tile, const int32_t* rows, int64_t p) {
  const float* row = tile + int64_t{rows[p + kPrefetchEntries]} * kTileWidth;
  for (int64_t l = 0; l < kTileLines; ++l) __builtin_prefetch(row + l * kLineFloats);
}

namespace {

// Rows summed in float32 before their float64 total (as the dense kernel's chunks).
constexpr int64_t kRowsPerPartial = 64;

// Tile t of the unit embeddings of rows [row_base, row_base + rows): their dims
// [t·kTileWidth, (t + 1)·kTileWidth), zero past d, into `tile` (rows x
// kTileWidth, 64-byte aligned so that a row is four cache lines), and the
// tile's column sums into tile_sum (kTileWidth float64, zero past d), unless it
// is null. Each thread builds the tile it reads into its own buffer: the tile
// is then in that core's L2 when the entries start reading it, and no
// all-tiles copy is written.
template <int W>
MONOLOSS_VECTOR_INLINE void build_unit_tile_at(const float* __restrict__ emb, const float* __restrict__ inv_norm,
                                               int64_t row_base, int64_t rows, int64_t d, int64_t t,
                                               float* __restrict__ tile, double* __restrict__ tile_sum) {
  const int64_t dim0 = t * kTileWidth, width = std::min(kTileWidth, d - dim0);
  if (tile_sum != nullptr) std::fill(tile_sum, tile_sum + kTileWidth, 0.0);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerPartial) {
    Vec<W> partial[kTileVecs<W>] = {};
    for (int64_t r = r0; r < std::min(r0 + kRowsPerPartial, rows); ++r) {
      const float* src = emb + (row_base + r) * d + dim0;
      const float scale = inv_norm[row_base + r];
      for (int64_t v = 0; v < kTileVecs<W>; ++v) {
        const int64_t vec_width = width - v * W;
        Vec<W> unit = {};
        if (vec_width >= W) {
          unit = load_vec<W>(src + v * W) * scale;
        } else {
          for (int64_t i = 0; i < vec_width; ++i) unit[i] = src[v * W + i] * scale;
        }
        store_vec<W>(tile + r * kTileWidth + v * W, unit);
        partial[v] += unit;
      }
    }
    if (tile_sum == nullptr) continue;
    for (int64_t i = 0; i < width; ++i) tile_sum[i] += partial[i / W][i % W];
  }
}

inline void build_unit_tile(const float* emb, const float* inv_norm, int64_t row_base, int64_t rows, int64_t d,
                            int64_t t, float* tile, double* tile_sum) {
  with_vector_width([&](auto width) MONOLOSS_VECTOR_LAMBDA {
    build_unit_tile_at<decltype(width)::value>(emb, inv_norm, row_base, rows, d, t, tile, tile_sum);
  });
}

}  // namespace

}  // namespace monoloss_kernels
