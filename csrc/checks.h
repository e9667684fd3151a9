// Argument checks shared by the CPU and CUDA kernels. Messages name the op, the argument, what was
// expected and what was passed; skelemix/ops/*.py repeats them in the fake kernels and the wrappers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace skelemix {

inline void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, "; got shape ", t.sizes());
}

// The dtypes every kernel dispatches over (AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16, ...)).
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be floating point (float32, float64, float16 or bfloat16); got ", s);
}

inline void check_bool(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, " must be a bool tensor; got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b, const char* name_b,
                              const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " and ", name_b, " must be on the same device; got ",
              name_a, " on ", a.device(), " and ", name_b, " on ", b.device());
}

}  // namespace skelemix
