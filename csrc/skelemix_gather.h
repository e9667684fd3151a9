// skelemix::skelemix_gather: R SkeleMix batches in one pass (paste partner fragments into x).
#pragma once

#include <ATen/core/Tensor.h>

namespace skelemix {

// Caller-error checks of shapes, dtypes and devices with readable messages, run by every backend first.
void check_skelemix_gather_args(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& joints,
                                const at::Tensor& span, int64_t block);

// Value checks: partner in [0, N), 0 <= start <= end <= ceil(T / block). Reads partner and span on the host,
// so for CUDA tensors this is one small device-to-host copy (a stream sync).
void check_skelemix_gather_values(const at::Tensor& partner, const at::Tensor& span, int64_t N, int64_t T,
                                  int64_t block);

inline int64_t num_blocks(int64_t T, int64_t block) { return (T + block - 1) / block; }

}  // namespace skelemix
