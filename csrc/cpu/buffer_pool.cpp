#include "buffer_pool.h"

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cstdlib>
#include <deque>
#include <iterator>
#include <mutex>

namespace monoloss_kernels {
namespace {

// Sizes are rounded up to this, so that buffers whose sizes differ a little
// from step to step (N, nnz) are still reused.
constexpr size_t kRoundBytes = size_t{1} << 20;
// A cache line: what at::empty guarantees, and what the tiles rely on.
constexpr size_t kAlignment = 64;

// Freed buffers, oldest first. It holds a handful of them (each at least
// kMinPooledBytes, kMaxPooledBytes in all), so a linear scan finds one.
class BufferPool {
 public:
  void* take(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // the most recently freed first
        if (it->bytes != bytes) continue;
        void* data = it->data;
        free_.erase(std::next(it).base());
        kept_ -= bytes;
        return data;
      }
    }
    void* data = std::aligned_alloc(kAlignment, bytes);  // bytes: a multiple of kRoundBytes
    TORCH_CHECK(data != nullptr, "monoloss_kernels: out of CPU memory allocating ", bytes, " bytes");
    return data;
  }

  // Keeps the buffer; frees the oldest kept ones if the pool would exceed
  // kMaxPooledBytes (the newest sizes are those of the running workload).
  void give_back(void* data, size_t bytes) {
    std::deque<Buffer> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back({data, bytes});
      kept_ += bytes;
      while (kept_ > kMaxPooledBytes) {
        evicted.push_back(free_.front());
        kept_ -= free_.front().bytes;
        free_.pop_front();
      }
    }
    for (const Buffer& buffer : evicted) std::free(buffer.data);
  }

  size_t release() {
    std::deque<Buffer> freed;
    size_t bytes = 0;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      freed.swap(free_);
      bytes = kept_;
      kept_ = 0;
    }
    for (const Buffer& buffer : freed) std::free(buffer.data);
    return bytes;
  }

 private:
  struct Buffer {
    void* data;
    size_t bytes;
  };
  std::mutex mutex_;
  std::deque<Buffer> free_;
  size_t kept_ = 0;
};

// Never destroyed: a tensor may be freed during static destruction.
BufferPool& pool() {
  static auto* instance = new BufferPool();
  return *instance;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu(), "pooled_empty: CPU tensors only");
  const size_t bytes =
      static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinPooledBytes) return at::empty(sizes, options);
  const size_t rounded = (bytes + kRoundBytes - 1) / kRoundBytes * kRoundBytes;
  void* data = pool().take(rounded);
  return at::from_blob(
      data, sizes, [rounded](void* freed) { pool().give_back(freed, rounded); }, options);
}

int64_t release_pooled_buffers() { return static_cast<int64_t>(pool().release()); }

TORCH_LIBRARY_FRAGMENT(monoloss_kernels, m) {
  // Frees the CPU buffers kept for reuse (csrc/cpu/buffer_pool.h); returns the bytes freed.
  m.def("release_pooled_buffers() -> int", &release_pooled_buffers);
}

}  // namespace monoloss_kernels
