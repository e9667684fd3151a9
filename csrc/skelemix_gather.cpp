// Schema of skelemix::skelemix_gather (the semantics are skelemix.reference.skelemix_gather).
// Kernels: cpu/skelemix_gather_kernel.cpp, cuda/skelemix_gather_kernel.cu. Fake kernel: ops/skelemix_gather.py.
#include "skelemix_gather.h"

#include <ATen/ops/cat.h>
#include <torch/library.h>

#include "checks.h"

namespace skelemix {

namespace {
constexpr const char* kOp = "skelemix::skelemix_gather";

void check_long(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, kOp, ": ", name, " must be an int64 tensor; got ", t.scalar_type());
}
}  // namespace

void check_skelemix_gather_args(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& joints,
                                const at::Tensor& span, int64_t block) {
  check_dim(x, kOp, "x", 5, "(N, C, T, V, M)");
  check_floating(x, kOp, "x");
  check_dim(partner, kOp, "partner", 2, "(R, N)");
  check_long(partner, "partner");
  check_dim(joints, kOp, "joints", 3, "(R, G, V)");
  check_bool(joints, kOp, "joints");
  check_dim(span, kOp, "span", 3, "(R, G, 2)");
  check_long(span, "span");
  check_same_device(x, "x", partner, "partner", kOp);
  check_same_device(x, "x", joints, "joints", kOp);
  check_same_device(x, "x", span, "span", kOp);
  const int64_t N = x.size(0), V = x.size(3), R = partner.size(0), G = joints.size(1);
  TORCH_CHECK(partner.size(1) == N, kOp, ": partner must have shape (R, N) with N=", N,
              " (the batch size of x); got shape ", partner.sizes());
  TORCH_CHECK(joints.size(0) == R && joints.size(2) == V, kOp, ": joints must have shape (R, G, V) = (", R,
              ", G, ", V, ") to match partner and x; got shape ", joints.sizes());
  TORCH_CHECK(G == 1 || G == N, kOp, ": joints has G=", G,
              " groups; G must be 1 (one region for the batch) or N=", N, " (one per sample)");
  TORCH_CHECK(span.size(0) == R && span.size(1) == G && span.size(2) == 2, kOp, ": span must have shape (R, G, 2) = (",
              R, ", ", G, ", 2) to match joints; got shape ", span.sizes());
  TORCH_CHECK(block >= 1, kOp, ": block must be >= 1; got ", block);
}

void check_skelemix_gather_values(const at::Tensor& partner, const at::Tensor& span, int64_t N, int64_t T,
                                  int64_t block) {
  // One host copy of both (tiny: R*N + 2*R*G values), so a CUDA caller pays a single sync.
  const at::Tensor values = at::cat({partner.reshape(-1), span.reshape(-1)}).cpu();
  const int64_t* p = values.const_data_ptr<int64_t>();
  const int64_t R = partner.size(0), G = span.size(1), blocks = num_blocks(T, block);
  for (int64_t i = 0; i < R * N; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < N, kOp, ": partner must hold sample indices in [0, N=", N, "); got partner[",
                      i / N, ", ", i % N, "] = ", p[i]);
  }
  const int64_t* s = p + R * N;
  for (int64_t i = 0; i < R * G; ++i) {
    const int64_t start = s[2 * i], end = s[2 * i + 1];
    TORCH_CHECK_VALUE(0 <= start && start <= end && end <= blocks, kOp,
                      ": span must hold block ranges [start, end) with 0 <= start <= end <= ceil(T / block) = ",
                      blocks, " (T=", T, ", block=", block, "); got span[", i / G, ", ", i % G, "] = [", start, ", ",
                      end, "]");
  }
}

}  // namespace skelemix

TORCH_LIBRARY_FRAGMENT(skelemix, m) {
  // x: (N, C, T, V, M) floating; partner: (R, N) int64 in [0, N); joints: (R, G, V) bool, G in {1, N};
  // span: (R, G, 2) int64 [start, end) in blocks of `block` frames. Returns mixed (R*N, C, T, V, M) in x's
  // dtype and mask (R, N, ceil(T / block), V) bool. Forward only: the op registers no autograd.
  // check_values=false skips the value checks on CUDA (they copy partner and span to the host: a sync); the
  // kernel then never reads out of bounds, but an invalid value gives an unspecified mix. CPU always checks.
  m.def(
      "skelemix_gather(Tensor x, Tensor partner, Tensor joints, Tensor span, int block, bool check_values=True) "
      "-> (Tensor mixed, Tensor mask)",
      {at::Tag::pt2_compliant_tag});
}
