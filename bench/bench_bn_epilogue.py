"""The block epilogue forward+backward: BatchNorm (batch statistics), dropout 0.5, residual add and ReLU at the
last block's feature map (2N, 256, T/4, 25). ``eager`` is the module sequence it replaces (nn.BatchNorm2d,
F.dropout, add, ReLU); the fused providers run skelemix.ops.bn_epilogue."""
import pytest
import torch
import torch.nn.functional as F

from bench.common import BATCH, DEVICE, measure, numbytes, skip_unless_provider
from skelemix import ops


def modules(x, residual, weight, bias, running_mean, running_var):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    return torch.relu(F.dropout(y, 0.5, training=True) + residual)


@pytest.mark.parametrize("provider", ["eager", "compile", "cpp", "cuda", "triton"])
def test_bn_epilogue_fwd_bwd(benchmark, provider):
    skip_unless_provider(provider, "bn_epilogue")
    N, C, T, V = BATCH, 256, 16, 25
    x = torch.randn(2 * N, C, T, V, device=DEVICE, requires_grad=True)
    residual = torch.randn(2 * N, C, T, V, device=DEVICE, requires_grad=True)
    weight = torch.rand(C, device=DEVICE, requires_grad=True)
    bias = torch.randn(C, device=DEVICE, requires_grad=True)
    stats = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    grad = torch.randn_like(x)
    if provider in ("eager", "compile"):
        fn = torch.compile(modules) if provider == "compile" else modules

        def call():
            return fn(x, residual, weight, bias, *stats)
    else:
        def call():
            return ops.bn_epilogue(x, weight, bias, residual, p=0.5, impl=provider)[0]

    def step():
        x.grad = residual.grad = weight.grad = bias.grad = None
        call().backward(grad)

    # Ideal traffic: forward reads x and residual, writes y; backward reads grad, x and y twice (statistics
    # gradient, then grad_x) and writes grad_residual and grad_x.
    measure(benchmark, step, group="op/bn_epilogue fwd+bwd", provider=provider,
            shapes={"x": list(x.shape), "p": 0.5}, bytes=11 * numbytes(x))
