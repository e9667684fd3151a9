// CPU kernels of skelemix::graph_conv and skelemix::_graph_conv_backward.
//
// Work is split over samples with at::parallel_for; each thread runs small GEMMs (at::mm_out / addmm_) on one
// sample at a time into its own buffers, so the per-sample intermediate stays in cache and the
// (N, K*C_out, T, V) tensor of the eager 1x1 conv + einsum is never written. Notation (per sample, row-major):
//   X  = x[n]    as (C_in*T, V)      xa[k] = X @ A[k]   (C_in*T, V), stacked as (K*C_in, T*V)
//   W' = weight  as (C_out, K*C_in)  (graph_conv_weight_to_wide)
// Forward, A first (C_in <= C_out):  y[n] (C_out, T*V) = W' @ xa  (+ bias term).
// Forward, weight first:             h = weight @ x[n] (K*C_out, T*V);  y[n] (C_out*T, V) = sum_k h[k] @ A[k].
// Backward (either case), with g = grad[n] (C_out, T*V) and u = W'^T @ g (K*C_in, T*V):
//   grad_x[n] (C_in*T, V) = sum_k u[k] @ A[k]^T;  grad_A[k] += X^T @ u[k];  grad_W' += g @ xa^T,
// so every big GEMM is K*C_in*C_out*T*V, as in the eager backward, and every A-product is a (.., V) x (V, V)
// one. half and bfloat16 are computed in float (whole tensors upcast) and rounded once at the end.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../graph_conv.h"

namespace skelemix {
namespace {

// The dtype the GEMMs run in: float for half and bfloat16 (float accumulation), else the input's.
at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

at::Tensor to_compute(const at::Tensor& t) { return t.to(compute_dtype(t.scalar_type())).contiguous(); }

// Runs f(begin, end, thread_index) over samples [0, N) on the intra-op threads. at::parallel_for does not carry
// the dispatcher's thread-local state to its workers; the at:: calls in f need it (autograd is excluded below
// this kernel, for one).
template <typename F>
void for_each_sample_chunk(int64_t N, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(0, N, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    f(begin, end, at::get_thread_num());
  });
}

// The K slices of a (K, ...) tensor, made once: views cost a dispatcher call each, and the loops below would
// otherwise make them for every sample.
std::vector<at::Tensor> slices(const at::Tensor& t, bool transpose = false) {
  std::vector<at::Tensor> out;
  for (int64_t k = 0; k < t.size(0); ++k) out.push_back(transpose ? t.select(0, k).t() : t.select(0, k));
  return out;
}

// xa[k] = X @ A[k] for one sample X (C_in*T, V); xa_k[k] is (C_in*T, V).
void apply_A(const at::Tensor& X, const std::vector<at::Tensor>& A_k, std::vector<at::Tensor>& xa_k) {
  for (size_t k = 0; k < A_k.size(); ++k) at::mm_out(xa_k[k], X, A_k[k]);
}

// G[c, w] += sum_t g[c, t, w] for one sample g (C_out, T, V), contiguous.
template <typename scalar_t>
void add_time_sum(const scalar_t* g, scalar_t* G, int64_t c_out, int64_t T, int64_t V) {
  for (int64_t c = 0; c < c_out; ++c) {
    scalar_t* Gc = G + c * V;
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* gt = g + (c * T + t) * V;
      for (int64_t w = 0; w < V; ++w) Gc[w] += gt[w];
    }
  }
}

at::Tensor graph_conv_forward_kernel(const at::Tensor& x_, const at::Tensor& weight_,
                                     const c10::optional<at::Tensor>& bias_, const at::Tensor& A_) {
  check_graph_conv_args(x_, weight_, bias_, A_);
  TORCH_INTERNAL_ASSERT(x_.device().is_cpu());
  const int64_t N = x_.size(0), c_in = x_.size(1), T = x_.size(2), V = x_.size(3), K = A_.size(0);
  const int64_t c_out = weight_.size(0) / K;
  const at::Tensor x = to_compute(x_), weight = to_compute(weight_), A = to_compute(A_);
  at::Tensor y = at::empty({N, c_out, T, V}, x.options());
  if (y.numel() == 0) return y.to(x_.scalar_type());
  // (C_out, 1, V) added to every frame; undefined without a bias.
  const at::Tensor bias_term =
      bias_.has_value() ? graph_conv_bias_term(to_compute(*bias_), A).unsqueeze(1) : at::Tensor();
  const bool a_first = graph_conv_a_first(c_in, c_out);
  const at::Tensor wide = a_first ? graph_conv_weight_to_wide(weight, K) : at::Tensor();

  const std::vector<at::Tensor> A_k = slices(A);
  const at::Tensor bias_frames = bias_term.defined() ? bias_term.expand({c_out, T, V}) : at::Tensor();

  for_each_sample_chunk(N, [&](int64_t begin, int64_t end, int64_t /*thread*/) {
    // Per-thread intermediate: xa (K, C_in*T, V) or h (K, C_out*T, V), i.e. (K*C_out, T*V).
    at::Tensor buf = a_first ? at::empty({K, c_in * T, V}, x.options()) : at::empty({K, c_out * T, V}, x.options());
    std::vector<at::Tensor> buf_k = slices(buf);
    const at::Tensor buf2 = a_first ? buf.view({K * c_in, T * V}) : buf.view({K * c_out, T * V});
    for (int64_t n = begin; n < end; ++n) {
      const at::Tensor xn = x.select(0, n);
      at::Tensor yn = y.select(0, n);
      if (bias_frames.defined()) yn.copy_(bias_frames);
      if (a_first) {
        apply_A(xn.view({c_in * T, V}), A_k, buf_k);
        at::Tensor y2 = yn.view({c_out, T * V});
        if (bias_frames.defined()) {
          y2.addmm_(wide, buf2);
        } else {
          at::mm_out(y2, wide, buf2);
        }
      } else {
        at::Tensor h = buf2;
        at::mm_out(h, weight, xn.view({c_in, T * V}));
        at::Tensor y2 = yn.view({c_out * T, V});
        for (int64_t k = 0; k < K; ++k) {
          if (k == 0 && !bias_frames.defined()) {
            at::mm_out(y2, buf_k[0], A_k[0]);
          } else {
            y2.addmm_(buf_k[k], A_k[k]);
          }
        }
      }
    }
  });
  return y.to(x_.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_conv_backward_kernel(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias_,
    const at::Tensor& A_, std::array<bool, 4> output_mask) {
  check_graph_conv_backward_args(grad_, x_, weight_, bias_, A_);
  TORCH_INTERNAL_ASSERT(x_.device().is_cpu());
  const int64_t N = x_.size(0), c_in = x_.size(1), T = x_.size(2), V = x_.size(3), K = A_.size(0);
  const int64_t c_out = weight_.size(0) / K;
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && bias_.has_value();
  const bool need_A = output_mask[3];
  const bool need_u = need_x || need_A;
  // Autograd often passes expanded (stride-0) grads; contiguous() materialises them. x and weight are read only
  // for some gradients (the autograd wrapper passes stand-ins for the others).
  const at::Tensor grad = to_compute(grad_), A = to_compute(A_);
  const at::Tensor x = (need_w || need_A) ? to_compute(x_) : at::Tensor();
  const at::Tensor wide = need_u ? graph_conv_weight_to_wide(to_compute(weight_), K) : at::Tensor();
  const int64_t threads = at::get_num_threads();

  const auto options = grad.options();
  at::Tensor grad_x = need_x ? at::empty({N, c_in, T, V}, options) : at::Tensor();
  // Per-thread partial sums of grad_W' and grad_A, reduced after the loop.
  at::Tensor wide_parts = need_w ? at::zeros({threads, c_out, K * c_in}, options) : at::Tensor();
  at::Tensor A_parts = need_A ? at::zeros({threads, K, V, V}, options) : at::Tensor();

  // G[c, w] = sum_{n,t} grad[n, c, t, w]: all that the bias needs (per-thread parts, like the others).
  const bool need_G = need_b || (need_A && bias_.has_value());
  at::Tensor G_parts = need_G ? at::zeros({threads, c_out, V}, options) : at::Tensor();
  const std::vector<at::Tensor> A_k = slices(A), A_kt = slices(A, /*transpose=*/true);

  if (N * T * V > 0) {
    for_each_sample_chunk(N, [&](int64_t begin, int64_t end, int64_t thread) {
      at::Tensor u = need_u ? at::empty({K, c_in * T, V}, options) : at::Tensor();
      at::Tensor xa = need_w ? at::empty({K, c_in * T, V}, options) : at::Tensor();
      std::vector<at::Tensor> u_k = need_u ? slices(u) : std::vector<at::Tensor>();
      std::vector<at::Tensor> xa_k = need_w ? slices(xa) : std::vector<at::Tensor>();
      at::Tensor u2 = need_u ? u.view({K * c_in, T * V}) : at::Tensor();
      const at::Tensor xa2t = need_w ? xa.view({K * c_in, T * V}).t() : at::Tensor();
      const at::Tensor wide_t = need_u ? wide.t() : at::Tensor();
      at::Tensor wide_part = need_w ? wide_parts.select(0, thread) : at::Tensor();
      std::vector<at::Tensor> A_part_k = need_A ? slices(A_parts.select(0, thread)) : std::vector<at::Tensor>();
      at::Tensor G_part = need_G ? G_parts.select(0, thread) : at::Tensor();
      for (int64_t n = begin; n < end; ++n) {
        const at::Tensor gn = grad.select(0, n);
        const at::Tensor g = gn.view({c_out, T * V});
        const at::Tensor X = x.defined() ? x.select(0, n).view({c_in * T, V}) : at::Tensor();
        if (need_u) at::mm_out(u2, wide_t, g);
        if (need_x) {
          at::Tensor gx = grad_x.select(0, n).view({c_in * T, V});
          at::mm_out(gx, u_k[0], A_kt[0]);
          for (int64_t k = 1; k < K; ++k) gx.addmm_(u_k[k], A_kt[k]);
        }
        if (need_A) {
          const at::Tensor Xt = X.t();
          for (int64_t k = 0; k < K; ++k) A_part_k[k].addmm_(Xt, u_k[k]);
        }
        if (need_w) {
          apply_A(X, A_k, xa_k);
          wide_part.addmm_(g, xa2t);
        }
        if (need_G) {
          AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "graph_conv_bias_grad_cpu", [&] {
            add_time_sum<scalar_t>(gn.const_data_ptr<scalar_t>(), G_part.mutable_data_ptr<scalar_t>(), c_out, T, V);
          });
        }
      }
    });
  }

  const auto dtype = x_.scalar_type();
  const at::Tensor G = need_G ? G_parts.sum(0) : at::Tensor();
  at::Tensor grad_A;
  if (need_A) {
    grad_A = A_parts.sum(0);
    if (bias_.has_value()) graph_conv_add_bias_grad_A(grad_A, G, to_compute(*bias_));
  }
  return {need_x ? grad_x.to(dtype) : graph_conv_no_grad(x_),
          need_w ? graph_conv_weight_from_wide(wide_parts.sum(0), K).to(dtype) : graph_conv_no_grad(x_),
          need_b ? graph_conv_grad_bias(G, A).to(dtype) : graph_conv_no_grad(x_),
          need_A ? grad_A.to(dtype) : graph_conv_no_grad(x_)};
}

}  // namespace

TORCH_LIBRARY_IMPL(skelemix, CPU, m) {
  m.impl("graph_conv", &graph_conv_forward_kernel);
  m.impl("_graph_conv_backward", &graph_conv_backward_kernel);
}

}  // namespace skelemix
