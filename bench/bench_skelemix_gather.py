"""skelemix_gather: the R = 3 mixed batches of a SkeleMixCLR+ view in one call, at the paper's batch (128 x 3
x 64 x 25 x 2, block 4), with one region for the batch (the official draw) and one per sample. Forward only.

GB/s counts one read of x per output element plus the output and mask writes (the index inputs are
negligible).
"""
import pytest
import torch

from bench.common import DEVICE, measure, skip_unless_provider
from skelemix import ops, reference

N, C, T, V, M, R, BLOCK = 128, 3, 64, 25, 2, 3, 4
_COMPILED = torch.compile(reference.skelemix_gather)


def make_inputs(per_sample: bool):
    g = torch.Generator().manual_seed(0)
    blocks, G = T // BLOCK, N if per_sample else 1
    x = torch.randn(N, C, T, V, M, generator=g)
    partner = (torch.arange(N) + torch.randint(1, N, (R, 1), generator=g)) % N
    joints = torch.rand(R, G, V, generator=g) < 0.5
    length = torch.randint(7, 12, (R, G), generator=g)
    start = (torch.rand(R, G, generator=g) * (blocks - length + 1)).long()
    span = torch.stack((start, start + length), dim=-1)
    return [t.to(DEVICE) for t in (x, partner, joints, span)]


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared-region", "per-sample"])
@pytest.mark.parametrize("provider", ["eager", "compile", "cpp", "cuda", "triton"])
def test_skelemix_gather(benchmark, provider, per_sample):
    skip_unless_provider(provider, "skelemix_gather")
    x, partner, joints, span = make_inputs(per_sample)
    if provider == "eager":  # the oracle itself, as SkeleMix ran before the kernels
        def run():
            return reference.skelemix_gather(x, partner, joints, span, BLOCK)
    elif provider == "compile":
        def run():
            return _COMPILED(x, partner, joints, span, BLOCK)
    else:
        def run():
            return ops.skelemix_gather(x, partner, joints, span, BLOCK, impl=provider)
    mixed, mask = run()
    expected = reference.skelemix_gather(x, partner, joints, span, BLOCK)
    assert torch.equal(mixed, expected[0]) and torch.equal(mask, expected[1])
    measure(benchmark, run, group=f"op/skelemix_gather R={R} {'per-sample' if per_sample else 'shared'} region",
            provider=provider, shapes={"x": list(x.shape), "R": R, "block": BLOCK},
            bytes=2 * mixed.numel() * mixed.element_size() + mask.numel())
