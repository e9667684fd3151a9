// CUDA kernel of skelemix::skelemix_gather.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../skelemix_gather.h"
#include "helpers.cuh"

namespace skelemix {
namespace {

constexpr int kThreads = 256;

// The op is a copy, so it moves raw bits: elem_t is an unsigned integer of the dtype's size.
//
// Grid: y strides over the R*N output samples (r, n), x over the C*T*V*M elements of one sample, which are
// contiguous in x and in out; per sample the source (partner or self), span and joints are fixed, so the
// per-element work is three divisions (32-bit when the sample fits, index_t) and one select.
// x: (N, plane) contiguous; partner: (R, N); joints: (R, G, V); span: (R, G, 2); out: (R*N, plane);
// mask: (R, N, blocks, V), written by a flat grid-stride loop after the copy.
template <typename elem_t, typename index_t>
__global__ void skelemix_gather_kernel_impl(const elem_t* __restrict__ x, const int64_t* __restrict__ partner,
                                            const bool* __restrict__ joints, const int64_t* __restrict__ span,
                                            elem_t* __restrict__ out, bool* __restrict__ mask, int64_t R, int64_t N,
                                            index_t plane, index_t T, index_t VM, index_t M, int64_t V, int64_t G,
                                            int64_t block, int64_t blocks) {
  for (int64_t rn = blockIdx.y; rn < R * N; rn += gridDim.y) {
    const int64_t n = rn % N, r = rn / N, rg = r * G + (G == 1 ? 0 : n);
    const int64_t t0 = span[2 * rg] * block, t1 = span[2 * rg + 1] * block;  // may pass T: the last block is partial
    const bool* jr = joints + rg * V;
    const elem_t* own = x + n * static_cast<int64_t>(plane);
    // Unchecked values (check_values=false) must still not read out of bounds: a bad partner copies the sample.
    const int64_t p = partner[rn];
    const elem_t* src = x + ((p >= 0 && p < N) ? p : n) * static_cast<int64_t>(plane);
    elem_t* dst = out + rn * static_cast<int64_t>(plane);
    for (index_t k = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; k < plane;
         k += static_cast<index_t>(blockDim.x) * gridDim.x) {
      const index_t q = k / VM, t = q % T, v = (k - q * VM) / M;
      const bool pasted = t0 <= static_cast<int64_t>(t) && static_cast<int64_t>(t) < t1 && jr[v];
      dst[k] = (pasted ? src : own)[k];
    }
  }
  const int64_t mask_numel = R * N * blocks * V;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x * gridDim.y;
  for (int64_t i = (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
       i < mask_numel; i += stride) {
    const int64_t v = i % V, b = (i / V) % blocks, rn = i / (V * blocks);
    const int64_t n = rn % N, r = rn / N, rg = r * G + (G == 1 ? 0 : n);
    mask[i] = span[2 * rg] <= b && b < span[2 * rg + 1] && joints[rg * V + v];
  }
}

template <typename elem_t, typename index_t>
void launch(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& joints, const at::Tensor& span,
            at::Tensor& out, at::Tensor& mask, int64_t block, dim3 grid, cudaStream_t stream) {
  const int64_t N = x.size(0), T = x.size(2), V = x.size(3), M = x.size(4);
  const int64_t plane = x.numel() / std::max<int64_t>(N, 1);
  skelemix_gather_kernel_impl<elem_t, index_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const elem_t*>(x.const_data_ptr()), partner.const_data_ptr<int64_t>(), joints.const_data_ptr<bool>(),
      span.const_data_ptr<int64_t>(), static_cast<elem_t*>(out.mutable_data_ptr()), mask.mutable_data_ptr<bool>(),
      partner.size(0), N, static_cast<index_t>(plane), static_cast<index_t>(T), static_cast<index_t>(V * M),
      static_cast<index_t>(M), V, joints.size(1), block, num_blocks(T, block));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename elem_t>
void launch_by_index(const at::Tensor& x, const at::Tensor& partner, const at::Tensor& joints, const at::Tensor& span,
                     at::Tensor& out, at::Tensor& mask, int64_t block, dim3 grid, cudaStream_t stream) {
  const int64_t plane = x.numel() / std::max<int64_t>(x.size(0), 1);
  // 32-bit in-sample indices when the loop's last step cannot overflow them.
  if (plane + static_cast<int64_t>(grid.x) * kThreads <= std::numeric_limits<uint32_t>::max()) {
    launch<elem_t, uint32_t>(x, partner, joints, span, out, mask, block, grid, stream);
  } else {
    launch<elem_t, int64_t>(x, partner, joints, span, out, mask, block, grid, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> skelemix_gather_forward_kernel(const at::Tensor& x_, const at::Tensor& partner_,
                                                                  const at::Tensor& joints_, const at::Tensor& span_,
                                                                  int64_t block, bool check_values) {
  check_skelemix_gather_args(x_, partner_, joints_, span_, block);
  TORCH_INTERNAL_ASSERT(x_.device().is_cuda());
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t N = x_.size(0), C = x_.size(1), T = x_.size(2), V = x_.size(3), M = x_.size(4);
  const int64_t R = partner_.size(0), blocks = num_blocks(T, block);
  // Reads partner and span on the host (one small copy, a sync) so a bad index is a clear error. Callers whose
  // values are valid by construction (SkeleMix's own draws) skip it: the kernel stays in bounds either way.
  if (check_values) check_skelemix_gather_values(partner_, span_, N, T, block);
  at::Tensor mixed = at::empty({R * N, C, T, V, M}, x_.options());
  at::Tensor mask = at::empty({R, N, blocks, V}, joints_.options());
  if (mixed.numel() == 0 && mask.numel() == 0) return {mixed, mask};
  const at::Tensor x = x_.contiguous(), partner = partner_.contiguous(), joints = joints_.contiguous(),
                   span = span_.contiguous();
  // y covers the samples (capped; the kernel strides over the rest), x the elements of one sample, capped so
  // the whole grid stays within cuda::kMaxBlocks blocks.
  const int64_t plane = C * T * V * M;
  const unsigned int grid_y = cuda::capped_blocks(R * N, 1);
  const unsigned int grid_x = static_cast<unsigned int>(std::clamp<int64_t>(
      std::max(cuda::ceil_div(plane, kThreads), cuda::ceil_div(mask.numel(), kThreads * int64_t{grid_y})), 1,
      std::max<int64_t>(1, cuda::kMaxBlocks / grid_y)));
  const dim3 grid(grid_x, grid_y);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (x.element_size()) {
    case 2: launch_by_index<uint16_t>(x, partner, joints, span, mixed, mask, block, grid, stream); break;
    case 4: launch_by_index<uint32_t>(x, partner, joints, span, mixed, mask, block, grid, stream); break;
    case 8: launch_by_index<uint64_t>(x, partner, joints, span, mixed, mask, block, grid, stream); break;
    default: TORCH_INTERNAL_ASSERT(false, "unexpected element size ", x.element_size());
  }
  return {mixed, mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(skelemix, CUDA, m) { m.impl("skelemix_gather", &skelemix_gather_forward_kernel); }

}  // namespace skelemix
