// CUDA kernels of skelemix::mask_pool and skelemix::_mask_pool_backward.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../mask_pool.h"
#include "helpers.cuh"

namespace skelemix {
namespace {

using cuda::block_sum;

// One block per (b, c) row (grid-stride over rows): threads stride over the row's cells, then the block
// reduces the two region sums. x: (rows, cells) contiguous; mask: (G, cells); out: (B, 2, C).
template <typename scalar_t, typename acc_t>
__global__ void mask_pool_forward_kernel_impl(const scalar_t* __restrict__ x, const bool* __restrict__ mask,
                                              const int64_t* __restrict__ count, scalar_t* __restrict__ out,
                                              int64_t rows, int64_t C, int64_t cells, int64_t per_group) {
  __shared__ acc_t shared[32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / C, c = row % C, g = b / per_group;
    const scalar_t* xr = x + row * cells;
    const bool* m = mask + g * cells;
    acc_t sum_in = 0, sum_out = 0;
    for (int64_t j = threadIdx.x; j < cells; j += blockDim.x) {
      const acc_t v = static_cast<acc_t>(xr[j]);
      if (m[j]) sum_in += v; else sum_out += v;
    }
    sum_in = block_sum(sum_in, shared);
    sum_out = block_sum(sum_out, shared);
    if (threadIdx.x == 0) {
      const int64_t n_in = count[g], n_out = cells - n_in;
      // An empty region pools to 0 (its sum is 0; divide by 1).
      out[(b * 2) * C + c] = static_cast<scalar_t>(sum_in / static_cast<acc_t>(n_in > 0 ? n_in : 1));
      out[(b * 2 + 1) * C + c] = static_cast<scalar_t>(sum_out / static_cast<acc_t>(n_out > 0 ? n_out : 1));
    }
  }
}

// grad_x: each cell gets its region's grad / region size. Grid: y strides over the (b, c) rows, x over the
// row's cells, so the per-row values (mask row, the two scaled grads) are computed once per row and the
// per-element work is one mask load and a select: no 64-bit divisions per element.
template <typename scalar_t, typename acc_t>
__global__ void mask_pool_backward_kernel_impl(const scalar_t* __restrict__ grad, const bool* __restrict__ mask,
                                               const int64_t* __restrict__ count, scalar_t* __restrict__ grad_x,
                                               int64_t rows, int64_t C, int64_t cells, int64_t per_group) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t b = row / C, c = row % C, g = b / per_group;
    const int64_t n_in = count[g], n_out = cells - n_in;
    const scalar_t g_in = static_cast<scalar_t>(static_cast<acc_t>(grad[(b * 2) * C + c]) /
                                                static_cast<acc_t>(n_in > 0 ? n_in : 1));
    const scalar_t g_out = static_cast<scalar_t>(static_cast<acc_t>(grad[(b * 2 + 1) * C + c]) /
                                                 static_cast<acc_t>(n_out > 0 ? n_out : 1));
    const bool* m = mask + g * cells;
    scalar_t* dst = grad_x + row * cells;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cells;
         j += static_cast<int64_t>(blockDim.x) * gridDim.x) {
      dst[j] = m[j] ? g_in : g_out;
    }
  }
}

at::Tensor mask_pool_forward_kernel(const at::Tensor& x_, const at::Tensor& mask_) {
  check_mask_pool_args(x_, mask_);
  TORCH_INTERNAL_ASSERT(x_.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t B = x_.size(0), C = x_.size(1), cells = x_.size(2) * x_.size(3), G = mask_.size(0);
  if (x_.numel() == 0) return at::zeros({B, 2, C}, x_.options());
  const at::Tensor x = x_.contiguous(), mask = mask_.contiguous();
  const at::Tensor count = mask_true_counts(mask);
  at::Tensor out = at::empty({B, 2, C}, x.options());
  const int64_t rows = B * C;
  const int threads = cuda::reduction_threads(cells);
  const unsigned int blocks = cuda::capped_blocks(rows, 1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mask_pool_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;  // float for float/half/bfloat16, double for double
    mask_pool_forward_kernel_impl<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), count.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), rows, C, cells, B / G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor mask_pool_backward_kernel(const at::Tensor& grad_, const at::Tensor& mask_) {
  check_mask_pool_backward_args(grad_, mask_);
  TORCH_INTERNAL_ASSERT(grad_.device().is_cuda());
  const c10::cuda::CUDAGuard guard(grad_.device());
  const int64_t B = grad_.size(0), C = grad_.size(2), T = mask_.size(1), V = mask_.size(2), G = mask_.size(0);
  at::Tensor grad_x = at::empty({B, C, T, V}, grad_.options());
  if (grad_x.numel() == 0) return grad_x;
  // Autograd often passes expanded (stride-0) grads.
  const at::Tensor grad = grad_.contiguous(), mask = mask_.contiguous();
  const at::Tensor count = mask_true_counts(mask);
  const int64_t rows = B * C, cells = T * V;
  const int threads = cuda::reduction_threads(cells);
  // x covers a row's cells, y the rows (capped: the kernel strides over the rest).
  const dim3 blocks(cuda::capped_blocks(cells, threads), cuda::capped_blocks(rows, 1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mask_pool_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    mask_pool_backward_kernel_impl<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), count.const_data_ptr<int64_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), rows, C, cells, B / G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(skelemix, CUDA, m) {
  m.impl("mask_pool", &mask_pool_forward_kernel);
  m.impl("_mask_pool_backward", &mask_pool_backward_kernel);
}

}  // namespace skelemix
