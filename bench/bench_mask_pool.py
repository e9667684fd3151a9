"""mask_pool forward+backward at the encoder's last feature map: (2N, 256, T/4, 25), a mask per sample."""
import pytest
import torch

from bench.common import BATCH, DEVICE, measure, numbytes, skip_unless_provider
from skelemix import ops, reference


@pytest.mark.parametrize("provider", ["eager", "compile", "cpp", "cuda", "triton"])
def test_mask_pool_fwd_bwd(benchmark, provider):
    skip_unless_provider(provider, "mask_pool")
    N, C, T, V = BATCH, 256, 16, 25
    x = torch.randn(2 * N, C, T, V, device=DEVICE, requires_grad=True)
    mask = torch.rand(N, T, V, device=DEVICE) < 0.3
    grad = torch.randn(2 * N, 2, C, device=DEVICE)
    if provider == "compile":
        fn = torch.compile(reference.mask_pool)
    else:
        def fn(x, mask, impl="eager" if provider == "eager" else provider):
            return ops.mask_pool(x, mask, impl=impl)

    def step():
        x.grad = None
        fn(x, mask).backward(grad)

    measure(benchmark, step, group="op/mask_pool fwd+bwd", provider=provider,
            shapes={"x": list(x.shape), "mask": list(mask.shape)}, bytes=2 * numbytes(x) + numbytes(mask, grad))
