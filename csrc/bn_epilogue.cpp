// Schema of skelemix::bn_epilogue and its backward (the semantics are skelemix.reference.bn_epilogue), the
// argument checks and the batch statistics shared by the CPU and CUDA kernels.
// Kernels: cpu/bn_epilogue_kernel.cpp, cuda/bn_epilogue_kernel.cu. Fake kernels and autograd: ops/bn_epilogue.py.
#include "bn_epilogue.h"

#include <ATen/ops/var_mean.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace skelemix {

namespace {
constexpr const char* kOp = "skelemix::bn_epilogue";
constexpr const char* kBackwardOp = "skelemix::_bn_epilogue_backward";
constexpr const char* kKeepOp = "skelemix::_bn_epilogue_dropout_keep";

void check_seed(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, op,
              ": seed must be an int64 tensor of one element; got ", seed.scalar_type(), " of shape ", seed.sizes());
}

void check_p(double p, const char* op) {
  TORCH_CHECK(p >= 0 && p < 1, op, ": p (dropout probability) must be in [0, 1); got ", p);
}

void check_channel_vector(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1),
              ",) (the channels of x, shape ", x.sizes(), "); got shape ", t.sizes());
  const auto acc = bn_epilogue_acc_type(x);
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " (the accumulation dtype of ", x.scalar_type(),
              " x); got ", t.scalar_type());
  check_same_device(x, "x", t, name, op);
}

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(), "; got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
              "); got ", t.scalar_type());
  check_same_device(x, "x", t, name, op);
}

void check_common(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& seed, double eps, double p,
                  const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": x must be at least 2-D (N, C, *); got shape ", x.sizes());
  check_floating(x, op, "x");
  check_channel_vector(weight, "weight", x, op);
  check_seed(seed, op);
  check_same_device(x, "x", seed, "seed", op);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0; got ", eps);
  check_p(p, op);
}
}  // namespace

at::ScalarType bn_epilogue_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> bn_epilogue_batch_stats(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  // 16-bit inputs are reduced in float32 (var_mean would return 16-bit statistics).
  auto [var, mean] = at::var_mean(x.to(bn_epilogue_acc_type(x)), dims, /*correction=*/0, /*keepdim=*/false);
  return {mean, var};
}

void check_bn_epilogue_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& stats_mean,
                            const c10::optional<at::Tensor>& stats_var, const at::Tensor& seed, double eps,
                            double p) {
  check_common(x, weight, seed, eps, p, kOp);
  check_channel_vector(bias, "bias", x, kOp);
  if (residual.has_value()) check_like_x(*residual, "residual", x, kOp);
  TORCH_CHECK(stats_mean.has_value() == stats_var.has_value(), kOp,
              ": stats_mean and stats_var must both be given (fixed statistics) or both be None (batch statistics)");
  if (stats_mean.has_value()) {
    check_channel_vector(*stats_mean, "stats_mean", x, kOp);
    check_channel_vector(*stats_var, "stats_var", x, kOp);
  }
}

void check_bn_epilogue_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                     const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& var,
                                     const at::Tensor& seed, double eps, double p) {
  check_common(x, weight, seed, eps, p, kBackwardOp);
  check_like_x(grad, "grad", x, kBackwardOp);
  check_like_x(y, "y", x, kBackwardOp);
  check_channel_vector(mean, "mean", x, kBackwardOp);
  check_channel_vector(var, "var", x, kBackwardOp);
}

void check_bn_epilogue_dropout_keep_args(const at::Tensor& seed, int64_t start, int64_t numel, double p) {
  check_seed(seed, kKeepOp);
  TORCH_CHECK(start >= 0 && numel >= 0 && numel <= INT64_MAX - start, kKeepOp,
              ": start and numel must be >= 0 with start + numel < 2**63; got start ", start, " and numel ", numel);
  check_p(p, kKeepOp);
}

}  // namespace skelemix

TORCH_LIBRARY_FRAGMENT(skelemix, m) {
  // x: (N, C, *) floating; weight, bias: (C,) in the accumulation dtype acc (float64 for float64 x, else float32);
  // residual: like x or None; stats_mean/stats_var: (C,) acc fixed statistics, or both None for the batch
  // statistics of x; seed: int64 (1,) on x's device, read when p > 0. Returns (y like x, mean, var): with batch
  // statistics their mean and biased variance (acc, (C,)), else two empty (0,) tensors.
  // y = relu?((x - mean) * weight * rsqrt(var + eps) + bias) * dropout keep / (1 - p) + residual).
  m.def("bn_epilogue(Tensor x, Tensor weight, Tensor bias, Tensor? residual, Tensor? stats_mean, Tensor? stats_var,"
        " Tensor seed, float eps, float p, bool relu) -> (Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // grad: the gradient of y; x, y: the forward's input and output; mean, var: the statistics the forward used.
  // batch_stats: they were x's batch statistics, so grad_x includes the gradient through them.
  // Returns (grad_x, grad_weight, grad_bias, grad_residual); output i is computed only when output_mask[i] is set
  // and is an empty (0,) tensor otherwise.
  m.def("_bn_epilogue_backward(Tensor grad, Tensor x, Tensor y, Tensor weight, Tensor mean, Tensor var, Tensor seed,"
        " float eps, float p, bool relu, bool batch_stats, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // The dropout mask of flat elements [start, start + numel) (bool, True = kept), computed as the kernels do: lets
  // tests compare every backend with skelemix.reference.dropout_keep at counters beyond 2**32.
  m.def("_bn_epilogue_dropout_keep(Tensor seed, int start, int numel, float p) -> Tensor");
}
