// Small CUDA helpers shared by the kernels in csrc/cuda/.
#pragma once

#include <algorithm>
#include <cstdint>

namespace skelemix::cuda {

constexpr int64_t kMaxBlocks = 65535;  // grid cap; kernels cover the rest with a grid-stride loop

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for `n` independent items of `per_block` each, capped at kMaxBlocks (at least 1).
inline unsigned int capped_blocks(int64_t n, int64_t per_block) {
  return static_cast<unsigned int>(std::clamp<int64_t>(ceil_div(n, per_block), 1, kMaxBlocks));
}

// Threads for a row reduction over `cells` items: a whole number of warps, 32..256.
inline int reduction_threads(int64_t cells) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(cells, 32) * 32, 32, 256));
}

// 64-bit grid-stride loop over [0, n).
#define SKELEMIX_CUDA_1D_KERNEL_LOOP(i, n)                                                       \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);         \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over the block, valid in thread 0. blockDim.x must be a multiple of 32 (<= 1024); `shared`
// holds 32 values. Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = (threadIdx.x < blockDim.x / 32) ? shared[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // `shared` may be reused right after
  return v;
}

}  // namespace skelemix::cuda
