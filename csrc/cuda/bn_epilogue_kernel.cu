// CUDA kernels of skelemix::bn_epilogue and skelemix::_bn_epilogue_backward (semantics: skelemix.reference.bn_epilogue;
// backward math: bn_epilogue.h). x is viewed as contiguous (N, C, L): row = n * C + c holds channel c of sample n,
// and element i = row * L + l is x's flat row-major index, the Philox counter of its dropout bits.
//
// Reductions are deterministic (no float atomics): one block per row writes the row's partial result to an
// (N, C) buffer, then one thread per channel combines its N rows in order.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../bn_epilogue.h"
#include "helpers.cuh"

namespace skelemix {
namespace {

using cuda::block_sum;

constexpr int kElementwiseThreads = 256;

// Dropout and ReLU settings shared by the forward and backward kernels. The seed stays on the device and is read
// by the kernel (no host sync, so the op can be captured in a CUDA graph).
template <typename acc_t>
struct Epilogue {
  const int64_t* seed;  // 1 element; read only when dropout
  uint32_t threshold;   // dropout_threshold(p)
  acc_t scale;          // 1 / (1 - p)
  bool dropout;         // p > 0
  bool relu;
};

struct DropoutKeys {
  uint32_t k0 = 0, k1 = 0;
};

template <typename acc_t>
__device__ __forceinline__ DropoutKeys load_keys(const Epilogue<acc_t>& e) {
  DropoutKeys k;
  if (e.dropout) {
    const uint64_t s = static_cast<uint64_t>(*e.seed);
    k.k0 = static_cast<uint32_t>(s);
    k.k1 = static_cast<uint32_t>(s >> 32);
  }
  return k;
}

// The factor that dropout applies to element i: keep / (1 - p), or 1 without dropout.
template <typename acc_t>
__device__ __forceinline__ acc_t dropout_factor(const Epilogue<acc_t>& e, const DropoutKeys& k, int64_t i) {
  if (!e.dropout) return acc_t(1);
  return dropout_bits(static_cast<uint64_t>(i), k.k0, k.k1) >= e.threshold ? e.scale : acc_t(0);
}

// The gradient reaching the dropout output: grad, zeroed where the ReLU clamped (y <= 0).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t relu_grad(const Epilogue<acc_t>& e, const scalar_t* grad, const scalar_t* y,
                                           int64_t i) {
  const acc_t g = static_cast<acc_t>(grad[i]);
  return (e.relu && !(static_cast<acc_t>(y[i]) > acc_t(0))) ? acc_t(0) : g;
}

template <typename acc_t>
__device__ __forceinline__ acc_t inv_std(acc_t var, acc_t eps) {
  return acc_t(1) / std::sqrt(var + eps);
}

// ---- forward ----

// Per row: its mean and its sum of squared deviations M2 (two passes over the row, which stays in cache).
template <typename scalar_t, typename acc_t>
__global__ void row_moments_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ row_mean,
                                   acc_t* __restrict__ row_m2, int64_t rows, int64_t L) {
  __shared__ acc_t shared[32];
  __shared__ acc_t mean_shared;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* xr = x + row * L;
    acc_t s = 0;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) s += static_cast<acc_t>(xr[l]);
    s = block_sum(s, shared);
    if (threadIdx.x == 0) mean_shared = s / static_cast<acc_t>(L);
    __syncthreads();
    const acc_t m = mean_shared;
    acc_t q = 0;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      const acc_t d = static_cast<acc_t>(xr[l]) - m;
      q += d * d;
    }
    // block_sum synchronises, so every thread has read mean_shared before thread 0 rewrites it.
    q = block_sum(q, shared);
    if (threadIdx.x == 0) {
      row_mean[row] = m;
      row_m2[row] = q;
    }
  }
}

// Per channel: merges its N rows (L elements each) in order with Chan's formula, giving the batch mean and the
// biased variance M2 / (N * L).
template <typename acc_t>
__global__ void channel_moments_kernel(const acc_t* __restrict__ row_mean, const acc_t* __restrict__ row_m2,
                                       acc_t* __restrict__ mean, acc_t* __restrict__ var, int64_t N, int64_t C,
                                       int64_t L) {
  SKELEMIX_CUDA_1D_KERNEL_LOOP(c, C) {
    acc_t m = row_mean[c], m2 = row_m2[c];
    for (int64_t n = 1; n < N; ++n) {
      // Merge n * L elements (m, m2) with L more (row n): delta * L / ((n + 1) L), delta^2 * n L * L / ((n + 1) L).
      const acc_t delta = row_mean[n * C + c] - m;
      const acc_t k = static_cast<acc_t>(n);
      m += delta / (k + 1);
      m2 += row_m2[n * C + c] + delta * delta * (k * static_cast<acc_t>(L) / (k + 1));
    }
    mean[c] = m;
    var[c] = m2 / (static_cast<acc_t>(N) * static_cast<acc_t>(L));
  }
}

// y = relu?(((x - mean) * a + bias) * dropout + residual), a = weight * rsqrt(var + eps); residual may be null.
template <typename scalar_t, typename acc_t>
__global__ void bn_epilogue_forward_kernel_impl(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                                const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                                const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                                scalar_t* __restrict__ y, int64_t numel, int64_t C, int64_t L,
                                                acc_t eps, Epilogue<acc_t> e) {
  const DropoutKeys keys = load_keys(e);
  SKELEMIX_CUDA_1D_KERNEL_LOOP(i, numel) {
    const int64_t c = (i / L) % C;
    const acc_t a = weight[c] * inv_std(var[c], eps);
    acc_t v = (static_cast<acc_t>(x[i]) - mean[c]) * a + bias[c];
    if (e.dropout) v *= dropout_factor(e, keys, i);  // a multiply, as in the reference (0 * inf stays NaN)
    if (residual != nullptr) v += static_cast<acc_t>(residual[i]);
    if (e.relu) v = v < acc_t(0) ? acc_t(0) : v;  // NaN passes through, as torch.relu
    y[i] = static_cast<scalar_t>(v);
  }
}

// ---- backward ----

// Per row: sum gp and sum gp * xhat with gp the gradient of the BatchNorm output (bn_epilogue.h).
template <typename scalar_t, typename acc_t>
__global__ void backward_row_sums_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ y, const acc_t* __restrict__ mean,
                                         const acc_t* __restrict__ var, acc_t* __restrict__ row_sum_gp,
                                         acc_t* __restrict__ row_sum_gp_xhat, int64_t rows, int64_t C, int64_t L,
                                         acc_t eps, Epilogue<acc_t> e) {
  __shared__ acc_t shared[32];
  const DropoutKeys keys = load_keys(e);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t c = row % C;
    const acc_t m = mean[c], invstd = inv_std(var[c], eps);
    acc_t sb = 0, sw = 0;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
      const int64_t i = row * L + l;
      const acc_t gp = relu_grad(e, grad, y, i) * dropout_factor(e, keys, i);
      sb += gp;
      sw += gp * ((static_cast<acc_t>(x[i]) - m) * invstd);
    }
    sb = block_sum(sb, shared);
    sw = block_sum(sw, shared);
    if (threadIdx.x == 0) {
      row_sum_gp[row] = sb;
      row_sum_gp_xhat[row] = sw;
    }
  }
}

// Per channel: grad_bias = sum over n of the row sums of gp, grad_weight likewise of gp * xhat, in order.
template <typename acc_t>
__global__ void channel_sums_kernel(const acc_t* __restrict__ row_sum_gp, const acc_t* __restrict__ row_sum_gp_xhat,
                                    acc_t* __restrict__ grad_bias, acc_t* __restrict__ grad_weight, int64_t N,
                                    int64_t C) {
  SKELEMIX_CUDA_1D_KERNEL_LOOP(c, C) {
    acc_t sb = 0, sw = 0;
    for (int64_t n = 0; n < N; ++n) {
      sb += row_sum_gp[n * C + c];
      sw += row_sum_gp_xhat[n * C + c];
    }
    grad_bias[c] = sb;
    grad_weight[c] = sw;
  }
}

// grad_residual = gu and grad_x = a * gp (fixed statistics) or a * (gp - grad_bias / n - xhat * grad_weight / n)
// (batch statistics: grad_bias/grad_weight non-null). Null outputs are skipped.
template <typename scalar_t, typename acc_t>
__global__ void backward_elementwise_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ y, const acc_t* __restrict__ weight,
                                            const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                            const acc_t* __restrict__ grad_bias, const acc_t* __restrict__ grad_weight,
                                            scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_residual,
                                            int64_t numel, int64_t C, int64_t L, acc_t eps, Epilogue<acc_t> e) {
  const DropoutKeys keys = load_keys(e);
  const acc_t n = static_cast<acc_t>(numel / C);
  SKELEMIX_CUDA_1D_KERNEL_LOOP(i, numel) {
    const acc_t gu = relu_grad(e, grad, y, i);
    if (grad_residual != nullptr) grad_residual[i] = static_cast<scalar_t>(gu);
    if (grad_x != nullptr) {
      const int64_t c = (i / L) % C;
      const acc_t invstd = inv_std(var[c], eps), a = weight[c] * invstd;
      const acc_t gp = gu * dropout_factor(e, keys, i);
      acc_t gx;
      if (grad_bias != nullptr) {
        const acc_t xhat = (static_cast<acc_t>(x[i]) - mean[c]) * invstd;
        gx = a * (gp - grad_bias[c] / n - xhat * grad_weight[c] / n);
      } else {
        gx = a * gp;
      }
      grad_x[i] = static_cast<scalar_t>(gx);
    }
  }
}

template <typename acc_t>
Epilogue<acc_t> make_epilogue(const at::Tensor& seed, double p, bool relu) {
  return {seed.const_data_ptr<int64_t>(), dropout_threshold(p), static_cast<acc_t>(1.0 / (1.0 - p)), p > 0, relu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_epilogue_forward_kernel(
    const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& bias_, const c10::optional<at::Tensor>& residual_,
    const c10::optional<at::Tensor>& stats_mean_, const c10::optional<at::Tensor>& stats_var_, const at::Tensor& seed,
    double eps, double p, bool relu) {
  check_bn_epilogue_args(x_, weight_, bias_, residual_, stats_mean_, stats_var_, seed, eps, p);
  TORCH_INTERNAL_ASSERT(x_.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto acc_options = x_.options().dtype(bn_epilogue_acc_type(x_));
  const bool batch_stats = !stats_mean_.has_value();
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) {
    // Statistics over an empty batch are NaN, as in the reference; var_mean gives exactly those.
    if (batch_stats) {
      auto [mean, var] = bn_epilogue_batch_stats(x);
      return {y, mean, var};
    }
    return {y, at::empty({0}, acc_options), at::empty({0}, acc_options)};
  }
  const int64_t N = x.size(0), C = x.size(1), numel = x.numel(), L = numel / (N * C), rows = N * C;
  const at::Tensor weight = weight_.contiguous(), bias = bias_.contiguous();
  const at::Tensor residual = residual_.has_value() ? residual_->contiguous() : at::Tensor();
  at::Tensor mean, var;
  if (batch_stats) {
    mean = at::empty({C}, acc_options);
    var = at::empty({C}, acc_options);
  } else {
    mean = stats_mean_->contiguous();
    var = stats_var_->contiguous();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_epilogue_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;  // float for float/half/bfloat16, double for double
    if (batch_stats) {
      at::Tensor moments = at::empty({2, rows}, acc_options);
      acc_t* row_mean = moments.mutable_data_ptr<acc_t>();
      row_moments_kernel<scalar_t, acc_t><<<cuda::capped_blocks(rows, 1), cuda::reduction_threads(L), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), row_mean, row_mean + rows, rows, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      channel_moments_kernel<acc_t><<<cuda::capped_blocks(C, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
          row_mean, row_mean + rows, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), N, C, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    bn_epilogue_forward_kernel_impl<scalar_t, acc_t>
        <<<cuda::capped_blocks(numel, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
            weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
            var.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(), numel, C, L, static_cast<acc_t>(eps),
            make_epilogue<acc_t>(seed, p, relu));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (batch_stats) return {y, mean, var};
  return {y, at::empty({0}, acc_options), at::empty({0}, acc_options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_epilogue_backward_kernel(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& weight_,
    const at::Tensor& mean_, const at::Tensor& var_, const at::Tensor& seed, double eps, double p, bool relu,
    bool batch_stats, std::array<bool, 4> output_mask) {
  check_bn_epilogue_backward_args(grad_, x_, y_, weight_, mean_, var_, seed, eps, p);
  TORCH_INTERNAL_ASSERT(x_.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto acc_options = x_.options().dtype(bn_epilogue_acc_type(x_));
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2], need_r = output_mask[3];
  // With batch statistics grad_x needs both channel sums, requested or not.
  const bool need_sums = need_w || need_b || (need_x && batch_stats);
  const int64_t C = x_.size(1), numel = x_.numel();

  at::Tensor grad_x = need_x ? at::empty(x_.sizes(), x_.options()) : at::empty({0}, x_.options());
  at::Tensor grad_residual = need_r ? at::empty(x_.sizes(), x_.options()) : at::empty({0}, x_.options());
  at::Tensor grad_weight = need_sums ? at::empty({C}, acc_options) : at::Tensor();
  at::Tensor grad_bias = need_sums ? at::empty({C}, acc_options) : at::Tensor();
  if (numel == 0) {
    if (need_sums) {  // sums over no element
      grad_weight.zero_();
      grad_bias.zero_();
    }
  } else {
    const int64_t N = x_.size(0), L = numel / (N * C), rows = N * C;
    // Autograd often passes expanded (stride-0) grads.
    const at::Tensor grad = grad_.contiguous(), x = x_.contiguous(), y = y_.contiguous();
    const at::Tensor weight = weight_.contiguous(), mean = mean_.contiguous(), var = var_.contiguous();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_epilogue_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
      const Epilogue<acc_t> e = make_epilogue<acc_t>(seed, p, relu);
      if (need_sums) {
        at::Tensor sums = at::empty({2, rows}, acc_options);
        acc_t* row_sum_gp = sums.mutable_data_ptr<acc_t>();
        backward_row_sums_kernel<scalar_t, acc_t>
            <<<cuda::capped_blocks(rows, 1), cuda::reduction_threads(L), 0, stream>>>(
                grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), row_sum_gp, row_sum_gp + rows, rows, C, L,
                static_cast<acc_t>(eps), e);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        channel_sums_kernel<acc_t><<<cuda::capped_blocks(C, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
            row_sum_gp, row_sum_gp + rows, grad_bias.mutable_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<acc_t>(),
            N, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_x || need_r) {
        const bool use_sums = need_x && batch_stats;
        backward_elementwise_kernel<scalar_t, acc_t>
            <<<cuda::capped_blocks(numel, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
                grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                weight.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(),
                use_sums ? grad_bias.const_data_ptr<acc_t>() : nullptr,
                use_sums ? grad_weight.const_data_ptr<acc_t>() : nullptr,
                need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                need_r ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr, numel, C, L, static_cast<acc_t>(eps), e);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return {grad_x, need_w ? grad_weight : at::empty({0}, acc_options), need_b ? grad_bias : at::empty({0}, acc_options),
          grad_residual};
}

// The mask of elements [start, start + numel) through load_keys and dropout_factor, as the kernels above.
__global__ void dropout_keep_kernel_impl(bool* __restrict__ keep, int64_t start, int64_t numel, Epilogue<float> e) {
  const DropoutKeys keys = load_keys(e);
  SKELEMIX_CUDA_1D_KERNEL_LOOP(j, numel) keep[j] = dropout_factor(e, keys, start + j) != 0.0f;
}

at::Tensor bn_epilogue_dropout_keep_kernel(const at::Tensor& seed, int64_t start, int64_t numel, double p) {
  check_bn_epilogue_dropout_keep_args(seed, start, numel, p);
  TORCH_INTERNAL_ASSERT(seed.device().is_cuda());
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor keep = at::empty({numel}, seed.options().dtype(at::kBool));
  if (numel > 0) {
    dropout_keep_kernel_impl<<<cuda::capped_blocks(numel, kElementwiseThreads), kElementwiseThreads, 0,
                               c10::cuda::getCurrentCUDAStream()>>>(keep.mutable_data_ptr<bool>(), start, numel,
                                                                    make_epilogue<float>(seed, p, false));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(skelemix, CUDA, m) {
  m.impl("bn_epilogue", &bn_epilogue_forward_kernel);
  m.impl("_bn_epilogue_backward", &bn_epilogue_backward_kernel);
  m.impl("_bn_epilogue_dropout_keep", &bn_epilogue_dropout_keep_kernel);
}

}  // namespace skelemix
