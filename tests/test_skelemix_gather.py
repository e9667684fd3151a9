"""skelemix.ops.skelemix_gather: every implementation against the eager reference, its PT2 surface, errors and
impl selection.

The op is a copy, so every comparison is exact (bit-for-bit), in every dtype.
"""
import importlib

import pytest
import torch

from skelemix import _extension, reference
from skelemix.ops import skelemix_gather
from skelemix.testing import (DTYPES, assert_bitwise_equal, compile_backend, impl_cases, opcheck, poison_allocator,
                              raw_ops, sample_inputs_skelemix_gather)

gather_module = importlib.import_module("skelemix.ops.skelemix_gather")  # the attribute is the function
WITH_EAGER = [pytest.param("eager", "cpu", id="eager")] + impl_cases()


def on(device, args):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def check_against_reference(args, impl, name):
    x, partner = args[0], args[1]
    poison_allocator(partner.numel() * x.shape[1:].numel(), x.dtype, x.device)
    mixed, mask = skelemix_gather(*args, impl=impl)
    expected_mixed, expected_mask = reference.skelemix_gather(*args)
    assert mixed.is_contiguous() and mask.is_contiguous(), name
    assert_bitwise_equal(mixed, expected_mixed, f"{name} mixed")
    assert_bitwise_equal(mask, expected_mask, f"{name} mask")


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("impl, device, dtype", impl_cases(dtypes=DTYPES, triton_float64=True))
def test_forward_matches_reference(impl, device, dtype):
    for name, args in sample_inputs_skelemix_gather(device, dtype):
        check_against_reference(args, impl, name)


@pytest.mark.needs_impl("cpp")
def test_cpu_threads_split_the_rows():
    """Large enough for at::parallel_for to split the (r, n, c) rows between threads (64k elements a task)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(8, 3, 32, 25, 2)
        partner = torch.randint(0, 8, (3, 8))
        joints, span = torch.rand(3, 8, 25) < 0.5, torch.tensor([2, 6]).repeat(3, 8, 1)
        check_against_reference((x, partner, joints, span, 4), "cpp", "two threads")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("impl, device", impl_cases())
def test_copies_bits_exactly(impl, device):
    """NaN payloads, -0 and infinities pass through unchanged: the kernels move raw bits."""
    for dtype in DTYPES:
        x = torch.randn(3, 2, 6, 25, 2, device=device, dtype=dtype)
        bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
        bits[0, 0, :2] = 0x7C01 if x.element_size() == 2 else 0x7FC00123  # NaNs with a payload
        x[1, 1, 2:4] = -0.0
        x[2, 0, 4:] = float("-inf")
        partner = torch.tensor([[1, 2, 0], [2, 0, 1]], device=device)
        joints = torch.rand(2, 1, 25, device=device) < 0.5
        span = torch.tensor([[[0, 3]], [[1, 2]]], device=device)
        mixed, _ = skelemix_gather(x, partner, joints, span, 2, impl=impl)
        expected, _ = reference.skelemix_gather(x, partner, joints, span, 2)
        assert_bitwise_equal(mixed, expected, str(dtype))


@pytest.mark.parametrize("impl, device", WITH_EAGER)
def test_semantics_on_a_hand_made_example(impl, device):
    """The reference and the kernels against the definition, element by element: T=5 is not a multiple of
    block=2, so the last block (frame 4) is partial; sample 1 has an empty span."""
    N, C, T, V, M, block = 3, 2, 5, 4, 2, 2
    x = torch.arange(N * C * T * V * M, dtype=torch.float32).reshape(N, C, T, V, M)
    partner = torch.tensor([[2, 0, 1], [1, 1, 0]])
    joints = torch.tensor([[True, False, False, True], [False, True, True, False],
                           [True, True, True, True], [False, False, True, False],
                           [True, False, True, False], [False, True, False, True]]).reshape(2, 3, V)
    span = torch.tensor([[[1, 3], [2, 2], [0, 1]], [[0, 3], [2, 3], [0, 0]]])
    expected = torch.empty(2 * N, C, T, V, M)
    expected_mask = torch.empty(2, N, 3, V, dtype=torch.bool)
    for r in range(2):
        for n in range(N):
            start, end = span[r, n].tolist()
            for t in range(T):
                for v in range(V):
                    pasted = bool(joints[r, n, v]) and start <= t // block < end
                    expected[r * N + n, :, t, v] = x[partner[r, n] if pasted else n, :, t, v]
            for b in range(3):
                expected_mask[r, n, b] = joints[r, n] & (start <= b < end)
    mixed, mask = skelemix_gather(*on(device, (x, partner, joints, span, block)), impl=impl)
    assert torch.equal(mixed.cpu(), expected), impl
    assert torch.equal(mask.cpu(), expected_mask), impl


@pytest.mark.parametrize("impl, device", WITH_EAGER)
def test_g1_shorthand(impl, device):
    x, partner, joints, span, block = sample_inputs_skelemix_gather(device)[1].args  # G == 1
    full = skelemix_gather(x, partner, joints, span, block, impl=impl)
    short = skelemix_gather(x, partner, joints[:, 0], span[:, 0], block, impl=impl)
    assert torch.equal(full[0], short[0]) and torch.equal(full[1], short[1])


@pytest.mark.parametrize("impl, device", impl_cases(devices=("cuda",)))
def test_runs_on_current_stream(impl, device):
    """The kernel must run on the current stream (extension-cpp's reduce-overhead bug)."""
    x, partner, joints, span, block = sample_inputs_skelemix_gather(device)[0].args
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        big = x.repeat(256, 1, 1, 1, 1)  # queue work first, so a kernel on the wrong stream reads too early
        p = partner.repeat(1, 256) + torch.arange(256, device=device).repeat_interleave(x.shape[0]) * x.shape[0]
        mixed, mask = skelemix_gather(big, p, joints, span, block, impl=impl)
    stream.synchronize()
    expected = reference.skelemix_gather(big, p, joints, span, block)
    assert torch.equal(mixed, expected[0]) and torch.equal(mask, expected[1])


# ---------------------------------------------------------------------------------------------- PT2 and autograd


@pytest.mark.parametrize("impl, device", impl_cases())
def test_opcheck(impl, device):
    op, = raw_ops(impl, "skelemix_gather")
    for name, args in sample_inputs_skelemix_gather(device, torch.float32):
        opcheck(op.default, args)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("impl, device", WITH_EAGER)
def test_compile_fullgraph(impl, device, dynamic):
    def fn(x, partner, joints, span):
        mixed, mask = skelemix_gather(x, partner, joints, span, 4, impl=impl)
        return mixed * 2, mask.sum()

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend(impl), dynamic=dynamic)
    for name, (x, partner, joints, span, block) in sample_inputs_skelemix_gather(device)[:2]:
        assert block == 4
        actual, expected = compiled(x, partner, joints, span), fn(x, partner, joints, span)
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1]), name


@pytest.mark.needs_impl("cpp")
def test_backward_through_the_cpp_op_raises():
    x, partner, joints, span, block = sample_inputs_skelemix_gather()[0].args
    mixed, _ = skelemix_gather(x.requires_grad_(), partner, joints, span, block, impl="cpp")
    with pytest.raises(RuntimeError, match="skelemix_gather has no backward"):
        mixed.sum().backward()
    with torch.no_grad():
        assert not skelemix_gather(x, partner, joints, span, block, impl="cpp")[0].requires_grad


# -------------------------------------------------------------------------------------------------- errors


def args_with(**changes):
    """Valid arguments (N=4, T=16, V=25, block 4, R=2, G=1) with some replaced."""
    args = dict(x=torch.randn(4, 3, 16, 25, 2), partner=torch.tensor([[1, 2, 3, 0], [3, 0, 1, 2]]),
                joints=torch.rand(2, 1, 25) < 0.5, span=torch.tensor([[[0, 4]], [[1, 3]]]), block=4)
    args.update(changes)
    return tuple(args.values())


BAD_SHAPES = [
    pytest.param(dict(x=torch.randn(4, 3, 16, 25)), ValueError, r"x must be 5-D \(N, C, T, V, M\); got shape "
                 r"\[4, 3, 16, 25\]", id="x_4d"),
    pytest.param(dict(x=torch.ones(4, 3, 16, 25, 2, dtype=torch.int32)), TypeError,
                 r"x must be floating point .*; got (torch\.int32|Int)", id="x_int"),
    pytest.param(dict(partner=torch.tensor([1, 2, 3, 0])), ValueError, r"partner must be 2-D \(R, N\); got shape "
                 r"\[4\]", id="partner_1d"),
    pytest.param(dict(partner=torch.tensor([[1, 2, 3, 0], [3, 0, 1, 2]], dtype=torch.int32)), TypeError,
                 r"partner must be an int64 tensor; got (torch\.int32|Int)", id="partner_int32"),
    pytest.param(dict(partner=torch.tensor([[1, 2, 0], [2, 0, 1]])), ValueError,
                 r"partner must have shape \(R, N\) with N=4 \(the batch size of x\); got shape \[2, 3\]",
                 id="partner_wrong_n"),
    pytest.param(dict(joints=torch.ones(2, 1, 25, 1, dtype=torch.bool)), ValueError,
                 r"joints must be 3-D \(R, G, V\); got shape \[2, 1, 25, 1\]", id="joints_4d"),
    pytest.param(dict(joints=torch.ones(2, 1, 25)), TypeError, r"joints must be a bool tensor; got "
                 r"(torch\.float32|Float)", id="joints_float"),
    pytest.param(dict(joints=torch.ones(2, 1, 20, dtype=torch.bool)), ValueError,
                 r"joints must have shape \(R, G, V\) = \(2, G, 25\) to match partner and x; got shape \[2, 1, 20\]",
                 id="joints_wrong_v"),
    pytest.param(dict(joints=torch.ones(3, 1, 25, dtype=torch.bool)), ValueError,
                 r"joints must have shape \(R, G, V\) = \(2, G, 25\) .*; got shape \[3, 1, 25\]", id="joints_wrong_r"),
    pytest.param(dict(joints=torch.ones(2, 2, 25, dtype=torch.bool), span=torch.zeros(2, 2, 2, dtype=torch.long)),
                 ValueError, r"joints has G=2 groups; G must be 1 \(one region for the batch\) or N=4 \(one per "
                 r"sample\)", id="g_not_1_or_n"),
    pytest.param(dict(span=torch.zeros(2, 1, 3, dtype=torch.long)), ValueError,
                 r"span must have shape \(R, G, 2\) = \(2, 1, 2\) to match joints; got shape \[2, 1, 3\]",
                 id="span_not_pairs"),
    pytest.param(dict(span=torch.zeros(2, 4, 2, dtype=torch.long)), ValueError,
                 r"span must have shape \(R, G, 2\) = \(2, 1, 2\) to match joints; got shape \[2, 4, 2\]",
                 id="span_wrong_g"),
    pytest.param(dict(span=torch.zeros(2, 1, 2)), TypeError, r"span must be an int64 tensor; got "
                 r"(torch\.float32|Float)", id="span_float"),
    pytest.param(dict(span=torch.zeros(2, 1, 2, 1, dtype=torch.long)), ValueError,
                 r"span must be 3-D \(R, G, 2\); got shape \[2, 1, 2, 1\]", id="span_4d"),
    pytest.param(dict(block=0), ValueError, r"block must be >= 1; got 0", id="block_0"),
    pytest.param(dict(joints=torch.ones(2, 1, 25, dtype=torch.bool, device="meta")), ValueError,
                 r"x and joints must be on the same device; got x on cpu and joints on meta", id="mixed_devices"),
]

BAD_VALUES = [
    pytest.param(dict(partner=torch.tensor([[1, 2, 3, 0], [3, 4, 1, 2]])),
                 r"partner must hold sample indices in \[0, N=4\); got partner\[1, 1\] = 4", id="partner_too_big"),
    pytest.param(dict(partner=torch.tensor([[1, -1, 3, 0], [3, 0, 1, 2]])),
                 r"partner must hold sample indices in \[0, N=4\); got partner\[0, 1\] = -1", id="partner_negative"),
    pytest.param(dict(span=torch.tensor([[[0, 4]], [[1, 5]]])),
                 r"span must hold block ranges \[start, end\) with 0 <= start <= end <= ceil\(T / block\) = 4 "
                 r"\(T=16, block=4\); got span\[1, 0\] = \[1, 5\]", id="span_past_the_end"),
    pytest.param(dict(span=torch.tensor([[[-1, 2]], [[1, 3]]])), r"got span\[0, 0\] = \[-1, 2\]",
                 id="span_negative"),
    pytest.param(dict(span=torch.tensor([[[0, 4]], [[3, 1]]])), r"got span\[1, 0\] = \[3, 1\]", id="span_reversed"),
    pytest.param(dict(x=torch.randn(4, 3, 15, 25, 2), span=torch.tensor([[[0, 4]], [[1, 5]]])),
                 r"ceil\(T / block\) = 4 \(T=15, block=4\); got span\[1, 0\] = \[1, 5\]", id="span_partial_block"),
]
# On the host: the wrapper checks eager's and Triton's values, the C++ CPU kernel its own.
HOST = [pytest.param("eager", "cpu", id="eager")] + impl_cases(("cpp", "triton"), devices=("cpu",))


@pytest.mark.parametrize("changes, exc, match", BAD_SHAPES)
def test_wrapper_errors(changes, exc, match):
    with pytest.raises(exc, match=r"skelemix\.ops\.skelemix_gather: " + match):
        skelemix_gather(*args_with(**changes))


@pytest.mark.parametrize("changes, exc, match", BAD_SHAPES)
@pytest.mark.parametrize("impl, device", impl_cases(("cpp", "triton"), devices=("cpu",)))
def test_raw_op_errors(impl, device, changes, exc, match):
    # The CPU kernel or, for meta inputs, the fake kernel raises; the Triton op checks in its body. Both prefix
    # the op name.
    op, = raw_ops(impl, "skelemix_gather")
    with pytest.raises(RuntimeError, match=f"{op.default.name()}: " + match):
        op(*args_with(**changes))


@pytest.mark.parametrize("changes, match", BAD_VALUES)
@pytest.mark.parametrize("impl, device", HOST)
def test_value_errors(impl, device, changes, match):
    # eager and triton: checked by the wrapper; cpp: by the kernel (raw op, prefix skelemix::skelemix_gather).
    prefix = r"skelemix::skelemix_gather: " if impl == "cpp" else r"skelemix\.ops\.skelemix_gather: "
    with pytest.raises(ValueError, match=prefix + ".*" + match):
        skelemix_gather(*args_with(**changes), impl=impl)


@pytest.mark.needs_cuda
@pytest.mark.needs_impl("cuda")
@pytest.mark.parametrize("changes, match", BAD_VALUES[:3])
def test_value_errors_cuda(changes, match):
    args = on("cuda", args_with(**changes))
    with pytest.raises(ValueError, match=r"skelemix::skelemix_gather: .*" + match):
        torch.ops.skelemix.skelemix_gather(*args)
    torch.cuda.synchronize()  # the context is still usable: no device-side assert fired


@pytest.mark.parametrize("impl, device", [pytest.param("eager", "cpu", id="eager")] + impl_cases(("cpp",)))
def test_cpu_checks_values_even_when_told_not_to(impl, device):
    """check_values=False skips what would synchronise with a GPU; on the host checking is free (and eager's
    indexing needs it), so a bad partner still raises."""
    changes, match = BAD_VALUES[0].values
    with pytest.raises(ValueError, match=match):
        skelemix_gather(*args_with(**changes), impl=impl, check_values=False)
    for name, args in sample_inputs_skelemix_gather():
        checked = skelemix_gather(*args, impl=impl)
        for got, want in zip(skelemix_gather(*args, impl=impl, check_values=False), checked):
            assert_bitwise_equal(got, want, f"{name} unchecked")


@pytest.mark.parametrize("impl, device", [pytest.param("eager", "cuda", marks=pytest.mark.needs_cuda, id="eager-cuda")]
                         + impl_cases(("cuda", "triton"), devices=("cuda",)))
def test_unchecked_values_do_not_synchronise(impl, device):
    """check_values=False (SkeleMix's own valid draws, the captured training step): no host synchronisation, which
    the checked call needs, in every implementation."""
    x, partner, joints, span, block = on(device, args_with())
    want = skelemix_gather(x, partner, joints, span, block, impl=impl)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = skelemix_gather(x, partner, joints, span, block, impl=impl, check_values=False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            skelemix_gather(x, partner, joints, span, block, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for g, w in zip(got, want):
        assert_bitwise_equal(g, w, "unchecked")


@pytest.mark.parametrize("impl, device", impl_cases(("cuda", "triton")))
def test_unchecked_bad_partner_copies_the_sample_itself(impl, device):
    """With check_values=False an invalid partner makes the kernels copy the sample itself instead of reading
    outside x; the checked call still raises."""
    x, partner, joints, span, block = on(device, args_with())
    bad = partner.clone()
    bad[0, 1], bad[1, 2] = 4, -7
    mixed, mask = skelemix_gather(x, bad, joints, span, block, impl=impl, check_values=False)
    fixed = bad.clone()
    fixed[0, 1], fixed[1, 2] = 1, 2  # the samples themselves
    want_mixed, want_mask = reference.skelemix_gather(x, fixed, joints, span, block)
    assert_bitwise_equal(mixed, want_mixed, "bad partner")
    assert_bitwise_equal(mask, want_mask, "bad partner mask")
    with pytest.raises(ValueError, match="partner must hold sample indices"):
        skelemix_gather(x, bad, joints, span, block, impl=impl)


def test_non_tensor_arguments():
    x, partner, joints, span, block = args_with()
    with pytest.raises(TypeError, match="x, partner, joints and span must be tensors; got Tensor, list"):
        skelemix_gather(x, partner.tolist(), joints, span, block)


@pytest.mark.needs_triton
def test_launch_settings_are_pure_and_bounded():
    from skelemix.kernels import skelemix_gather as kernels

    assert kernels.settings(3 * 64, 25 * 2) == (64, 64, 8)  # (BLOCK_ROW, BLOCK_COL, num_warps)
    with pytest.raises(ValueError, match="skelemix_gather .* more than 65535 programs"):
        kernels.settings(1 << 30, 50)


# ----------------------------------------------------------------------------------------- impl selection


def test_impl_triton_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors need Triton's interpreter
    with pytest.raises((NotImplementedError, RuntimeError, ValueError), match=r"impl='triton'"):
        skelemix_gather(*args_with(), impl="triton")


def test_impl_cuda_on_cpu_raises():
    with pytest.raises((RuntimeError, ValueError), match=r"impl='cuda'"):
        skelemix_gather(*args_with(), impl="cuda")


def test_auto_on_cpu_picks_cpp_when_built():
    from skelemix.ops._impl import select

    chosen = select("skelemix_gather", "auto", torch.device("cpu"), gather_module._IMPLEMENTATIONS)
    expected = "cpp" if _extension.HAS_CPP else "eager"
    assert chosen is gather_module._IMPLEMENTATIONS[expected]
