// CPU kernels of skelemix::bn_epilogue and skelemix::_bn_epilogue_backward.
//
// Every pass walks rows (n, c) of x viewed as (N, C, L). The per-element work is written as branch-free loops
// over one row, specialised on the dropout and ReLU flags, so the compiler vectorises them. The dropout bits
// (Philox4x32-10, bn_epilogue.h) are computed first for pieces of up to kPiece elements into a buffer that stays
// in L1, eight lanes at a time with AVX2 where the CPU has it. Sums run in kLanes independent accumulators per
// row and are added up in double across rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SKELEMIX_PHILOX_AVX2 1
#include <immintrin.h>
#endif

#include "../bn_epilogue.h"

namespace skelemix {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kPiece = 256;  // elements per dropout-bits buffer

// Rows (n, c) per task: about 32k elements, so small inputs stay on one thread.
int64_t grain_rows(int64_t L) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1)); }

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

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

#ifdef SKELEMIX_PHILOX_AVX2
// The high and low 32 bits of m * a in eight lanes (vpmuludq multiplies the even lanes, so twice).
__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// philox4x32_10_word0 for counters (lo + j, hi), j < n rounded down to a multiple of 8; returns that count.
__attribute__((target("avx2"))) int64_t dropout_bits_avx2(uint32_t* bits, int64_t n, uint32_t lo, uint32_t hi,
                                                          uint32_t k0, uint32_t k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo + static_cast<uint32_t>(j))), lanes);
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(hi)), c2 = _mm256_setzero_si256(), c3 = c2;
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(c0, m0, hi0, lo0);
      mulhilo_avx2(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(key0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(key1)));
      c1 = lo1;
      c3 = lo0;
      key0 += 0x9E3779B9u;
      key1 += 0xBB67AE85u;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits + j), c0);
  }
  return j;
}
#endif

// bits[j] = philox4x32_10_word0(lo + j, hi, k0, k1) for j < n: with AVX2 (2.3x the scalar rate on this
// project's CPU) where the CPU has it, the scalar function of bn_epilogue.h for the rest.
void dropout_bits(uint32_t* bits, int64_t n, uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1) {
  int64_t j = 0;
#ifdef SKELEMIX_PHILOX_AVX2
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) j = dropout_bits_avx2(bits, n, lo, hi, k0, k1);
#endif
  for (; j < n; ++j) bits[j] = philox4x32_10_word0(lo + static_cast<uint32_t>(j), hi, k0, k1);
}

// Calls piece(offset, length, bits) for consecutive pieces of the flat range [base, base + L); bits[j] are the
// dropout bits of element base + offset + j (null without dropout). With dropout a piece has at most kPiece
// elements and never crosses a multiple of 2**32, so its counters are (lo + j, hi) with one hi.
template <typename F>
void for_each_piece(int64_t base, int64_t L, const Dropout& drop, F&& piece) {
  if (!drop.on) {
    piece(int64_t{0}, L, static_cast<const uint32_t*>(nullptr));
    return;
  }
  uint32_t bits[kPiece];
  int64_t offset = 0;
  while (offset < L) {
    const auto i = static_cast<uint64_t>(base + offset);
    const int64_t to_boundary = static_cast<int64_t>((uint64_t{1} << 32) - (i & 0xFFFFFFFFu));
    const int64_t length = std::min({L - offset, to_boundary, kPiece});
    dropout_bits(bits, length, static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), drop.k0, drop.k1);
    piece(offset, length, static_cast<const uint32_t*>(bits));
    offset += length;
  }
}

// ReLU and its gradient as torch.relu computes them: a NaN v passes the forward, and a NaN y passes the gradient
// (only y <= 0 is clamped), so a diverging run stays visible to the trainer's finiteness check.
template <typename acc_t>
inline acc_t relu_keep_nan(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

template <typename acc_t>
inline acc_t relu_grad_keep_nan(acc_t grad, acc_t y) {
  return y <= acc_t(0) ? acc_t(0) : grad;
}

// The dropout factor of an element with these bits: scale if kept, else 0. A multiply rather than a branch: the
// branch is mispredicted half the time and keeps the loop from vectorising (5x slower).
template <typename acc_t>
inline acc_t keep_factor(uint32_t bits, uint32_t threshold, acc_t scale) {
  return bits >= threshold ? scale : acc_t(0);
}

// ------------------------------------------------------------------------------------------------ statistics

// Per-channel mean and biased variance. Sums of (x - shift) and its square in double, with the channel's
// first element as the shift, so a large mean does not cancel the variance.
template <typename scalar_t>
void batch_stats_impl(const scalar_t* x, acc_of<scalar_t>* mean, acc_of<scalar_t>* var, int64_t N, int64_t C,
                      int64_t L) {
  at::parallel_for(0, C, std::max<int64_t>(1, 32768 / std::max<int64_t>(N * L, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const double shift = static_cast<double>(x[c * L]);
      double sum = 0, sum_sq = 0;
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* row = x + (n * C + c) * L;
        double s[kLanes] = {}, q[kLanes] = {};
        int64_t l = 0;
        for (; l + kLanes <= L; l += kLanes) {
          for (int j = 0; j < kLanes; ++j) {
            const double d = static_cast<double>(row[l + j]) - shift;
            s[j] += d;
            q[j] += d * d;
          }
        }
        for (; l < L; ++l) {
          const double d = static_cast<double>(row[l]) - shift;
          s[0] += d;
          q[0] += d * d;
        }
        for (int j = 0; j < kLanes; ++j) sum += s[j], sum_sq += q[j];
      }
      const double count = static_cast<double>(N * L), m = sum / count;
      mean[c] = static_cast<acc_of<scalar_t>>(shift + m);
      var[c] = static_cast<acc_of<scalar_t>>(std::max(sum_sq / count - m * m, 0.0));
    }
  });
}

// --------------------------------------------------------------------------------------------------- forward

template <bool kDrop, bool kRelu, typename scalar_t>
void forward_rows(const scalar_t* x, const scalar_t* residual, const acc_of<scalar_t>* mean,
                  const acc_of<scalar_t>* a, const acc_of<scalar_t>* bias, scalar_t* y, int64_t rows, int64_t C,
                  int64_t L, Dropout drop) {
  using acc_t = acc_of<scalar_t>;
  const acc_t scale = static_cast<acc_t>(drop.scale);
  at::parallel_for(0, rows, grain_rows(L), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % C, base = row * L;
      const acc_t m = mean[c], ac = a[c], b = bias[c];
      for_each_piece(base, L, drop, [&](int64_t off, int64_t len, const uint32_t* bits) {
        const scalar_t* xs = x + base + off;
        const scalar_t* rs = residual ? residual + base + off : nullptr;
        scalar_t* ys = y + base + off;
        auto value = [&](int64_t j) {
          acc_t v = (static_cast<acc_t>(xs[j]) - m) * ac + b;
          if constexpr (kDrop) v *= keep_factor(bits[j], drop.threshold, scale);
          return v;
        };
        if (rs) {
          for (int64_t j = 0; j < len; ++j) {
            const acc_t v = value(j) + static_cast<acc_t>(rs[j]);
            ys[j] = static_cast<scalar_t>(kRelu ? relu_keep_nan(v) : v);
          }
        } else {
          for (int64_t j = 0; j < len; ++j) {
            const acc_t v = value(j);
            ys[j] = static_cast<scalar_t>(kRelu ? relu_keep_nan(v) : v);
          }
        }
      });
    }
  });
}

// -------------------------------------------------------------------------------------------------- backward

// The pointers of one backward pass; a null output is not written.
template <typename scalar_t>
struct BackwardArgs {
  const scalar_t *grad, *x, *y;
  const acc_of<scalar_t>*mean, *invstd, *a;
  scalar_t *grad_x, *grad_residual;
  double *row_gp, *row_gp_xhat;              // pass 1: per-row sums, (N, C)
  const double *sum_gp, *sum_gp_xhat;        // pass 2: per-channel sums
  int64_t rows, C, L;
};

// Pass 1: grad_residual, the per-row sums of gp and gp * xhat, and grad_x = a * gp when the statistics are fixed.
template <bool kDrop, bool kRelu, typename scalar_t>
void backward_pass1(const BackwardArgs<scalar_t>& t, Dropout drop) {
  using acc_t = acc_of<scalar_t>;
  const acc_t scale = static_cast<acc_t>(drop.scale);
  at::parallel_for(0, t.rows, grain_rows(t.L), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % t.C, base = row * t.L;
      const acc_t m = t.mean[c], is = t.invstd[c], ac = t.a[c];
      double row_gp = 0, row_gp_xhat = 0;
      for_each_piece(base, t.L, drop, [&](int64_t off, int64_t len, const uint32_t* bits) {
        const scalar_t* g = t.grad + base + off;
        const scalar_t* xs = t.x + base + off;
        const scalar_t* ys = t.y + base + off;
        auto gu_of = [&](int64_t j) {
          const acc_t gj = static_cast<acc_t>(g[j]);
          return kRelu ? relu_grad_keep_nan(gj, static_cast<acc_t>(ys[j])) : gj;
        };
        auto gp_of = [&](int64_t j, acc_t gu) {
          if constexpr (kDrop) return gu * keep_factor(bits[j], drop.threshold, scale);
          return gu;
        };
        if (t.grad_residual) {
          scalar_t* gr = t.grad_residual + base + off;
          for (int64_t j = 0; j < len; ++j) gr[j] = static_cast<scalar_t>(gu_of(j));
        }
        if (t.grad_x) {  // fixed statistics only
          scalar_t* gx = t.grad_x + base + off;
          for (int64_t j = 0; j < len; ++j) gx[j] = static_cast<scalar_t>(gp_of(j, gu_of(j)) * ac);
        }
        if (t.row_gp) {
          acc_t s[kLanes] = {}, q[kLanes] = {};
          int64_t j = 0;
          for (; j + kLanes <= len; j += kLanes) {
            for (int k = 0; k < kLanes; ++k) {
              const acc_t gp = gp_of(j + k, gu_of(j + k));
              s[k] += gp;
              q[k] += gp * ((static_cast<acc_t>(xs[j + k]) - m) * is);
            }
          }
          for (; j < len; ++j) {
            const acc_t gp = gp_of(j, gu_of(j));
            s[0] += gp;
            q[0] += gp * ((static_cast<acc_t>(xs[j]) - m) * is);
          }
          for (int k = 0; k < kLanes; ++k) row_gp += s[k], row_gp_xhat += q[k];
        }
      });
      if (t.row_gp) t.row_gp[row] = row_gp, t.row_gp_xhat[row] = row_gp_xhat;
    }
  });
}

// Pass 2 (batch statistics): grad_x = a * (gp - sum_gp / n - xhat * sum_gp_xhat / n).
template <bool kDrop, bool kRelu, typename scalar_t>
void backward_pass2(const BackwardArgs<scalar_t>& t, Dropout drop) {
  using acc_t = acc_of<scalar_t>;
  const acc_t scale = static_cast<acc_t>(drop.scale);
  const double n = static_cast<double>(t.rows / t.C * t.L);
  at::parallel_for(0, t.rows, grain_rows(t.L), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % t.C, base = row * t.L;
      const acc_t m = t.mean[c], is = t.invstd[c], ac = t.a[c];
      const acc_t mean_gp = static_cast<acc_t>(t.sum_gp[c] / n);
      const acc_t mean_gp_xhat = static_cast<acc_t>(t.sum_gp_xhat[c] / n);
      for_each_piece(base, t.L, drop, [&](int64_t off, int64_t len, const uint32_t* bits) {
        const scalar_t* g = t.grad + base + off;
        const scalar_t* xs = t.x + base + off;
        const scalar_t* ys = t.y + base + off;
        scalar_t* gx = t.grad_x + base + off;
        for (int64_t j = 0; j < len; ++j) {
          acc_t gp = static_cast<acc_t>(g[j]);
          if constexpr (kRelu) gp = relu_grad_keep_nan(gp, static_cast<acc_t>(ys[j]));
          if constexpr (kDrop) gp *= keep_factor(bits[j], drop.threshold, scale);
          const acc_t xhat = (static_cast<acc_t>(xs[j]) - m) * is;
          gx[j] = static_cast<scalar_t>(ac * (gp - mean_gp - xhat * mean_gp_xhat));
        }
      });
    }
  });
}

// Calls fn(std::bool_constant<drop>, std::bool_constant<relu>) for the runtime flags.
template <typename F>
void with_flags(bool drop, bool relu, F&& fn) {
  using T = std::true_type;
  using F_ = std::false_type;
  if (drop) {
    relu ? fn(T{}, T{}) : fn(T{}, F_{});
  } else {
    relu ? fn(F_{}, T{}) : fn(F_{}, F_{});
  }
}

// ---------------------------------------------------------------------------------------------------- entries

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_epilogue_forward_kernel(
    const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& bias, const c10::optional<at::Tensor>& residual_,
    const c10::optional<at::Tensor>& stats_mean, const c10::optional<at::Tensor>& stats_var, const at::Tensor& seed,
    double eps, double p, bool relu) {
  check_bn_epilogue_args(x_, weight, bias, residual_, stats_mean, stats_var, seed, eps, p);
  TORCH_INTERNAL_ASSERT(x_.device().is_cpu());
  const at::Tensor x = x_.contiguous();
  const bool batch_stats = !stats_mean.has_value();
  const int64_t N = x.size(0), C = x.size(1), rows = N * C, L = rows > 0 ? x.numel() / rows : 0;
  at::Tensor mean, var;
  if (!batch_stats) {
    mean = stats_mean->contiguous();
    var = stats_var->contiguous();
  } else if (x.numel() == 0) {
    std::tie(mean, var) = bn_epilogue_batch_stats(x);  // NaN, as in the reference
  } else {
    mean = at::empty({C}, weight.options());
    var = at::empty({C}, weight.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_epilogue_stats_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      batch_stats_impl<scalar_t>(x.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                                 var.mutable_data_ptr<acc_t>(), N, C, L);
    });
  }
  // Per-channel scale with the reference's own ATen ops, so both round it the same way.
  const at::Tensor a = weight.mul(at::rsqrt(var.add(eps))).contiguous(), b = bias.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const at::Tensor residual = residual_.has_value() ? residual_->contiguous() : at::Tensor();
  if (x.numel() > 0) {
    const Dropout drop = make_dropout(seed, p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_epilogue_cpu", [&] {
      using acc_t = acc_of<scalar_t>;
      with_flags(drop.on, relu, [&](auto kDrop, auto kRelu) {
        forward_rows<decltype(kDrop)::value, decltype(kRelu)::value, scalar_t>(
            x.const_data_ptr<scalar_t>(), residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
            mean.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
            y.mutable_data_ptr<scalar_t>(), rows, C, L, drop);
      });
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
      BackwardArgs<scalar_t> t{grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                               y.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
                               invstd.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(),
                               need_x && !batch_stats ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                               need_r ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr,
                               need_sums ? row_gp.mutable_data_ptr<double>() : nullptr,
                               need_sums ? row_gp_xhat.mutable_data_ptr<double>() : nullptr,
                               nullptr, nullptr, rows, C, L};
      with_flags(drop.on, relu, [&](auto kDrop, auto kRelu) {
        backward_pass1<decltype(kDrop)::value, decltype(kRelu)::value, scalar_t>(t, drop);
      });
      if (need_sums) sum_gp = row_gp.sum(0), sum_gp_xhat = row_gp_xhat.sum(0);
      if (need_x && batch_stats) {
        t.grad_x = grad_x.mutable_data_ptr<scalar_t>();
        t.sum_gp = sum_gp.const_data_ptr<double>();
        t.sum_gp_xhat = sum_gp_xhat.const_data_ptr<double>();
        with_flags(drop.on, relu, [&](auto kDrop, auto kRelu) {
          backward_pass2<decltype(kDrop)::value, decltype(kRelu)::value, scalar_t>(t, drop);
        });
      }
    });
  } else if (need_sums) {
    sum_gp = row_gp.sum(0), sum_gp_xhat = row_gp_xhat.sum(0);
  }
  at::Tensor grad_weight = need_w ? sum_gp_xhat.to(weight.scalar_type()) : empty_acc;
  at::Tensor grad_bias = need_b ? sum_gp.to(weight.scalar_type()) : empty_acc.clone();
  return {grad_x, grad_weight, grad_bias, grad_residual};
}

// The mask of elements [start, start + numel) through for_each_piece and keep_factor, as the passes above.
at::Tensor bn_epilogue_dropout_keep_kernel(const at::Tensor& seed, int64_t start, int64_t numel, double p) {
  check_bn_epilogue_dropout_keep_args(seed, start, numel, p);
  TORCH_INTERNAL_ASSERT(seed.device().is_cpu());
  at::Tensor keep = at::empty({numel}, seed.options().dtype(at::kBool));
  bool* out = keep.mutable_data_ptr<bool>();
  const Dropout drop = make_dropout(seed, p);
  for_each_piece(start, numel, drop, [&](int64_t off, int64_t len, const uint32_t* bits) {
    for (int64_t j = 0; j < len; ++j) out[off + j] = !bits || keep_factor(bits[j], drop.threshold, 1.0f) != 0.0f;
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(skelemix, CPU, m) {
  m.impl("bn_epilogue", &bn_epilogue_forward_kernel);
  m.impl("_bn_epilogue_backward", &bn_epilogue_backward_kernel);
  m.impl("_bn_epilogue_dropout_keep", &bn_epilogue_dropout_keep_kernel);
}

}  // namespace skelemix
