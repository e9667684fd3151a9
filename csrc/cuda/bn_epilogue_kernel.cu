// CUDA kernels of skelemix::bn_epilogue and skelemix::_bn_epilogue_backward (semantics: skelemix.reference.bn_epilogue;
// backward math: bn_epilogue.h). x is viewed as contiguous (N, C, L): row (n, c) holds channel c of sample n, and
// element i = (n * C + c) * L + l is x's flat row-major index, the Philox counter of its dropout bits.
//
// Every kernel walks n, c and l with grid-stride loops on separate grid (and block) dimensions, so no index is
// ever divided. Reductions are deterministic: a fixed partition and a fixed order, no float atomics.
//   1. One block per row (n, c) reduces the row and writes its partial result to a channel-major (C, N) buffer.
//   2. One block of T = reduction_threads(N) threads per channel combines the channel's N partials in double:
//      thread t takes rows t, t + T, t + 2T, ... in that order, then a tree combines the threads (a warp-shuffle
//      tree in each warp, lane l taking lane l + k for k = 16, 8, 4, 2, 1, and the same tree in warp 0 over the
//      warps' results). tests/test_bn_epilogue.py replays this order on the CPU (channel_reduce_emulated).
// The forward's statistics: per row its mean and the sum of squared deviations M2 (two passes over the row, shifted
// by its first element), then per channel the merge of the rows' (count, mean, M2) by Chan et al.'s formula. Neither
// step cancels when the mean is large next to the spread (as the CPU kernel's shifted sums in double).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "../bn_epilogue.h"
#include "helpers.cuh"

namespace skelemix {
namespace {

using cuda::block_sum;
using cuda::capped_blocks;
using cuda::reduction_threads;

constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxBlockZ = 64;  // CUDA's limit on blockDim.z

// Grid-stride loop of `var` over [0, n) along grid dimension `dim` (x, y or z): block b, thread t of each block.
#define BN_GRID_LOOP(var, dim, n)                                                                       \
  for (int64_t var = static_cast<int64_t>(blockIdx.dim) * blockDim.dim + threadIdx.dim; var < (n); \
       var += static_cast<int64_t>(blockDim.dim) * gridDim.dim)

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// The launch of the elementwise kernels: grid and block dimensions x, y, z over l, c, n. A block has at most 256
// threads, as many along the contiguous cells l as they fill (a warp reads consecutive addresses), the rest over
// channels, then samples; short rows (L < 32) put several rows in a warp.
struct ElementwiseLaunch {
  dim3 grid, block;
};

ElementwiseLaunch elementwise_launch(int64_t N, int64_t C, int64_t L) {
  const int64_t threads = kElementwiseThreads;
  const int64_t bl = std::min(next_pow2(L), threads);
  const int64_t bc = std::min(next_pow2(C), threads / bl);
  const int64_t bn = std::min({next_pow2(N), threads / (bl * bc), kMaxBlockZ});
  return {dim3(capped_blocks(L, bl), capped_blocks(C, bc), capped_blocks(N, bn)),
          dim3(static_cast<unsigned>(bl), static_cast<unsigned>(bc), static_cast<unsigned>(bn))};
}

// The launch of the per-row kernels: one block per row (n, c), grid x over n and y over c.
dim3 row_grid(int64_t N, int64_t C) { return dim3(capped_blocks(N, 1), capped_blocks(C, 1)); }

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

// The gradient reaching the dropout output: grad, zeroed where the ReLU clamped (y <= 0). A NaN y passes the
// gradient, as torch.relu's backward does.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t relu_grad(const Epilogue<acc_t>& e, const scalar_t* grad, const scalar_t* y,
                                           int64_t i) {
  const acc_t g = static_cast<acc_t>(grad[i]);
  return (e.relu && static_cast<acc_t>(y[i]) <= acc_t(0)) ? acc_t(0) : g;
}

template <typename acc_t>
__device__ __forceinline__ acc_t inv_std(acc_t var, acc_t eps) {
  return acc_t(1) / std::sqrt(var + eps);
}

// ---- channel reductions (step 2 above) ----

// Moments of a set of elements: their count, mean and M2 (sum of squared deviations from the mean).
struct Moments {
  double count, mean, m2;
};

// Chan et al.'s merge of the moments of two disjoint sets; an empty set (count 0) leaves the other as it is.
__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const double count = a.count + b.count, delta = b.mean - a.mean, share_b = b.count / count;
  return {count, a.mean + delta * share_b, a.m2 + b.m2 + delta * delta * (a.count * share_b)};
}

// Lane 0 gets the merge of the warp's 32 values by the fixed tree of cuda::warp_sum.
__device__ __forceinline__ Moments warp_merge(Moments m) {
  const int lane = threadIdx.x % 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    const Moments other{__shfl_down_sync(0xffffffffu, m.count, offset),
                        __shfl_down_sync(0xffffffffu, m.mean, offset), __shfl_down_sync(0xffffffffu, m.m2, offset)};
    if (lane + offset < 32) m = merge(m, other);
  }
  return m;
}

// The merge of `m` over the block, valid in thread 0, in the order of cuda::block_sum (blockDim.x a multiple of
// 32). Every thread of the block must call it.
__device__ __forceinline__ Moments block_merge(Moments m, Moments* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  m = warp_merge(m);
  if (lane == 0) shared[warp] = m;
  __syncthreads();
  m = (threadIdx.x < blockDim.x / 32) ? shared[lane] : Moments{0, 0, 0};
  if (warp == 0) m = warp_merge(m);
  __syncthreads();  // `shared` may be reused right after
  return m;
}

// Per channel: the batch mean and biased variance M2 / (N * L) from the rows' moments (channel-major (C, N)).
template <typename acc_t>
__global__ void channel_moments_kernel(const double* __restrict__ row_mean, const double* __restrict__ row_m2,
                                       acc_t* __restrict__ mean, acc_t* __restrict__ var, int64_t N, int64_t C,
                                       int64_t L) {
  __shared__ Moments shared[32];
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    Moments m{0, 0, 0};
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      const int64_t r = c * N + n;
      m = merge(m, Moments{static_cast<double>(L), row_mean[r], row_m2[r]});
    }
    m = block_merge(m, shared);
    if (threadIdx.x == 0) {
      mean[c] = static_cast<acc_t>(m.mean);
      var[c] = static_cast<acc_t>(m.m2 / m.count);
    }
  }
}

// Per channel: grad_bias and grad_weight, the sums of the rows' sums of gp and gp * xhat (channel-major (C, N)).
template <typename acc_t>
__global__ void channel_sums_kernel(const acc_t* __restrict__ row_sum_gp, const acc_t* __restrict__ row_sum_gp_xhat,
                                    acc_t* __restrict__ grad_bias, acc_t* __restrict__ grad_weight, int64_t N,
                                    int64_t C) {
  __shared__ double shared[32];
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    double sb = 0, sw = 0;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      sb += static_cast<double>(row_sum_gp[c * N + n]);
      sw += static_cast<double>(row_sum_gp_xhat[c * N + n]);
    }
    sb = block_sum(sb, shared);
    sw = block_sum(sw, shared);
    if (threadIdx.x == 0) {
      grad_bias[c] = static_cast<acc_t>(sb);
      grad_weight[c] = static_cast<acc_t>(sw);
    }
  }
}

// ---- forward ----

// Per row (n, c): its mean and M2 at [c * N + n]. Two passes over the row (which stays in cache), both over
// x - shift with shift the row's first element: that difference is exact where x is near the shift, so a mean that
// is large next to the spread costs no digits (the mean is shift + the mean of x - shift, kept in double).
template <typename scalar_t, typename acc_t>
__global__ void row_moments_kernel(const scalar_t* __restrict__ x, double* __restrict__ row_mean,
                                   double* __restrict__ row_m2, int64_t N, int64_t C, int64_t L) {
  __shared__ acc_t shared[32];
  __shared__ acc_t offset_shared;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
      const scalar_t* xr = x + (n * C + c) * L;
      const acc_t shift = static_cast<acc_t>(xr[0]);
      acc_t s = 0;
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) s += static_cast<acc_t>(xr[l]) - shift;
      s = block_sum(s, shared);
      if (threadIdx.x == 0) offset_shared = s / static_cast<acc_t>(L);
      __syncthreads();
      const acc_t offset = offset_shared;
      acc_t q = 0;
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
        const acc_t d = (static_cast<acc_t>(xr[l]) - shift) - offset;
        q += d * d;
      }
      // block_sum synchronises, so every thread has read offset_shared before thread 0 rewrites it.
      q = block_sum(q, shared);
      if (threadIdx.x == 0) {
        row_mean[c * N + n] = static_cast<double>(shift) + static_cast<double>(offset);
        row_m2[c * N + n] = static_cast<double>(q);
      }
    }
  }
}

// y = relu?(((x - mean) * a + bias) * dropout + residual), a = weight * rsqrt(var + eps); residual may be null.
template <typename scalar_t, typename acc_t>
__global__ void bn_epilogue_forward_kernel_impl(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                                const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                                const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                                scalar_t* __restrict__ y, int64_t N, int64_t C, int64_t L, acc_t eps,
                                                Epilogue<acc_t> e) {
  const DropoutKeys keys = load_keys(e);
  BN_GRID_LOOP(n, z, N) {
    BN_GRID_LOOP(c, y, C) {
      const acc_t m = mean[c], a = weight[c] * inv_std(var[c], eps), b = bias[c];
      const int64_t row = (n * C + c) * L;
      BN_GRID_LOOP(l, x, L) {
        const int64_t i = row + l;
        acc_t v = (static_cast<acc_t>(x[i]) - m) * a + b;
        if (e.dropout) v *= dropout_factor(e, keys, i);  // a multiply, as in the reference (0 * inf stays NaN)
        if (residual != nullptr) v += static_cast<acc_t>(residual[i]);
        if (e.relu) v = v < acc_t(0) ? acc_t(0) : v;  // NaN passes through, as torch.relu
        y[i] = static_cast<scalar_t>(v);
      }
    }
  }
}

// ---- backward ----

// Per row (n, c): the sums of gp and gp * xhat with gp the gradient of the BatchNorm output (bn_epilogue.h), at
// [c * N + n].
template <typename scalar_t, typename acc_t>
__global__ void backward_row_sums_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ y, const acc_t* __restrict__ mean,
                                         const acc_t* __restrict__ var, acc_t* __restrict__ row_sum_gp,
                                         acc_t* __restrict__ row_sum_gp_xhat, int64_t N, int64_t C, int64_t L,
                                         acc_t eps, Epilogue<acc_t> e) {
  __shared__ acc_t shared[32];
  const DropoutKeys keys = load_keys(e);
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const acc_t m = mean[c], invstd = inv_std(var[c], eps);
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
      const int64_t row = (n * C + c) * L;
      acc_t sb = 0, sw = 0;
      for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
        const int64_t i = row + l;
        const acc_t gp = relu_grad(e, grad, y, i) * dropout_factor(e, keys, i);
        sb += gp;
        sw += gp * ((static_cast<acc_t>(x[i]) - m) * invstd);
      }
      sb = block_sum(sb, shared);
      sw = block_sum(sw, shared);
      if (threadIdx.x == 0) {
        row_sum_gp[c * N + n] = sb;
        row_sum_gp_xhat[c * N + n] = sw;
      }
    }
  }
}

// grad_residual = gu and grad_x = a * gp (fixed statistics) or a * (gp - grad_bias / n - xhat * grad_weight / n)
// (batch statistics: grad_bias/grad_weight non-null), n = N * L. Null outputs are skipped.
template <typename scalar_t, typename acc_t>
__global__ void backward_elementwise_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ y, const acc_t* __restrict__ weight,
                                            const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                            const acc_t* __restrict__ grad_bias, const acc_t* __restrict__ grad_weight,
                                            scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_residual,
                                            int64_t N, int64_t C, int64_t L, acc_t eps, Epilogue<acc_t> e) {
  const DropoutKeys keys = load_keys(e);
  const acc_t count = static_cast<acc_t>(N * L);
  BN_GRID_LOOP(n, z, N) {
    BN_GRID_LOOP(c, y, C) {
      const acc_t m = mean[c], invstd = inv_std(var[c], eps), a = weight[c] * invstd;
      const bool batch_stats = grad_bias != nullptr;
      const acc_t mean_gp = batch_stats ? grad_bias[c] / count : acc_t(0);
      const acc_t mean_gp_xhat = batch_stats ? grad_weight[c] / count : acc_t(0);
      const int64_t row = (n * C + c) * L;
      BN_GRID_LOOP(l, x, L) {
        const int64_t i = row + l;
        const acc_t gu = relu_grad(e, grad, y, i);
        if (grad_residual != nullptr) grad_residual[i] = static_cast<scalar_t>(gu);
        if (grad_x != nullptr) {
          const acc_t gp = gu * dropout_factor(e, keys, i);
          acc_t gx;
          if (batch_stats) {
            const acc_t xhat = (static_cast<acc_t>(x[i]) - m) * invstd;
            gx = a * (gp - mean_gp - xhat * mean_gp_xhat);
          } else {
            gx = a * gp;
          }
          grad_x[i] = static_cast<scalar_t>(gx);
        }
      }
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
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C), rows = N * C;
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
      at::Tensor moments = at::empty({2, C, N}, x.options().dtype(at::kDouble));  // row means, then row M2s
      double* row_mean = moments.mutable_data_ptr<double>();
      row_moments_kernel<scalar_t, acc_t><<<row_grid(N, C), reduction_threads(L), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), row_mean, row_mean + rows, N, C, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      channel_moments_kernel<acc_t><<<capped_blocks(C, 1), reduction_threads(N), 0, stream>>>(
          row_mean, row_mean + rows, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), N, C, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const ElementwiseLaunch launch = elementwise_launch(N, C, L);
    bn_epilogue_forward_kernel_impl<scalar_t, acc_t><<<launch.grid, launch.block, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
        weight.const_data_ptr<acc_t>(), bias.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
        var.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(), N, C, L, static_cast<acc_t>(eps),
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
        at::Tensor sums = at::empty({2, C, N}, acc_options);  // row sums of gp, then of gp * xhat
        acc_t* row_sum_gp = sums.mutable_data_ptr<acc_t>();
        backward_row_sums_kernel<scalar_t, acc_t><<<row_grid(N, C), reduction_threads(L), 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
            mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), row_sum_gp, row_sum_gp + rows, N, C, L,
            static_cast<acc_t>(eps), e);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        channel_sums_kernel<acc_t><<<capped_blocks(C, 1), reduction_threads(N), 0, stream>>>(
            row_sum_gp, row_sum_gp + rows, grad_bias.mutable_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<acc_t>(),
            N, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_x || need_r) {
        const bool use_sums = need_x && batch_stats;
        const ElementwiseLaunch launch = elementwise_launch(N, C, L);
        backward_elementwise_kernel<scalar_t, acc_t><<<launch.grid, launch.block, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
            weight.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(),
            use_sums ? grad_bias.const_data_ptr<acc_t>() : nullptr,
            use_sums ? grad_weight.const_data_ptr<acc_t>() : nullptr,
            need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
            need_r ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr, N, C, L, static_cast<acc_t>(eps), e);
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
