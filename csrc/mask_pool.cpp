// Schema of skelemix::mask_pool and its backward (the semantics are skelemix.reference.mask_pool).
// Kernels: cpu/mask_pool_kernel.cpp, cuda/mask_pool_kernel.cu. Fake kernels and autograd: ops/mask_pool.py.
#include "mask_pool.h"

#include <torch/library.h>

#include "checks.h"

namespace skelemix {

namespace {
constexpr const char* kOp = "skelemix::mask_pool";
constexpr const char* kBackwardOp = "skelemix::_mask_pool_backward";

// mask is (G, T, V) bool, on the device of `t`, and G divides the batch size B = t.size(0).
void check_mask(const at::Tensor& mask, const at::Tensor& t, const char* t_name, const char* op) {
  check_dim(mask, op, "mask", 3, "(G, T, V)");
  check_bool(mask, op, "mask");
  check_same_device(t, t_name, mask, "mask", op);
}

void check_groups(int64_t B, int64_t G, const char* op) {
  TORCH_CHECK(G > 0 && B % G == 0, op, ": the batch size B=", B, " must be a multiple of the number of masks G=", G);
}
}  // namespace

at::Tensor mask_true_counts(const at::Tensor& mask) {
  return mask.reshape({mask.size(0), -1}).sum(at::IntArrayRef{1}, /*keepdim=*/false, at::kLong);
}

void check_mask_pool_args(const at::Tensor& x, const at::Tensor& mask) {
  check_dim(x, kOp, "x", 4, "(B, C, T, V)");
  check_floating(x, kOp, "x");
  check_mask(mask, x, "x", kOp);
  TORCH_CHECK(mask.size(1) == x.size(2) && mask.size(2) == x.size(3), kOp, ": mask must have shape (G, ", x.size(2),
              ", ", x.size(3), ") to match x of shape ", x.sizes(), "; got shape ", mask.sizes());
  check_groups(x.size(0), mask.size(0), kOp);
}

void check_mask_pool_backward_args(const at::Tensor& grad, const at::Tensor& mask) {
  check_dim(grad, kBackwardOp, "grad", 3, "(B, 2, C)");
  TORCH_CHECK(grad.size(1) == 2, kBackwardOp, ": grad must have shape (B, 2, C); got shape ", grad.sizes());
  check_floating(grad, kBackwardOp, "grad");
  check_mask(mask, grad, "grad", kBackwardOp);
  check_groups(grad.size(0), mask.size(0), kBackwardOp);
}

}  // namespace skelemix

TORCH_LIBRARY_FRAGMENT(skelemix, m) {
  // x: (B, C, T, V) floating; mask: (G, T, V) bool, B % G == 0; returns (B, 2, C) in x's dtype.
  m.def("mask_pool(Tensor x, Tensor mask) -> Tensor", {at::Tag::pt2_compliant_tag});
  // grad: (B, 2, C), the gradient of mask_pool's output; returns the gradient of x, (B, C, T, V).
  // B and C come from grad, T and V from mask, so no size arguments are needed.
  m.def("_mask_pool_backward(Tensor grad, Tensor mask) -> Tensor", {at::Tag::pt2_compliant_tag});
}
