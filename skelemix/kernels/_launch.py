"""What every launcher shares: tile sizes, CUDA's grid limit, and launching through ``wrap_triton``.

Under ``TRITON_INTERPRET=1`` the kernels run in Triton's CPU interpreter on CPU or CUDA tensors. There
``wrap_triton`` hands back the raw interpreted kernel, which needs real data: fake tensors (shape propagation,
``opcheck``, Dynamo) skip the launch, and functionalized tracing (AOTAutograd, i.e. ``torch.compile`` with a
backend other than ``"eager"``) raises, rather than silently compiling a graph without the kernel.
"""
from __future__ import annotations

import contextlib

import torch
import triton
from torch.library import wrap_triton

from .. import _extension

MAX_GRID_YZ = 65535  # CUDA's limit on the 2nd and 3rd grid dimensions


def tile(op: str, sizes: str, rows: int, cols: int, max_cols: int, rows_on_yz: bool = True) -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS, num_warps)`` for ``rows`` rows of ``cols`` contiguous elements: a tile of at most
    4096 elements, as wide along the contiguous columns as they go, up to ``max_cols`` (coalesced loads). The
    column blocks (and, with ``rows_on_yz``, the row blocks) go on grid axes 1 and 2, where CUDA allows 65535
    programs: more raise, naming ``op`` and its ``sizes``."""
    block_cols = min(max(triton.next_power_of_2(cols), 16), max_cols)
    block_rows = min(max(triton.next_power_of_2(rows), 1), max(4096 // block_cols, 1))
    programs = [triton.cdiv(cols, block_cols)] + ([triton.cdiv(rows, block_rows)] if rows_on_yz else [])
    if max(programs) > MAX_GRID_YZ:
        raise ValueError(f"{op} (triton): {sizes} need more than {MAX_GRID_YZ} programs along one grid dimension; "
                         "use impl='eager' or 'cuda'")
    return block_rows, block_cols, 8 if block_rows * block_cols >= 4096 else 4


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the buffer a kernel writes a ``dtype`` result into. Triton's interpreter (3.8) rounds fp32 -> bf16
    toward zero, where GPUs round to nearest even: under it, bf16 results go to an fp32 buffer that torch
    rounds (``.to(dtype)``, a no-op otherwise)."""
    return torch.float32 if dtype == torch.bfloat16 and _extension.triton_interpret() else dtype


def _no_data(tensors: list[torch.Tensor]) -> bool:
    """True when the launch must be skipped: interpreted kernels read real memory, which fake tensors lack."""
    if not _extension.triton_interpret():
        return False  # compiled kernels: wrap_triton traces them
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if any(isinstance(t, FunctionalTensor) for t in tensors):
        raise RuntimeError(
            "skelemix triton ops cannot be traced by AOTAutograd under TRITON_INTERPRET=1 (wrap_triton passes "
            "interpreted kernels through untraced); use torch.compile(backend='eager') or a GPU without "
            "TRITON_INTERPRET")
    return any(isinstance(t, FakeTensor) for t in tensors)


def launch(kernel, grid, *args, **meta) -> None:
    """``wrap_triton(kernel)[grid](*args, **meta)`` inside the device context of the first tensor argument (the
    current CUDA device picks the stream); skipped on fake tensors under the interpreter."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if _no_data(tensors):
        return
    device = tensors[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        wrap_triton(kernel)[grid](*args, **meta)
