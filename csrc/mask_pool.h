// skelemix::mask_pool: mean of x over the True and the False cells of a (T, V) mask.
#pragma once

#include <ATen/core/Tensor.h>

namespace skelemix {

// Caller-error checks with readable messages, run by every backend before touching data.
void check_mask_pool_args(const at::Tensor& x, const at::Tensor& mask);
void check_mask_pool_backward_args(const at::Tensor& grad, const at::Tensor& mask);

// True cells of every mask, (G,) int64 on the mask's device.
at::Tensor mask_true_counts(const at::Tensor& mask);

}  // namespace skelemix
