// CPU kernels of skelemix::mask_pool and skelemix::_mask_pool_backward.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "../mask_pool.h"

namespace skelemix {
namespace {

constexpr int kLanes = 16;

// Rows (b, c) per task: about 32k cells, so small inputs stay on one thread.
int64_t grain_rows(int64_t cells) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cells, 1)); }

// x: (B*C rows, cells) contiguous; mask: (G, cells); count[g] = True cells of mask g; out: (B, 2, C).
template <typename scalar_t>
void mask_pool_forward_kernel_impl(const scalar_t* x, const bool* mask, const int64_t* count, scalar_t* out,
                                   int64_t B, int64_t C, int64_t cells, int64_t per_group) {
  // acc_type on CPU is double for float and double, float for half and bfloat16.
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  at::parallel_for(0, B * C, grain_rows(cells), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C, g = b / per_group;
      const scalar_t* xr = x + row * cells;
      const bool* m = mask + g * cells;
      // Branch-free sums in kLanes independent accumulators, so the compiler vectorises the loop.
      acc_t in_lanes[kLanes] = {}, out_lanes[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= cells; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const acc_t v = static_cast<acc_t>(xr[j + l]);
          const acc_t w = m[j + l] ? acc_t(1) : acc_t(0);
          in_lanes[l] += v * w;
          out_lanes[l] += v - v * w;
        }
      }
      for (; j < cells; ++j) (m[j] ? in_lanes[0] : out_lanes[0]) += static_cast<acc_t>(xr[j]);
      acc_t sum_in = 0, sum_out = 0;
      for (int l = 0; l < kLanes; ++l) sum_in += in_lanes[l], sum_out += out_lanes[l];
      const int64_t n_in = count[g], n_out = cells - n_in;
      // An empty region pools to 0 (its sum is 0; divide by 1).
      out[(b * 2) * C + c] = static_cast<scalar_t>(sum_in / static_cast<acc_t>(std::max<int64_t>(n_in, 1)));
      out[(b * 2 + 1) * C + c] = static_cast<scalar_t>(sum_out / static_cast<acc_t>(std::max<int64_t>(n_out, 1)));
    }
  });
}

// grad: (B, 2, C) contiguous; grad_x: (B*C rows, cells). Each cell gets its region's grad / region size.
template <typename scalar_t>
void mask_pool_backward_kernel_impl(const scalar_t* grad, const bool* mask, const int64_t* count, scalar_t* grad_x,
                                    int64_t B, int64_t C, int64_t cells, int64_t per_group) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  at::parallel_for(0, B * C, grain_rows(cells), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C, g = b / per_group;
      const bool* m = mask + g * cells;
      const int64_t n_in = count[g], n_out = cells - n_in;
      const scalar_t g_in = static_cast<scalar_t>(
          static_cast<acc_t>(grad[(b * 2) * C + c]) / static_cast<acc_t>(std::max<int64_t>(n_in, 1)));
      const scalar_t g_out = static_cast<scalar_t>(
          static_cast<acc_t>(grad[(b * 2 + 1) * C + c]) / static_cast<acc_t>(std::max<int64_t>(n_out, 1)));
      scalar_t* gr = grad_x + row * cells;
      for (int64_t j = 0; j < cells; ++j) gr[j] = m[j] ? g_in : g_out;
    }
  });
}

at::Tensor mask_pool_forward_kernel(const at::Tensor& x_, const at::Tensor& mask_) {
  check_mask_pool_args(x_, mask_);
  TORCH_INTERNAL_ASSERT(x_.device().is_cpu());
  const int64_t B = x_.size(0), C = x_.size(1), cells = x_.size(2) * x_.size(3), G = mask_.size(0);
  // No cells: both regions are empty and pool to 0. No rows: nothing to compute.
  if (x_.numel() == 0) return at::zeros({B, 2, C}, x_.options());
  const at::Tensor x = x_.contiguous(), mask = mask_.contiguous();
  const at::Tensor count = mask_true_counts(mask);
  at::Tensor out = at::empty({B, 2, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mask_pool_cpu", [&] {
    mask_pool_forward_kernel_impl<scalar_t>(x.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
                                            count.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), B,
                                            C, cells, B / G);
  });
  return out;
}

at::Tensor mask_pool_backward_kernel(const at::Tensor& grad_, const at::Tensor& mask_) {
  check_mask_pool_backward_args(grad_, mask_);
  TORCH_INTERNAL_ASSERT(grad_.device().is_cpu());
  const int64_t B = grad_.size(0), C = grad_.size(2), T = mask_.size(1), V = mask_.size(2), G = mask_.size(0);
  at::Tensor grad_x = at::empty({B, C, T, V}, grad_.options());
  if (grad_x.numel() == 0) return grad_x;
  // Autograd often passes expanded (stride-0) grads.
  const at::Tensor grad = grad_.contiguous(), mask = mask_.contiguous();
  const at::Tensor count = mask_true_counts(mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mask_pool_backward_cpu", [&] {
    mask_pool_backward_kernel_impl<scalar_t>(grad.const_data_ptr<scalar_t>(), mask.const_data_ptr<bool>(),
                                             count.const_data_ptr<int64_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                                             B, C, T * V, B / G);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(skelemix, CPU, m) {
  m.impl("mask_pool", &mask_pool_forward_kernel);
  m.impl("_mask_pool_backward", &mask_pool_backward_kernel);
}

}  // namespace skelemix
