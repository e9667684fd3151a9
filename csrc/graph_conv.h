// skelemix::graph_conv: the ST-GCN spatial graph convolution (1x1 conv to K*C_out channels, then the K
// adjacency matrices) as one op that never writes the (N, K*C_out, T, V) intermediate.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace skelemix {

// Caller-error checks with readable messages, run by every backend before touching data.
void check_graph_conv_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& A);
void check_graph_conv_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias, const at::Tensor& A);

// Contraction order of the forward. A first costs K*T*V*C_in*(V + C_out) flops, the weight first
// K*T*V*C_out*(C_in + V): A first wins when C_in < C_out (and ties, where its intermediate is no larger).
inline bool graph_conv_a_first(int64_t c_in, int64_t c_out) { return c_in <= c_out; }

// The bias after aggregation: bias_term[c, w] = sum_k bias[k*C_out + c] * sum_v A[k, v, w], (C_out, V).
at::Tensor graph_conv_bias_term(const at::Tensor& bias, const at::Tensor& A);

// The gradients that only need G[c, w] = sum_{n,t} grad[n, c, t, w] (C_out, V):
// grad_bias[k*C_out + c] = sum_w G[c, w] * sum_v A[k, v, w], and the bias part of grad_A,
// grad_A[k, v, w] += sum_c bias[k*C_out + c] * G[c, w] (the same for every v).
at::Tensor graph_conv_grad_bias(const at::Tensor& G, const at::Tensor& A);
void graph_conv_add_bias_grad_A(at::Tensor& grad_A, const at::Tensor& G, const at::Tensor& bias);

// weight (K*C_out, C_in) <-> W' (C_out, K*C_in) with W'[c, k*C_in + i] = weight[k*C_out + c, i]: the
// weight as one matrix against the A-first intermediate xa[k*C_in + i, (t, w)].
at::Tensor graph_conv_weight_to_wide(const at::Tensor& weight, int64_t K);
at::Tensor graph_conv_weight_from_wide(const at::Tensor& wide, int64_t K);

// An empty (0,) tensor stands for a gradient that output_mask did not ask for (or for the bias gradient when
// there is no bias): the backward op returns four tensors either way.
at::Tensor graph_conv_no_grad(const at::Tensor& like);

}  // namespace skelemix
