// CUDA kernels of skelemix::graph_conv and skelemix::_graph_conv_backward.
//
// The same contractions as the CPU kernel (cpu/graph_conv_kernel.cpp, which documents the notation), batched
// over the whole batch with cuBLAS GEMMs (at::mm / at::bmm on the current stream), one adjacency subset k at
// a time: the only workspace is one (N, min(C_in, C_out), T, V) buffer, never the (N, K*C_out, T, V)
// intermediate of the eager 1x1 conv + einsum.
//
// half and bfloat16 (e.g. under amp=bf16) run their GEMMs in their own dtype on the tensor cores. Whatever
// sums over k, and the long reductions of the weight and adjacency gradients, go to fp32 outputs through
// cuBLAS's out_dtype GEMMs (torch >= 2.9); the one intermediate per k (x @ A_k, W_k @ x or W_k^T @ grad) is
// rounded once to the input dtype, as the eager reference rounds its 1x1 conv output. Older torch upcasts the
// inputs to fp32 instead (correct, but far from the tensor cores).
#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <tuple>

#include "../graph_conv.h"

#ifndef SKELEMIX_OUT_DTYPE_GEMM  // -DSKELEMIX_OUT_DTYPE_GEMM=0 builds the upcasting path (a compile check)
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define SKELEMIX_OUT_DTYPE_GEMM 1
#else
#define SKELEMIX_OUT_DTYPE_GEMM 0
#endif
#endif

namespace skelemix {
namespace {

bool low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Where sums accumulate (and the dtype of the results before the final rounding).
at::ScalarType accumulate_dtype(at::ScalarType t) { return low_precision(t) ? at::kFloat : t; }

// The dtype of the GEMM operands: the input's, unless this torch lacks the out_dtype GEMMs.
at::ScalarType operand_dtype(at::ScalarType t) { return SKELEMIX_OUT_DTYPE_GEMM ? t : accumulate_dtype(t); }

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// out = a @ b (batched, beta = 0) with out in a's dtype or, for fp16/bf16 a and b, in fp32.
void bmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    at::bmm_out(out, a, b);
    return;
  }
#if SKELEMIX_OUT_DTYPE_GEMM
  at::bmm_out(out, a, b, out.scalar_type());
#else
  TORCH_INTERNAL_ASSERT(false, "mixed-dtype GEMM without torch's out_dtype GEMMs");
#endif
}

// out += a @ b (batched; out is also the addend, as cuBLAS's beta = 1), dtypes as bmm_into.
void baddbmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.scalar_type() == a.scalar_type()) {
    out.baddbmm_(a, b);
    return;
  }
#if SKELEMIX_OUT_DTYPE_GEMM
  at::baddbmm_out(out, out, a, b, out.scalar_type());
#else
  TORCH_INTERNAL_ASSERT(false, "mixed-dtype GEMM without torch's out_dtype GEMMs");
#endif
}

// out += a @ b for matrices, through the batched form (the out_dtype addmm wants its addend in a's dtype).
void addmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out3 = out.unsqueeze(0);
  baddbmm_into(out3, a.unsqueeze(0), b.unsqueeze(0));
}

at::Tensor graph_conv_forward_kernel(const at::Tensor& x_, const at::Tensor& weight_,
                                     const c10::optional<at::Tensor>& bias_, const at::Tensor& A_) {
  check_graph_conv_args(x_, weight_, bias_, A_);
  TORCH_INTERNAL_ASSERT(x_.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t N = x_.size(0), c_in = x_.size(1), T = x_.size(2), V = x_.size(3), K = A_.size(0);
  const int64_t c_out = weight_.size(0) / K;
  const auto dtype = x_.scalar_type(), acc = accumulate_dtype(dtype), op = operand_dtype(dtype);
  const at::Tensor x = as_dtype(x_, op), A = as_dtype(A_, op);
  const at::Tensor W = as_dtype(weight_, op).view({K, c_out, c_in});
  at::Tensor y = at::empty({N, c_out, T, V}, x.options().dtype(acc));
  if (y.numel() == 0) return y.to(dtype);
  if (bias_.has_value()) {
    y.copy_(graph_conv_bias_term(as_dtype(*bias_, acc), as_dtype(A_, acc)).view({1, c_out, 1, V}).expand_as(y));
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
      baddbmm_into(y3, W.select(0, k).expand({N, c_out, c_in}), xa.view({N, c_in, T * V}));
    }
  } else {
    // y += (W_k @ x[n]) @ A[k] for each k; h holds W_k @ x[n] for the whole batch.
    at::Tensor h = at::empty({N, c_out, T, V}, x.options());
    at::Tensor h3 = h.view({N, c_out, T * V});
    at::Tensor y2 = y.view({N * c_out * T, V});
    for (int64_t k = 0; k < K; ++k) {
      at::bmm_out(h3, W.select(0, k).expand({N, c_out, c_in}), x.view({N, c_in, T * V}));
      addmm_into(y2, h.view({N * c_out * T, V}), A.select(0, k));
    }
  }
  return y.to(dtype);
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
  const auto dtype = x_.scalar_type(), acc = accumulate_dtype(dtype), op = operand_dtype(dtype);
  const at::Tensor grad = as_dtype(grad_, op), A = as_dtype(A_, op);
  // x and weight are read only for some gradients (the autograd wrapper passes stand-ins for the others).
  const at::Tensor x = (need_w || need_A) ? as_dtype(x_, op) : at::Tensor();
  const at::Tensor W = need_u ? as_dtype(weight_, op).view({K, c_out, c_in}) : at::Tensor();
  const auto options = grad.options(), acc_options = options.dtype(acc);
  const int64_t rows = N * c_in * T;

  at::Tensor grad_x = need_x ? at::empty({N, c_in, T, V}, acc_options) : at::Tensor();
  at::Tensor grad_W = need_w ? at::empty({K, c_out, c_in}, acc_options) : at::Tensor();
  at::Tensor grad_A = need_A ? at::empty({K, V, V}, acc_options) : at::Tensor();
  if (need_x && grad_x.numel() > 0 && K > 0) grad_x.zero_();
  if (need_w && N * T * V == 0) grad_W.zero_();
  if (need_A && rows == 0) grad_A.zero_();

  if (N * T * V > 0) {
    const at::Tensor g3 = grad.view({N, c_out, T * V});
    // u = W_k^T @ grad[n] (N, C_in, T, V) and xa = x @ A[k], one k at a time.
    at::Tensor u = need_u ? at::empty({N, c_in, T, V}, options) : at::Tensor();
    at::Tensor xa = need_w ? at::empty({N, c_in, T, V}, options) : at::Tensor();
    at::Tensor wk = need_w ? at::empty({N, c_out, c_in}, acc_options) : at::Tensor();
    const at::Tensor x2 = x.defined() ? x.view({rows, V}) : at::Tensor();
    for (int64_t k = 0; k < K; ++k) {
      if (need_u) {
        at::Tensor u3 = u.view({N, c_in, T * V});
        at::bmm_out(u3, W.select(0, k).t().expand({N, c_in, c_out}), g3);
      }
      if (need_x) {
        at::Tensor gx2 = grad_x.view({rows, V});
        addmm_into(gx2, u.view({rows, V}), A.select(0, k).t());
      }
      if (need_A) {
        at::Tensor out = grad_A.select(0, k).unsqueeze(0);
        bmm_into(out, x2.t().unsqueeze(0), u.view({1, rows, V}));
      }
      if (need_w) {
        at::Tensor xa2 = xa.view({rows, V});
        at::mm_out(xa2, x2, A.select(0, k));
        // (N, C_out, C_in) per-sample products, summed over the batch: small next to the GEMMs.
        bmm_into(wk, g3, xa.view({N, c_in, T * V}).transpose(1, 2));
        at::Tensor out = grad_W.select(0, k);
        at::sum_out(out, wk, at::IntArrayRef{0});
      }
    }
  }

  const bool need_G = need_b || (need_A && bias_.has_value());
  // G[c, w] = sum_{n,t} grad[n, c, t, w]: all that the bias needs.
  const at::Tensor G = need_G ? grad.sum(at::IntArrayRef{0, 2}, /*keepdim=*/false, acc) : at::Tensor();
  if (need_A && bias_.has_value()) graph_conv_add_bias_grad_A(grad_A, G, as_dtype(*bias_, acc));
  return {need_x ? grad_x.to(dtype) : graph_conv_no_grad(x_),
          need_w ? grad_W.view({K * c_out, c_in}).to(dtype) : graph_conv_no_grad(x_),
          need_b ? graph_conv_grad_bias(G, as_dtype(A_, acc)).to(dtype) : graph_conv_no_grad(x_),
          need_A ? grad_A.to(dtype) : graph_conv_no_grad(x_)};
}

}  // namespace

TORCH_LIBRARY_IMPL(skelemix, CUDA, m) {
  m.impl("graph_conv", &graph_conv_forward_kernel);
  m.impl("_graph_conv_backward", &graph_conv_backward_kernel);
}

}  // namespace skelemix
