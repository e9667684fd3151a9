// Schema of skelemix::graph_conv and its backward (the semantics are skelemix.reference.graph_conv), the
// argument checks and the small host-side pieces shared by the CPU and CUDA kernels.
// Kernels: cpu/graph_conv_kernel.cpp, cuda/graph_conv_kernel.cu. Fake kernels and autograd: ops/graph_conv.py.
#include "graph_conv.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <torch/library.h>

#include "checks.h"

namespace skelemix {

namespace {
constexpr const char* kOp = "skelemix::graph_conv";
constexpr const char* kBackwardOp = "skelemix::_graph_conv_backward";

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
              "); got ", t.scalar_type());
}

void check_operands(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& A, const char* op) {
  check_dim(x, op, "x", 4, "(N, C_in, T, V)");
  check_floating(x, op, "x");
  check_dim(weight, op, "weight", 2, "(K * C_out, C_in)");
  check_dim(A, op, "A", 3, "(K, V, V)");
  check_same_dtype(weight, "weight", x, op);
  check_same_dtype(A, "A", x, op);
  check_same_device(x, "x", weight, "weight", op);
  check_same_device(x, "x", A, "A", op);
  const int64_t V = x.size(3), K = A.size(0);
  TORCH_CHECK(A.size(1) == V && A.size(2) == V, op, ": A must have shape (K, ", V, ", ", V,
              ") to match x of shape ", x.sizes(), "; got shape ", A.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight must have shape (K * C_out, ", x.size(1),
              ") to match x of shape ", x.sizes(), "; got shape ", weight.sizes());
  TORCH_CHECK(K > 0 && weight.size(0) % K == 0, op, ": weight must have a multiple of K = ", K,
              " rows (K * C_out) to match A of shape ", A.sizes(), "; got shape ", weight.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), op, ": bias must have shape (", weight.size(0),
                ",) (K * C_out) to match weight of shape ", weight.sizes(), "; got shape ", b.sizes());
    check_same_dtype(b, "bias", x, op);
    check_same_device(x, "x", b, "bias", op);
  }
}
}  // namespace

void check_graph_conv_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& A) {
  check_operands(x, weight, bias, A, kOp);
}

void check_graph_conv_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, const at::Tensor& A) {
  check_operands(x, weight, bias, A, kBackwardOp);
  check_same_dtype(grad, "grad", x, kBackwardOp);
  check_same_device(x, "x", grad, "grad", kBackwardOp);
  const int64_t c_out = weight.size(0) / A.size(0);
  const bool ok = grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(1) == c_out &&
                  grad.size(2) == x.size(2) && grad.size(3) == x.size(3);
  TORCH_CHECK(ok, kBackwardOp, ": grad must have shape (N, C_out, T, V) = [", x.size(0), ", ", c_out, ", ",
              x.size(2), ", ", x.size(3), "]; got shape ", grad.sizes());
}

at::Tensor graph_conv_bias_term(const at::Tensor& bias, const at::Tensor& A) {
  const int64_t K = A.size(0);
  return at::matmul(bias.view({K, -1}).t(), A.sum(1));  // (C_out, K) @ (K, V)
}

at::Tensor graph_conv_grad_bias(const at::Tensor& G, const at::Tensor& A) {
  return at::matmul(A.sum(1), G.t()).reshape({-1});  // (K, V) @ (V, C_out), flattened k-major
}

void graph_conv_add_bias_grad_A(at::Tensor& grad_A, const at::Tensor& G, const at::Tensor& bias) {
  const int64_t K = grad_A.size(0);
  grad_A.add_(at::matmul(bias.view({K, -1}), G).unsqueeze(1));  // (K, 1, V): the same for every v
}

at::Tensor graph_conv_weight_to_wide(const at::Tensor& weight, int64_t K) {
  const int64_t c_in = weight.size(1), c_out = weight.size(0) / K;
  return weight.view({K, c_out, c_in}).permute({1, 0, 2}).reshape({c_out, K * c_in});
}

at::Tensor graph_conv_weight_from_wide(const at::Tensor& wide, int64_t K) {
  const int64_t c_out = wide.size(0), c_in = wide.size(1) / K;
  return wide.view({c_out, K, c_in}).permute({1, 0, 2}).reshape({K * c_out, c_in});
}

at::Tensor graph_conv_no_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace skelemix

TORCH_LIBRARY_FRAGMENT(skelemix, m) {
  // x: (N, C_in, T, V); weight: (K*C_out, C_in); bias: (K*C_out,) or None; A: (K, V, V); all one floating
  // dtype and device. Returns y (N, C_out, T, V) with
  // y[n, c, t, w] = sum_k sum_v (sum_i weight[k*C_out + c, i] * x[n, i, t, v] + bias[k*C_out + c]) * A[k, v, w].
  m.def("graph_conv(Tensor x, Tensor weight, Tensor? bias, Tensor A) -> Tensor", {at::Tag::pt2_compliant_tag});
  // grad: (N, C_out, T, V), the gradient of y. Returns (grad_x, grad_weight, grad_bias, grad_A); output i is
  // computed only when output_mask[i] is set (grad_bias also needs a bias), and is an empty (0,) tensor
  // otherwise.
  m.def("_graph_conv_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor A, bool[4] output_mask)"
        " -> (Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}
