"""graph_conv at the distinct graph convolutions of the paper's ST-GCN encoder (hidden 16, out 256, K=3, V=25,
T=64 input frames; the ten layers have seven distinct shapes), forward and forward+backward (all four
gradients, as in training: the edge importance is trained), per provider. The whole encoder is in
bench_model.py.

Batch: ``bench.common.BATCH`` samples of 2 bodies (16 on the CPU, 128 on a GPU). The torch.compile provider
is marked ``slow`` (deselect with ``-m "not slow"``, or set SKELEMIX_BENCH_COMPILE=0): its cold compile takes
minutes on a CPU.
"""
import pytest
import torch

from bench.common import BATCH, DEVICE, measure, numbytes, skip_unless_provider
from skelemix import ops, reference
from skelemix.models.stgcn import STGCN

FRAMES, M = 64, 2
PROVIDERS = ["eager", pytest.param("compile", marks=pytest.mark.slow), "cpp", "cuda", "triton"]
_COMPILED = torch.compile(reference.graph_conv)  # one compiled function: later shapes reuse its cache


def layer_shapes(frames: int = FRAMES):
    """(C_in, C_out, T, K, V) of each block's graph convolution, read off the encoder (stride is in the tcn,
    after the graph conv, so a block's graph conv sees its input's T)."""
    model = STGCN(hidden_channels=16, hidden_dim=256)
    K, V = model.A.shape[0], model.A.shape[1]
    shapes, t = [], frames
    for block in model.blocks:
        shape = (block.gcn.conv.in_channels, block.gcn.conv.out_channels // K, t, K, V)
        if shape not in shapes:
            shapes.append(shape)
        t = -(-t // block.stride)
    return shapes


LAYERS = layer_shapes()


def _fn(provider):
    if provider == "compile":
        return _COMPILED
    impl = "eager" if provider == "eager" else provider

    def fn(x, weight, bias, A):
        return ops.graph_conv(x, weight, bias, A, impl=impl)
    return fn


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("layer", range(len(LAYERS)), ids=[f"{ci}-{co}xT{t}" for ci, co, t, _, _ in LAYERS])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_graph_conv(benchmark, provider, layer, mode):
    skip_unless_provider(provider, "graph_conv")
    c_in, c_out, T, K, V = LAYERS[layer]
    B = BATCH * M
    backward = mode == "fwd+bwd"
    x = torch.randn(B, c_in, T, V, device=DEVICE, requires_grad=backward)
    weight = (torch.randn(K * c_out, c_in, device=DEVICE) * 0.1).requires_grad_(backward)
    bias = torch.randn(K * c_out, device=DEVICE).requires_grad_(backward)
    A = (torch.rand(K, V, V, device=DEVICE) / V).requires_grad_(backward)
    grad = torch.randn(B, c_out, T, V, device=DEVICE)
    fn = _fn(provider)
    inputs = (x, weight, bias, A)

    if backward:
        def step():
            for t in inputs:
                t.grad = None
            fn(*inputs).backward(grad)
    else:
        def step():
            with torch.no_grad():
                fn(*inputs)

    # The eager op's arithmetic (1x1 conv to K*C_out channels, then the K (V x V) products); backward = 2x.
    flops = 2 * B * T * V * K * c_out * (c_in + V) * (3 if backward else 1)
    y_bytes = B * c_out * T * V * 4
    traffic = numbytes(x, weight, bias, A) + y_bytes + (numbytes(x, weight, bias, A) + 2 * y_bytes if backward else 0)
    measure(benchmark, step, group=f"op/graph_conv {c_in}->{c_out} T={T} {mode}", provider=provider,
            shapes={"x": list(x.shape), "weight": list(weight.shape), "A": list(A.shape)}, bytes=traffic,
            flops=flops)


# Triton's launch settings on a GPU: the fixed forward config used everywhere but here against autotuning over
# _fwd_configs(), and the gradient reductions' programs per SM (4 is about the 512 programs of the first
# version on an H100), fwd+bwd at the widest and at the longest layer.
TRITON_SETTINGS = [("fixed", 8), ("autotuned", 8), ("fixed", 4), ("fixed", 16)]


@pytest.mark.parametrize("config, per_sm", TRITON_SETTINGS, ids=[f"{c}-{n}_per_sm" for c, n in TRITON_SETTINGS])
@pytest.mark.parametrize("layer", [len(LAYERS) - 1, 1], ids=lambda i: f"{LAYERS[i][0]}-{LAYERS[i][1]}xT{LAYERS[i][2]}")
def test_graph_conv_triton_settings(benchmark, monkeypatch, layer, config, per_sm):
    skip_unless_provider("triton", "graph_conv")
    from skelemix.kernels import graph_conv as kernels

    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "1" if config == "autotuned" else "0")
    monkeypatch.setattr(kernels, "REDUCTION_PROGRAMS_PER_SM", per_sm)
    c_in, c_out, T, K, V = LAYERS[layer]
    B = BATCH * M
    inputs = (torch.randn(B, c_in, T, V, device=DEVICE, requires_grad=True),
              (torch.randn(K * c_out, c_in, device=DEVICE) * 0.1).requires_grad_(),
              torch.randn(K * c_out, device=DEVICE).requires_grad_(),
              (torch.rand(K, V, V, device=DEVICE) / V).requires_grad_())
    grad = torch.randn(B, c_out, T, V, device=DEVICE)

    def step():
        for t in inputs:
            t.grad = None
        ops.graph_conv(*inputs, impl="triton").backward(grad)

    measure(benchmark, step, group=f"op/graph_conv triton settings {c_in}->{c_out} T={T} fwd+bwd",
            provider=f"triton {config} {per_sm}/SM", shapes={"x": list(inputs[0].shape)},
            flops=2 * B * T * V * K * c_out * (c_in + V) * 3)
