// CUDA kernels of skelemix::graph_conv and skelemix::_graph_conv_backward.
//
// The same contractions as the CPU kernel (cpu/graph_conv_kernel.cpp, which documents the notation), batched
// over the whole batch with cuBLAS GEMMs (at::mm / at::bmm on the current stream), one adjacency subset k at
// a time: the only workspace is one (N, min(C_in, C_out), T, V) buffer, never the (N, K*C_out, T, V)
// intermediate of the eager 1x1 conv + einsum. half and bfloat16 run in float (upcast inputs, one rounding
// of each result), so every sum accumulates in fp32 whatever cuBLAS's reduced-precision settings are.
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../graph_conv.h"

namespace skelemix {
namespace {

at::Tensor to_compute(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return t.to((s == at::kHalf || s == at::kBFloat16) ? at::kFloat : s).contiguous();
}

at::Tensor graph_conv_forward_kernel(const at::Tensor& x_, const at::Tensor& weight_,
                                     const c10::optional<at::Tensor>& bias_, const at::Tensor& A_) {
  check_graph_conv_args(x_, weight_, bias_, A_);
  TORCH_INTERNAL_ASSERT(x_.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t N = x_.size(0), c_in = x_.size(1), T = x_.size(2), V = x_.size(3), K = A_.size(0);
  const int64_t c_out = weight_.size(0) / K;
  const at::Tensor x = to_compute(x_), A = to_compute(A_);
  const at::Tensor W = to_compute(weight_).view({K, c_out, c_in});
  at::Tensor y = at::empty({N, c_out, T, V}, x.options());
  if (y.numel() == 0) return y.to(x_.scalar_type());
  if (bias_.has_value()) {
    y.copy_(graph_conv_bias_term(to_compute(*bias_), A).view({1, c_out, 1, V}).expand_as(y));
  } else {
    y.zero_();
  }
  const int64_t rows = N * c_in * T;
  if (graph_conv_a_first(c_in, c_out)) {
    // y[n] += W_k @ (x[n] @ A[k]) for each k; xa holds x @ A[k] for the whole batch.
    at::Tensor xa = at::empty({N, c_in, T, V}, x.options());
    at::Tensor xa2 = xa.view({rows, V});
    at::Tensor y3 = y.view({N, c_out, T * V});
    for (int64_t k = 0; k < K; ++k) {
      at::mm_out(xa2, x.view({rows, V}), A.select(0, k));
      y3.baddbmm_(W.select(0, k).expand({N, c_out, c_in}), xa.view({N, c_in, T * V}));
    }
  } else {
    // y += (W_k @ x[n]) @ A[k] for each k; h holds W_k @ x[n] for the whole batch.
    at::Tensor h = at::empty({N, c_out, T, V}, x.options());
    at::Tensor h3 = h.view({N, c_out, T * V});
    at::Tensor y2 = y.view({N * c_out * T, V});
    for (int64_t k = 0; k < K; ++k) {
      at::bmm_out(h3, W.select(0, k).expand({N, c_out, c_in}), x.view({N, c_in, T * V}));
      y2.addmm_(h.view({N * c_out * T, V}), A.select(0, k));
    }
  }
  return y.to(x_.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_conv_backward_kernel(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias_,
    const at::Tensor& A_, std::array<bool, 4> output_mask) {
  check_graph_conv_backward_args(grad_, x_, weight_, bias_, A_);
  TORCH_INTERNAL_ASSERT(x_.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t N = x_.size(0), c_in = x_.size(1), T = x_.size(2), V = x_.size(3), K = A_.size(0);
  const int64_t c_out = weight_.size(0) / K;
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && bias_.has_value();
  const bool need_A = output_mask[3], need_u = need_x || need_A;
  const at::Tensor grad = to_compute(grad_), A = to_compute(A_);
  // x and weight are read only for some gradients (the autograd wrapper passes stand-ins for the others).
  const at::Tensor x = (need_w || need_A) ? to_compute(x_) : at::Tensor();
  const at::Tensor W = need_u ? to_compute(weight_).view({K, c_out, c_in}) : at::Tensor();
  const auto options = grad.options();
  const int64_t rows = N * c_in * T;

  at::Tensor grad_x = need_x ? at::empty({N, c_in, T, V}, options) : at::Tensor();
  at::Tensor grad_W = need_w ? at::empty({K, c_out, c_in}, options) : at::Tensor();
  at::Tensor grad_A = need_A ? at::empty({K, V, V}, options) : at::Tensor();
  if (need_x && grad_x.numel() > 0 && K > 0) grad_x.zero_();
  if (need_w && N * T * V == 0) grad_W.zero_();
  if (need_A && rows == 0) grad_A.zero_();

  if (N * T * V > 0) {
    const at::Tensor g3 = grad.view({N, c_out, T * V});
    // u = W_k^T @ grad[n] (N, C_in, T, V) and xa = x @ A[k], one k at a time.
    at::Tensor u = need_u ? at::empty({N, c_in, T, V}, options) : at::Tensor();
    at::Tensor xa = need_w ? at::empty({N, c_in, T, V}, options) : at::Tensor();
    const at::Tensor x2 = x.defined() ? x.view({rows, V}) : at::Tensor();
    for (int64_t k = 0; k < K; ++k) {
      if (need_u) {
        at::Tensor u3 = u.view({N, c_in, T * V});
        at::bmm_out(u3, W.select(0, k).t().expand({N, c_in, c_out}), g3);
      }
      if (need_x) grad_x.view({rows, V}).addmm_(u.view({rows, V}), A.select(0, k).t());
      if (need_A) {
        at::Tensor out = grad_A.select(0, k);
        at::mm_out(out, x2.t(), u.view({rows, V}));
      }
      if (need_w) {
        at::Tensor xa2 = xa.view({rows, V});
        at::mm_out(xa2, x2, A.select(0, k));
        // (N, C_out, C_in) per-sample products, summed over the batch: small next to the GEMMs.
        at::Tensor out = grad_W.select(0, k);
        at::sum_out(out, at::bmm(g3, xa.view({N, c_in, T * V}).transpose(1, 2)), at::IntArrayRef{0});
      }
    }
  }

  const auto dtype = x_.scalar_type();
  const bool need_G = need_b || (need_A && bias_.has_value());
  // G[c, w] = sum_{n,t} grad[n, c, t, w]: all that the bias needs.
  const at::Tensor G = need_G ? grad.sum(at::IntArrayRef{0, 2}) : at::Tensor();
  if (need_A && bias_.has_value()) graph_conv_add_bias_grad_A(grad_A, G, to_compute(*bias_));
  return {need_x ? grad_x.to(dtype) : graph_conv_no_grad(x_),
          need_w ? grad_W.view({K * c_out, c_in}).to(dtype) : graph_conv_no_grad(x_),
          need_b ? graph_conv_grad_bias(G, A).to(dtype) : graph_conv_no_grad(x_),
          need_A ? grad_A.to(dtype) : graph_conv_no_grad(x_)};
}

}  // namespace

TORCH_LIBRARY_IMPL(skelemix, CUDA, m) {
  m.impl("graph_conv", &graph_conv_forward_kernel);
  m.impl("_graph_conv_backward", &graph_conv_backward_kernel);
}

}  // namespace skelemix
