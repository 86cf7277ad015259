// Recycled memory for the large CPU tensors the kernels return or use as
// workspace.
//
// A training step allocates the same large buffers every step -- the
// statistics' cross (M x d), its gradient, the dense backward's N x M result --
// and memory fresh from the OS costs a page fault and a zeroed page per 4 KiB:
// about 10k faults, ~5 ms of a 35 ms TopK MonoLoss step at B=4096, M=8192,
// d=768 on the 2-core dev machine (glibc returns such buffers to the OS when
// they are freed). Buffers of at least kMinPooledBytes come from, and go back
// to, a process-wide pool that keeps at most kMaxPooledBytes of freed memory
// (the oldest buffers go first); smaller ones come from at::empty.
// torch.ops.monoloss_kernels.release_pooled_buffers() (in Python
// monoloss_kernels.release_cpu_buffers()) frees what it keeps.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace monoloss_kernels {

constexpr size_t kMinPooledBytes = size_t{1} << 20;
constexpr size_t kMaxPooledBytes = size_t{256} << 20;

// An uninitialised contiguous CPU tensor, like at::empty(sizes, options).
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every buffer the pool keeps; returns how many bytes it freed.
int64_t release_pooled_buffers();

}  // namespace monoloss_kernels
