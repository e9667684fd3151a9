// CPU kernels of skelemix::bn_epilogue and skelemix::_bn_epilogue_backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../bn_epilogue.h"

namespace skelemix {
namespace {

// Rows (n, c) per task: about 32k elements, so small inputs stay on one thread.
int64_t grain_rows(int64_t L) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1)); }

// What a launch needs besides the tensors: the seed's two halves, the dropout threshold and scale.
struct Dropout {
  bool on;
  uint32_t k0, k1, threshold;
  double scale;
};

Dropout make_dropout(const at::Tensor& seed, double p) {
  if (p <= 0) return {false, 0, 0, 0, 1.0};
  const auto s = static_cast<uint64_t>(seed.item<int64_t>());
  return {true, static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), dropout_threshold(p), 1.0 / (1.0 - p)};
}

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// y[row, l] = relu?(((x - mean) * a + bias) * keep-scale + residual) for rows (n, c) of length L.
template <typename scalar_t>
void forward_impl(const scalar_t* x, const scalar_t* residual, const acc_of<scalar_t>* mean,
                  const acc_of<scalar_t>* a, const acc_of<scalar_t>* bias, scalar_t* y, int64_t rows, int64_t C,
                  int64_t L, Dropout drop, bool relu) {
  using acc_t = acc_of<scalar_t>;
  const acc_t scale = static_cast<acc_t>(drop.scale);
  at::parallel_for(0, rows, grain_rows(L), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % C, base = row * L;
      const acc_t m = mean[c], ac = a[c], b = bias[c];
      for (int64_t l = 0; l < L; ++l) {
        const int64_t i = base + l;
        acc_t v = (static_cast<acc_t>(x[i]) - m) * ac + b;
        if (drop.on) v = dropout_hash(i, drop.k0, drop.k1) >= drop.threshold ? v * scale : acc_t(0);
        if (residual) v += static_cast<acc_t>(residual[i]);
        if (relu) v = std::max(v, acc_t(0));
        y[i] = static_cast<scalar_t>(v);
      }
    }
  });
}

// Pass 1: grad_residual, the per-row sums of gp and gp * xhat (double), and grad_x when it needs no sums.
// Pass 2 (batch statistics): grad_x = a * (gp - sum_gp / n - xhat * sum_gp_xhat / n).
template <typename scalar_t>
void backward_impl(const scalar_t* grad, const scalar_t* x, const scalar_t* y, const acc_of<scalar_t>* mean,
                   const acc_of<scalar_t>* invstd, const acc_of<scalar_t>* a, scalar_t* grad_x,
                   scalar_t* grad_residual, double* row_gp, double* row_gp_xhat, const double* sum_gp,
                   const double* sum_gp_xhat, int64_t rows, int64_t C, int64_t L, Dropout drop, bool relu,
                   bool batch_stats, int pass) {
  using acc_t = acc_of<scalar_t>;
  const acc_t scale = static_cast<acc_t>(drop.scale);
  const double n = static_cast<double>(rows / C * L);
  at::parallel_for(0, rows, grain_rows(L), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % C, base = row * L;
      const acc_t m = mean[c], is = invstd[c], ac = a[c];
      acc_t mean_gp = 0, mean_gp_xhat = 0;
      if (pass == 2) {
        mean_gp = static_cast<acc_t>(sum_gp[c] / n);
        mean_gp_xhat = static_cast<acc_t>(sum_gp_xhat[c] / n);
      }
      double s_gp = 0, s_gp_xhat = 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t i = base + l;
        acc_t gu = static_cast<acc_t>(grad[i]);
        if (relu && !(static_cast<acc_t>(y[i]) > 0)) gu = 0;
        const acc_t gp = drop.on ? (dropout_hash(i, drop.k0, drop.k1) >= drop.threshold ? gu * scale : acc_t(0)) : gu;
        const acc_t xhat = (static_cast<acc_t>(x[i]) - m) * is;
        if (pass == 1) {
          if (grad_residual) grad_residual[i] = static_cast<scalar_t>(gu);
          if (row_gp) s_gp += gp, s_gp_xhat += static_cast<double>(gp * xhat);
          if (grad_x && !batch_stats) grad_x[i] = static_cast<scalar_t>(gp * ac);
        } else {
          grad_x[i] = static_cast<scalar_t>(ac * (gp - mean_gp - xhat * mean_gp_xhat));
        }
      }
      if (pass == 1 && row_gp) row_gp[row] = s_gp, row_gp_xhat[row] = s_gp_xhat;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_epilogue_forward_kernel(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bias, const c10::optional<at::Tensor>& residual_,
    const c10::optional<at::Tensor>& stats_mean, const c10::optional<at::Tensor>& stats_var, const at::Tensor& seed,
    double eps, double p, bool relu) {
  check_bn_epilogue_args(x_, weight, bias, residual_, stats_mean, stats_var, seed, eps, p);
  TORCH_INTERNAL_ASSERT(x_.device().is_cpu());
  const at::Tensor x = x_.contiguous();
  const bool batch_stats = !stats_mean.has_value();
  at::Tensor mean, var;
  if (batch_stats) {
    std::tie(mean, var) = bn_epilogue_batch_stats(x);
  } else {
    mean = stats_mean->contiguous();
    var = stats_var->contiguous();
  }
  // Per-channel scale with the reference's own ATen ops, so both round it the same way.
  const at::Tensor a = weight.mul(at::rsqrt(var.add(eps))).contiguous(), b = bias.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const at::Tensor residual = residual_.has_value() ? residual_->contiguous() : at::Tensor();
  const int64_t C = x.size(1), rows = x.size(0) * C, L = C > 0 && rows > 0 ? x.numel() / rows : 0;
  if (x.numel() > 0) {
    const Dropout drop = make_dropout(seed, p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_epilogue_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      forward_impl<scalar_t>(x.const_data_ptr<scalar_t>(),
                             residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
                             mean.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                             y.mutable_data_ptr<scalar_t>(), rows, C, L, drop, relu);
    });
  }
  if (!batch_stats) {
    const auto empty = at::empty({0}, weight.options());
    return {y, empty, empty.clone()};
  }
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_epilogue_backward_kernel(
    const at::Tensor& grad_, const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& weight,
    const at::Tensor& mean_, const at::Tensor& var, const at::Tensor& seed, double eps, double p, bool relu,
    bool batch_stats, std::array<bool, 4> output_mask) {
  check_bn_epilogue_backward_args(grad_, x_, y_, weight, mean_, var, seed, eps, p);
  TORCH_INTERNAL_ASSERT(x_.device().is_cpu());
  const auto [need_x, need_w, need_b, need_r] = output_mask;
  const at::Tensor x = x_.contiguous(), y = y_.contiguous(), grad = grad_.contiguous(), mean = mean_.contiguous();
  const at::Tensor invstd = at::rsqrt(var.add(eps)).contiguous();
  const at::Tensor a = weight.mul(invstd).contiguous();
  const auto empty_like_x = at::empty({0}, x.options()), empty_acc = at::empty({0}, weight.options());
  at::Tensor grad_x = need_x ? at::empty(x.sizes(), x.options()) : empty_like_x;
  at::Tensor grad_residual = need_r ? at::empty(x.sizes(), x.options()) : empty_like_x.clone();
  const int64_t C = x.size(1), N = x.size(0), rows = N * C, L = rows > 0 ? x.numel() / rows : 0;
  const bool need_sums = need_w || need_b || (need_x && batch_stats);
  auto dopts = weight.options().dtype(at::kDouble);
  at::Tensor row_gp = need_sums ? at::zeros({N, C}, dopts) : at::Tensor();
  at::Tensor row_gp_xhat = need_sums ? at::zeros({N, C}, dopts) : at::Tensor();
  at::Tensor sum_gp, sum_gp_xhat;
  if (x.numel() > 0) {
    const Dropout drop = make_dropout(seed, p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_epilogue_backward_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      auto run = [&](int pass) {
        backward_impl<scalar_t>(
            grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
            mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(),
            need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
            pass == 1 && need_r ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
            need_sums ? row_gp.mutable_data_ptr<double>() : nullptr,
            need_sums ? row_gp_xhat.mutable_data_ptr<double>() : nullptr,
            sum_gp.defined() ? sum_gp.const_data_ptr<double>() : nullptr,
            sum_gp_xhat.defined() ? sum_gp_xhat.const_data_ptr<double>() : nullptr, rows, C, L, drop, relu,
            batch_stats, pass);
      };
      run(1);
      if (need_sums) sum_gp = row_gp.sum(0), sum_gp_xhat = row_gp_xhat.sum(0);
      if (need_x && batch_stats) run(2);
    });
  } else if (need_sums) {
    sum_gp = row_gp.sum(0), sum_gp_xhat = row_gp_xhat.sum(0);
  }
  at::Tensor grad_weight = need_w ? sum_gp_xhat.to(weight.scalar_type()) : empty_acc;
  at::Tensor grad_bias = need_b ? sum_gp.to(weight.scalar_type()) : empty_acc.clone();
  return {grad_x, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(skelemix, CPU, m) {
  m.impl("bn_epilogue", &bn_epilogue_forward_kernel);
  m.impl("_bn_epilogue_backward", &bn_epilogue_backward_kernel);
}

}  // namespace skelemix
