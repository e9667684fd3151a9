"""The machine's measured ceilings, for the physical floor in the report: copy bandwidth and matmul rate."""
import pytest
import torch

from bench.common import DEVICE, measure


def test_copy_bandwidth(benchmark):
    n = 256 * 2**20 // 4  # float32 elements: 256 MiB, far beyond any cache
    src, dst = torch.randn(n, device=DEVICE), torch.empty(n, device=DEVICE)
    measure(benchmark, lambda: dst.copy_(src), group="machine/copy", provider="eager", shapes={"numel": n},
            bytes=2 * src.numel() * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matmul_rate(benchmark, dtype):
    if DEVICE.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 matmul is not a fast path on this CPU")
    n = 8192 if DEVICE.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=DEVICE, dtype=dtype), torch.randn(n, n, device=DEVICE, dtype=dtype)
    measure(benchmark, lambda: a @ b, group=f"machine/matmul-{str(dtype)[6:]}", provider="eager",
            shapes={"n": n}, dtype=dtype, flops=2 * n**3)
