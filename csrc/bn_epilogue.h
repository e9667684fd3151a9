// skelemix::bn_epilogue: BatchNorm, dropout, residual add and ReLU in one pass (skelemix.reference.bn_epilogue).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace skelemix {

// Backward, with invstd = rsqrt(var + eps), a = weight * invstd, xhat = (x - mean) * invstd, d = keep / (1 - p)
// (1 when p == 0), n = numel / C and sums over every element of channel c:
//   gu = relu ? (y <= 0 ? 0 : grad) : grad;   grad_residual = gu;   gp = gu * d;
//   grad_bias[c] = sum gp;   grad_weight[c] = sum gp * xhat;
//   grad_x = batch_stats ? a * (gp - grad_bias / n - xhat * grad_weight / n) : a * gp.
// A NaN y passes the gradient (NaN <= 0 is false), as in torch.relu's backward.

// Caller-error checks with readable messages, run by every backend before touching data.
void check_bn_epilogue_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& stats_mean,
                            const c10::optional<at::Tensor>& stats_var, const at::Tensor& seed, double eps, double p);
void check_bn_epilogue_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                     const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
                                     const at::Tensor& seed, double eps, double p);
void check_bn_epilogue_dropout_keep_args(const at::Tensor& seed, int64_t start, int64_t numel, double p);

// The accumulation dtype of x: float64 for float64, float32 otherwise (weight, bias and statistics use it).
at::ScalarType bn_epilogue_acc_type(const at::Tensor& x);

// Batch statistics over every dim but 1, in the accumulation dtype: (mean, biased var).
std::tuple<at::Tensor, at::Tensor> bn_epilogue_batch_stats(const at::Tensor& x);

// Counter-based dropout shared by every kernel (skelemix.reference.dropout_keep): element i is kept iff
// dropout_bits(i, k0, k1) >= dropout_threshold(p) (unsigned), with k0/k1 the low/high 32 bits of the seed.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

#if defined(__CUDACC__)
#define SKELEMIX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SKELEMIX_HOST_DEVICE inline
#endif

// Word 0 of Philox4x32-10 (Salmon et al., SC 2011; the generator of cuRAND and Triton) with key (k0, k1) and
// counter (lo, hi, 0, 0): Triton's tl.randint(seed, index) for index = hi * 2**32 + lo. The compiler folds the
// zero counter words and the unused outputs of the last round.
SKELEMIX_HOST_DEVICE uint32_t philox4x32_10_word0(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1) {
  uint32_t c0 = lo, c1 = hi, c2 = 0, c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    c1 = static_cast<uint32_t>(p1);
    c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c3 = static_cast<uint32_t>(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

SKELEMIX_HOST_DEVICE uint32_t dropout_bits(uint64_t i, uint32_t k0, uint32_t k1) {
  return philox4x32_10_word0(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), k0, k1);
}

}  // namespace skelemix
